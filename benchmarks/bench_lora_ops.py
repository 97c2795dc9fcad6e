"""Multi-adapter LoRA delta: lora_fast against a PEFT-style loop, a torch loop and the reference.

    python -m benchmarks.bench_lora_ops            # CPU sweep, one thread, results/ JSON + Markdown
    python -m benchmarks.bench_lora_ops --quick    # tiny shapes (CI smoke test)

Every variant computes ``y += scale[a] * (x @ A[a]^T) @ B[a]^T`` for each token's adapter a, with
tokens assigned to L adapters at random (interleaved order). Times are medians of
torch.utils.benchmark blocked autoranges, all variants in one process; compare the ratios.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import lora_fast
from benchmarks import common

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_problem(T: int, L: int, d: int, r: int, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen).to(dtype)
    A = (torch.randn(L, r, d, generator=gen) / d**0.5).to(dtype)
    B = (torch.randn(L, d, r, generator=gen) / r**0.5).to(dtype)
    scales = torch.rand(L, generator=gen) + 0.5
    adapter_ids = torch.randint(0, L, (T,), generator=gen)
    return {"x": x, "A": A, "B": B, "scales": scales, "adapter_ids": adapter_ids}


def peft_style_loop(p: dict):
    """PEFT's mixed-batch LoRA path (LoraLayer._mixed_batch_forward without the base layer).

    Per layer call: for each adapter in the batch, gather its rows with a Python index list, run
    lora_B(lora_A(x)) * scaling, and add the result back at those rows. The index lists are built
    once outside the timed call (PEFT builds them per layer), which favours the baseline.
    """
    x, A, B, scales = p["x"], p["A"], p["B"], p["scales"].tolist()
    names = p["adapter_ids"].tolist()
    adapters = sorted(set(names))
    index_lists = [[i for i, a in enumerate(names) if a == adapter] for adapter in adapters]
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype)

    def run():
        for adapter, rows in zip(adapters, index_lists, strict=True):
            lora_output = F.linear(F.linear(x[rows], A[adapter]), B[adapter]) * scales[adapter]
            out[rows] += lora_output
        return out

    return run


def torch_loop(p: dict):
    """The best plain-torch loop: precomputed index tensors, index_select and index_add_."""
    x, A, B, scales = p["x"], p["A"], p["B"], p["scales"].tolist()
    ids = p["adapter_ids"]
    adapters = ids.unique().tolist()
    rows = [torch.nonzero(ids == a).reshape(-1) for a in adapters]
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype)

    def run():
        for adapter, index in zip(adapters, rows, strict=True):
            delta = (x.index_select(0, index) @ A[adapter].T) @ B[adapter].T
            out.index_add_(0, index, delta, alpha=scales[adapter])
        return out

    return run


def lora_fast_op(p: dict, backend: str | None):
    """lora_fast.lora_delta adding into a preallocated output; the batch is built once per step.

    backend None: the default choice (what users get); a name forces that backend.
    """
    x, A, B, scales = p["x"], p["A"], p["B"], p["scales"]
    batch = lora_fast.AdapterBatch(p["adapter_ids"], A.shape[0])
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype)

    def run():
        return lora_fast.lora_delta(x, A, B, batch, scales, out=out)

    def run_forced():
        with lora_fast.use_backend(backend):
            return lora_fast.lora_delta(x, A, B, batch, scales, out=out)

    return run if backend is None else run_forced


def check_agreement(p: dict, backend: str) -> float:
    """Largest difference between the timed backend and the reference, relative to the output."""
    batch = lora_fast.AdapterBatch(p["adapter_ids"], p["A"].shape[0])
    args = (p["x"], p["A"], p["B"], batch, p["scales"])
    with lora_fast.use_backend("torch"):
        expected = lora_fast.lora_delta(*args).double()
    with lora_fast.use_backend(backend):
        got = lora_fast.lora_delta(*args).double()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def run_cpu_sweep(
    tokens: Sequence[int], adapters: Sequence[int], d: int, r: int, dtype: torch.dtype, min_run_time: float
) -> list[dict]:
    backend = lora_fast.backends.select(torch.device("cpu"))
    rows = []
    for T in tokens:
        for L in adapters:
            p = make_problem(T, L, d, r, dtype)
            error = check_agreement(p, backend)
            times = {
                "lora_fast_us": common.median_us(lora_fast_op(p, None), min_run_time),
                "reference_us": common.median_us(lora_fast_op(p, "torch"), min_run_time),
                "peft_loop_us": common.median_us(peft_style_loop(p), min_run_time),
                "torch_loop_us": common.median_us(torch_loop(p), min_run_time),
            }
            fast = times["lora_fast_us"]
            rows.append(
                {
                    "T": T,
                    "L": L,
                    "d": d,
                    "r": r,
                    "dtype": str(dtype).removeprefix("torch."),
                    "backend": backend,
                    **times,
                    "speedup_vs_peft_loop": times["peft_loop_us"] / fast,
                    "speedup_vs_torch_loop": times["torch_loop_us"] / fast,
                    "speedup_vs_reference": times["reference_us"] / fast,
                    "max_rel_error_vs_reference": error,
                }
            )
            row = rows[-1]
            print(
                f"T={T:5d} L={L:3d}  lora_fast {fast:9.1f} us"
                f"  peft_loop x{row['speedup_vs_peft_loop']:.2f}"
                f"  torch_loop x{row['speedup_vs_torch_loop']:.2f}"
                f"  reference x{row['speedup_vs_reference']:.2f}",
                flush=True,
            )
    return rows


COLUMNS = [
    "T",
    "L",
    "dtype",
    "backend",
    "lora_fast_us",
    "peft_loop_us",
    "torch_loop_us",
    "reference_us",
    "speedup_vs_peft_loop",
    "speedup_vs_torch_loop",
    "speedup_vs_reference",
]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="T values (default 64 1024)")
    parser.add_argument("--adapters", type=int, nargs="+", default=None, help="L values (default 1 8)")
    parser.add_argument("--d", type=int, default=None, help="d_in = d_out (default 1024)")
    parser.add_argument("--r", type=int, default=16, help="rank of every adapter")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable ratios)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per variant")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, short timing (smoke test)")
    parser.add_argument("--out-dir", default=None, help="where to write results (default benchmarks/results)")
    args = parser.parse_args(argv)
    quick = {"tokens": [16, 64], "adapters": [1, 4], "d": 128}
    full = {"tokens": [64, 1024], "adapters": [1, 8], "d": 1024}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.min_run_time = min(args.min_run_time, 0.05)
    torch.set_num_threads(args.threads)

    info = common.machine()
    print(
        f"lora_fast ops on CPU ({info['cpu']}, {info['cpu_isa']}, {info['threads']} thread(s)), "
        f"d={args.d}, r={args.r}, {args.dtype}"
    )
    rows = run_cpu_sweep(args.tokens, args.adapters, args.d, args.r, DTYPES[args.dtype], args.min_run_time)
    table = common.markdown_table(rows, COLUMNS)
    print()
    print(table)
    slug = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")
    stem = f"lora_ops_cpu_{slug}" + ("_quick" if args.quick else "")
    payload = {"benchmark": "lora_delta", "machine": info, "config": vars(args), "rows": rows}
    paths = common.write_results(stem, payload, table, args.out_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()

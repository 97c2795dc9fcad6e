"""Serving many adapters stored as EigenLoRAx loadings against the same adapters materialised.

    python -m benchmarks.bench_eigenlora                 # CPU, one thread: 1,000 adapters, D=1024
    python -m benchmarks.bench_eigenlora --device cuda   # GPU: D=4096, bf16
    python -m benchmarks.bench_eigenlora --quick         # tiny shapes (CI smoke test)

N adapters of rank r live on shared bases of K components per side. Per mixed batch of T tokens
(each token a random adapter of the N) it times ``lora_fast.ops.subspace_lora_delta`` on the
loadings (``r * 2K`` numbers per adapter) against ``lora_fast.lora_delta`` on the materialised
``A [N, r, D]``, ``B [N, D, r]`` (``2 r D`` per adapter), checks both give the same delta, and
reports the bytes each stores.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import lora_fast
from benchmarks import common
from lora_fast import ops, reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_problem(
    N: int, T: int, d: int, r: int, K: int, dtype: torch.dtype, device: str, seed: int = 0
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    basis_A = torch.linalg.qr(torch.randn(d, K, generator=gen, dtype=torch.float64))[0].T
    basis_B = torch.linalg.qr(torch.randn(d, K, generator=gen, dtype=torch.float64))[0].T
    loadings_A = torch.randn(N, r, K, generator=gen, dtype=torch.float64) / K**0.5
    loadings_B = torch.randn(N, K, r, generator=gen, dtype=torch.float64) / r**0.5
    A, B = reference.subspace_weights(basis_A, loadings_A, loadings_B, basis_B)
    problem = {
        "x": torch.randn(T, d, generator=gen),
        "basis_A": basis_A,
        "basis_B": basis_B,
        "loadings_A": loadings_A,
        "loadings_B": loadings_B,
        "A": A,
        "B": B,
    }
    problem = {k: v.to(device, dtype) for k, v in problem.items()}
    problem["scales"] = (torch.rand(N, generator=gen) + 0.5).to(device)
    problem["batch"] = lora_fast.AdapterBatch(torch.randint(0, N, (T,), generator=gen).to(device), N)
    return problem


def loadings_delta(p: dict):
    args = (p["x"], p["basis_A"], p["loadings_A"], p["loadings_B"], p["basis_B"], p["batch"], p["scales"])
    return lambda: ops.subspace_lora_delta(*args, check_args=False)


def materialised_delta(p: dict):
    return lambda: lora_fast.lora_delta(p["x"], p["A"], p["B"], p["batch"], p["scales"], check_args=False)


def measure(fn, device: str, min_run_time: float, repetitions: int) -> float:
    if device == "cuda":
        return common.gpu_median_us(fn, repetitions, graph=False)
    return common.median_us(fn, min_run_time)


COLUMNS = [
    "N",
    "T",
    "d",
    "r",
    "K",
    "dtype",
    "loadings_us",
    "materialised_us",
    "speedup",
    "loadings_MB",
    "materialised_MB",
    "memory_ratio",
    "max_rel_error",
]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--d", type=int, default=None, help="d_in = d_out (default CPU 1024, GPU 4096)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 128])
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default CPU float32, GPU bfloat16"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--repetitions", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device")
    if args.quick:
        args.adapters, args.tokens, args.d, args.rank, args.k = 50, [8, 64], 64, 4, [16]
        args.min_run_time, args.repetitions = 0.05, 5
    d = args.d or (4096 if gpu else 1024)
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    torch.set_num_threads(args.threads)
    info = common.machine()
    where = info.get("gpu") if gpu else f"{info['cpu']}, {info['cpu_isa']}, {info['threads']} thread(s)"
    print(f"{args.adapters} adapters as loadings vs materialised on {where}: D={d}, r={args.rank}, {dtype}")
    element = torch.finfo(dtype).bits // 8
    rows = []
    for K in args.k:
        for T in args.tokens:
            p = make_problem(args.adapters, T, d, args.rank, K, dtype, args.device)
            fast, full = loadings_delta(p)(), materialised_delta(p)()
            error = float((fast.double() - full.double()).abs().max() / full.double().abs().max())
            loadings_bytes = (p["loadings_A"].numel() + p["loadings_B"].numel()) * element
            basis_bytes = (p["basis_A"].numel() + p["basis_B"].numel()) * element
            full_bytes = (p["A"].numel() + p["B"].numel()) * element
            row = {
                "N": args.adapters,
                "T": T,
                "d": d,
                "r": args.rank,
                "K": K,
                "dtype": str(dtype).removeprefix("torch."),
                "backend": lora_fast.backends.select(torch.device(args.device), dtype),
                "loadings_us": measure(loadings_delta(p), args.device, args.min_run_time, args.repetitions),
                "materialised_us": measure(
                    materialised_delta(p), args.device, args.min_run_time, args.repetitions
                ),
                "loadings_MB": (loadings_bytes + basis_bytes) / 2**20,
                "materialised_MB": full_bytes / 2**20,
                "max_rel_error": error,
            }
            row["speedup"] = row["materialised_us"] / row["loadings_us"]
            row["memory_ratio"] = row["materialised_MB"] / row["loadings_MB"]
            rows.append(row)
            print(
                f"K={K:4d} T={T:5d}  loadings {row['loadings_us']:9.1f} us  materialised "
                f"{row['materialised_us']:9.1f} us  x{row['speedup']:.2f}  memory "
                f"{row['loadings_MB']:.1f} vs {row['materialised_MB']:.1f} MB  err {error:.1e}",
                flush=True,
            )
    table = common.markdown_table(rows, COLUMNS)
    print()
    print(table)
    name = info["gpu"] if gpu else info["cpu"]
    slug = common.slug(name)
    stem = f"eigenlora_serving_{args.device}_{slug}" + ("_quick" if args.quick else "")
    payload = {"benchmark": "eigenlora_serving", "machine": info, "config": vars(args), "rows": rows}
    paths = common.write_results(stem, payload, table, args.out_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()

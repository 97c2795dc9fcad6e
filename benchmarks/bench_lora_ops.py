"""Multi-adapter LoRA delta: lora_fast against PEFT, torch loops, vLLM and the memory floor.

    python -m benchmarks.bench_lora_ops                 # CPU sweep, one thread
    python -m benchmarks.bench_lora_ops --device cuda   # GPU sweep (D=4096, decode + prefill)
    python -m benchmarks.bench_lora_ops --quick         # tiny shapes (CI smoke test)

Every variant computes ``y += scale[a] * (x @ A[a]^T) @ B[a]^T`` for each token's adapter a.
All variants are timed in one process; compare ratios, not absolute times across runs.

CPU: medians of torch.utils.benchmark blocked autoranges. GPU: each variant is captured in a CUDA
graph where it can be (eager otherwise), L2 is flushed before every repetition, and the median
of the CUDA-event times is kept. The HBM floor divides the bytes the op must move by the
bandwidth of a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import lora_fast
from benchmarks import common

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REFERENCE_CSV = Path(__file__).resolve().parent / "reference" / "h100_lora_forward_anchors.csv"
ANCHOR_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # the CSV's names, ours


# ---------------------------------------------------------------------------------------------
# Problems


def make_problem(
    T: int,
    L: int,
    d: int,
    r: int,
    dtype: torch.dtype,
    order: str = "interleaved",
    mixed_ranks: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Random x, A, B, scales; ids either adapter after adapter (contiguous) or round robin
    (interleaved, the order a serving batch of independent requests has). Mixed ranks: half the
    slots rank 8, the others rank r."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen).to(dtype)
    A = (torch.randn(L, r, d, generator=gen) / d**0.5).to(dtype)
    B = (torch.randn(L, d, r, generator=gen) / r**0.5).to(dtype)
    ranks = None
    if mixed_ranks:
        ranks = torch.tensor([8 if slot % 2 == 0 else r for slot in range(L)])
        for slot, k in enumerate(ranks.tolist()):
            A[slot, k:] = 0
            B[slot, :, k:] = 0
    if order == "contiguous":
        adapter_ids = torch.arange(T) * L // max(T, 1)
    elif order == "interleaved":
        adapter_ids = torch.arange(T) % L
    else:
        adapter_ids = torch.randint(0, L, (T,), generator=gen)
    problem = {
        "x": x,
        "A": A,
        "B": B,
        "scales": torch.rand(L, generator=gen) + 0.5,
        "ranks": ranks,
        "adapter_ids": adapter_ids,
    }
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}


def bytes_moved(T: int, L: int, d: int, ranks: Sequence[int], element: int) -> int:
    """x, the adapters' A and B, y read and written, and the fp32 rank-r intermediate."""
    return T * d * element + 2 * d * sum(ranks) * element + 2 * T * d * element + T * max(ranks) * 4


# ---------------------------------------------------------------------------------------------
# Variants: each returns a zero-argument callable that adds the delta into its own output.


def lora_fast_op(p: dict, backend: str | None) -> Callable[[], object]:
    """lora_fast.lora_delta into a preallocated output; the AdapterBatch is built once per step.

    backend None: the default choice (what users get); a name forces that backend.
    """
    x, A, B, scales, ranks = p["x"], p["A"], p["B"], p["scales"], p["ranks"]
    batch = lora_fast.AdapterBatch(p["adapter_ids"], A.shape[0])
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)

    def run():
        return lora_fast.lora_delta(x, A, B, batch, scales, ranks, out=out)

    def run_forced():
        with lora_fast.use_backend(backend):
            return lora_fast.lora_delta(x, A, B, batch, scales, ranks, out=out)

    return run if backend is None else run_forced


def peft_style_loop(p: dict) -> Callable[[], object]:
    """PEFT's mixed-batch LoRA path (LoraLayer._mixed_batch_forward without the base layer).

    Per layer call: for each adapter in the batch, gather its rows with a Python index list, run
    lora_B(lora_A(x)) * scaling, and add the result back at those rows. The index lists are built
    once outside the timed call (PEFT builds them per layer), which favours the baseline.
    """
    x, A, B, scales = p["x"], p["A"], p["B"], p["scales"].tolist()
    names = p["adapter_ids"].tolist()
    adapters = sorted(set(names))
    index_lists = [[i for i, a in enumerate(names) if a == adapter] for adapter in adapters]
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)

    def run():
        for adapter, rows in zip(adapters, index_lists, strict=True):
            lora_output = F.linear(F.linear(x[rows], A[adapter]), B[adapter]) * scales[adapter]
            out[rows] += lora_output
        return out

    return run


def torch_loop(p: dict) -> Callable[[], object]:
    """The best plain-torch loop: precomputed index tensors, index_select and index_add_."""
    x, A, B, scales = p["x"], p["A"], p["B"], p["scales"].tolist()
    ids = p["adapter_ids"]
    adapters = ids.unique().tolist()
    rows = [torch.nonzero(ids == a).reshape(-1) for a in adapters]
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)

    def run():
        for adapter, index in zip(adapters, rows, strict=True):
            delta = (x.index_select(0, index) @ A[adapter].T) @ B[adapter].T
            out.index_add_(0, index, delta, alpha=scales[adapter])
        return out

    return run


def torch_gather_bmm(p: dict) -> Callable[[], object] | None:
    """Each token's A and B gathered, then two batched matmuls (None when that would not fit)."""
    x, A, B, scales, ids = p["x"], p["A"], p["B"], p["scales"], p["adapter_ids"]
    gathered_bytes = ids.numel() * A.shape[1] * (A.shape[2] + B.shape[1]) * A.element_size()
    if gathered_bytes > 8 * 2**30:
        return None
    token_scales = scales[ids].to(x.dtype)[:, None]
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)

    def run():
        t = torch.bmm(A[ids], x[:, :, None])
        out.add_(torch.bmm(B[ids], t)[:, :, 0] * token_scales)
        return out

    return run


def build_peft_model(p: dict) -> tuple[torch.nn.Module, list[str]]:
    """One LoRA Linear as PEFT holds it, with the problem's adapters as adapters a0..a{L-1}."""
    from peft import LoraConfig, get_peft_model

    x, A, B, scales, ids = p["x"], p["A"], p["B"], p["scales"], p["adapter_ids"]
    d_out, r, d_in = B.shape[1], A.shape[1], A.shape[2]

    class OneLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out, bias=False)

        def forward(self, inputs):
            return self.proj(inputs)

    model = None
    for slot in range(A.shape[0]):
        config = LoraConfig(r=r, lora_alpha=float(scales[slot]) * r, target_modules=["proj"])
        if model is None:
            model = get_peft_model(OneLinear(), config, adapter_name=f"a{slot}")
        else:
            model.add_adapter(f"a{slot}", config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for slot in range(A.shape[0]):
            layer.lora_A[f"a{slot}"].weight.copy_(A[slot])
            layer.lora_B[f"a{slot}"].weight.copy_(B[slot])
    model = model.to(device=x.device, dtype=x.dtype).eval()
    return model, [f"a{a}" for a in ids.tolist()]


def peft_forward(p: dict) -> Callable[[], object]:
    """PEFT's own mixed-batch forward of one LoRA Linear (includes the base matmul)."""
    model, names = build_peft_model(p)
    x = p["x"]

    def run():
        with torch.no_grad():
            return model(x, adapter_names=names)

    return run


def dense_base(p: dict) -> Callable[[], object]:
    """The base layer's own GEMM for the same tokens: what LoRA should cost a fraction of."""
    x = p["x"]
    weight = torch.randn(p["B"].shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    return lambda: F.linear(x, weight)


def vllm_ops(p: dict) -> Callable[[], object] | None:
    """vLLM's Triton lora_shrink + lora_expand, when vllm imports and its API matches.

    vLLM applies one scaling per call, so per-adapter scales are folded into B beforehand.
    """
    try:
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
    except Exception:  # vllm absent, or a build that does not import here
        return None
    x, A, B, scales, ids = p["x"], p["A"], p["B"], p["scales"], p["adapter_ids"]
    B_scaled = B * scales[:, None, None].to(B.dtype)
    T, L, r = x.shape[0], A.shape[0], A.shape[1]
    meta = LoRAKernelMeta.make(max_loras=L, max_num_tokens=T, device=x.device)
    meta.prepare_tensors(ids.to(torch.int32))
    buffer = torch.zeros(1, T, r, dtype=torch.float32, device=x.device)
    out = torch.zeros(T, B.shape[1], dtype=x.dtype, device=x.device)

    def run():
        args = meta.meta_args(T)
        lora_shrink(x, [A], buffer, *args, 1.0)
        lora_expand(buffer, [B_scaled], out, *args, offset_start=0, add_inputs=True)
        return out

    try:
        run()
    except Exception as err:  # an API from another vLLM version
        print(f"vLLM ops skipped: {type(err).__name__}: {err}")
        return None
    return run


# ---------------------------------------------------------------------------------------------
# Sweeps


def check_agreement(p: dict, backend: str | None) -> float:
    """Largest difference between lora_fast and the reference, relative to the output."""
    batch = lora_fast.AdapterBatch(p["adapter_ids"], p["A"].shape[0])
    args = (p["x"], p["A"], p["B"], batch, p["scales"], p["ranks"])
    with lora_fast.use_backend("torch"):
        expected = lora_fast.lora_delta(*args).double()
    with lora_fast.use_backend(backend):
        got = lora_fast.lora_delta(*args).double()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def run_cpu_sweep(
    tokens: Sequence[int], adapters: Sequence[int], d: int, r: int, dtype: torch.dtype, min_run_time: float
) -> list[dict]:
    backend = lora_fast.backends.select(torch.device("cpu"), dtype)
    rows = []
    for T in tokens:
        for L in adapters:
            p = make_problem(T, L, d, r, dtype, order="random")
            error = check_agreement(p, backend)
            times = {
                "lora_fast_us": common.median_us(lora_fast_op(p, None), min_run_time),
                "reference_us": common.median_us(lora_fast_op(p, "torch"), min_run_time),
                "peft_loop_us": common.median_us(peft_style_loop(p), min_run_time),
                "torch_loop_us": common.median_us(torch_loop(p), min_run_time),
            }
            fast = times["lora_fast_us"]
            row = {
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
            rows.append(row)
            common.record_row(row)
            print(
                f"T={T:5d} L={L:3d}  lora_fast {fast:9.1f} us"
                f"  peft_loop x{row['speedup_vs_peft_loop']:.2f}"
                f"  torch_loop x{row['speedup_vs_torch_loop']:.2f}"
                f"  reference x{row['speedup_vs_reference']:.2f}",
                flush=True,
            )
    return rows


CPU_COLUMNS = [
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


def gpu_shapes(quick: bool) -> list[dict]:
    """The sweep of the GPU issue: decode and prefill, both orders, and a mixed-rank case."""
    if quick:
        return [
            {"phase": "decode", "T": 16, "L": 4, "r": 16, "order": "interleaved", "mixed": False},
            {"phase": "prefill", "T": 256, "L": 4, "r": 16, "order": "contiguous", "mixed": True},
        ]
    shapes = []
    for T in (1, 16, 64, 256):
        for L in (1, 8, 64):
            if L > T:
                continue
            for r in (8, 16, 64):
                for order in ("contiguous", "interleaved") if L > 1 else ("contiguous",):
                    shapes.append({"phase": "decode", "T": T, "L": L, "r": r, "order": order, "mixed": False})
    for T in (1024, 4096, 16384):
        for L in (1, 4, 16):
            for order in ("contiguous", "interleaved") if L > 1 else ("contiguous",):
                shapes.append({"phase": "prefill", "T": T, "L": L, "r": 16, "order": order, "mixed": False})
    shapes.append({"phase": "decode", "T": 64, "L": 64, "r": 64, "order": "interleaved", "mixed": True})
    shapes.append({"phase": "prefill", "T": 4096, "L": 16, "r": 64, "order": "interleaved", "mixed": True})
    return shapes


def reference_anchors() -> dict:
    """vLLM / PEFT H100 numbers from another run (benchmarks/reference), keyed by shape."""
    if not REFERENCE_CSV.is_file():
        return {}
    with REFERENCE_CSV.open() as handle:
        return {
            (
                row["phase"],
                ANCHOR_DTYPES[row["dtype"]],
                int(row["T"]),
                int(row["L"]),
                int(row["r"]),
                row["order"],
            ): row
            for row in csv.DictReader(handle)
        }


def run_gpu_sweep(
    shapes: Sequence[dict], dtypes: Sequence[str], d: int, repetitions: int, device: str = "cuda"
) -> list[dict]:
    """One row per shape and dtype. ``device`` is for the CPU test of this code path (with the
    timers swapped for stand-ins): the timings themselves need CUDA events."""
    bandwidth = common.copy_bandwidth_gbps(device)
    anchors = reference_anchors()
    backends = [b for b in ("triton", "cuda") if b in lora_fast.backends.available(device)]
    print(f"device copy bandwidth {bandwidth:.0f} GB/s; lora_fast backends: {backends}")
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for shape in shapes:
            T, L, r = shape["T"], shape["L"], shape["r"]
            p = make_problem(T, L, d, r, dtype, shape["order"], shape["mixed"], device)
            ranks = p["ranks"].tolist() if p["ranks"] is not None else [r] * L
            moved = bytes_moved(T, L, d, ranks, p["x"].element_size())
            row = {
                "phase": shape["phase"],
                "dtype": dtype_name,
                "T": T,
                "L": L,
                "r": r,
                "order": shape["order"] + ("+mixed_ranks" if shape["mixed"] else ""),
                "bytes": moved,
                "hbm_floor_us": moved / (bandwidth * 1e3),
            }
            variants: dict[str, Callable[[], object] | None] = {
                f"lora_fast_{b}_us": lora_fast_op(p, b) for b in backends
            }
            variants |= {
                "torch_gather_bmm_us": torch_gather_bmm(p),
                "torch_loop_us": torch_loop(p),
                "peft_us": peft_forward(p) if not shape["mixed"] else None,
                "vllm_us": vllm_ops(p) if not shape["mixed"] else None,
                "dense_base_us": dense_base(p),
            }
            for b in backends:
                row[f"lora_fast_{b}_max_rel_error"] = check_agreement(p, b)
            for name, fn in variants.items():
                # PEFT builds index tensors from Python lists on every call: not capturable.
                graph = name != "peft_us"
                row[name] = common.gpu_median_us(fn, repetitions, graph) if fn is not None else None
            best = min(row[f"lora_fast_{b}_us"] for b in backends)
            row["lora_fast_us"] = best
            row["floor_fraction"] = row["hbm_floor_us"] / best
            anchor = anchors.get((shape["phase"], dtype_name, T, L, r, shape["order"]))
            row["vllm_reference_us"] = float(anchor["vllm_us"]) if anchor else None
            vllm = row["vllm_us"] or row["vllm_reference_us"]
            row["speedup_vs_vllm"] = vllm / best if vllm else None
            rows.append(row)
            common.record_row(row)
            print(
                f"{row['phase']:7s} {dtype_name:8s} T={T:5d} L={L:2d} r={r:2d} {row['order']:24s} "
                f"lora_fast {best:8.1f} us  floor {row['floor_fraction']:.0%}"
                + (f"  vs vLLM x{row['speedup_vs_vllm']:.2f}" if row["speedup_vs_vllm"] else ""),
                flush=True,
            )
    return rows


GPU_COLUMNS = [
    "phase",
    "dtype",
    "T",
    "L",
    "r",
    "order",
    "hbm_floor_us",
    "lora_fast_triton_us",
    "lora_fast_cuda_us",
    "floor_fraction",
    "vllm_us",
    "vllm_reference_us",
    "speedup_vs_vllm",
    "torch_gather_bmm_us",
    "torch_loop_us",
    "peft_us",
    "dense_base_us",
]


def plot_gpu(rows: Sequence[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [
        f"{r['phase'][0]} {r['dtype'][:4]} T{r['T']} L{r['L']} r{r['r']} {r['order'][:5]}" for r in rows
    ]
    series = [
        "hbm_floor_us",
        "lora_fast_us",
        "vllm_us",
        "vllm_reference_us",
        "torch_loop_us",
        "dense_base_us",
    ]
    fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.18), 5))
    for name in series:
        values = [r.get(name) or float("nan") for r in rows]
        ax.plot(
            range(len(rows)), values, marker=".", linestyle="-" if name == "lora_fast_us" else ":", label=name
        )
    ax.set_yscale("log")
    ax.set_ylabel("microseconds (log)")
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=5)
    ax.legend(fontsize=7)
    ax.set_title("multi-adapter LoRA delta, D=4096")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="CPU: T values (default 64 1024)")
    parser.add_argument("--adapters", type=int, nargs="+", default=None, help="CPU: L values (default 1 8)")
    parser.add_argument("--d", type=int, default=None, help="d_in = d_out (default CPU 1024, GPU 4096)")
    parser.add_argument("--r", type=int, default=16, help="CPU: rank of every adapter")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable ratios)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="CPU: seconds of timing per variant")
    parser.add_argument("--repetitions", type=int, default=30, help="GPU: timed repetitions per variant")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, short timing (smoke test)")
    parser.add_argument("--out-dir", default=None, help="where to write results (default benchmarks/results)")
    args = parser.parse_args(argv)
    info = common.machine()
    if args.device == "cuda":
        return _main_gpu(args, info)
    return _main_cpu(args, info)


def _main_cpu(args: argparse.Namespace, info: dict) -> list[dict]:
    quick = {"tokens": [16, 64], "adapters": [1, 4], "d": 128}
    full = {"tokens": [64, 1024], "adapters": [1, 8], "d": 1024}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.min_run_time = min(args.min_run_time, 0.05)
    dtype_name = (args.dtype or ["float32"])[0]
    torch.set_num_threads(args.threads)
    info["threads"] = torch.get_num_threads()
    print(
        f"lora_fast ops on CPU ({info['cpu']}, {info['cpu_isa']}, {info['threads']} thread(s)), "
        f"d={args.d}, r={args.r}, {dtype_name}"
    )
    rows = run_cpu_sweep(args.tokens, args.adapters, args.d, args.r, DTYPES[dtype_name], args.min_run_time)
    table = common.markdown_table(rows, CPU_COLUMNS)
    print()
    print(table)
    slug = common.slug(info["cpu"])
    stem = f"lora_ops_cpu_{slug}" + ("_quick" if args.quick else "")
    payload = {"benchmark": "lora_delta", "machine": info, "config": vars(args), "rows": rows}
    paths = common.write_results(stem, payload, table, args.out_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


def _main_gpu(args: argparse.Namespace, info: dict) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device")
    d = args.d or (512 if args.quick else 4096)
    dtypes = args.dtype or ["float16", "bfloat16"]
    repetitions = 5 if args.quick else max(args.repetitions, 20)
    print(f"lora_fast ops on {info['gpu']}, D={d}, {dtypes}")
    rows = run_gpu_sweep(gpu_shapes(args.quick), dtypes, d, repetitions)
    table = common.markdown_table(rows, GPU_COLUMNS)
    print()
    print(table)
    slug = common.slug(info["gpu"])
    stem = f"lora_ops_gpu_{slug}" + ("_quick" if args.quick else "")
    payload = {"benchmark": "lora_delta", "machine": info, "config": vars(args), "rows": rows}
    paths = common.write_results(stem, payload, table, args.out_dir)
    out_dir = paths[0].parent
    plot = plot_gpu(rows, out_dir / f"{stem}.png")
    print("\nwrote " + ", ".join(str(p) for p in paths + ([plot] if plot else [])))
    return rows


if __name__ == "__main__":
    main()

"""Training many adapters in one batch: forward + backward of the multi-adapter LoRA delta.

    python -m benchmarks.bench_lora_train                 # CPU, one thread (D=T=1024)
    python -m benchmarks.bench_lora_train --device cuda   # GPU (D=T=4096, bf16)
    python -m benchmarks.bench_lora_train --quick         # tiny shapes (CI smoke test)

Each variant computes ``y = scale[a] * B[a] A[a] x`` per token (tokens spread round robin over
L adapters), then ``y.backward(dy)`` for the gradients of every adapter's A and B. Variants:
lora_fast (one op, grouped backward kernels); a torch per-adapter loop as PEFT / mLoRA train
(gather, two matmuls, scatter per adapter, autograd); torch._grouped_mm on the slot-sorted
tokens where this torch has it; and lora_fast on a single-adapter batch of the same size, the
cost a mixed batch should match. On the CPU the variants are timed in interleaved rounds (one
call of each per round), so the machine's drift does not bend their ratios.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

import lora_fast
from benchmarks import common

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_problem(T: int, L: int, d: int, r: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(T, d, generator=gen).to(device, dtype),
        "A": (torch.randn(L, r, d, generator=gen) / d**0.5).to(device, dtype),
        "B": (torch.randn(L, d, r, generator=gen) / r**0.5).to(device, dtype),
        "scales": (torch.rand(L, generator=gen) + 0.5).to(device),
        "adapter_ids": (torch.arange(T) % L).to(device),
        "grad_out": torch.randn(T, d, generator=gen).to(device, dtype),
    }


def lora_fast_step(p: dict) -> Callable[[], object]:
    A = p["A"].clone().requires_grad_()
    B = p["B"].clone().requires_grad_()
    batch = lora_fast.AdapterBatch(p["adapter_ids"], A.shape[0])

    def run():
        A.grad = B.grad = None
        y = lora_fast.lora_delta(p["x"], A, B, batch, p["scales"])
        y.backward(p["grad_out"])
        return A.grad, B.grad

    return run


def torch_loop_step(p: dict) -> Callable[[], object]:
    """Per-adapter parameters and a Python loop over the adapters in the batch (PEFT / mLoRA)."""
    L = p["A"].shape[0]
    As = [p["A"][a].clone().requires_grad_() for a in range(L)]
    Bs = [p["B"][a].clone().requires_grad_() for a in range(L)]
    scales = p["scales"].tolist()
    rows = [torch.nonzero(p["adapter_ids"] == a).reshape(-1) for a in range(L)]
    x = p["x"]

    def run():
        for weight in As + Bs:
            weight.grad = None
        y = torch.zeros(x.shape[0], Bs[0].shape[0], dtype=x.dtype, device=x.device)
        for a in range(L):
            delta = (x.index_select(0, rows[a]) @ As[a].T) @ Bs[a].T
            y = y.index_add(0, rows[a], delta, alpha=scales[a])
        y.backward(p["grad_out"])
        return [w.grad for w in As + Bs]

    return run


def grouped_mm_step(p: dict) -> Callable[[], object] | None:
    """torch._grouped_mm over the slot-sorted tokens (None where missing or unsupported)."""
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is None:
        return None
    A_t = p["A"].transpose(1, 2).contiguous().requires_grad_()  # [L, d, r]
    B_t = p["B"].transpose(1, 2).contiguous().requires_grad_()  # [L, r, d]
    batch = lora_fast.AdapterBatch(p["adapter_ids"], A_t.shape[0])
    order = batch.token_order
    offsets = torch.cumsum(batch.segment_lengths, 0).to(torch.int32)
    token_scales = p["scales"][batch.token_slots[order]].to(p["x"].dtype)[:, None]

    def run():
        A_t.grad = B_t.grad = None
        x_sorted = p["x"][order]
        y_sorted = grouped_mm(grouped_mm(x_sorted, A_t, offs=offsets), B_t, offs=offsets) * token_scales
        y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        y.backward(p["grad_out"])
        return A_t.grad, B_t.grad

    try:
        run()
    except Exception as err:  # e.g. dtypes or devices this torch's grouped GEMM does not take
        print(f"torch._grouped_mm skipped: {type(err).__name__}: {str(err)[:80]}")
        return None
    return run


def single_adapter(p: dict) -> dict:
    return dict(
        p, A=p["A"][:1], B=p["B"][:1], scales=p["scales"][:1], adapter_ids=torch.zeros_like(p["adapter_ids"])
    )


def check_gradients(p: dict) -> float:
    """lora_fast's weight gradients against the torch loop's, relative to their size."""
    fast = lora_fast_step(p)()
    loop = torch_loop_step(p)()
    L = p["A"].shape[0]
    loop_A, loop_B = torch.stack(loop[:L]), torch.stack(loop[L:])
    worst = 0.0
    for got, expected in ((fast[0], loop_A), (fast[1], loop_B)):
        error = (got.double() - expected.double()).abs().max() / expected.double().abs().max()
        worst = max(worst, float(error))
    return worst


def gpu_eager_us(fn: Callable[[], object] | None, repetitions: int) -> float | None:
    return None if fn is None else common.gpu_median_us(fn, repetitions, graph=False)


def graph_us(fn: Callable[[], object] | None, repetitions: int) -> float | None:
    if fn is None:
        return None
    captured: list[bool] = []
    time = common.gpu_median_us(fn, repetitions, graph=True, captured=captured)
    return time if captured[0] else None


def step_bytes(T: int, d: int, L: int, r: int, dtype: torch.dtype) -> int:
    """Bytes a training step of the delta must move at the least: x read and y written by the
    forward; dy read, dx written and x read again (for dA) by the backward; every slot's A and
    B read twice and their gradients written once. (dy is read once: a kernel that reads it for
    both u = B^T dy and dB is assumed; lora_fast reads it twice.)"""
    size = torch.empty(0, dtype=dtype).element_size()
    activations = 5 * T * d
    weights = 3 * 2 * L * r * d
    return (activations + weights) * size


def run_sweep(
    device: str,
    T: int,
    d: int,
    adapters: Sequence[int],
    ranks: Sequence[int],
    dtype: torch.dtype,
    min_run_time: float,
    repetitions: int,
    graphs: bool | None = None,
) -> list[dict]:
    """One row per (L, r). ``graphs`` (default: on CUDA) adds each step replayed from a CUDA graph."""
    graphs = device == "cuda" if graphs is None else graphs
    bandwidth = common.copy_bandwidth_gbps(device) if graphs else None
    rows = []
    for L in adapters:
        for r in ranks:
            p = make_problem(T, L, d, r, dtype, device)
            error = check_gradients(p)
            steps = {
                "lora_fast": lora_fast_step(p),
                "torch_loop": torch_loop_step(p),
                "grouped_mm": grouped_mm_step(p),
            }
            steps["single_adapter"] = lora_fast_step(single_adapter(p))
            if device == "cuda":
                times = {f"{name}_us": gpu_eager_us(fn, repetitions) for name, fn in steps.items()}
            else:
                # in rounds that run every variant once, so the CPU's drift (±30% on a shared VM)
                # lands on all of them alike and the ratios hold
                present = {name: fn for name, fn in steps.items() if fn is not None}
                measured = common.interleaved_median_us(present, min_run_time)
                times = {f"{name}_us": measured.get(name) for name in steps}
            del steps["single_adapter"]
            graph = {}
            if graphs:
                # eager steps are bound by the host's launches; a step replayed from a CUDA graph
                # is the GPU's own time (None where the step cannot be captured)
                graph = {f"{name}_graph_us": graph_us(fn, repetitions) for name, fn in steps.items()}
                fast_graph, grouped_graph = graph["lora_fast_graph_us"], graph["grouped_mm_graph_us"]
                graph["speedup_vs_grouped_mm_graph"] = (
                    grouped_graph / fast_graph if fast_graph and grouped_graph else None
                )
                # the memory floor of the step at this run's device-copy bandwidth
                graph["hbm_floor_us"] = step_bytes(T, d, L, r, dtype) / (bandwidth * 1e3)
                graph["floor_fraction_graph"] = graph["hbm_floor_us"] / fast_graph if fast_graph else None
            fast = times["lora_fast_us"]
            row = {
                "T": T,
                "L": L,
                "r": r,
                "d": d,
                "dtype": str(dtype).removeprefix("torch."),
                "backend": lora_fast.backends.select(torch.device(device), dtype),
                **times,
                "speedup_vs_torch_loop": times["torch_loop_us"] / fast,
                "speedup_vs_grouped_mm": times["grouped_mm_us"] / fast if times["grouped_mm_us"] else None,
                "mixed_over_single": fast / times["single_adapter_us"],
                "max_rel_grad_error_vs_loop": error,
                **graph,
            }
            rows.append(row)
            common.record_row(row)
            grouped = (
                f"  grouped_mm x{row['speedup_vs_grouped_mm']:.2f}" if row["speedup_vs_grouped_mm"] else ""
            )
            print(
                f"T={T} L={L:2d} r={r:2d}  lora_fast {fast:10.1f} us"
                f"  torch_loop x{row['speedup_vs_torch_loop']:.2f}"
                f"{grouped}  mixed/single {row['mixed_over_single']:.2f}",
                flush=True,
            )
    return rows


COLUMNS = [
    "T",
    "L",
    "r",
    "dtype",
    "backend",
    "lora_fast_us",
    "torch_loop_us",
    "grouped_mm_us",
    "single_adapter_us",
    "speedup_vs_torch_loop",
    "speedup_vs_grouped_mm",
    "mixed_over_single",
]
GRAPH_COLUMNS = [
    "lora_fast_graph_us",
    "torch_loop_graph_us",
    "grouped_mm_graph_us",
    "speedup_vs_grouped_mm_graph",
    "hbm_floor_us",
    "floor_fraction_graph",
]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="T (default CPU 1024, GPU 4096)")
    parser.add_argument("--d", type=int, default=None, help="d_in = d_out (default CPU 1024, GPU 4096)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
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
        args.tokens, args.d, args.adapters, args.ranks = 64, 64, [1, 4], [8]
        args.min_run_time, args.repetitions = 0.05, 5
    T = args.tokens or (4096 if gpu else 1024)
    d = args.d or (4096 if gpu else 1024)
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    torch.set_num_threads(args.threads)
    info = common.machine()
    where = info.get("gpu") if gpu else f"{info['cpu']}, {info['cpu_isa']}, {info['threads']} thread(s)"
    print(f"lora_fast training step on {where}: T={T}, D={d}, {dtype}")
    rows = run_sweep(args.device, T, d, args.adapters, args.ranks, dtype, args.min_run_time, args.repetitions)
    table = common.markdown_table(rows, COLUMNS + (GRAPH_COLUMNS if args.device == "cuda" else []))
    print()
    print(table)
    name = info["gpu"] if gpu else info["cpu"]
    slug = common.slug(name)
    stem = f"lora_train_{args.device}_{slug}" + ("_quick" if args.quick else "")
    payload = {"benchmark": "lora_delta_train", "machine": info, "config": vars(args), "rows": rows}
    paths = common.write_results(stem, payload, table, args.out_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()

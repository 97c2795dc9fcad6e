"""Where the host's time goes in an eager accelerated forward and a training step (cProfile).

    python -m benchmarks.profile_host --device cuda      # one Llama-8B-shaped layer, 16 adapters
    python -m benchmarks.profile_host --quick            # tiny Llama on the CPU (smoke test)

Eager decode on a GPU is bound by the host's launches (bench_peft's graph-replayed columns show
the GPU's own time), so this prints, per accelerated LoRA layer call, the wall time of an eager
decode forward over the base model's, and cProfile's top functions by own time: lora_fast's
Python, the custom-op dispatch and Triton's launcher. Then the same for one training step of
bench_lora_train's problem. Writes nothing; read its log.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import time
from collections.abc import Callable, Sequence

import torch

from benchmarks import bench_lora_train, bench_peft


def wall_us(fn: Callable[[], object], device: str, repetitions: int) -> float:
    """Mean wall microseconds per call, synchronised, after a warm-up."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repetitions):
        fn()
    sync()
    return (time.perf_counter() - start) / repetitions * 1e6


def profile(fn: Callable[[], object], label: str, calls: int, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    print(f"\n== {label}: cProfile over {calls} calls, top {top} by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    device = args.device
    if args.quick:
        base, vocab, dtype, adapters, sequences = bench_peft.tiny_llama(), 512, torch.float32, 4, 8
    else:
        base, vocab, dtype, adapters, sequences = (
            bench_peft.llama_8b_shaped(1),
            128256,
            torch.bfloat16,
            16,
            64,
        )
    base = base.to(device, dtype)
    base_model, _, fast_model = bench_peft.build_models(base, adapters, 16, dtype)
    ids = torch.randint(1, vocab, (sequences, 1), device=device)
    names = [f"a{i % adapters}" for i in range(sequences)]
    layers = (
        sum(1 for m in fast_model.modules() if hasattr(m, "lora_A") and isinstance(m, torch.nn.Module)) // 1
    )
    forward_base = functools.partial(base_model, input_ids=ids)
    forward_fast = functools.partial(fast_model, input_ids=ids, adapter_names=names)
    with torch.no_grad():
        base_us = wall_us(forward_base, device, 10)
        fast_us = wall_us(forward_fast, device, 10)
        print(
            f"eager decode {sequences}x1, {adapters} adapters: base {base_us:.0f} us, accelerated "
            f"{fast_us:.0f} us; {layers} LoRA layers: {(fast_us - base_us) / max(layers, 1):.1f} us each"
        )
        profile(forward_fast, "accelerated eager decode forward", 5, args.top)

    T, L = (256, 4) if args.quick else (4096, 4)
    d = 64 if args.quick else 4096
    problem = bench_lora_train.make_problem(T, L, d, 16, dtype, device)
    step = bench_lora_train.lora_fast_step(problem)
    print(f"\ntraining step T={T} L={L} r=16 d={d}: {wall_us(step, device, 10):.0f} us wall")
    profile(step, "training step", 5, args.top)
    if device == "cuda":
        with torch.no_grad():
            kernel_times(forward_fast, "accelerated decode forward", 5)
        kernel_times(step, "training step", 5)


def kernel_times(fn: Callable[[], object], label: str, calls: int) -> None:
    """The GPU's own time per kernel over ``calls`` calls (torch.profiler's CUDA activity): which
    kernels a step's device time goes to, whatever the host adds around them."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"\n== {label}: GPU time per kernel over {calls} calls")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()

"""Host time of lora_fast's Triton path, measured without a GPU.

    python -m benchmarks.host_launch            # D=4096 shapes: a decode op, a training step
    python -m benchmarks.host_launch --quick    # small shapes (CI smoke test)
    python -m benchmarks.host_launch --profile "train step"   # cProfile of one case

Eager decode and eager training on a GPU are bound by the host: the Python of lora_fast's ops
and kernel launchers and Triton's own launch path. That Python does not need a GPU. Here Triton
compiles every kernel for sm_90 through a stand-in driver (as tests/sm90_compile.py does), each
compiled kernel's launch is replaced by a no-op, and the calls are timed on the CPU in thread
time (the VM's steal time and frequency drift left out: best of 60 runs of 30 calls). The GPU's
own launch call (a few microseconds) is not included, and a CPU allocation of a large tensor
costs more than the GPU's caching allocator, so compare these numbers with each other (before
and after a change), not with a GPU's.

Cases: the kernel launchers alone (``kernels.lora_delta_`` and ``kernels.lora_delta_backward``)
and the public op on the ``triton`` backend (``lora_delta`` with ``out=`` and no autograd, as a
decode layer calls it; a forward + backward with autograd, as training does).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from triton.backends.compiler import GPUTarget

ROOT = Path(__file__).resolve().parent.parent


class Sm90Driver:
    """The little of a Triton driver that compiling needs: an sm_90 target, a device and a
    stream (tests/sm90_compile.py compiles through it too)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _stand_in_gpu() -> Callable[[], None]:
    """Triton compiles for sm_90 and launches nothing. Returns a function that makes later
    launches go the normal way (after one call of each case has compiled its kernels)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(Sm90Driver())
    launch = JITFunction.run

    def compile_and_stub(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel._run is None:  # the launcher a GPU would load: nothing to run here
            kernel._run = lambda *_args, **_kwargs: None
            kernel.module = object()
        return kernel

    JITFunction.run = compile_and_stub

    def restore() -> None:
        JITFunction.run = launch

    return restore


def thread_us(fn: Callable[[], object], calls: int = 30, runs: int = 60) -> float:
    """Best thread-time microseconds per call over ``runs`` runs of ``calls`` calls."""
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(runs):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls * 1e6)
    return best


def cases(quick: bool) -> dict[str, Callable[[], object]]:
    import torch

    import lora_fast
    from lora_fast import backends

    kernels = importlib.import_module("lora_fast.kernels")
    # the op layer picks the triton backend for these CPU tensors (its kernels are the stand-ins)
    backends._available = lambda device_type, dtype: ("triton", "torch")
    d = 256 if quick else 4096

    def problem(T: int, L: int, r: int = 16):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(T, d, generator=gen).to(torch.bfloat16)
        A = torch.randn(L, r, d, generator=gen).to(torch.bfloat16)
        B = torch.randn(L, r, d, generator=gen).to(torch.bfloat16).transpose(1, 2)  # rank-major
        batch = lora_fast.AdapterBatch(torch.arange(T) % L, L)
        return x, A, B, batch, torch.rand(L), torch.full((L,), r)

    decode = problem(64, 16)
    train = problem(256 if quick else 4096, 4)

    def launcher_forward(p):
        x, A, B, b, scales, ranks = p
        out = torch.empty(x.shape[0], B.shape[1], dtype=x.dtype)
        segments = (b.segment_starts, b.segment_lengths)
        return lambda: kernels.lora_delta_(
            x, A, B, b.token_order, b.token_slots, scales, ranks, out, segments=segments
        )

    def launcher_backward(p):
        x, A, B, b, scales, ranks = p
        dy = torch.randn(x.shape[0], B.shape[1]).to(x.dtype)
        metadata = (b.token_order, b.token_slots, b.segment_starts, b.segment_lengths)
        return lambda: kernels.lora_delta_backward(dy, x, A, B, *metadata, scales, ranks, None)

    def decode_op(p):
        x, A, B, b, scales, ranks = p
        out = torch.empty(x.shape[0], B.shape[1], dtype=x.dtype)

        def run():
            with torch.no_grad():
                lora_fast.lora_delta(x, A, B, b, scales, ranks, out=out, check_args=False)

        return run

    def train_step(p):
        x, A, B, b, scales, ranks = p
        A, B = A.clone().requires_grad_(), B.detach().clone().requires_grad_()
        dy = torch.randn(x.shape[0], B.shape[1]).to(x.dtype)

        def run():
            A.grad = B.grad = None
            lora_fast.lora_delta(x, A, B, b, scales, ranks).backward(dy)

        return run

    return {
        "launcher forward (decode T=64 L=16)": launcher_forward(decode),
        "launcher backward (decode T=64 L=16)": launcher_backward(decode),
        "launcher forward (train)": launcher_forward(train),
        "launcher backward (train)": launcher_backward(train),
        "op decode (T=64 L=16, out=)": decode_op(decode),
        "train step (op, autograd)": train_step(train),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", default=None, help="a case name (or its start) to profile")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET: this times the compiled kernels' launch path")
    sys.path.insert(0, str(ROOT))
    restore = _stand_in_gpu()
    fns = cases(args.quick)
    for fn in fns.values():  # compile every kernel once
        fn()
    restore()
    times = {}
    for name, fn in fns.items():
        times[name] = thread_us(fn, calls=5 if args.quick else 30, runs=5 if args.quick else 60)
        print(f"{name:40s} {times[name]:8.1f} us of host thread time per call", flush=True)
    if args.profile:
        name = next(n for n in fns if n.startswith(args.profile))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(300):
            fns[name]()
        profiler.disable()
        print(f"\n== {name}: cProfile over 300 calls")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return times


if __name__ == "__main__":
    main()

"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler, so type
errors that only the compiler sees (a helper returning int64 on one path and int32 on another,
say) pass every CPU test and fail at the first launch on a GPU. This script drives the kernels'
own launchers with CPU tensors, but swaps Triton's driver for one that names an sm_90 target and
turns every launch into a compile (``warmup``), so Triton lowers each kernel to PTX and runs its
bundled ptxas. Run by tests/test_triton_sm90_compile.py in a fresh process: the kernels must be
decorated without the interpreter. Prints one line per compiled variant, then ``compiled N``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.pop("TRITON_INTERPRET", None)
os.environ["LORA_FAST_TRITON_CONFIG"] = str(ROOT / "kernels" / "configs" / "default.json")

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def compile_only() -> list[tuple[str, int]]:
    """Makes every launch a compile; returns the (kernel, shared bytes) list it fills."""
    compiled: list[tuple[str, int]] = []
    launch = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel.metadata.shared))
        return kernel

    sys.path.insert(0, str(ROOT))
    driver.set_active(importlib.import_module("benchmarks.host_launch").Sm90Driver())
    JITFunction.run = run
    return compiled


# the grids of the token-blocked kernels (positions of the slot-sorted order, slot segments,
# compact slot segments), the last also with programmatic dependent launch
MODES = ({"SEGMENTED": 0}, {"SEGMENTED": 1}, {"SEGMENTED": 2}, {"SEGMENTED": 2, "PDL": 1})


def drive(num_slots: int = 4, d_in: int = 256, d_out: int = 384) -> None:
    """Every launcher, every dtype, per-slot ranks or not, each config-table row's token count,
    both grid modes, whole and split weight-gradient segments."""
    sys.path.insert(0, str(ROOT))
    # rows that ask for programmatic dependent launch get it, as on an H100 (the check reads the
    # CPU tensors' device otherwise), so griddepcontrol and launch_pdl are compiled too
    common = importlib.import_module("kernels._common")
    common._pdl_available = lambda device: common.gdc_wait is not None
    delta = importlib.import_module("kernels.lora_delta")
    backward = importlib.import_module("kernels.lora_delta_backward")
    subspace = importlib.import_module("kernels.subspace_project")
    lookup = importlib.import_module("kernels.configs").lookup
    tune = importlib.import_module("benchmarks.tune_triton")
    fused_config = tune.RETIRED_CANDIDATES["fused_positions"]["fused"]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for num_tokens, r_max in ((8, 16), (100, 64), (5000, 8)):
            x = torch.randn(num_tokens, d_in).to(dtype)
            A = torch.randn(num_slots, r_max, d_in).to(dtype)
            # B rank-major, as the stacks keep it, and plain [S, d_out, r_max]
            B_rank_major = torch.randn(num_slots, r_max, d_out).to(dtype).transpose(1, 2)
            B = torch.randn(num_slots, d_out, r_max).to(dtype)
            slots = torch.randint(-1, num_slots, (num_tokens,))
            order = torch.argsort(slots)
            ranks = torch.randint(1, r_max + 1, (num_slots,))
            scales = torch.rand(num_slots)
            out = torch.empty(num_tokens, d_out, dtype=dtype)
            starts = torch.zeros(num_slots, dtype=torch.long)
            lengths = torch.zeros(num_slots, dtype=torch.long)
            # the rank-major B (other stride specialisations) in one dtype keeps the run short
            for B_ in (B, B_rank_major) if dtype == torch.bfloat16 else (B,):
                for ranks_ in (None, ranks):
                    for fused in (True, False):
                        for mode in MODES:
                            configs = {
                                kernel: dict(lookup(kernel, x.device, tokens, r_max, d_in), **mode)
                                for kernel, tokens in (
                                    ("shrink", num_tokens),
                                    ("expand", num_tokens),
                                )
                            }
                            # no shipped table uses the fused delta now; it stays compiled
                            configs["fused"] = dict(fused_config, **mode)
                            # the expand that writes out (training forwards, dx) beside the one
                            # that adds into it; the fused path zero-fills instead
                            for accumulate in (True,) if fused else (True, False):
                                delta.lora_delta_(
                                    x,
                                    A,
                                    B_,
                                    order,
                                    slots,
                                    scales,
                                    ranks_,
                                    out,
                                    fused,
                                    configs,
                                    (starts, lengths),
                                    accumulate,
                                )
            grad_out = torch.randn(num_tokens, d_out).to(dtype)
            for grad_slots in (None, torch.ones(num_slots, dtype=torch.bool)):
                # (FUSE_DY: the dy pass in place of the shrink of dy and dB's weight gradient)
                for split_m, fuse_dy in ((1, 0), (4, 0), (4, 1)):
                    configs = {"weight_grad": dict(lookup("weight_grad", x.device, num_tokens, r_max, d_in))}
                    configs["weight_grad"]["SPLIT_M"] = split_m
                    configs["weight_grad"]["FUSE_DY"] = fuse_dy
                    # the weight gradients read split-K planes of t and u (SPLIT_COEF > 1) at
                    # the decode shapes' SPLIT_K, a single plane at the prefill ones
                    backward.lora_delta_backward(
                        grad_out,
                        x,
                        A,
                        B,
                        order,
                        slots,
                        starts,
                        lengths,
                        scales,
                        ranks,
                        grad_slots,
                        configs=configs,
                    )
        subspace.subspace_project(torch.randn(64, 256).to(dtype), torch.randn(8, 256).to(dtype))
    # every candidate benchmarks/tune_triton.py times on a GPU, in its dtype, at each rank
    candidates = tune.DECODE_CANDIDATES | tune.PREFILL_CANDIDATES
    linear = importlib.import_module("kernels.lora_linear")
    for r_max in (8, 16, 64):
        # fused_lora_linear's one-kernel candidates (rank-major B, as the stacks keep it; a bias)
        x = torch.randn(40, d_in).to(torch.bfloat16)
        W = torch.randn(d_out, d_in).to(torch.bfloat16)
        A = torch.randn(num_slots, r_max, d_in).to(torch.bfloat16)
        B = torch.randn(num_slots, r_max, d_out).to(torch.bfloat16).transpose(1, 2)
        slots = torch.randint(-1, num_slots, (40,))
        for config in tune.LINEAR_CANDIDATES.values():
            if config is not None:
                linear.lora_linear(
                    x, W, W[0], A, B, torch.argsort(slots), slots, torch.rand(num_slots), None, config
                )
    for r_max in (8, 16, 64):
        num_tokens = 40
        x = torch.randn(num_tokens, d_in).to(torch.bfloat16)
        A = torch.randn(num_slots, r_max, d_in).to(torch.bfloat16)
        B = torch.randn(num_slots, d_out, r_max).to(torch.bfloat16)
        slots = torch.randint(-1, num_slots, (num_tokens,))
        out = torch.empty(num_tokens, d_out, dtype=torch.bfloat16)
        segments = (torch.zeros(num_slots, dtype=torch.long), torch.zeros(num_slots, dtype=torch.long))
        for candidate in (candidates | tune.RETIRED_CANDIDATES).values():
            configs = {kernel: candidate[kernel] for kernel in ("fused", "shrink", "expand")}
            delta.lora_delta_(
                x,
                A,
                B,
                torch.argsort(slots),
                slots,
                torch.rand(num_slots),
                None,
                out,
                candidate["fused"] is not None,
                configs,
                segments,
            )
        # the training step's candidates (the tuner's train phase): the shrink kept for a
        # backward, and the backward with that shrink and the candidate's weight gradients
        expand = tune.PREFILL_CANDIDATES["m64_split2_positions"]["expand"]
        order = torch.argsort(slots)
        scales = torch.rand(num_slots)
        grad_out = torch.randn(num_tokens, d_out).to(torch.bfloat16)
        for candidate in tune.TRAIN_CANDIDATES.values():
            configs = {"fused": None, "shrink": candidate["train_shrink"], "expand": expand}
            delta.lora_delta_(x, A, B, order, slots, scales, None, out, False, configs, segments, True, True)
            configs = {"shrink": candidate["train_shrink"], "expand": expand}
            configs["weight_grad"] = candidate["weight_grad"]
            backward.lora_delta_backward(
                grad_out, x, A, B, order, slots, *segments, scales, None, None, configs=configs
            )


if __name__ == "__main__":
    variants = compile_only()
    drive()
    for name, shared in variants:
        print(f"{name} shared={shared}")
    print(f"compiled {len(variants)}")

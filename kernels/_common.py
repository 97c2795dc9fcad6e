"""Pieces shared by the LoRA kernels: walking the slots of a token block, and the dot product."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under the interpreter (TRITON_INTERPRET=1, CPU tests) tl.dot on bf16 gives wrong results, so
# the kernels upcast before every dot there; on a GPU they keep the tensor-core dtypes.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def first_slot(slots, num_slots):
    """Smallest slot present in a block (num_slots when every token has none)."""
    return tl.min(tl.where(slots >= 0, slots, num_slots))


@triton.jit
def next_slot(slots, slot, num_slots):
    """Smallest slot of the block above ``slot`` (num_slots when there is none)."""
    return tl.min(tl.where(slots > slot, slots, num_slots))


@triton.jit
def slot_rank(ranks_ptr, slot, r_max, HAS_RANKS: tl.constexpr):
    """The slot's rank, clamped to [0, r_max] so a bad value can never index past A or B."""
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + slot)
        return tl.minimum(tl.maximum(rank, 0), r_max)
    return r_max


@triton.jit
def dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE keeps fp32 inputs exact (no TF32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


def check_dtype(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32 {name}, got {tensor.dtype}")


def rank_block(r_max: int, cap: int) -> int:
    """Rank columns per pass: a power of two >= 16 (tl.dot's minimum), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(max(r_max, 1))))

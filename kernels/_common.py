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
def block_tokens(token_order_ptr, token_slots_ptr, pid_m, num_tokens, BLOCK_M: tl.constexpr):
    """Tokens of a block of slot-sorted positions and their slots (-1 past the end)."""
    positions = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = positions < num_tokens
    tokens = tl.load(token_order_ptr + positions, mask=in_range, other=0)
    slots = tl.load(token_slots_ptr + tokens, mask=in_range, other=-1)
    return tokens, slots


@triton.jit
def segment_tokens(
    token_order_ptr, segment_starts_ptr, segment_lengths_ptr, pid_m, blocks_per_slot, BLOCK_M: tl.constexpr
):
    """Tokens of block ``pid_m % blocks_per_slot`` of slot ``pid_m // blocks_per_slot``'s segment
    and their slots (-1 past the segment's end, so a block beyond it walks no slot)."""
    slot = pid_m // blocks_per_slot
    first = (pid_m % blocks_per_slot) * BLOCK_M
    start = tl.load(segment_starts_ptr + slot)
    length = tl.load(segment_lengths_ptr + slot)
    offsets = first + tl.arange(0, BLOCK_M)
    in_segment = offsets < length
    tokens = tl.load(token_order_ptr + start + offsets, mask=in_segment, other=0)
    return tokens, tl.where(in_segment, slot, -1).to(tl.int64)


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
        rank = tl.load(ranks_ptr + slot).to(tl.int32)
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


@triton.jit
def shrink_tile(
    x_ptr,
    tokens,
    rows,
    stride_x_row,
    a_slot,
    stride_a_rank,
    stride_a_col,
    cols,
    col_ok,
    k_begin,
    k_end,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_R]`` fp32: x[tokens, k_begin:k_end] @ A_slot[cols, k_begin:k_end]^T on ``rows``."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < k_end
        x_tile = tl.load(
            x_ptr + tokens[:, None] * stride_x_row + ks[None, :],
            mask=rows[:, None] & k_ok[None, :],
            other=0.0,
        )
        a_tile = tl.load(
            a_slot + cols[None, :] * stride_a_rank + ks[:, None] * stride_a_col,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc += dot(x_tile, a_tile, UPCAST, IEEE)
    return acc


@triton.jit
def expand_tile(
    t_tile,
    b_slot,
    outs,
    out_ok,
    stride_b_out,
    stride_b_rank,
    cols,
    col_ok,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` fp32: t_tile @ B_slot[outs, cols]^T (t rounded to B's dtype first)."""
    b_tile = tl.load(
        b_slot + outs[None, :] * stride_b_out + cols[:, None] * stride_b_rank,
        mask=out_ok[None, :] & col_ok[:, None],
        other=0.0,
    )
    return dot(t_tile.to(b_tile.dtype), b_tile, UPCAST, IEEE)


@triton.jit
def add_scaled(out_tile_ptr, mask, acc, scale):
    """out += scale * acc on ``mask``, in fp32, rounded once to out's dtype."""
    current = tl.load(out_tile_ptr, mask=mask, other=0.0)
    tl.store(out_tile_ptr, (current.to(tl.float32) + acc * scale).to(current.dtype), mask=mask)


def check_dtype(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32 {name}, got {tensor.dtype}")


def token_grid(config: dict, num_tokens: int, segments) -> tuple[int, int, tuple | None]:
    """``(programs along tokens, blocks per slot, segments)`` for a launch.

    Positions mode (``SEGMENTED`` 0, or no segments given): one program per BLOCK_M positions of
    the slot-sorted order, walking the slots present. Segments mode: ``num_slots`` times
    cdiv(T, BLOCK_M) programs, each owning one block of one slot's segment (most are empty and
    return at once), so a decode block of many slots is spread over many programs instead of
    looped in one. Pops ``SEGMENTED`` from ``config``.
    """
    block_m = config["BLOCK_M"]
    positions = triton.cdiv(num_tokens, block_m)
    if not config.pop("SEGMENTED", 0) or segments is None:
        return positions, positions, None
    starts, lengths = segments
    return starts.shape[0] * positions, positions, (starts, lengths)


def rank_block(r_max: int, cap: int) -> int:
    """Rank columns per pass: a power of two >= 16 (tl.dot's minimum), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(max(r_max, 1))))

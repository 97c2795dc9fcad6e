"""Pieces shared by the LoRA kernels: walking the slots of a token block, and the dot product."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Under the interpreter (TRITON_INTERPRET=1, CPU tests) tl.dot on bf16 gives wrong results, so
# the kernels upcast before every dot there; on a GPU they keep the tensor-core dtypes.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

try:  # programmatic dependent launch (griddepcontrol, sm_90 and newer)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without them: PDL rows of a config table are ignored
    gdc_launch_dependents = gdc_wait = None

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
def compact_segment_tokens(
    token_order_ptr,
    segment_starts_ptr,
    segment_lengths_ptr,
    num_slots,
    pid_m,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Tokens of the ``pid_m``-th block when every slot's segment is cut into blocks of BLOCK_M
    and the blocks are numbered in slot order, and their slots (-1 past the segment's end, and
    for a ``pid_m`` past the last block). Each program finds its block from the segment lengths
    itself (a prefix sum over BLOCK_S >= num_slots slots), so the grid needs only
    cdiv(T, BLOCK_M) + min(S, T) programs, never one per (slot, block) pair."""
    offs_s = tl.arange(0, BLOCK_S)
    slot_ok = offs_s < num_slots
    lengths = tl.load(segment_lengths_ptr + offs_s, mask=slot_ok, other=0)
    blocks = (lengths + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)
    slot = tl.sum(((ends <= pid_m) & slot_ok).to(tl.int32), 0)  # slots whose blocks end before pid_m
    mine = offs_s == slot
    first_block = tl.sum(tl.where(mine, ends - blocks, 0), 0)
    length = tl.sum(tl.where(mine, lengths, 0), 0)  # 0 past the last slot
    start = tl.load(segment_starts_ptr + slot, mask=slot < num_slots, other=0)
    offsets = (pid_m - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_segment = offsets < length
    tokens = tl.load(token_order_ptr + start + offsets, mask=in_segment, other=0)
    return tokens, tl.where(in_segment, slot, -1).to(tl.int64)


@triton.jit
def grid_tokens(
    token_order_ptr,
    token_slots_ptr,
    segment_starts_ptr,
    segment_lengths_ptr,
    pid_m,
    num_tokens,
    num_slots,
    blocks_per_slot,
    GRID: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """The tokens of program ``pid_m`` and their slots in each grid mode (see ``Grid``)."""
    if GRID == 2:
        return compact_segment_tokens(
            token_order_ptr, segment_starts_ptr, segment_lengths_ptr, num_slots, pid_m, BLOCK_M, BLOCK_S
        )
    elif GRID == 1:
        return segment_tokens(
            token_order_ptr, segment_starts_ptr, segment_lengths_ptr, pid_m, blocks_per_slot, BLOCK_M
        )
    else:
        return block_tokens(token_order_ptr, token_slots_ptr, pid_m, num_tokens, BLOCK_M)


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
def slot_expand(
    t_ptr,
    stride_t_split,
    stride_t_row,
    tokens,
    rows,
    rank,
    b_slot,
    outs,
    out_ok,
    stride_b_out,
    stride_b_rank,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` fp32, unscaled: one slot's expand on ``rows``, t summed over its
    split-K planes while loading, in rank passes of BLOCK_R columns."""
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        cols = r0 + offs_r
        col_ok = cols < rank
        t_tile = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in range(SPLIT_K):
            t_tile += tl.load(
                t_ptr + split * stride_t_split + tokens[:, None] * stride_t_row + cols[None, :],
                mask=rows[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
        acc += expand_tile(
            t_tile, b_slot, outs, out_ok, stride_b_out, stride_b_rank, cols, col_ok, UPCAST, IEEE
        )
    return acc


@triton.jit
def add_scaled(out_tile_ptr, mask, acc, scale):
    """out += scale * acc on ``mask``, in fp32, rounded once to out's dtype."""
    current = tl.load(out_tile_ptr, mask=mask, other=0.0)
    tl.store(out_tile_ptr, (current.to(tl.float32) + acc * scale).to(current.dtype), mask=mask)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host (``triton.cdiv`` costs ~2.5 us per call outside a kernel)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), on the host, like ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


def check_dtype(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32 {name}, got {tensor.dtype}")


POSITIONS, SEGMENTS, COMPACT_SEGMENTS = 0, 1, 2


class Grid:
    """How a launch spreads tokens over programs (``SEGMENTED`` in a config row):

    - 0, positions: one program per BLOCK_M positions of the slot-sorted order, walking the
      slots present in its block;
    - 1, segments: ``num_slots`` x cdiv(T, BLOCK_M) programs, each owning one block of one slot's
      segment (most are empty and return at once), so a decode block of many slots is spread
      over many programs instead of walked by one;
    - 2, compact segments: the segments' blocks numbered one after another, cdiv(T, BLOCK_M) +
      min(S, T) programs; each finds its (slot, block) from the segment lengths, so a batch of
      many slots with few tokens each launches no empty programs.

    ``mode`` falls back to positions when no segments are given. ``slot_programs`` counts the
    programs that own slot tokens (an expand that writes its output adds programs after them for
    the tokens without a slot).
    """

    def __init__(self, config: dict, num_tokens: int, num_slots: int, segments) -> None:
        block_m = config["BLOCK_M"]
        positions = cdiv(num_tokens, block_m)
        mode = config.pop("SEGMENTED", 0)
        if mode not in (POSITIONS, SEGMENTS, COMPACT_SEGMENTS):
            raise ValueError(f"SEGMENTED must be 0, 1 or 2, got {mode!r}")
        self.mode = mode if segments is not None else POSITIONS
        self.blocks_per_slot = positions
        self.block_s = max(16, next_power_of_2(max(num_slots, 1)))
        self.starts, self.lengths = segments if segments is not None else (None, None)
        if self.mode == SEGMENTS:
            self.slot_programs = num_slots * positions
        elif self.mode == COMPACT_SEGMENTS:
            self.slot_programs = positions + min(num_slots, num_tokens)
        else:
            self.slot_programs = positions

    def none_programs(self) -> int:
        """Programs for the tokens without a slot, which lead the slot-sorted order (grid modes
        other than positions, whose blocks already cover every position)."""
        return 0 if self.mode == POSITIONS else self.blocks_per_slot

    def pointers(self, token_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment_starts, segment_lengths), or any pointers where the mode reads neither."""
        if self.starts is None:
            return token_order, token_order
        return self.starts, self.lengths


def use_pdl(config: dict, device: torch.device) -> bool:
    """Pops ``PDL`` from ``config``: True when the row asks for programmatic dependent launch and
    this Triton and GPU have it (Hopper or newer, not the interpreter).

    With it the shrink lets the next kernel launch once all its programs are running, and the
    expand, launched as such a dependent, waits (``griddepcontrol.wait``) before its first load:
    the expand's launch and scheduling overlap the shrink's tail instead of following it. The
    wait comes before every load, so an expand after any other kernel is still correct.
    """
    return bool(config.pop("PDL", 0)) and _pdl_available(device)


def _pdl_available(device: torch.device) -> bool:
    if INTERPRETED or gdc_wait is None or device.type != "cuda":
        return False
    return _pdl_on_gpu(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _pdl_on_gpu(index: int) -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    known = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return known and torch.cuda.get_device_capability(index)[0] >= 9


def rank_block(r_max: int, cap: int) -> int:
    """Rank columns per pass: a power of two >= 16 (tl.dot's minimum), at most ``cap``."""
    return max(16, min(cap, next_power_of_2(max(r_max, 1))))

"""Multi-adapter LoRA shrink: ``t[i, :k] = A[a_i, :k] @ x_i`` for tokens grouped by slot.

One program per (block of BLOCK_M positions of the slot-sorted token order, split of d_in). A
block holds the tokens of one slot or, at segment boundaries and in decode batches, of several:
the program walks the distinct slots present and runs a masked tile for each, so every token's
row of x and every slot's A rows are read once per program and no program sits idle waiting for
a slot that is not there. Split-K partials go to separate planes of a float32 buffer and are
summed by the reader: no atomics, the same bits on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    Grid,
    check_dtype,
    first_slot,
    gdc_launch_dependents,
    grid_tokens,
    next_slot,
    rank_block,
    shrink_tile,
    slot_rank,
    use_pdl,
)
from .configs import lookup


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    A_ptr,
    t_ptr,
    token_order_ptr,
    token_slots_ptr,
    segment_starts_ptr,
    segment_lengths_ptr,
    ranks_ptr,
    num_tokens,
    num_slots,
    blocks_per_slot,
    d_in,
    r_max,
    stride_x_row,
    stride_a_slot,
    stride_a_rank,
    stride_a_col,
    stride_t_split,
    stride_t_row,
    HAS_RANKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GRID: tl.constexpr,
    BLOCK_S: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:  # the expand that reads t may launch now (it waits for this grid)
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    tokens, slots = grid_tokens(
        token_order_ptr,
        token_slots_ptr,
        segment_starts_ptr,
        segment_lengths_ptr,
        pid_m,
        num_tokens,
        num_slots,
        blocks_per_slot,
        GRID,
        BLOCK_M,
        BLOCK_S,
    )
    k_per_split = tl.cdiv(tl.cdiv(d_in, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_split * k_per_split
    k_end = tl.minimum(d_in, k_begin + k_per_split)
    offs_r = tl.arange(0, BLOCK_R)
    t_rows = t_ptr + pid_split * stride_t_split + tokens[:, None] * stride_t_row

    slot = first_slot(slots, num_slots)
    while slot < num_slots:
        rows = slots == slot
        rank = slot_rank(ranks_ptr, slot, r_max, HAS_RANKS)
        a_slot = A_ptr + slot * stride_a_slot
        for r0 in range(0, rank, BLOCK_R):
            cols = r0 + offs_r
            col_ok = cols < rank
            acc = shrink_tile(
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
                BLOCK_M,
                BLOCK_K,
                BLOCK_R,
                UPCAST,
                IEEE,
            )
            tl.store(t_rows + cols[None, :], acc, mask=rows[:, None] & col_ok[None, :])
        slot = next_slot(slots, slot, num_slots)


def lora_shrink_partials(
    x: torch.Tensor,
    A: torch.Tensor,
    token_order: torch.Tensor,
    token_slots: torch.Tensor,
    ranks: torch.Tensor | None,
    config: dict | None = None,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    zeroed: bool = True,
    kind: str = "shrink",
) -> torch.Tensor:
    """Split-K partial products ``[SPLIT_K, T, r_max]`` (float32) whose sum over dim 0 is t.

    Entries the shrink does not own (columns past a slot's rank, tokens without a slot) are
    zero (left unwritten with ``zeroed=False``, for a reader that never looks at them: the expand).
    ``x [T, d_in]`` with unit inner stride, ``A [S, r_max, d_in]`` (any strides; the backward
    passes ``B`` transposed), metadata as in lora_fast.AdapterBatch, ``ranks`` int64 or None,
    ``segments`` the batch's (segment_starts, segment_lengths), used by configs with SEGMENTED.
    ``kind``: the config table's kind looked up when ``config`` is None (``train_shrink`` for
    partials that a backward reads).
    """
    check_dtype(x, "x")
    num_tokens, d_in = x.shape
    num_slots, r_max, _ = A.shape
    if config is None:
        config = lookup(kind, x.device, num_tokens, r_max, d_in)
    config = dict(config)
    split_k = config.pop("SPLIT_K")
    pdl = use_pdl(config, x.device)
    block_r = rank_block(r_max, config.pop("MAX_BLOCK_R"))
    allocate = torch.zeros if zeroed else torch.empty
    partials = allocate((split_k, num_tokens, r_max), dtype=torch.float32, device=x.device)
    if num_tokens == 0 or r_max == 0:
        return partials
    grid = Grid(config, num_tokens, num_slots, segments)
    starts, lengths = grid.pointers(token_order)
    _lora_shrink_kernel[(grid.slot_programs, split_k)](
        x,
        A,
        partials,
        token_order,
        token_slots,
        starts,
        lengths,
        ranks if ranks is not None else token_order,  # any pointer: HAS_RANKS=False never reads it
        num_tokens,
        num_slots,
        grid.blocks_per_slot,
        d_in,
        r_max,
        x.stride(0),
        *A.stride(),
        partials.stride(0),
        partials.stride(1),
        HAS_RANKS=ranks is not None,
        BLOCK_R=block_r,
        SPLIT_K=split_k,
        GRID=grid.mode,
        BLOCK_S=grid.block_s,
        LAUNCH_DEPENDENTS=pdl,
        UPCAST=INTERPRETED,
        IEEE=x.dtype == torch.float32,
        **config,
    )
    return partials


def lora_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    token_order: torch.Tensor,
    token_slots: torch.Tensor,
    ranks: torch.Tensor | None,
    config: dict | None = None,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``t [T, r_max]`` float32: the shrink of every token (zero where it owns nothing)."""
    partials = lora_shrink_partials(x, A, token_order, token_slots, ranks, config, segments)
    return partials[0] if partials.shape[0] == 1 else partials.sum(dim=0)

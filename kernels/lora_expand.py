"""Multi-adapter LoRA expand: ``out[i] += scales[a_i] * B[a_i][:, :k] @ t[i, :k]``.

One program per (block of BLOCK_M slot-sorted positions, block of BLOCK_N outputs), walking the
distinct slots of its block as the shrink does. ``t`` may arrive as split-K partial planes
``[SPLIT_K, T, r_max]``, summed here while loading, so shrink + expand need no reduction launch.
The output tile is read, updated in fp32 and written once per slot: no atomics.

With ``ACCUMULATE`` off the expand *writes* ``out`` instead (the delta itself; zeros for tokens
without a slot), so an out-of-place delta or a gradient needs no zero-filled buffer and never
reads its output: half the output traffic. In the segment grids the tokens without a slot (the
first ``segment_starts[0]`` of the slot-sorted order) get programs of their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    Grid,
    add_scaled,
    cdiv,
    check_dtype,
    first_slot,
    gdc_wait,
    grid_tokens,
    next_slot,
    rank_block,
    slot_expand,
    slot_rank,
    use_pdl,
)
from .configs import lookup


@triton.jit
def _lora_expand_kernel(
    t_ptr,
    B_ptr,
    out_ptr,
    scales_ptr,
    token_order_ptr,
    token_slots_ptr,
    segment_starts_ptr,
    segment_lengths_ptr,
    ranks_ptr,
    num_tokens,
    num_slots,
    blocks_per_slot,
    slot_programs,
    d_out,
    r_max,
    stride_b_slot,
    stride_b_out,
    stride_b_rank,
    stride_t_split,
    stride_t_row,
    stride_out_row,
    HAS_RANKS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GRID: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    WAIT_PRIOR: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    if WAIT_PRIOR:  # launched as a programmatic dependent: the prior grid's writes first
        gdc_wait()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < d_out
    if GRID != 0:
        if not ACCUMULATE:
            if pid_m >= slot_programs:
                # the tokens without a slot lead the slot-sorted order: write their zeros
                offsets = (pid_m - slot_programs) * BLOCK_M + tl.arange(0, BLOCK_M)
                in_none = offsets < tl.load(segment_starts_ptr)
                none_tokens = tl.load(token_order_ptr + offsets, mask=in_none, other=0)
                zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
                tile = out_ptr + none_tokens[:, None] * stride_out_row + outs[None, :]
                tl.store(tile, zeros, mask=in_none[:, None] & out_ok[None, :])
                return
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
    out_tile_ptr = out_ptr + tokens[:, None] * stride_out_row + outs[None, :]
    if not ACCUMULATE and GRID == 0:  # (both constexpr)
        # this block's tokens without a slot (positions past the end read as slot -1 too)
        positions = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        none = (slots < 0) & (positions < num_tokens)
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        tl.store(out_tile_ptr, zeros, mask=none[:, None] & out_ok[None, :])

    slot = first_slot(slots, num_slots)
    while slot < num_slots:
        rows = slots == slot
        rank = slot_rank(ranks_ptr, slot, r_max, HAS_RANKS)
        b_slot = B_ptr + slot * stride_b_slot
        acc = slot_expand(
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
            SPLIT_K,
            BLOCK_M,
            BLOCK_N,
            BLOCK_R,
            UPCAST,
            IEEE,
        )
        scale = tl.load(scales_ptr + slot)
        if ACCUMULATE:
            add_scaled(out_tile_ptr, rows[:, None] & out_ok[None, :], acc, scale)
        else:
            tile = (acc * scale).to(out_ptr.dtype.element_ty)
            tl.store(out_tile_ptr, tile, mask=rows[:, None] & out_ok[None, :])
        slot = next_slot(slots, slot, num_slots)


def lora_expand_(
    t: torch.Tensor,
    B: torch.Tensor,
    token_order: torch.Tensor,
    token_slots: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor | None,
    out: torch.Tensor,
    config: dict | None = None,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    accumulate: bool = True,
) -> None:
    """Adds the expand into ``out [T, d_out]`` (unit inner stride) in place; with
    ``accumulate=False`` writes it there instead (zeros for tokens without a slot), so ``out``
    may start uninitialised.

    ``t`` is ``[T, r_max]`` or split-K partials ``[SPLIT_K, T, r_max]`` (any float dtype, unit
    inner stride), ``B [S, d_out, r_max]`` (any strides; the backward passes ``A`` transposed),
    ``scales [S]`` float32.
    """
    check_dtype(B, "B")
    partials = t if t.dim() == 3 else t.unsqueeze(0)
    split_k, num_tokens, r_max = partials.shape
    num_slots, d_out, _ = B.shape
    if num_tokens == 0 or d_out == 0:
        return
    if r_max == 0:
        if not accumulate:
            out.zero_()
        return
    if config is None:
        config = lookup("expand", out.device, num_tokens, r_max, d_out)
    config = dict(config)
    block_r = rank_block(r_max, config.pop("MAX_BLOCK_R"))
    pdl = use_pdl(config, out.device)
    if pdl:  # (Triton's launch option; never passed where it does not apply, e.g. the interpreter)
        config["launch_pdl"] = True
    grid = Grid(config, num_tokens, num_slots, segments)
    starts, lengths = grid.pointers(token_order)
    programs = grid.slot_programs + (0 if accumulate else grid.none_programs())
    _lora_expand_kernel[(programs, cdiv(d_out, config["BLOCK_N"]))](
        partials,
        B,
        out,
        scales,
        token_order,
        token_slots,
        starts,
        lengths,
        ranks if ranks is not None else token_order,  # any pointer: HAS_RANKS=False never reads it
        num_tokens,
        num_slots,
        grid.blocks_per_slot,
        grid.slot_programs,
        d_out,
        r_max,
        *B.stride(),
        partials.stride(0),
        partials.stride(1),
        out.stride(0),
        HAS_RANKS=ranks is not None,
        SPLIT_K=split_k,
        BLOCK_R=block_r,
        GRID=grid.mode,
        BLOCK_S=grid.block_s,
        ACCUMULATE=accumulate,
        WAIT_PRIOR=pdl,
        UPCAST=INTERPRETED,
        IEEE=B.dtype == torch.float32,
        **config,
    )

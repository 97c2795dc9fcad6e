"""Multi-adapter LoRA delta ``out[i] += scales[a_i] * B[a_i][:, :k] @ (A[a_i][:k] @ x_i)``.

The split-K shrink writes float32 partial planes and the expand sums them while it reads:
two launches. A fused one-launch variant is kept for tables that ask for it (a ``fused`` row):
each program owns (a block of tokens, a block of outputs), computes the rank-k intermediate of
its tokens itself and expands it straight into its outputs. Every output block then recomputes
the shrink of the same tokens over all of d_in, and on an H200 that lost to the two launches on
every decode shape (2x to 10x slower), so no shipped table uses it.
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
    expand_tile,
    first_slot,
    grid_tokens,
    next_slot,
    rank_block,
    shrink_tile,
    slot_rank,
)
from .configs import find
from .lora_expand import lora_expand_
from .lora_shrink import lora_shrink_partials


@triton.jit
def _lora_delta_fused_kernel(
    x_ptr,
    A_ptr,
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
    d_in,
    d_out,
    r_max,
    stride_x_row,
    stride_a_slot,
    stride_a_rank,
    stride_a_col,
    stride_b_slot,
    stride_b_out,
    stride_b_rank,
    stride_out_row,
    HAS_RANKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GRID: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
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
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < d_out
    offs_r = tl.arange(0, BLOCK_R)
    out_tile_ptr = out_ptr + tokens[:, None] * stride_out_row + outs[None, :]

    slot = first_slot(slots, num_slots)
    while slot < num_slots:
        rows = slots == slot
        rank = slot_rank(ranks_ptr, slot, r_max, HAS_RANKS)
        a_slot = A_ptr + slot * stride_a_slot
        b_slot = B_ptr + slot * stride_b_slot
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            cols = r0 + offs_r
            col_ok = cols < rank
            t_tile = shrink_tile(
                x_ptr,
                tokens,
                rows,
                stride_x_row,
                a_slot,
                stride_a_rank,
                stride_a_col,
                cols,
                col_ok,
                0,
                d_in,
                BLOCK_M,
                BLOCK_K,
                BLOCK_R,
                UPCAST,
                IEEE,
            )
            acc += expand_tile(
                t_tile, b_slot, outs, out_ok, stride_b_out, stride_b_rank, cols, col_ok, UPCAST, IEEE
            )
        add_scaled(out_tile_ptr, rows[:, None] & out_ok[None, :], acc, tl.load(scales_ptr + slot))
        slot = next_slot(slots, slot, num_slots)


def lora_delta_fused_(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    token_order: torch.Tensor,
    token_slots: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor | None,
    out: torch.Tensor,
    config: dict,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """The one-launch delta (see the module docstring), added into ``out`` in place."""
    num_tokens, d_in = x.shape
    num_slots, r_max, _ = A.shape
    d_out = B.shape[1]
    config = dict(config)
    config.pop("PDL", None)  # one launch: no dependent to overlap
    block_r = rank_block(r_max, config.pop("MAX_BLOCK_R"))
    grid = Grid(config, num_tokens, num_slots, segments)
    starts, lengths = grid.pointers(token_order)
    _lora_delta_fused_kernel[(grid.slot_programs, cdiv(d_out, config["BLOCK_N"]))](
        x,
        A,
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
        d_in,
        d_out,
        r_max,
        x.stride(0),
        *A.stride(),
        *B.stride(),
        out.stride(0),
        HAS_RANKS=ranks is not None,
        BLOCK_R=block_r,
        GRID=grid.mode,
        BLOCK_S=grid.block_s,
        UPCAST=INTERPRETED,
        IEEE=x.dtype == torch.float32,
        **config,
    )


def lora_delta_(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    token_order: torch.Tensor,
    token_slots: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor | None,
    out: torch.Tensor,
    fused: bool | None = None,
    configs: dict | None = None,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    accumulate: bool = True,
    training: bool = False,
) -> torch.Tensor | None:
    """Adds the LoRA delta of every token into ``out [T, d_out]`` in place; with
    ``accumulate=False`` writes it there instead (zeros for tokens without a slot), so ``out``
    may start uninitialised.

    ``x [T, d_in]`` and ``out`` with unit inner stride; ``A``, ``B`` any strides (a rank-major
    ``B``, the transpose of ``[S, r_max, d_out]``, reads coalesced along d_out); ``ranks`` int64
    or None. ``fused`` None picks by the config table (a ``fused`` row that matches);
    ``configs`` may give ``{"fused": ..., "shrink": ..., "expand": ...}`` launch parameters;
    ``segments`` the batch's (segment_starts, segment_lengths), used by configs with SEGMENTED.
    ``training``: the partials returned feed a backward, so the shrink takes the table's
    ``train_shrink`` entry (kernels/configs.py).

    Returns the shrink's split-K partials ``[SPLIT_K, T, r_max]`` float32 (what the backward's
    ``t_partials`` takes; only the entries a slot owns are written), or None when the one-launch
    kernel ran or there was nothing to compute.
    """
    check_dtype(x, "x")
    num_tokens, d_in = x.shape
    r_max, d_out = A.shape[1], B.shape[1]
    if num_tokens == 0 or r_max == 0 or d_out == 0:
        if not accumulate:
            out.zero_()
        return None
    configs = configs or {}
    if fused is None:
        fused_config = configs.get("fused") or _fused_config(x.device, num_tokens, r_max, d_in)
        fused = fused_config is not None
    elif fused:
        fused_config = configs.get("fused") or _fused_config(x.device, 1, r_max, d_in)
        fused = fused_config is not None
    if fused:
        if not accumulate:
            out.zero_()
        lora_delta_fused_(x, A, B, token_order, token_slots, scales, ranks, out, fused_config, segments)
        return None
    kind = "train_shrink" if training else "shrink"
    partials = lora_shrink_partials(
        x, A, token_order, token_slots, ranks, configs.get("shrink"), segments, zeroed=False, kind=kind
    )
    lora_expand_(
        partials, B, token_order, token_slots, scales, ranks, out, configs.get("expand"), segments, accumulate
    )
    return partials


def _fused_config(device: torch.device, num_tokens: int, r_max: int, d_in: int) -> dict | None:
    return find("fused", device, num_tokens, r_max, d_in)  # None: no fused entry covers the shape

"""A base linear layer and its LoRA expand in one kernel: ``out = x @ W^T + bias + delta``.

``delta[i] = scales[a_i] * B[a_i][:, :k] @ t[i, :k]`` where ``t`` is the shrink of x, computed by
the shrink kernel just before (split-K partial planes, summed here while loading). One program
per (block of BLOCK_M slot-sorted positions, block of BLOCK_N outputs): the base GEMM over d_in
for every token of the block (tokens without a slot included), the bias, then the expand of each
slot present in the block added to the still-unwritten fp32 tile, written once. Against
``F.linear`` followed by the expand this saves the expand's launch and its read-modify-write of
``out``; launched as a programmatic dependent of the shrink (``PDL``), its base GEMM also runs
while the shrink finishes and it waits only before reading ``t``.

Meant for decode-sized token counts, where the GEMM streams W once and is memory-bound; the
config table's ``linear`` rows say where it is used (none: F.linear + lora_delta).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    block_tokens,
    cdiv,
    check_dtype,
    dot,
    first_slot,
    gdc_wait,
    next_slot,
    rank_block,
    slot_expand,
    slot_rank,
    use_pdl,
)
from .configs import find
from .lora_shrink import lora_shrink_partials


@triton.jit
def _lora_linear_kernel(
    x_ptr,
    W_ptr,
    bias_ptr,
    t_ptr,
    B_ptr,
    out_ptr,
    scales_ptr,
    token_order_ptr,
    token_slots_ptr,
    ranks_ptr,
    num_tokens,
    num_slots,
    d_in,
    d_out,
    r_max,
    stride_x_row,
    stride_w_out,
    stride_w_in,
    stride_b_slot,
    stride_b_out,
    stride_b_rank,
    stride_t_split,
    stride_t_row,
    stride_out_row,
    HAS_BIAS: tl.constexpr,
    HAS_RANKS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    WAIT_PRIOR: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tokens, slots = block_tokens(token_order_ptr, token_slots_ptr, pid_m, num_tokens, BLOCK_M)
    positions = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = positions < num_tokens
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < d_out
    offs_k = tl.arange(0, BLOCK_K)

    # the base GEMM: x and W were complete before the shrink began, so this part may overlap it
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < d_in
        x_tile = tl.load(
            x_ptr + tokens[:, None] * stride_x_row + ks[None, :],
            mask=in_range[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_tile = tl.load(
            W_ptr + outs[None, :] * stride_w_out + ks[:, None] * stride_w_in,
            mask=out_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc += dot(x_tile, w_tile, UPCAST, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]

    if WAIT_PRIOR:  # launched as a programmatic dependent of the shrink: its t first
        gdc_wait()
    slot = first_slot(slots, num_slots)
    while slot < num_slots:
        rows = slots == slot
        rank = slot_rank(ranks_ptr, slot, r_max, HAS_RANKS)
        b_slot = B_ptr + slot * stride_b_slot
        lora = slot_expand(
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
        acc += tl.where(rows[:, None], lora * tl.load(scales_ptr + slot), 0.0)
        slot = next_slot(slots, slot, num_slots)
    tl.store(
        out_ptr + tokens[:, None] * stride_out_row + outs[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=in_range[:, None] & out_ok[None, :],
    )


def linear_config(device: torch.device, num_tokens: int, r_max: int, d_in: int) -> dict | None:
    """The table's ``linear`` row for the shape, or None where the table leaves it to F.linear
    followed by lora_delta (no row, or ``"config": null``)."""
    return find("linear", device, num_tokens, r_max, d_in)


def lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    token_order: torch.Tensor,
    token_slots: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor | None,
    config: dict,
    out: torch.Tensor | None = None,
    shrink_config: dict | None = None,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` plus the LoRA delta of every token, written into ``out [T, d_out]``
    (a new tensor when None; it may start uninitialised): the shrink, then this kernel.

    ``x [T, d_in]`` and ``out`` with unit inner stride, ``W [d_out, d_in]`` and ``B`` any
    strides, ``bias [d_out]`` or None, ``scales`` float32, ``ranks`` int64 or None; ``config``
    the ``linear`` row (BLOCK_M, BLOCK_N, BLOCK_K, MAX_BLOCK_R, num_warps, num_stages, PDL),
    ``shrink_config`` and ``segments`` as for :func:`lora_shrink_partials`.
    """
    check_dtype(x, "x")
    num_tokens, d_in = x.shape
    num_slots, r_max, _ = A.shape
    d_out = W.shape[0]
    if out is None:
        out = torch.empty((num_tokens, d_out), dtype=x.dtype, device=x.device)
    if bias is not None:
        bias = bias.contiguous()  # (read with unit stride; an nn.Linear's bias already is)
    if num_tokens == 0 or d_out == 0:
        return out
    if r_max > 0:
        partials = lora_shrink_partials(
            x, A, token_order, token_slots, ranks, shrink_config, segments, zeroed=False
        )
    else:  # no rank columns: nothing to read (the kernel walks no rank pass)
        partials = x.new_empty((1, num_tokens, 1), dtype=torch.float32)
    config = dict(config)
    block_r = rank_block(max(r_max, 1), config.pop("MAX_BLOCK_R"))
    pdl = use_pdl(config, x.device)
    if pdl:  # (Triton's launch option; never passed where it does not apply, e.g. the interpreter)
        config["launch_pdl"] = True
    grid = (cdiv(num_tokens, config["BLOCK_M"]), cdiv(d_out, config["BLOCK_N"]))
    _lora_linear_kernel[grid](
        x,
        W,
        bias if bias is not None else W,  # any pointer: HAS_BIAS=False never reads it
        partials,
        B,
        out,
        scales,
        token_order,
        token_slots,
        ranks if ranks is not None else token_order,  # any pointer: HAS_RANKS=False never reads it
        num_tokens,
        num_slots,
        d_in,
        d_out,
        r_max,
        x.stride(0),
        *W.stride(),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        partials.stride(0),
        partials.stride(1),
        out.stride(0),
        HAS_BIAS=bias is not None,
        HAS_RANKS=ranks is not None,
        SPLIT_K=partials.shape[0],
        BLOCK_R=block_r,
        WAIT_PRIOR=pdl,
        UPCAST=INTERPRETED,
        IEEE=x.dtype == torch.float32,
        **config,
    )
    return out

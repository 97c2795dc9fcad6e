"""Backward of the multi-adapter LoRA delta, for training many adapters in one batch.

For token i with slot a, rank k and scale s (``t_i = A[a][:k] x_i``, ``u_i = B[a][:, :k]^T dy_i``)::

    dx_i = s * A[a][:k]^T u_i,    dA[a][:k] = s * sum_i u_i x_i^T,    dB[a][:, :k] = s * sum_i dy_i t_i^T

``u`` is the forward shrink run on ``dy`` with B read transposed, ``dx`` the forward expand of ``u``
with A read transposed: the forward kernels with other strides. The weight gradients are grouped
GEMMs over each slot's segment of the slot-sorted order: one program per (slot, block of
columns) walks its segment in order, so they need no atomics and repeat bit for bit. A config
may fuse the two uses of dy (``FUSE_DY``): u and dB then come from one read of dy, u as one
partial plane per block of columns, summed in order.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, cdiv, check_dtype, dot, next_power_of_2, slot_rank
from .configs import lookup
from .lora_expand import lora_expand_
from .lora_shrink import lora_shrink_partials


def dy_pass_pays(r_max: int, block_d: int, element_size: int) -> bool:
    """Whether the fused dy pass (``FUSE_DY``) is worth its planes at this rank: it writes one
    float32 plane of u per block of BLOCK_D columns of dy and then sums them, ``2 * 4 * r_max``
    bytes per token and block, to save reading the block's ``BLOCK_D * element_size`` bytes of dy
    a second time. It is used while that costs at most half of what it saves (bf16 with 128-wide
    blocks: ranks up to 16; 256-wide: up to 32)."""
    return 2 * 8 * r_max <= block_d * element_size


@triton.jit
def _segment_share(length, pid_split, BLOCK_M: tl.constexpr, SPLIT_M: tl.constexpr):
    """``[m_begin, m_end)``: program ``pid_split``'s share of a segment, whole blocks, SPLIT_M ways."""
    chunk = tl.cdiv(tl.cdiv(length, BLOCK_M), SPLIT_M) * BLOCK_M
    m_begin = pid_split * chunk
    return m_begin, tl.minimum(length, m_begin + chunk)


@triton.jit
def _coef_t_rows(
    coef_ptr, tokens, ranks_here, mask, stride_split, stride_row, rows, SPLIT: tl.constexpr, UPCAST, IEEE
):
    """``coef[tokens, ranks]^T @ rows`` ([BLOCK_R, BLOCK_D], float32): the coefficients' SPLIT
    planes summed in order while loading, only where ``mask`` ([BLOCK_R, BLOCK_M]) holds."""
    coef = tl.zeros(mask.shape, dtype=tl.float32)
    tile = coef_ptr + tokens[None, :] * stride_row + ranks_here[:, None]
    for part in range(SPLIT):
        coef += tl.load(tile + part * stride_split, mask=mask, other=0.0).to(tl.float32)
    return dot(coef.to(rows.dtype), rows, UPCAST, IEEE)


@triton.jit
def _lora_weight_grad_kernel(
    coef_ptr,
    rows_ptr,
    grad_ptr,
    scales_ptr,
    token_order_ptr,
    segment_starts_ptr,
    segment_lengths_ptr,
    ranks_ptr,
    grad_slots_ptr,
    width,
    r_max,
    stride_coef_split,
    stride_coef_row,
    stride_rows_row,
    stride_grad_split,
    stride_grad_slot,
    stride_grad_rank,
    stride_grad_col,
    HAS_RANKS: tl.constexpr,
    HAS_GRAD_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_M: tl.constexpr,
    SPLIT_COEF: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    slot = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_split = tl.program_id(2)
    start = tl.load(segment_starts_ptr + slot)
    length = tl.load(segment_lengths_ptr + slot)
    rank = slot_rank(ranks_ptr, slot, r_max, HAS_RANKS)
    if HAS_GRAD_SLOTS:  # a frozen slot's gradient is written as zeros, like its rows past the rank
        rank = tl.where(tl.load(grad_slots_ptr + slot) != 0, rank, 0)
    scale = tl.load(scales_ptr + slot)
    columns = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    column_ok = columns < width
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_begin, m_end = _segment_share(length, pid_split, BLOCK_M, SPLIT_M)
    # every rank row of the plane is written (zeros past the slot's rank), so the gradient
    # needs no zero-filled buffer; passes past the rank skip the token loop
    for r0 in range(0, r_max, BLOCK_R):
        ranks_here = r0 + offs_r
        rank_ok = ranks_here < rank
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        m_stop = tl.where(r0 < rank, m_end, m_begin)
        for m0 in range(m_begin, m_stop, BLOCK_M):
            in_segment = m0 + offs_m < m_end
            tokens = tl.load(token_order_ptr + start + m0 + offs_m, mask=in_segment, other=0)
            rows = tl.load(
                rows_ptr + tokens[:, None] * stride_rows_row + columns[None, :],
                mask=in_segment[:, None] & column_ok[None, :],
                other=0.0,
            )
            mask = rank_ok[:, None] & in_segment[None, :]  # (the shrink's split-K planes)
            acc += _coef_t_rows(
                coef_ptr,
                tokens,
                ranks_here,
                mask,
                stride_coef_split,
                stride_coef_row,
                rows,
                SPLIT_COEF,
                UPCAST,
                IEEE,
            )
        grad = grad_ptr + pid_split * stride_grad_split + slot * stride_grad_slot
        grad += ranks_here[:, None] * stride_grad_rank + columns[None, :] * stride_grad_col
        tl.store(
            grad,
            (acc * scale).to(grad_ptr.dtype.element_ty),
            mask=(ranks_here < r_max)[:, None] & column_ok[None, :],
        )


@triton.jit
def _lora_dy_pass_kernel(
    dy_ptr,
    B_ptr,
    t_ptr,
    u_ptr,
    grad_ptr,
    scales_ptr,
    token_order_ptr,
    segment_starts_ptr,
    segment_lengths_ptr,
    ranks_ptr,
    grad_slots_ptr,
    d_out,
    r_max,
    stride_dy_row,
    stride_b_slot,
    stride_b_out,
    stride_b_rank,
    stride_t_split,
    stride_t_row,
    stride_u_plane,
    stride_u_row,
    stride_grad_split,
    stride_grad_slot,
    stride_grad_rank,
    stride_grad_col,
    HAS_RANKS: tl.constexpr,
    HAS_GRAD_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_M: tl.constexpr,
    SPLIT_T: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One read of dy for both of its uses: program (slot, block of BLOCK_D columns of d_out,
    share of the segment) writes u's partial over its columns, ``dy[:, cols] @ B[slot][cols, :k]``,
    to plane ``pid_d`` of u, and accumulates dB's columns ``t^T dy[:, cols]`` as the weight
    gradient kernel does (a frozen slot's dB is written as zeros; its u is still computed)."""
    slot = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_split = tl.program_id(2)
    start = tl.load(segment_starts_ptr + slot)
    length = tl.load(segment_lengths_ptr + slot)
    rank = slot_rank(ranks_ptr, slot, r_max, HAS_RANKS)
    trains = True
    if HAS_GRAD_SLOTS:
        trains = tl.load(grad_slots_ptr + slot) != 0
    scale = tl.load(scales_ptr + slot)
    columns = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    column_ok = columns < d_out
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_begin, m_end = _segment_share(length, pid_split, BLOCK_M, SPLIT_M)
    b_slot = B_ptr + slot * stride_b_slot
    for r0 in range(0, r_max, BLOCK_R):
        ranks_here = r0 + offs_r
        rank_ok = ranks_here < rank
        coef_ok = rank_ok & trains
        b_tile = tl.load(  # B[slot][cols, r0 : r0 + BLOCK_R], [BLOCK_D, BLOCK_R]
            b_slot + columns[:, None] * stride_b_out + ranks_here[None, :] * stride_b_rank,
            mask=column_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        m_stop = tl.where(r0 < rank, m_end, m_begin)
        for m0 in range(m_begin, m_stop, BLOCK_M):
            in_segment = m0 + offs_m < m_end
            tokens = tl.load(token_order_ptr + start + m0 + offs_m, mask=in_segment, other=0)
            rows = tl.load(
                dy_ptr + tokens[:, None] * stride_dy_row + columns[None, :],
                mask=in_segment[:, None] & column_ok[None, :],
                other=0.0,
            )
            u_part = dot(rows, b_tile, UPCAST, IEEE)
            tl.store(
                u_ptr + pid_d * stride_u_plane + tokens[:, None] * stride_u_row + ranks_here[None, :],
                u_part,
                mask=in_segment[:, None] & rank_ok[None, :],
            )
            mask = coef_ok[:, None] & in_segment[None, :]  # (the forward shrink's split-K planes)
            acc += _coef_t_rows(
                t_ptr, tokens, ranks_here, mask, stride_t_split, stride_t_row, rows, SPLIT_T, UPCAST, IEEE
            )
        grad = grad_ptr + pid_split * stride_grad_split + slot * stride_grad_slot
        grad += ranks_here[:, None] * stride_grad_rank + columns[None, :] * stride_grad_col
        tl.store(
            grad,
            (acc * scale).to(grad_ptr.dtype.element_ty),
            mask=(ranks_here < r_max)[:, None] & column_ok[None, :],
        )


def _weight_grad(
    coef: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    grad_strides: tuple[int, int, int],
    scales: torch.Tensor,
    token_order: torch.Tensor,
    segment_starts: torch.Tensor,
    segment_lengths: torch.Tensor,
    ranks: torch.Tensor | None,
    grad_slots: torch.Tensor | None,
    config: dict,
) -> None:
    """grad[slot] (seen through grad_strides as [r_max, width]) = scale * coef^T rows per slot.

    ``coef`` is ``[T, r_max]`` or split-K partial planes ``[SPLIT_K, T, r_max]`` (summed while
    loading; only the entries a slot owns are read).

    Each slot's segment is split SPLIT_M ways (config; 0 picks enough splits to give the GPU's
    multiprocessors two programs each): the splits write float32 partial planes, summed in a
    fixed order afterwards, so a batch of one or few slots still fills the GPU without atomics.
    With ``SUM_COEF`` set (config), split-K planes of ``coef`` are summed into one first: every
    program (one per block of columns) reads the coefficients of its tokens, so with many column
    blocks one summing pass can cost less than reading every plane in each of them.
    """
    config = dict(config)
    config.pop("FUSE_DY", None)
    coef = coef if coef.dim() == 3 else coef.unsqueeze(0)
    if config.pop("SUM_COEF", 0) and coef.shape[0] > 1:
        # (entries no slot owns may hold anything; the kernel never reads them)
        coef = coef.sum(0, keepdim=True)
    width, r_max = rows.shape[1], coef.shape[2]
    split = _SplitPlanes(config, grad, grad_strides, rows.shape[0], segment_starts.shape[0], width, r_max)
    _lora_weight_grad_kernel[split.grid](
        coef,
        rows,
        split.target,
        scales,
        token_order,
        segment_starts,
        segment_lengths,
        ranks if ranks is not None else token_order,  # any pointer: HAS_RANKS=False never reads it
        grad_slots if grad_slots is not None else token_order,
        width,
        r_max,
        coef.stride(0),
        coef.stride(1),
        rows.stride(0),
        *split.strides,
        HAS_RANKS=ranks is not None,
        HAS_GRAD_SLOTS=grad_slots is not None,
        BLOCK_R=split.block_r,
        SPLIT_M=split.split_m,
        SPLIT_COEF=coef.shape[0],
        UPCAST=INTERPRETED,
        IEEE=rows.dtype == torch.float32,
        **config,
    )
    split.reduce()


class _SplitPlanes:
    """The grid of a per-slot column-block kernel over ``width`` columns, with each slot's
    segment split SPLIT_M ways (config, popped; 0 picks enough splits for two programs per
    multiprocessor): the splits write float32 planes ``[SPLIT_M, S, r_max, width]`` that
    :meth:`reduce` sums into ``grad`` in a fixed order; with one split the kernel writes ``grad``."""

    def __init__(self, config, grad, grad_strides, num_tokens, num_slots, width, r_max) -> None:
        self.block_r = max(16, min(config.pop("MAX_BLOCK_R"), next_power_of_2(max(r_max, 1))))
        column_blocks = cdiv(width, config["BLOCK_D"])
        split_m = config.pop("SPLIT_M", 0)
        if split_m <= 0:
            wanted = cdiv(2 * _multiprocessors(grad.device), num_slots * column_blocks)
            split_m = max(1, min(16, wanted, cdiv(num_tokens, config["BLOCK_M"])))
        self.split_m, self.grid = split_m, (num_slots, column_blocks, split_m)
        self._grad, self._shape, self._grad_strides = grad, (num_slots, r_max, width), grad_strides
        self.target, self.strides = grad, (0, *grad_strides)
        if split_m > 1:  # (every entry of every plane is written)
            self.target = torch.empty(split_m, *self._shape, dtype=torch.float32, device=grad.device)
            self.strides = self.target.stride()

    def reduce(self) -> None:
        if self.split_m > 1:
            torch.sum(self.target, dim=0, out=self._grad.as_strided(self._shape, self._grad_strides))


def _dy_pass(
    grad_out: torch.Tensor,
    B: torch.Tensor,
    t: torch.Tensor,
    dB: torch.Tensor,
    scales: torch.Tensor,
    token_order: torch.Tensor,
    segment_starts: torch.Tensor,
    segment_lengths: torch.Tensor,
    ranks: torch.Tensor | None,
    grad_slots: torch.Tensor | None,
    config: dict,
) -> torch.Tensor:
    """dB (zeros for frozen slots) and ``u = B^T dy`` from one read of ``grad_out``: returns u as
    one float32 plane ``[1, T, r_max]`` (entries no slot owns hold anything), the sum of the
    kernel's per-column-block planes. ``t``: the forward's shrink of x (split-K planes or not)."""
    config = dict(config)
    for key in ("FUSE_DY", "SUM_COEF"):
        config.pop(key, None)
    t = t if t.dim() == 3 else t.unsqueeze(0)
    num_tokens, d_out = grad_out.shape
    r_max = B.shape[2]
    strides = (dB.stride(0), dB.stride(2), dB.stride(1))  # dB[slot] written as [r_max, d_out]
    split = _SplitPlanes(config, dB, strides, num_tokens, segment_starts.shape[0], d_out, r_max)
    u = torch.empty(split.grid[1], num_tokens, r_max, dtype=torch.float32, device=grad_out.device)
    _lora_dy_pass_kernel[split.grid](
        grad_out,
        B,
        t,
        u,
        split.target,
        scales,
        token_order,
        segment_starts,
        segment_lengths,
        ranks if ranks is not None else token_order,  # any pointer: HAS_RANKS=False never reads it
        grad_slots if grad_slots is not None else token_order,
        d_out,
        r_max,
        grad_out.stride(0),
        *B.stride(),
        t.stride(0),
        t.stride(1),
        u.stride(0),
        u.stride(1),
        *split.strides,
        HAS_RANKS=ranks is not None,
        HAS_GRAD_SLOTS=grad_slots is not None,
        BLOCK_R=split.block_r,
        SPLIT_M=split.split_m,
        SPLIT_T=t.shape[0],
        UPCAST=INTERPRETED,
        IEEE=grad_out.dtype == torch.float32,
        **config,
    )
    split.reduce()
    return u.sum(0, keepdim=True) if u.shape[0] > 1 else u


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_multiprocessors(index: int) -> int:  # asked once per GPU, not on every backward launch
    return torch.cuda.get_device_properties(index).multi_processor_count


def lora_delta_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    token_order: torch.Tensor,
    token_slots: torch.Tensor,
    segment_starts: torch.Tensor,
    segment_lengths: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor | None,
    grad_slots: torch.Tensor | None,
    needs: tuple[bool, bool, bool] = (True, True, True),
    configs: dict | None = None,
    t_partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dA, dB)`` of lora_delta (None where ``needs`` is False).

    ``grad_out [T, d_out]`` and ``x [T, d_in]`` with unit inner stride, ``A``/``B`` contiguous;
    weight gradients only for slots with ``grad_slots`` True (all when None), zero elsewhere.
    ``t_partials``: the forward's shrink partials of ``x`` (what ``lora_delta_`` returns), so dB
    need not run the shrink of x again.

    Launches: the shrink of dy, the expand that writes dx (no zero-filled buffer), the weight
    gradients of A and B reading the shrink's split-K planes as they are (no reduction launch),
    and the shrink of x only when ``t_partials`` is not given. With ``FUSE_DY`` in the weight
    gradient's config (at the ranks where :func:`dy_pass_pays`), one kernel reads dy once for both u
    and dB (:func:`_dy_pass`) instead of the shrink of dy and dB's weight gradient.
    """
    check_dtype(x, "x")
    needs_x, needs_A, needs_B = needs
    configs = configs or {}
    num_tokens, d_in = x.shape
    r_max, d_out = A.shape[1], B.shape[1]
    grad_out = grad_out.to(x.dtype)
    # every kernel below writes all of its output (zeros where a gradient is zero): no fills
    dx = torch.empty_like(x) if needs_x else None
    dA = torch.empty_like(A, memory_format=torch.contiguous_format) if needs_A else None
    dB = torch.empty_like(B, memory_format=torch.contiguous_format) if needs_B else None
    if num_tokens == 0 or r_max == 0:
        return tuple(g.zero_() if g is not None else None for g in (dx, dA, dB))
    grad_config = configs.get("weight_grad") or lookup(
        "weight_grad", x.device, num_tokens, r_max, max(d_in, d_out)
    )
    segments = (token_order, segment_starts, segment_lengths)

    def shrink_of_x() -> torch.Tensor:
        if t_partials is not None:
            return t_partials
        return lora_shrink_partials(
            x,
            A,
            token_order,
            token_slots,
            ranks,
            configs.get("shrink"),
            (segment_starts, segment_lengths),
            zeroed=False,
            kind="train_shrink",
        )

    fuse_dy = (
        grad_config.get("FUSE_DY", 0)
        and needs_B
        and (needs_x or needs_A)
        and dy_pass_pays(r_max, grad_config["BLOCK_D"], grad_out.element_size())
    )
    if fuse_dy:  # u and dB from one read of dy
        u_partials = _dy_pass(
            grad_out, B, shrink_of_x(), dB, scales, *segments, ranks, grad_slots, grad_config
        )
        needs_B = False  # written
    elif needs_x or needs_A:
        # u = B^T dy: the shrink with B read as [S, r_max, d_out]; its readers (the expand and
        # the weight gradient) read only the entries a slot owns, so it is never zero-filled
        u_partials = lora_shrink_partials(
            grad_out,
            B.transpose(1, 2),
            token_order,
            token_slots,
            ranks,
            configs.get("shrink"),
            (segment_starts, segment_lengths),
            zeroed=False,
            kind="train_shrink",
        )
    if needs_x or needs_A:
        if needs_x:  # dx = s * A^T u: the expand with A read as [S, d_in, r_max], written
            lora_expand_(
                u_partials,
                A.transpose(1, 2),
                token_order,
                token_slots,
                scales,
                ranks,
                dx,
                configs.get("expand"),
                (segment_starts, segment_lengths),
                accumulate=False,
            )
        if needs_A:
            _weight_grad(u_partials, x, dA, dA.stride(), scales, *segments, ranks, grad_slots, grad_config)
    if needs_B:
        strides = (dB.stride(0), dB.stride(2), dB.stride(1))  # dB[slot] written as [r_max, d_out]
        _weight_grad(shrink_of_x(), grad_out, dB, strides, scales, *segments, ranks, grad_slots, grad_config)
    return dx, dA, dB

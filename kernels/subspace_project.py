"""Subspace projection: express many weight rows in an orthonormal basis, and measure what is lost.

For ``weights [M, d]`` (the rank rows of many adapters, flattened) and a basis ``[K, d]`` with
orthonormal rows, one launch computes ``coefficients = weights @ basis^T [M, K]`` and, per row,
the squared residual ``|w - coefficients @ basis|^2`` of the reconstruction. One program owns
BLOCK_ROWS rows: a first pass over d accumulates their coefficients, a second reads the rows
again and subtracts the reconstruction tile by tile, so the reconstruction is never written out.
Everything accumulates in float32 with IEEE dots (no TF32): this is an offline, accuracy-first op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, cdiv, check_dtype, next_power_of_2

MAX_BASIS = 1024  # K held in registers per program; larger bases are split by the caller


@triton.jit
def _subspace_project_kernel(
    weights_ptr,
    basis_ptr,
    coefficients_ptr,
    residual_ptr,
    num_rows,
    d,
    K,
    stride_w_row,
    stride_w_col,
    stride_basis_k,
    stride_basis_col,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    coefficients = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.float32)
    for d_begin in range(0, d, BLOCK_D):
        cols = d_begin + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        w = tl.load(
            weights_ptr + rows[:, None] * stride_w_row + cols[None, :] * stride_w_col,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        basis_t = tl.load(
            basis_ptr + ks[None, :] * stride_basis_k + cols[:, None] * stride_basis_col,
            mask=k_ok[None, :] & col_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        coefficients += tl.dot(w, basis_t, input_precision="ieee")
    residual = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for d_begin in range(0, d, BLOCK_D):
        cols = d_begin + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        w = tl.load(
            weights_ptr + rows[:, None] * stride_w_row + cols[None, :] * stride_w_col,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        basis = tl.load(
            basis_ptr + ks[:, None] * stride_basis_k + cols[None, :] * stride_basis_col,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        difference = w - tl.dot(coefficients, basis, input_precision="ieee")
        residual += tl.sum(difference * difference, axis=1)
    tl.store(
        coefficients_ptr + rows[:, None] * K + ks[None, :],
        coefficients,
        mask=row_ok[:, None] & k_ok[None, :],
    )
    tl.store(residual_ptr + rows, residual, mask=row_ok)


def subspace_project(weights: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coefficients [M, K] fp32, residual [M] fp32)`` of ``weights [M, d]`` on ``basis [K, d]``.

    Both may be strided (a transposed B works in place); ``basis`` rows must be orthonormal for
    the residual to be the projection error.
    """
    check_dtype(weights, "weights")
    check_dtype(basis, "basis")
    num_rows, d = weights.shape
    K = basis.shape[0]
    if K > MAX_BASIS:
        raise ValueError(f"basis has {K} rows; the kernel holds at most {MAX_BASIS}")
    coefficients = torch.empty(num_rows, K, dtype=torch.float32, device=weights.device)
    residual = torch.empty(num_rows, dtype=torch.float32, device=weights.device)
    if num_rows == 0:
        return coefficients, residual
    block_k = max(16, next_power_of_2(K))
    block_rows = 16 if INTERPRETED else max(16, min(64, 8192 // block_k))
    block_d = 128 if INTERPRETED else 64
    grid = (cdiv(num_rows, block_rows),)
    _subspace_project_kernel[grid](
        weights,
        basis,
        coefficients,
        residual,
        num_rows,
        d,
        K,
        weights.stride(0),
        weights.stride(1),
        basis.stride(0),
        basis.stride(1),
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        BLOCK_K=block_k,
    )
    return coefficients, residual

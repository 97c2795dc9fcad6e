"""The specification: readable torch implementations of every lora_fast op.

Each kernel backend is tested against these functions, and they are the `torch` backend that runs
wherever no compiled kernel does. Arguments are not validated here (lora_fast.ops does that).

Notation: T tokens, S slots, ``x [T, d_in]``, ``A [S, r_max, d_in]``, ``B [S, d_out, r_max]``,
``scales [S]`` float32 (or float64 for float64 inputs), ``ranks [S]`` ints (default: every slot
has rank r_max). Token i with slot ``a = batch.token_slots[i]`` and rank ``k = ranks[a]`` gets::

    delta_i = scales[a] * B[a][:, :k] @ (A[a][:k] @ x_i)

and a token with slot -1 gets nothing. Accumulation is in float32 (float64 for float64 inputs);
a result added into ``out`` is rounded to out's dtype once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .batch import AdapterBatch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the ops accumulate in, and the dtype of the shrink output ``t``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slot_segments(batch: AdapterBatch) -> Iterator[tuple[int, torch.Tensor]]:
    """(slot, token indices) for every slot that has tokens, in slot order."""
    starts = batch.segment_starts.tolist()
    lengths = batch.segment_lengths.tolist()
    for slot in batch.active_slots.tolist():
        yield slot, batch.token_order[starts[slot] : starts[slot] + lengths[slot]]


def _rank(ranks: torch.Tensor | None, slot: int, r_max: int) -> int:
    return r_max if ranks is None else int(ranks[slot])


def lora_shrink(
    x: torch.Tensor, A: torch.Tensor, batch: AdapterBatch, ranks: torch.Tensor | None = None
) -> torch.Tensor:
    """``t [T, r_max]``: ``t[i, :k] = A[a_i, :k] @ x_i``; every other entry is 0."""
    acc = accumulation_dtype(x.dtype)
    r_max = A.shape[1]
    t = torch.zeros(x.shape[0], r_max, dtype=acc, device=x.device)
    for slot, tokens in slot_segments(batch):
        k = _rank(ranks, slot, r_max)
        t[tokens, :k] = x[tokens].to(acc) @ A[slot, :k].to(acc).T
    return t


def lora_expand(
    t: torch.Tensor,
    B: torch.Tensor,
    batch: AdapterBatch,
    scales: torch.Tensor,
    out: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adds ``scales[a_i] * B[a_i][:, :k] @ t[i, :k]`` into ``out[i]`` in place; returns ``out``.

    Only the first k columns of t are read.
    """
    acc = accumulation_dtype(out.dtype)
    r_max = B.shape[2]
    for slot, tokens in slot_segments(batch):
        k = _rank(ranks, slot, r_max)
        delta = (t[tokens, :k].to(acc) @ B[slot, :, :k].to(acc).T) * scales[slot].to(acc)
        out[tokens] = (out[tokens].to(acc) + delta).to(out.dtype)
    return out


def lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    batch: AdapterBatch,
    scales: torch.Tensor,
    ranks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA delta of every token, added into ``out`` when given, else into zeros ``[T, d_out]``."""
    if out is None:
        out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    t = lora_shrink(x, A, batch, ranks)
    return lora_expand(t, B, batch, scales, out, ranks)


def fused_lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    batch: AdapterBatch,
    scales: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """A base linear layer with the LoRA delta: ``x @ W^T + bias + lora_delta(x, ...)``.

    ``W [d_out, d_in]``, ``bias [d_out]`` or None. Accumulated in the accumulation dtype and
    rounded to x's dtype once.
    """
    acc = accumulation_dtype(x.dtype)
    y = torch.nn.functional.linear(x.to(acc), W.to(acc), None if bias is None else bias.to(acc))
    return lora_delta(x, A, B, batch, scales, ranks, out=y).to(x.dtype)


def lora_delta_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    batch: AdapterBatch,
    scales: torch.Tensor,
    ranks: torch.Tensor | None = None,
    grad_slots: torch.Tensor | None = None,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``lora_delta``'s output w.r.t. ``(x, A, B)``; None where ``needs`` is False.

    For token i with slot a, rank k, scale s, ``t_i = A[a][:k] @ x_i`` and ``u_i = B[a][:, :k]^T
    @ grad_out_i``::

        dx_i = s * A[a][:k]^T @ u_i
        dA[a][:k] = s * sum_i u_i x_i^T        dB[a][:, :k] = s * sum_i grad_out_i t_i^T

    summed over the slot's tokens. Entries past a slot's rank are zero, and so are the weight
    gradients of slots with ``grad_slots[a] == False`` (they are not computed).
    """
    needs_x, needs_A, needs_B = needs
    acc = accumulation_dtype(x.dtype)
    r_max = A.shape[1]
    dx = torch.zeros_like(x) if needs_x else None
    dA = torch.zeros_like(A) if needs_A else None
    dB = torch.zeros_like(B) if needs_B else None
    for slot, tokens in slot_segments(batch):
        k = _rank(ranks, slot, r_max)
        scale = scales[slot].to(acc)
        a = A[slot, :k].to(acc)
        b = B[slot, :, :k].to(acc)
        x_rows = x[tokens].to(acc)
        grad_rows = grad_out[tokens].to(acc)
        u = grad_rows @ b
        if needs_x:
            dx[tokens] = (u @ a * scale).to(x.dtype)
        if grad_slots is not None and not bool(grad_slots[slot]):
            continue
        if needs_A:
            dA[slot, :k] = (u.T @ x_rows * scale).to(A.dtype)
        if needs_B:
            dB[slot, :, :k] = (grad_rows.T @ (x_rows @ a.T) * scale).to(B.dtype)
    return dx, dA, dB


# ---------------------------------------------------------------------------------------------
# Subspace ops: adapters expressed as coefficients on a shared orthonormal basis.


def subspace_project(weights: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weights [N, r, d]`` on ``basis [K, d]`` (orthonormal rows): ``(coefficients [N, r, K],
    residual [N])`` with ``coefficients = weights @ basis^T`` and ``residual[n] = |W_n -
    coefficients_n @ basis|_F^2``, the squared error of the reconstruction."""
    acc = accumulation_dtype(weights.dtype)
    w = weights.to(acc)
    b = basis.to(acc)
    coefficients = w @ b.T
    residual = (w - coefficients @ b).square().sum(dim=(1, 2))
    return coefficients, residual


def subspace_weights(
    basis_A: torch.Tensor, loadings_A: torch.Tensor, loadings_B: torch.Tensor, basis_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA weights that loadings stand for: ``A = loadings_A @ basis_A [S, r, d_in]`` and
    ``B = basis_B^T @ loadings_B [S, d_out, r]``, from ``basis_A [K_A, d_in]``,
    ``loadings_A [S, r, K_A]``, ``loadings_B [S, K_B, r]``, ``basis_B [K_B, d_out]``."""
    return loadings_A @ basis_A, basis_B.T @ loadings_B


def subspace_lora_delta(
    x: torch.Tensor,
    basis_A: torch.Tensor,
    loadings_A: torch.Tensor,
    loadings_B: torch.Tensor,
    basis_B: torch.Tensor,
    batch: AdapterBatch,
    scales: torch.Tensor,
    ranks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lora_delta`` of the adapters that ``subspace_weights`` materialises."""
    A, B = subspace_weights(basis_A, loadings_A, loadings_B, basis_B)
    return lora_delta(x, A, B, batch, scales, ranks, out)

"""Ops on adapters stored as coefficients on a shared basis (EigenLoRAx-style serving).

A basis ``[K, d]`` has orthonormal rows spanning the directions many adapters use. An adapter on
the bases ``basis_A [K_A, d_in]`` and ``basis_B [K_B, d_out]`` is a pair of loadings
``loadings_A [r, K_A]``, ``loadings_B [K_B, r]`` standing for ``A = loadings_A @ basis_A`` and
``B = basis_B^T @ loadings_B``. Two ops:

- ``subspace_project``: many adapters' weights onto a basis in one launch (Triton on GPU), with
  each adapter's reconstruction error;
- ``subspace_lora_delta``: the multi-adapter delta straight from loadings: ``x @ basis_A^T`` is one
  dense GEMM for all tokens, the per-token part is ``lora_delta`` on K-sized vectors, and
  ``@ basis_B`` is one more dense GEMM. It equals ``lora_delta`` on the materialised weights
  without ever holding them. Re-exported by ``lora_fast.ops``; semantics in ``lora_fast.reference``.
"""

from __future__ import annotations

import torch

from . import _checks as check
from . import reference
from .backends import select
from .batch import AdapterBatch
from .ops import lora_delta

Tensor = torch.Tensor
ORTHONORMAL_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _project_rows_impl(weights: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    if select(weights.device, weights.dtype) == "triton":
        from . import kernels

        return kernels.subspace_project(weights, basis)
    coefficients, _ = reference.subspace_project(weights[None], basis)
    acc = coefficients.dtype
    residual = (weights.to(acc) - coefficients[0] @ basis.to(acc)).square().sum(dim=1)
    return coefficients[0], residual


_subspace_project_rows = torch.library.custom_op(
    "lora_fast::subspace_project_rows", _project_rows_impl, mutates_args=()
)


@_subspace_project_rows.register_fake
def _(weights, basis):
    acc = reference.accumulation_dtype(weights.dtype)
    return (
        weights.new_empty((weights.shape[0], basis.shape[0]), dtype=acc),
        weights.new_empty((weights.shape[0],), dtype=acc),
    )


def check_basis(basis: object, name: str, d: int, d_name: str) -> Tensor:
    """A ``[K, d]`` float tensor with orthonormal rows, else ValueError/TypeError naming ``name``."""
    basis = check.float_tensor(basis, name, 2)
    check.dim_size(basis, name, 1, d, d_name)
    K = basis.shape[0]
    if not 1 <= K <= d:
        raise ValueError(f"{name} must have between 1 and {d} rows ({d_name}), got {K}")
    gram = basis.double() @ basis.double().T
    error = (gram - torch.eye(K, dtype=torch.float64, device=basis.device)).abs().max().item()
    if not error <= ORTHONORMAL_TOLERANCE[basis.dtype]:
        raise ValueError(f"{name} rows must be orthonormal; |{name} {name}^T - I| reaches {error:.3g}")
    return basis


def subspace_project(weights: Tensor, basis: Tensor, check_args: bool = True) -> tuple[Tensor, Tensor]:
    """Project ``weights [N, r, d]`` (N adapters' rank rows: A, or B transposed) onto ``basis [K, d]``.

    Returns ``(coefficients [N, r, K], residual [N])`` in float32 (float64 for float64 inputs):
    ``weights[n] ~ coefficients[n] @ basis`` and ``residual[n]`` is that reconstruction's squared
    Frobenius error. ``basis`` rows must be orthonormal (checked unless ``check_args=False``).
    """
    if check_args:
        weights = check.float_tensor(weights, "weights", 3)
        check_basis(basis, "basis", weights.shape[2], "weights.shape[2]")
        check.same_dtype(basis, "basis", weights.dtype, "weights")
        if basis.device != weights.device:
            raise ValueError(f"basis is on {basis.device} but weights are on {weights.device}")
    N, r, d = weights.shape
    rows = weights.reshape(N * r, d)
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and weights.requires_grad:
        coefficients, residual = _subspace_project_rows(rows, basis)
    else:
        coefficients, residual = _project_rows_impl(rows, basis)
    return coefficients.view(N, r, -1), residual.view(N, r).sum(dim=1)


def subspace_lora_delta(
    x: Tensor,
    basis_A: Tensor,
    loadings_A: Tensor,
    loadings_B: Tensor,
    basis_B: Tensor,
    batch: AdapterBatch,
    scales: Tensor,
    ranks: Tensor | None = None,
    out: Tensor | None = None,
    grad_slots: Tensor | None = None,
    check_args: bool = True,
) -> Tensor:
    """The multi-adapter LoRA delta of adapters stored as loadings on shared bases.

    ``x [T, d_in]``, ``basis_A [K_A, d_in]``, ``loadings_A [S, r_max, K_A]``, ``loadings_B
    [S, K_B, r_max]``, ``basis_B [K_B, d_out]``, all one dtype; ``scales``, ``ranks``, ``out`` and
    ``grad_slots`` as in ``lora_delta``. Token i with slot a gets ``scales[a] * B_a A_a x_i`` with
    ``A_a = loadings_A[a] @ basis_A`` and ``B_a = basis_B^T @ loadings_B[a]``. Differentiable
    w.r.t. everything; the bases are usually frozen and only the loadings train.
    """
    if check_args:
        x = check.float_tensor(x, "x", 2)
        basis_A = check.float_tensor(basis_A, "basis_A", 2)
        basis_B = check.float_tensor(basis_B, "basis_B", 2)
        check.dim_size(basis_A, "basis_A", 1, x.shape[1], "d_in of x")
        loadings_A = check.float_tensor(loadings_A, "loadings_A", 3)
        loadings_B = check.float_tensor(loadings_B, "loadings_B", 3)
        check.dim_size(loadings_A, "loadings_A", 2, basis_A.shape[0], "K_A (basis_A.shape[0])")
        check.dim_size(loadings_B, "loadings_B", 1, basis_B.shape[0], "K_B (basis_B.shape[0])")
        for name, value in (("basis_A", basis_A), ("basis_B", basis_B)):
            check.same_dtype(value, name, x.dtype, "x")
        if out is not None:
            out = check.float_tensor(out, "out", 2)
            check.dim_size(out, "out", 1, basis_B.shape[1], "d_out (basis_B.shape[1])")
            check.dim_size(out, "out", 0, x.shape[0], "the token count of x")
            check.same_dtype(out, "out", x.dtype, "x")
    check.batch(batch)
    if out is None:
        out = x.new_zeros(x.shape[0], basis_B.shape[1])
    if not torch.compiler.is_compiling() and batch.all_none:  # reads a host value: eager only
        return out
    projected = x @ basis_A.T
    coefficients = lora_delta(
        projected, loadings_A, loadings_B, batch, scales, ranks, grad_slots=grad_slots, check_args=check_args
    )
    return out.addmm_(coefficients, basis_B)

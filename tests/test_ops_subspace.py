"""Subspace ops (projection onto a basis, delta from loadings) against the reference."""

import pytest
import torch

import lora_fast
from lora_fast import ops, reference

from .helpers import assert_close, naive_delta

BACKENDS = ["torch", "cpu"]


def orthonormal(k: int, d: int, dtype=torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))
    return q.T.contiguous().to(dtype)


def loadings_case(T=29, S=5, d_in=40, d_out=36, K_A=12, K_B=10, r=6, dtype=torch.float64):
    ids = torch.randint(0, S, (T,))
    ids[torch.rand(T) < 0.25] = -1
    ranks = torch.randint(0, r + 1, (S,))
    ranks[0] = r
    return {
        "x": torch.randn(T, d_in, dtype=torch.float64).to(dtype),
        "basis_A": orthonormal(K_A, d_in, dtype),
        "loadings_A": torch.randn(S, r, K_A, dtype=torch.float64).to(dtype),
        "loadings_B": torch.randn(S, K_B, r, dtype=torch.float64).to(dtype),
        "basis_B": orthonormal(K_B, d_out, dtype),
        "batch": lora_fast.AdapterBatch(ids, S),
        "ids": ids,
        "scales": (torch.rand(S) + 0.5).float(),
        "ranks": ranks,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_out", [False, True])
def test_subspace_lora_delta_equals_materialised_adapters(backend, with_out):
    c = loadings_case()
    A, B = reference.subspace_weights(c["basis_A"], c["loadings_A"], c["loadings_B"], c["basis_B"])
    expected = naive_delta(c["x"], A, B, c["ids"], c["scales"], c["ranks"])
    base = torch.randn(c["x"].shape[0], B.shape[1], dtype=torch.float64)
    out = base.clone() if with_out else None
    with lora_fast.use_backend(backend):
        got = ops.subspace_lora_delta(
            c["x"],
            c["basis_A"],
            c["loadings_A"],
            c["loadings_B"],
            c["basis_B"],
            c["batch"],
            c["scales"],
            c["ranks"],
            out=out,
        )
    assert_close(got, expected + base if with_out else expected, torch.float64)
    assert got[c["ids"] < 0].eq(base[c["ids"] < 0] if with_out else 0).all()
    assert_close(
        reference.subspace_lora_delta(
            c["x"],
            c["basis_A"],
            c["loadings_A"],
            c["loadings_B"],
            c["basis_B"],
            c["batch"],
            c["scales"],
            c["ranks"],
        ),
        expected,
        torch.float64,
    )


def test_subspace_lora_delta_gradcheck_loadings_and_x():
    c = loadings_case(T=9, S=3, d_in=7, d_out=6, K_A=4, K_B=3, r=2)
    inputs = [c["x"].requires_grad_(), c["loadings_A"].requires_grad_(), c["loadings_B"].requires_grad_()]

    def fn(x, loadings_A, loadings_B):
        return ops.subspace_lora_delta(
            x, c["basis_A"], loadings_A, loadings_B, c["basis_B"], c["batch"], c["scales"], c["ranks"]
        )

    for backend in BACKENDS:
        with lora_fast.use_backend(backend):
            assert torch.autograd.gradcheck(fn, inputs)


def test_subspace_lora_delta_all_none_is_zero():
    c = loadings_case(T=6)
    batch = lora_fast.AdapterBatch(torch.full((6,), -1), 5)
    got = ops.subspace_lora_delta(
        c["x"], c["basis_A"], c["loadings_A"], c["loadings_B"], c["basis_B"], batch, c["scales"]
    )
    assert got.eq(0).all()


def test_subspace_lora_delta_rejects_mismatched_loadings():
    c = loadings_case()
    with pytest.raises(ValueError, match="loadings_A"):
        ops.subspace_lora_delta(
            c["x"],
            c["basis_A"],
            c["loadings_A"][..., :-1],
            c["loadings_B"],
            c["basis_B"],
            c["batch"],
            c["scales"],
        )
    with pytest.raises(ValueError, match="basis_A"):
        ops.subspace_lora_delta(
            c["x"][:, :-1],
            c["basis_A"],
            c["loadings_A"],
            c["loadings_B"],
            c["basis_B"],
            c["batch"],
            c["scales"],
        )
    with pytest.raises(TypeError, match="out has dtype"):
        ops.subspace_lora_delta(
            c["x"],
            c["basis_A"],
            c["loadings_A"],
            c["loadings_B"],
            c["basis_B"],
            c["batch"],
            c["scales"],
            out=torch.zeros(c["x"].shape[0], c["basis_B"].shape[1]),
        )
    with pytest.raises(TypeError, match="basis_B"):
        ops.subspace_lora_delta(
            c["x"],
            c["basis_A"],
            c["loadings_A"],
            c["loadings_B"],
            c["basis_B"].float(),
            c["batch"],
            c["scales"],
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_subspace_project_matches_reference_and_reconstructs(backend):
    N, r, d, K = 7, 5, 33, 9
    basis = orthonormal(K, d)
    inside = torch.randn(N, r, K, dtype=torch.float64) @ basis  # exactly representable
    weights = inside + 1e-2 * torch.randn(N, r, d, dtype=torch.float64)
    with lora_fast.use_backend(backend):
        coefficients, residual = ops.subspace_project(weights, basis)
        _, zero_residual = ops.subspace_project(inside, basis)
    expected_coefficients, expected_residual = reference.subspace_project(weights, basis)
    assert_close(coefficients, expected_coefficients, torch.float64)
    assert_close(residual, expected_residual, torch.float64)
    assert_close(residual, (weights - coefficients @ basis).square().sum((1, 2)), torch.float64)
    assert zero_residual.max() < 1e-20


def test_subspace_project_reads_a_transposed_B_in_place():
    B = torch.randn(4, 30, 6, dtype=torch.float64)  # [N, d_out, r]
    basis = orthonormal(8, 30)
    coefficients, residual = ops.subspace_project(B.transpose(1, 2), basis)
    expected = reference.subspace_project(B.transpose(1, 2).contiguous(), basis)
    assert_close(coefficients, expected[0], torch.float64)
    assert_close(residual, expected[1], torch.float64)


def test_subspace_project_rejects_bad_basis():
    weights = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="orthonormal"):
        ops.subspace_project(weights, torch.randn(4, 10))
    with pytest.raises(ValueError, match="basis.shape\\[1\\]"):
        ops.subspace_project(weights, orthonormal(4, 11, torch.float32))
    with pytest.raises(TypeError, match="basis"):
        ops.subspace_project(weights, orthonormal(4, 10, torch.float64))
    with pytest.raises(ValueError, match="weights must be 3-D"):
        ops.subspace_project(weights[0], orthonormal(4, 10, torch.float32))


kernels = pytest.importorskip("lora_fast.kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not kernels.AVAILABLE, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 16, 1), (3, 7, 150, 20), (5, 4, 37, 33)])
def test_triton_subspace_project(dtype, shape):
    N, r, d, K = shape
    basis = orthonormal(K, d).to(dtype)
    weights = torch.randn(N, r, d, dtype=torch.float64).to(dtype)
    with lora_fast.use_backend("triton"):
        got_coefficients, got_residual = ops.subspace_project(weights.to(DEVICE), basis.to(DEVICE))
    expected_coefficients, expected_residual = reference.subspace_project(weights.double(), basis.double())
    assert_close(got_coefficients, expected_coefficients, torch.float32)
    assert_close(got_residual, expected_residual, torch.float32)
    # B's columns: a transposed view, read in place
    B = weights.transpose(1, 2).contiguous().to(DEVICE)
    with lora_fast.use_backend("triton"):
        got_t, got_t_residual = ops.subspace_project(B.transpose(1, 2), basis.to(DEVICE))
    assert_close(got_t, expected_coefficients, torch.float32)
    assert_close(got_t_residual, expected_residual, torch.float32)


def test_subspace_project_custom_op_passes_opcheck():
    weights = torch.randn(12, 20)
    basis = orthonormal(5, 20, torch.float32)
    torch.library.opcheck(torch.ops.lora_fast.subspace_project_rows.default, (weights, basis))


def test_subspace_lora_delta_compiles_fullgraph():
    c = loadings_case(dtype=torch.float32)

    def fn(x):
        return ops.subspace_lora_delta(
            x,
            c["basis_A"],
            c["loadings_A"],
            c["loadings_B"],
            c["basis_B"],
            c["batch"],
            c["scales"],
            c["ranks"],
            check_args=False,
        )

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert_close(compiled(c["x"]), fn(c["x"]), torch.float32)

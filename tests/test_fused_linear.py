"""fused_lora_linear: the one-call C++ kernel and the composed path against the reference."""

import pytest
import torch

import lora_fast
from lora_fast import ops, reference

from .helpers import assert_close, count_fused_kernel_calls, random_case, torch_threads

SHAPES = [
    # T, S, d_in, d_out, r_max: no tokens, odd widths and token counts, a rank above the
    # 64-column pass, the largest token count the kernel takes, an output narrower than a tile,
    # rows long enough for the base GEMM's column chunks (a short last chunk with a scalar tail)
    (0, 2, 5, 4, 3),
    (1, 1, 7, 5, 3),
    (2, 3, 40, 33, 8),
    (9, 4, 97, 161, 80),
    (ops.FUSED_MAX_TOKENS, 5, 64, 19, 16),
    (5, 2, 3, 1, 2),
    (7, 3, 1001, 45, 8),
]


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


def linear_case(shape, dtype, bias=True, rank_major=False):
    T, S, d_in, d_out, r_max = shape
    c = random_case(T, S, d_in, d_out, r_max, dtype=dtype, none_fraction=0.25)
    c["W"] = torch.randn(d_out, d_in, dtype=torch.float64).div(d_in**0.5).to(dtype)
    c["bias"] = torch.randn(d_out, dtype=torch.float64).to(dtype) if bias else None
    if rank_major:  # the stacked layout lora_fast.accelerate keeps
        c["B"] = c["B"].transpose(1, 2).contiguous().transpose(1, 2)
    return c


def call(c, fn=lora_fast.fused_lora_linear):
    return fn(c["x"], c["W"], c["bias"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])


def expected(c):
    d = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "scales" else v)
        for k, v in c.items()
    }
    return call(d, reference.fused_lora_linear)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rank_major", [False, True], ids=["B", "B_rank_major"])
def test_kernel_matches_reference(isa, one_thread, dtype, shape, bias, rank_major):
    c = linear_case(shape, dtype, bias, rank_major)
    ids = c["ids"].clone()
    got = torch.ops.lora_fast_C.fused_lora_linear(
        c["x"], c["W"], c["bias"], c["A"], c["B"], *c["batch"].metadata[1:], c["scales"], c["ranks"]
    )
    assert got.dtype == dtype
    assert_close(got, expected(c), dtype)
    # the extension's binding of the same kernel (accelerate()'s short path calls it directly)
    direct = lora_fast.backends.extension().fused_lora_linear_cpu(
        c["x"], c["W"], c["bias"], c["A"], c["B"], *c["batch"].metadata[1:], c["scales"], c["ranks"]
    )
    assert torch.equal(direct, got)
    with lora_fast.use_backend("cpu"):  # the public op takes the kernel on this shape
        assert torch.equal(call(c), got)
    assert torch.equal(c["ids"], ids)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(0, 2, 5, 4, 3), (ops.FUSED_MAX_TOKENS + 1, 5, 64, 19, 16), (67, 3, 97, 161, 80)], ids=str
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_then_delta_binding_is_the_composed_path_bit_for_bit(one_thread, dtype, shape, bias):
    """accelerate()'s short path past the fused kernel's token limit calls the extension's
    linear_then_delta_cpu: at::linear, then the delta kernel added into it. It must give the
    bits of fused_lora_linear's composed path (F.linear, then lora_delta) and match the
    reference, on unsorted tokens with no-adapter ones and mixed ranks."""
    c = linear_case(shape, dtype, bias, rank_major=True)
    ids = c["ids"].clone()
    got = lora_fast.backends.extension().linear_then_delta_cpu(
        c["x"], c["W"], c["bias"], c["A"], c["B"], *c["batch"].metadata[1:], c["scales"], c["ranks"]
    )
    assert got.dtype == dtype and got.shape == (shape[0], shape[3])
    composed = torch.nn.functional.linear(c["x"], c["W"], c["bias"])
    lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"], out=composed)
    assert torch.equal(got, composed)
    if shape[0] > ops.FUSED_MAX_TOKENS:
        assert torch.equal(call(c), got)  # the public op's composed path
    if dtype != torch.bfloat16:
        assert_close(got, expected(c), dtype)
    assert torch.equal(c["ids"], ids)


def test_threads_split_the_rows_without_changing_a_bit():
    c = linear_case((9, 4, 70, 203, 16), torch.float32, rank_major=True)
    args = (c["x"], c["W"], c["bias"], c["A"], c["B"], *c["batch"].metadata[1:], c["scales"], c["ranks"])
    with torch_threads(1):
        one = torch.ops.lora_fast_C.fused_lora_linear(*args)
    with torch_threads(3):
        several = torch.ops.lora_fast_C.fused_lora_linear(*args)
    assert torch.equal(one, several)
    assert_close(one, expected(c), torch.float32)


def test_no_adapter_tokens_get_exactly_the_base_layer(one_thread):
    c = linear_case((7, 3, 50, 21, 8), torch.float64)
    c["batch"] = lora_fast.AdapterBatch(torch.full((7,), -1), 3)
    with lora_fast.use_backend("cpu"):
        got = call(c)
    assert_close(got, torch.nn.functional.linear(c["x"], c["W"], c["bias"]), torch.float64)


@pytest.mark.parametrize(
    "when",
    ["grad", "two_threads", "many_tokens", "bfloat16", "torch_backend"],
)
def test_every_other_case_composes_linear_and_delta(when, one_thread):
    shape = (ops.FUSED_MAX_TOKENS + 3 if when == "many_tokens" else 6, 3, 24, 17, 4)
    dtype = torch.bfloat16 if when == "bfloat16" else torch.float64
    c = linear_case(shape, dtype)
    if when == "grad":
        c["x"].requires_grad_(True)
        c["W"].requires_grad_(True)
    if when == "two_threads":
        torch.set_num_threads(2)
    backend = "torch" if when == "torch_backend" else "cpu"
    with lora_fast.use_backend(backend):
        got = call(c)
    assert_close(got, expected(c), dtype)
    if when == "grad":
        got.sum().backward()
        ones = torch.ones_like(got)
        assert_close(c["W"].grad, ones.T @ c["x"].detach(), torch.float64)
        assert c["x"].grad is not None and torch.isfinite(c["x"].grad).all()


def test_gradcheck_through_the_composed_path():
    c = linear_case((5, 3, 6, 4, 3), torch.float64)
    inputs = [c[k].requires_grad_(True) for k in ("x", "W", "bias", "A", "B")]

    def f(x, W, bias, A, B):
        return lora_fast.fused_lora_linear(x, W, bias, A, B, c["batch"], c["scales"], c["ranks"])

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize(
    "name, value, error, message",
    [
        ("W", torch.randn(5, 9), ValueError, r"W.shape\[1\] must be d_in of x"),
        ("W", torch.randn(6, 8), ValueError, r"W.shape\[0\] must be d_out of B"),
        ("W", torch.randn(5, 8, dtype=torch.float64), TypeError, "W has dtype torch.float64 but x has"),
        ("W", torch.randn(40), ValueError, "W must be 2-D"),
        ("bias", torch.randn(6), ValueError, r"bias.shape\[0\] must be d_out of W"),
        ("bias", torch.randn(5).half(), TypeError, "bias has dtype torch.float16 but x has"),
        ("bias", [0.0] * 5, TypeError, "bias must be a torch.Tensor"),
        ("x", torch.randn(6, 9), ValueError, r"A.shape\[2\] must be d_in of x"),
    ],
)
def test_bad_arguments_name_the_argument(name, value, error, message):
    args = {
        "x": torch.randn(6, 8),
        "W": torch.randn(5, 8),
        "bias": torch.randn(5),
        "A": torch.randn(3, 4, 8),
        "B": torch.randn(3, 5, 4),
        "batch": lora_fast.AdapterBatch(torch.tensor([0, 1, -1, 2, 0, 1]), 3),
        "scales": torch.ones(3),
    }
    args[name] = value
    with pytest.raises(error, match=message):
        lora_fast.fused_lora_linear(**args)


def test_multilora_linear_inference_takes_the_fused_kernel(one_thread, monkeypatch):
    torch.manual_seed(0)
    stack = lora_fast.AdapterStack(3, 20, 13, max_rank=6)
    for slot in range(3):
        stack.set_slot(slot, torch.randn(6 - slot, 20), torch.randn(13, 6 - slot), scale=0.5 + slot)
    layer = lora_fast.MultiLoRALinear(torch.nn.Linear(20, 13), stack)
    x = torch.randn(2, 4, 20)
    batch = lora_fast.AdapterBatch(torch.tensor([[2, -1, 0, 1], [1, 1, -1, 0]]), 3)
    with torch.no_grad(), lora_fast.use_backend("cpu"):
        expected = layer.base(x) + lora_fast.lora_delta(
            x.reshape(8, 20), stack.A, stack.B, batch, stack.scales, stack.ranks
        ).view(2, 4, 13)
        calls = count_fused_kernel_calls(monkeypatch)
        got = layer(x, batch)
    assert calls == [8]
    assert_close(got, expected, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_composes_the_base_gemm_and_the_delta(dtype):
    c = linear_case((37, 5, 64, 48, 8), dtype)
    gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in c.items()}
    gpu["batch"] = lora_fast.AdapterBatch(gpu["ids"], 5)
    got = call(gpu)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert_close(got, expected(c), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_overlaps_the_shrink_with_the_base_gemm(dtype, overlap, monkeypatch):
    """Captured in a CUDA graph with LORA_FAST_OVERLAP_SHRINK=1, fused_lora_linear runs the
    shrink on a side stream beside the base GEMM (0: one stream); replays give the reference's
    answer on fresh inputs copied into the captured buffers, each replay after out is poisoned."""
    kernels = pytest.importorskip("lora_fast.kernels")
    if not kernels.AVAILABLE:
        pytest.skip("triton is not installed")
    monkeypatch.setenv(ops.OVERLAP_ENV, overlap)
    forks = []
    real = ops._overlapped_linear
    monkeypatch.setattr(ops, "_overlapped_linear", lambda *a: forks.append(1) or real(*a))
    c = linear_case((37, 5, 64, 48, 8), dtype)
    gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in c.items()}
    gpu["batch"] = lora_fast.AdapterBatch(gpu["ids"], 5)
    with lora_fast.use_backend("triton"):
        call(gpu)  # compile outside the capture
        assert not forks  # eager calls never fork
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = call(gpu)
    assert forks == ([1] if overlap == "1" else [])
    for _ in range(2):
        fresh = linear_case((37, 5, 64, 48, 8), dtype)
        for name in ("x", "W", "bias", "A", "B", "scales"):
            gpu[name].copy_(fresh[name])
        fresh["ids"], fresh["batch"], fresh["ranks"] = c["ids"], c["batch"], c["ranks"]
        got.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(got.cpu(), expected(fresh), dtype)


@pytest.mark.parametrize("when", ["inference", "grad", "many_tokens"])
def test_triton_backend_takes_the_one_kernel_linear_where_its_table_has_a_row(when, monkeypatch):
    """With the Triton backend, fused_lora_linear runs the shrink and then one GEMM + expand
    kernel where the config table has a ``linear`` row (the interpreter's: up to 40 tokens) and
    nothing needs gradients; with autograd or above the rows, F.linear then lora_delta."""
    kernels = pytest.importorskip("lora_fast.kernels")
    if not kernels.AVAILABLE:
        pytest.skip("triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    T = 45 if when == "many_tokens" else 13
    c = linear_case((T, 4, 40, 36, 8), torch.float32)
    expect = expected(c)
    c = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in c.items()}
    c["batch"] = lora_fast.AdapterBatch(c["ids"], 4)
    if when == "grad":
        c["A"].requires_grad_(True)
    calls = []
    real = kernels.lora_linear
    monkeypatch.setattr(kernels, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    if device == "cuda":  # the interpreter's table, whatever this GPU's holds
        monkeypatch.setenv("LORA_FAST_TRITON_CONFIG", str(kernels.configs.CONFIG_DIR / "interpreter.json"))
    with lora_fast.use_backend("triton"):
        got = call(c)
    assert calls == ([1] if when == "inference" else [])
    assert_close(got.detach().cpu(), expect, torch.float32)

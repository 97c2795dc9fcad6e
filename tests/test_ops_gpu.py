"""CUDA backend against the reference (runs only where a GPU is present)."""

import pytest
import torch

import lora_fast
from lora_fast import reference

from .helpers import assert_close, random_case

pytestmark = pytest.mark.gpu

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def cuda_backend_available():
    return "cuda" in lora_fast.backends.available("cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64, 64, 8), (37, 5, 53, 41, 8), (300, 9, 256, 320, 64)])
def test_cuda_backend_matches_reference(dtype, shape):
    if not cuda_backend_available():
        pytest.skip("lora_fast._C was built without CUDA")
    c = random_case(*shape, dtype=dtype, device="cuda")
    start = torch.randn(shape[0], shape[3], device="cuda").to(dtype)
    with lora_fast.use_backend("cuda"):
        t = lora_fast.lora_shrink(c["x"], c["A"], c["batch"], c["ranks"])
        out = lora_fast.lora_delta(
            c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"], out=start.clone()
        )
    expected = reference.lora_delta(
        c["x"].double(), c["A"].double(), c["B"].double(), c["batch"], c["scales"], c["ranks"]
    )
    assert_close(out, start.double() + expected, dtype, magnitude=float(expected.abs().max()) + 4)
    expected_t = reference.lora_shrink(c["x"].double(), c["A"].double(), c["batch"], c["ranks"])
    assert_close(t, expected_t, dtype if dtype == torch.float64 else torch.float32)


def test_default_backend_captures_in_a_cuda_graph():
    c = random_case(64, 4, 128, 128, 16, dtype=torch.float16, device="cuda")
    out = torch.zeros(64, 128, device="cuda", dtype=torch.float16)
    args = (c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
    backend = lora_fast.backends.select(torch.device("cuda"))
    if backend == "torch":
        pytest.skip("the torch reference reads segment sizes on the host and cannot be captured")
    lora_fast.lora_delta(*args, out=out)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.zero_()
        lora_fast.lora_delta(*args, out=out)
    c["x"].copy_(torch.randn_like(c["x"]))
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.lora_delta(
        *(a.double() if a.is_floating_point() and a.dim() > 1 else a for a in args[:3]), *args[3:]
    )
    assert_close(out, expected, torch.float16)

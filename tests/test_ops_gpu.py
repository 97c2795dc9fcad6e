"""CUDA backend against the reference (runs only where a GPU is present)."""

import json

import pytest
import torch

import lora_fast
from lora_fast import reference

from .helpers import assert_close, random_case

pytestmark = pytest.mark.gpu

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def cuda_backend_available():
    return "cuda" in lora_fast.backends.available("cuda")


@pytest.mark.parametrize("rank_major", [False, True], ids=["b_contiguous", "b_rank_major"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    # one token (16-byte loads in the fused kernel's shrink), 37 tokens with an odd d_in (its
    # scalar loads) and 64 (the most it takes, 4 output tiles), 300 (shrink + expand launches);
    # d_in 1096: rows long enough for the shrink's four loads per lane in flight, plus a remainder
    "shape",
    [
        (1, 1, 64, 4096, 8),
        (37, 5, 53, 41, 8),
        (64, 7, 128, 200, 16),
        (300, 9, 256, 320, 64),
        (5, 3, 1096, 300, 16),
    ],
)
def test_cuda_backend_matches_reference(dtype, shape, rank_major):
    if not cuda_backend_available():
        pytest.skip("lora_fast._C was built without CUDA")
    c = random_case(*shape, dtype=dtype, device="cuda")
    if rank_major:  # the layout the stacks keep
        c["B"] = c["B"].transpose(1, 2).contiguous().transpose(1, 2)
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


def test_table_routes_inference_deltas_to_the_cuda_backend(monkeypatch, tmp_path):
    """A cuda_delta row of the GPU's table sends lora_delta's in-place inference calls (no
    backend forced) to the CUDA C++ one-launch kernel; autograd calls stay on Triton."""
    if not cuda_backend_available() or "triton" not in lora_fast.backends.available("cuda"):
        pytest.skip("needs both the CUDA extension and Triton")
    from lora_fast.kernels import configs

    from lora_fast import ops

    table = json.loads((configs.CONFIG_DIR / "default.json").read_text())
    table["cuda_delta"] = [{"when": {"max_tokens": 16}, "config": {}}, {"config": None}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(configs.ENV_VAR, str(path))
    calls = []
    compiled = ops._compiled()

    class Recording:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(compiled, name)

    monkeypatch.setattr(ops, "_compiled", Recording)
    for T, routed in ((9, True), (40, False)):
        calls.clear()
        c = random_case(T, 3, 64, 48, 8, dtype=torch.bfloat16, device="cuda")
        out = torch.randn(T, 48, device="cuda").to(torch.bfloat16)
        expected = out.double() + reference.lora_delta(
            c["x"].double(), c["A"].double(), c["B"].double(), c["batch"], c["scales"], c["ranks"]
        )
        lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"], out=out)
        assert calls == (["lora_delta_"] if routed else [])
        assert_close(out, expected, torch.bfloat16, magnitude=float(expected.abs().max()))
    calls.clear()
    c = random_case(9, 3, 64, 48, 8, dtype=torch.bfloat16, device="cuda")
    c["A"].requires_grad_(True)
    lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"]).sum().backward()
    assert calls == [] and c["A"].grad is not None

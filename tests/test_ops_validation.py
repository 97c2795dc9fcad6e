"""Bad arguments raise ValueError / TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import lora_fast

T, S, D_IN, D_OUT, R = 6, 3, 8, 5, 4


def good():
    return {
        "x": torch.randn(T, D_IN),
        "A": torch.randn(S, R, D_IN),
        "B": torch.randn(S, D_OUT, R),
        "batch": lora_fast.AdapterBatch(torch.tensor([0, 1, -1, 2, 0, 1]), S),
        "scales": torch.ones(S),
        "ranks": torch.tensor([4, 2, 0]),
        "out": torch.zeros(T, D_OUT),
    }


DELTA_CASES = [
    ("x", torch.randn(T, D_IN, 1), ValueError, "x must be 2-D"),
    ("x", torch.randn(T + 1, D_IN), ValueError, r"x.shape\[0\] must be the batch's token count"),
    ("x", torch.randint(0, 3, (T, D_IN)), TypeError, "x must be float16, bfloat16, float32 or float64"),
    ("x", [[1.0]], TypeError, "x must be a torch.Tensor"),
    ("A", torch.randn(S, R, D_IN + 1), ValueError, r"A.shape\[2\] must be d_in of x"),
    ("A", torch.randn(S + 1, R, D_IN), ValueError, r"A.shape\[0\] must be the batch's num_slots"),
    ("A", torch.randn(S, R, D_IN, dtype=torch.float64), TypeError, "A has dtype torch.float64 but x has"),
    ("A", torch.randn(R, D_IN), ValueError, "A must be 3-D"),
    ("B", torch.randn(S, D_OUT, R + 1), ValueError, r"B.shape\[2\] must be r_max \(A.shape\[1\]\)"),
    ("B", torch.randn(S + 1, D_OUT, R), ValueError, r"B.shape\[0\] must be the batch's num_slots"),
    ("B", torch.randn(S, D_OUT, R).half(), TypeError, "B has dtype torch.float16 but x has"),
    ("scales", torch.ones(S, dtype=torch.float64), TypeError, "scales must be float32"),
    ("scales", torch.ones(S + 1), ValueError, r"scales.shape\[0\] must be num_slots"),
    ("scales", torch.ones(S, 1), ValueError, "scales must be 1-D"),
    ("ranks", torch.tensor([4, 2]), ValueError, r"ranks.shape\[0\] must be num_slots"),
    ("ranks", torch.tensor([4, 5, 0]), ValueError, r"ranks must lie in \[0, r_max=4\], found 5"),
    ("ranks", torch.tensor([4, -1, 0]), ValueError, r"ranks must lie in \[0, r_max=4\], found -1"),
    ("ranks", torch.tensor([4.0, 2.0, 0.0]), TypeError, "ranks must be int32 or int64"),
    ("out", torch.zeros(T, D_OUT + 1), ValueError, r"out.shape\[1\] must be d_out"),
    ("out", torch.zeros(T + 1, D_OUT), ValueError, r"out.shape\[0\] must be the batch's token count"),
    ("out", torch.zeros(T, D_OUT, dtype=torch.float64), TypeError, "out has dtype torch.float64"),
    ("batch", torch.tensor([0, 1]), TypeError, "batch must be a lora_fast.AdapterBatch"),
    ("batch", lora_fast.AdapterBatch([0, 1, 0, 1, 0, 1], S + 1), ValueError, "num_slots"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "name, value, error, match", DELTA_CASES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_lora_delta_rejects(backend, name, value, error, match):
    args = good()
    args[name] = value
    with lora_fast.use_backend(backend), pytest.raises(error, match=match):
        lora_fast.lora_delta(**args)


def test_out_may_not_alias_x():
    args = good()
    args["B"] = torch.randn(S, D_IN, R)
    args["out"] = args["x"]
    with pytest.raises(ValueError, match="out shares memory with x"):
        lora_fast.lora_delta(**args)


def test_shrink_and_expand_reject_bad_arguments():
    args = good()
    with pytest.raises(ValueError, match=r"x.shape\[0\]"):
        lora_fast.lora_shrink(torch.randn(T + 2, D_IN), args["A"], args["batch"])
    with pytest.raises(ValueError, match="ranks must lie"):
        lora_fast.lora_shrink(args["x"], args["A"], args["batch"], torch.tensor([9, 0, 0]))
    t = torch.randn(T, R)
    with pytest.raises(ValueError, match=r"B.shape\[2\] must be r_max \(t.shape\[1\]\)"):
        lora_fast.lora_expand(torch.randn(T, R + 1), args["B"], args["batch"], args["scales"], args["out"])
    with pytest.raises(TypeError, match="out has dtype torch.float16 but B has"):
        lora_fast.lora_expand(t, args["B"], args["batch"], args["scales"], args["out"].half())
    with pytest.raises(ValueError, match=r"t.shape\[0\]"):
        lora_fast.lora_expand(torch.randn(T - 1, R), args["B"], args["batch"], args["scales"], args["out"])


def test_forcing_an_unknown_or_unavailable_backend_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with lora_fast.use_backend("fast"):
            pass
    monkeypatch.setenv("LORA_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="LORA_FAST_BACKEND='nope'"):
        lora_fast.lora_delta(**good())
    monkeypatch.setenv("LORA_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend .cuda. cannot run on cpu"):
        lora_fast.lora_delta(**good())

"""The reference is the spec: check it against the formula written token by token."""

import pytest
import torch

from lora_fast import reference

from .helpers import naive_delta, random_case


@pytest.mark.parametrize(
    "T, S, d_in, d_out, r_max, none_fraction",
    [
        (0, 3, 5, 7, 4, 0.2),
        (1, 1, 3, 2, 1, 0.0),
        (37, 5, 19, 23, 6, 0.2),
        (40, 4, 8, 8, 8, 1.0),
        (64, 7, 16, 9, 5, 0.5),
    ],
)
def test_reference_delta_matches_per_token_formula(T, S, d_in, d_out, r_max, none_fraction):
    c = random_case(T, S, d_in, d_out, r_max, none_fraction=none_fraction)
    got = reference.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
    expected = naive_delta(c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    full = reference.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"])
    torch.testing.assert_close(
        full, naive_delta(c["x"], c["A"], c["B"], c["ids"], c["scales"]), rtol=1e-12, atol=1e-12
    )


def test_shrink_zeroes_columns_past_the_rank_and_rows_without_adapter():
    c = random_case(30, 4, 11, 13, 6)
    t = reference.lora_shrink(c["x"], c["A"], c["batch"], c["ranks"])
    assert t.dtype == torch.float64
    for i, slot in enumerate(c["ids"].tolist()):
        k = 0 if slot < 0 else int(c["ranks"][slot])
        assert (t[i, k:] == 0).all()
        if k:
            torch.testing.assert_close(t[i, :k], c["A"][slot, :k] @ c["x"][i])


def test_expand_adds_into_out_and_reads_only_the_rank_columns():
    c = random_case(25, 3, 6, 10, 5)
    t = reference.lora_shrink(c["x"], c["A"], c["batch"], c["ranks"])
    k = c["ranks"][c["ids"].clamp(min=0)]
    poisoned = t.clone()
    poisoned[torch.arange(5)[None, :] >= k[:, None]] = float("nan")
    start = torch.randn(25, 10, dtype=torch.float64)
    out = reference.lora_expand(poisoned, c["B"], c["batch"], c["scales"], start.clone(), c["ranks"])
    expected = start + naive_delta(c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"])
    torch.testing.assert_close(out, expected)


def test_half_precision_accumulates_in_float32_and_rounds_once():
    c = random_case(20, 3, 64, 32, 8, dtype=torch.bfloat16)
    assert reference.lora_shrink(c["x"], c["A"], c["batch"], c["ranks"]).dtype == torch.float32
    out = reference.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
    exact = naive_delta(c["x"], c["A"], c["B"], c["ids"], c["scales"], c["ranks"])
    assert out.dtype == torch.bfloat16
    # one rounding of an fp32-accurate result: within half an ulp of bf16 (2^-8 relative)
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()

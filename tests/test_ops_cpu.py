"""The C++ CPU backend against the reference: every instruction-set copy, dtype and odd case."""

import pytest
import torch

import lora_fast
from lora_fast import reference

from .helpers import assert_close, random_case

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    # T, S, d_in, d_out, r_max
    (0, 3, 16, 16, 4),
    (1, 1, 7, 5, 3),
    (5, 2, 3, 70, 2),
    (37, 5, 53, 41, 8),
    (130, 6, 129, 67, 16),
    (70, 3, 40, 33, 80),  # rank above the kernel's 64-column pass
]


def expected_delta(c, out=None):
    """float64 reference on the (already rounded) inputs."""
    return reference.lora_delta(
        c["x"].double(),
        c["A"].double(),
        c["B"].double(),
        c["batch"],
        c["scales"],
        c["ranks"],
        None if out is None else out.double(),
    )


def test_extension_is_built_and_is_the_cpu_default():
    assert lora_fast.backends.extension() is not None, "lora_fast._C did not build"
    assert lora_fast.backends.select(torch.device("cpu")) in ("cpu", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_delta_matches_reference(isa, dtype, shape):
    c = random_case(*shape, dtype=dtype)
    with lora_fast.use_backend("cpu"):
        got = lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
    assert got.dtype == dtype
    assert_close(got, expected_delta(c), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_adds_into_poisoned_out_and_leaves_no_adapter_rows_alone(isa, dtype):
    c = random_case(45, 4, 33, 29, 8, dtype=dtype, none_fraction=0.3)
    start = (torch.randn(45, 29, dtype=torch.float64) * 100).to(dtype)
    out = start.clone()
    with lora_fast.use_backend("cpu"):
        result = lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"], out=out)
    assert result is out
    delta = expected_delta(c)
    assert_close(out, start.double() + delta, dtype, magnitude=float(delta.abs().max()) + 100)
    untouched = c["ids"] < 0
    assert untouched.any() and torch.equal(out[untouched], start[untouched])


def test_weights_past_each_slots_rank_are_never_read(isa):
    c = random_case(50, 4, 24, 20, 8, dtype=torch.float32)
    for slot, k in enumerate(c["ranks"].tolist()):
        c["A"][slot, k:] = float("nan")
        c["B"][slot, :, k:] = float("nan")
    with lora_fast.use_backend("cpu"):
        got = lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
    c["A"], c["B"] = c["A"].nan_to_num(0.0), c["B"].nan_to_num(0.0)
    assert_close(got, expected_delta(c), torch.float32)


def long_segments_case(dtype):
    """Slots with enough tokens for the GEMM-style shrink (kLanesTokens = 16: the ranks across the
    vector lanes, A transposed once per slot) beside short ones, tokens interleaved: segments
    past one 32-token work item (40, 70) and with a last tile shorter than the register tile,
    ranks that fill whole vectors (16), leave padding lanes (13), fall back to the dot-product
    tiles (8 on 16-lane vectors) or span two 64-rank passes (72)."""
    lengths = [40, 17, 70, 3, 0, 16, 9]
    ids = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)] + [torch.full((5,), -1)])
    ids = ids[torch.randperm(len(ids))]
    c = random_case(len(ids), len(lengths), 37, 45, 72, dtype=dtype, ids=ids)
    c["ranks"] = torch.tensor([16, 13, 72, 16, 16, 8, 72])
    return c


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank_major", [False, True], ids=["B", "B_rank_major"])
def test_long_segments_match_reference(isa, dtype, rank_major):
    c = long_segments_case(dtype)
    if rank_major:  # the stacks' layout: B read in place (and the next adapter's prefetched)
        c["B"] = c["B"].transpose(1, 2).contiguous().transpose(1, 2)
    grad_out = torch.randn(len(c["ids"]), 45, dtype=torch.float64).to(dtype)
    x, A, B = (c[k].clone().requires_grad_() for k in ("x", "A", "B"))
    start = torch.randn(len(c["ids"]), 45, dtype=torch.float64).to(dtype)
    with lora_fast.use_backend("cpu"):
        t = lora_fast.lora_shrink(c["x"], c["A"], c["batch"], c["ranks"])
        out = lora_fast.lora_delta(
            c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"], out=start.clone()
        )
        fresh = lora_fast.lora_delta(x, A, B, c["batch"], c["scales"], c["ranks"])  # written, not added
        fresh.backward(grad_out)
    expected_t = reference.lora_shrink(c["x"].double(), c["A"].double(), c["batch"], c["ranks"])
    assert_close(t, expected_t, dtype)
    delta = expected_delta(c)
    assert_close(fresh, delta, dtype)
    assert_close(out, start.double() + delta, dtype, magnitude=float(delta.abs().max()) + 4)
    expected = reference.lora_delta_backward(
        grad_out.double(), *(c[k].double() for k in ("x", "A", "B")), c["batch"], c["scales"], c["ranks"]
    )
    for got, want in zip((x.grad, A.grad, B.grad), expected, strict=True):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_and_expand_match_reference(isa, dtype):
    c = random_case(61, 5, 35, 27, 12, dtype=dtype)
    with lora_fast.use_backend("cpu"):
        t = lora_fast.lora_shrink(c["x"], c["A"], c["batch"], c["ranks"])
    expected_t = reference.lora_shrink(c["x"].double(), c["A"].double(), c["batch"], c["ranks"])
    assert t.dtype == reference.accumulation_dtype(dtype)
    assert_close(t, expected_t, dtype if dtype == torch.float64 else torch.float32)
    # columns past the rank come back zero; poison them before the expand, which must skip them
    k = torch.where(c["ids"] >= 0, c["ranks"][c["ids"].clamp(min=0)], 0)
    beyond = torch.arange(12)[None, :] >= k[:, None]
    assert (t[beyond] == 0).all()
    t[beyond] = float("nan")
    start = torch.randn(61, 27, dtype=torch.float64).to(dtype)
    out = start.clone()
    with lora_fast.use_backend("cpu"):
        lora_fast.lora_expand(t, c["B"], c["batch"], c["scales"], out, c["ranks"])
    delta = expected_delta(c)
    assert_close(out, start.double() + delta, dtype, magnitude=float(delta.abs().max()) + 4)


def test_every_token_without_adapter():
    c = random_case(30, 3, 16, 16, 4, dtype=torch.float32, ids=torch.full((30,), -1))
    out = torch.randn(30, 16)
    start = out.clone()
    with lora_fast.use_backend("cpu"):
        assert (lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"]) == 0).all()
        lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], out=out)
    assert torch.equal(out, start)


def test_sorted_and_shuffled_orders_give_identical_bits():
    c = random_case(200, 6, 64, 48, 16, dtype=torch.float32)
    order = torch.randperm(200)
    shuffled = lora_fast.AdapterBatch(c["ids"][order], 6)
    with lora_fast.use_backend("cpu"):
        plain = lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
        permuted = lora_fast.lora_delta(c["x"][order], c["A"], c["B"], shuffled, c["scales"], c["ranks"])
    assert torch.equal(plain[order], permuted)


@pytest.mark.parametrize("layout", ["row_padded", "transposed", "strided"])
def test_non_contiguous_inputs_and_outputs(layout):
    c = random_case(33, 4, 24, 18, 8, dtype=torch.float32)
    x = c["x"]
    if layout == "row_padded":
        x = torch.cat([x, torch.randn(33, 5)], dim=1)[:, :24]
        out = torch.cat([torch.zeros(33, 18), torch.randn(33, 3)], dim=1)[:, :18]
    elif layout == "transposed":
        x = x.t().contiguous().t()
        out = torch.zeros(18, 33).t()
    else:
        x = torch.stack([x, torch.randn_like(x)], dim=2)[:, :, 0]
        out = torch.zeros(33, 18, 2)[:, :, 0]
    assert not x.is_contiguous() and not out.is_contiguous()
    with lora_fast.use_backend("cpu"):
        lora_fast.lora_delta(x, c["A"], c["B"], c["batch"], c["scales"], c["ranks"], out=out)
    assert_close(out, expected_delta(c), torch.float32)


def test_threads_split_the_work_without_changing_the_result():
    c = random_case(700, 8, 96, 80, 16, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with lora_fast.use_backend("cpu"):
            single = lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
        torch.set_num_threads(2)
        with lora_fast.use_backend("cpu"):
            double = lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, double)
    assert_close(single, expected_delta(c), torch.float32)


def test_compiled_op_rejects_malformed_metadata():
    c = random_case(10, 3, 8, 8, 4, dtype=torch.float32)
    b = c["batch"]
    out = torch.zeros(10, 8)
    bad_order = b.token_order.clone()
    bad_order[0] = 10
    # the whole message, numbers included: linked with -static-libstdc++ the module's messages
    # lose their numbers, and on the H100 image of 2026-11-26, where the module came out without
    # libstdc++ among its needed libraries, this call crashed the process (setup.py's cxx_runtime)
    with pytest.raises(ValueError, match=r"token_order\[0\] = 10 is not a token index in \[0, 10\)"):
        torch.ops.lora_fast_C.lora_delta_(
            c["x"], c["A"], c["B"], bad_order, b.segment_starts, b.segment_lengths, c["scales"], None, out
        )
    with pytest.raises(ValueError, match="segment"):
        torch.ops.lora_fast_C.lora_delta_(
            c["x"],
            c["A"],
            c["B"],
            b.token_order,
            b.segment_starts + 20,
            b.segment_lengths,
            c["scales"],
            None,
            out,
        )
    with pytest.raises(ValueError, match="ranks"):
        torch.ops.lora_fast_C.lora_delta_(
            c["x"],
            c["A"],
            c["B"],
            b.token_order,
            b.segment_starts,
            b.segment_lengths,
            c["scales"],
            torch.tensor([1, 5, 0]),
            out,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_major_B_matches_reference_forward_and_backward(isa, dtype):
    """B passed as the transpose of a contiguous [S, r_max, d_out] tensor is read in place."""
    c = random_case(57, 5, 40, 70, 16, dtype=dtype)
    c["B"] = c["B"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not c["B"].is_contiguous()
    start = torch.randn(57, 70, dtype=torch.float64).to(dtype)
    with lora_fast.use_backend("cpu"):
        out = lora_fast.lora_delta(
            c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"], out=start.clone()
        )
        t = lora_fast.lora_shrink(c["x"], c["A"], c["batch"], c["ranks"])
        expanded = lora_fast.lora_expand(t, c["B"], c["batch"], c["scales"], start.clone(), c["ranks"])
    delta = expected_delta(c)
    assert_close(out, start.double() + delta, dtype, magnitude=float(delta.abs().max()) + 4)
    assert_close(expanded, start.double() + delta, dtype, magnitude=float(delta.abs().max()) + 4)
    x, A, B = (c[k].detach().requires_grad_() for k in ("x", "A", "B"))
    with lora_fast.use_backend("cpu"):
        lora_fast.lora_delta(x, A, B, c["batch"], c["scales"], c["ranks"]).sum().backward()
    grads = reference.lora_delta_backward(
        torch.ones(57, 70, dtype=torch.float64),
        c["x"].double(),
        c["A"].double(),
        c["B"].double(),
        c["batch"],
        c["scales"],
        c["ranks"],
    )
    for got, want in zip((x.grad, A.grad, B.grad), grads, strict=True):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank_major", [False, True], ids=["B", "B_rank_major"])
def test_streamed_and_tiled_slots_in_one_batch(isa, dtype, rank_major):
    # Slots with 1-3 tokens take the streamed path (one weight row at a time), slots with 4 or
    # more the register tiles; one batch holds both, plus an empty slot, -1 tokens, a rank above
    # the 64-column pass and widths that are no multiple of any vector width.
    counts = [1, 2, 3, 4, 5, 0, 1, 37]
    ids = torch.cat([torch.full((n,), slot) for slot, n in enumerate(counts)] + [torch.full((3,), -1)])
    ids = ids[torch.randperm(len(ids))]
    c = random_case(len(ids), len(counts), 97, 161, 80, dtype=dtype, ids=ids)
    B = c["B"]
    if rank_major:  # the stacked layout lora_fast.accelerate keeps: [S, r_max, d_out], transposed
        B = B.transpose(1, 2).contiguous().transpose(1, 2)
    start = torch.randn(len(ids), 161, dtype=torch.float64).to(dtype)
    out = start.clone()
    with lora_fast.use_backend("cpu"):
        lora_fast.lora_delta(c["x"], c["A"], B, c["batch"], c["scales"], c["ranks"], out=out)
    delta = expected_delta(c)
    assert_close(out, start.double() + delta, dtype, magnitude=float(delta.abs().max()) + 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank_major", [False, True], ids=["B", "B_rank_major"])
@pytest.mark.parametrize("written", [False, True], ids=["added", "written"])
def test_decode_slots_in_groups(isa, dtype, rank_major, written):
    # One token per slot (decode): consecutive one-token slots of one rank stream their weights in
    # groups of up to four (float32 / float64 with B rank-major): five slots of rank 16 make a
    # group of four and a single, then a group of three and a pair. A rank change, a two-token
    # slot, ranks above the 64-column pass and a -1 token break the groups; widths reach every tail.
    counts = [1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1]
    ids = torch.cat([torch.full((n,), slot) for slot, n in enumerate(counts)] + [torch.full((1,), -1)])
    ids = ids[torch.randperm(len(ids))]
    c = random_case(len(ids), len(counts), 83, 71, 72, dtype=dtype, ids=ids)
    c["ranks"] = torch.tensor([16, 16, 16, 16, 16, 8, 8, 8, 16, 72, 72, 13, 13, 16])
    B = c["B"].transpose(1, 2).contiguous().transpose(1, 2) if rank_major else c["B"]
    start = torch.randn(len(ids), 71, dtype=torch.float64).to(dtype)
    delta = expected_delta(c)
    with lora_fast.use_backend("cpu"):
        if written:
            got = lora_fast.lora_delta(c["x"], c["A"], B, c["batch"], c["scales"], c["ranks"])
            assert_close(got, delta, dtype)
        else:
            out = lora_fast.lora_delta(
                c["x"], c["A"], B, c["batch"], c["scales"], c["ranks"], out=start.clone()
            )
            assert_close(out, start.double() + delta, dtype, magnitude=float(delta.abs().max()) + 4)
        if dtype in (torch.float32, torch.float64) and written:  # the decode layer's own kernel
            W = torch.randn(71, 83, dtype=torch.float64).div(83**0.5).to(dtype)
            y = lora_fast.fused_lora_linear(c["x"], W, None, c["A"], B, c["batch"], c["scales"], c["ranks"])
            assert_close(y, c["x"].double() @ W.double().T + delta, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank_major", [False, True], ids=["B", "B_rank_major"])
def test_written_delta_and_expand_overwrite_a_poisoned_out(isa, dtype, rank_major):
    # accumulate=False (an out-of-place delta): the kernels write every row instead of adding,
    # zeros for -1 tokens and rank-0 slots, so out may hold anything before; the counts cover the
    # streamed and the tiled slots, a rank above the 64-column pass and an empty slot.
    counts = [1, 2, 3, 4, 5, 0, 1, 37]
    ids = torch.cat([torch.full((n,), slot) for slot, n in enumerate(counts)] + [torch.full((4,), -1)])
    ids = ids[torch.randperm(len(ids))]
    c = random_case(len(ids), len(counts), 97, 161, 80, dtype=dtype, ids=ids)
    c["ranks"][3] = 0  # a slot with tokens and no rank: its rows are zeroed too
    B = c["B"].transpose(1, 2).contiguous().transpose(1, 2) if rank_major else c["B"]
    b = c["batch"]
    segments = (b.token_order, b.segment_starts, b.segment_lengths)
    delta = expected_delta(c)
    zero_rows = (c["ids"] < 0) | (c["ids"] == 3)
    ops = torch.ops.lora_fast_C
    out = torch.full((len(ids), 161), float("nan"), dtype=dtype)
    ops.lora_delta_(c["x"], c["A"], B, *segments, c["scales"], c["ranks"], out, False)
    assert_close(out, delta, dtype)
    assert (out[zero_rows] == 0).all()
    t = ops.lora_shrink(c["x"], c["A"], *segments, c["ranks"])
    out = torch.full((len(ids), 161), float("nan"), dtype=dtype)
    ops.lora_expand_(t, B, *segments, c["scales"], c["ranks"], out, False)
    assert_close(out, delta, dtype)
    assert (out[zero_rows] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_dx_is_written_whole_over_reused_memory(isa, dtype):
    # dx is allocated uninitialised and written by the expand (zeros for -1 tokens and rank-0
    # slots). Freeing a NaN tensor of dx's size just before makes the allocator hand its memory
    # back, so a row the backward failed to write would show as NaN.
    c = random_case(67, 5, 48, 36, 8, dtype=dtype, none_fraction=0.3)
    c["ranks"][1] = 0
    b = c["batch"]
    segments = (b.token_order, b.segment_starts, b.segment_lengths)
    grad_out = torch.randn(67, 36, dtype=torch.float64).to(dtype)
    want = reference.lora_delta_backward(
        grad_out.double(), c["x"].double(), c["A"].double(), c["B"].double(), b, c["scales"], c["ranks"]
    )[0]
    for _ in range(3):
        poison = torch.full_like(c["x"], float("nan"))
        del poison
        dx = torch.ops.lora_fast_C.lora_delta_backward(
            grad_out, c["x"], c["A"], c["B"], *segments, c["scales"], c["ranks"], None, True, False, False
        )[0]
        assert_close(dx, want, dtype)
        assert (dx[(c["ids"] < 0) | (c["ids"] == 1)] == 0).all()

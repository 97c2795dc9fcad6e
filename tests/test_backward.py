"""Gradients of lora_delta: every backend against the reference, gradcheck, and mixed batches."""

import importlib
import json

import pytest
import torch

import lora_fast
from lora_fast import reference

from .helpers import assert_close, count_fused_kernel_calls, random_case, torch_threads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_BACKENDS = ["torch", "cpu"]


def grads_of(c, backend, dtype, grad_out, grad_slots=None, device="cpu"):
    x, A, B = (c[k].detach().to(device=device, dtype=dtype).requires_grad_() for k in ("x", "A", "B"))
    batch = c["batch"].to(device)
    with lora_fast.use_backend(backend):
        y = lora_fast.lora_delta(
            x,
            A,
            B,
            batch,
            c["scales"].to(device),
            c["ranks"].to(device),
            grad_slots=None if grad_slots is None else grad_slots.to(device),
        )
    y.backward(grad_out.to(device=device, dtype=dtype))
    return x.grad, A.grad, B.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 3, 2, 1), (13, 3, 7, 5, 4), (29, 4, 9, 6, 70)], ids=str)
def test_gradcheck_float64(backend, shape):
    c = random_case(*shape)

    def f(x, A, B):
        return lora_fast.lora_delta(x, A, B, c["batch"], c["scales"], c["ranks"])

    inputs = tuple(c[k].detach().requires_grad_() for k in ("x", "A", "B"))
    with lora_fast.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs)


def reference_grads(c, grad_out, grad_slots=None):
    """``(dx, dA, dB)`` of the float64 reference on the case's (already rounded) inputs."""
    x, A, B = (c[k].double() for k in ("x", "A", "B"))
    return reference.lora_delta_backward(
        grad_out.double(), x, A, B, c["batch"], c["scales"], c["ranks"], grad_slots
    )


def check_against_reference(backend, dtype, shape, grad_slots, device="cpu"):
    c = random_case(*shape, dtype=dtype)
    grad_out = torch.randn(shape[0], shape[3], dtype=torch.float64).to(dtype)
    got = grads_of(c, backend, dtype, grad_out, grad_slots, device=device)
    expected = reference_grads(c, grad_out, grad_slots)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, dtype)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cpu_backward_matches_reference(monkeypatch, isa, dtype):
    monkeypatch.setenv("LORA_FAST_CPU_ISA", isa)
    check_against_reference(
        "cpu", dtype, (70, 5, 300, 270, 16), torch.tensor([True, False, True, True, False])
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_matches_reference(dtype):
    pytest.importorskip("triton")
    check_against_reference(
        "triton", dtype, (45, 4, 80, 56, 24), torch.tensor([True, True, False, True]), DEVICE
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_batch_gradients_are_the_sum_of_per_adapter_runs(backend):
    c = random_case(60, 4, 24, 20, 8)
    grad_out = torch.randn(60, 20, dtype=torch.float64)
    mixed = grads_of(c, backend, torch.float64, grad_out)
    summed = [torch.zeros_like(g) for g in mixed]
    for slot in range(4):
        alone = dict(c, batch=lora_fast.AdapterBatch(torch.where(c["ids"] == slot, slot, -1), 4))
        for total, g in zip(summed, grads_of(alone, backend, torch.float64, grad_out), strict=True):
            total += g
    for g, s in zip(mixed, summed, strict=True):
        torch.testing.assert_close(g, s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_slots_past_rank_and_no_adapter_tokens_get_zero_gradient(backend):
    c = random_case(50, 4, 16, 12, 8, none_fraction=0.3)
    grad_slots = torch.tensor([True, False, True, False])
    dx, dA, dB = grads_of(c, backend, torch.float64, torch.randn(50, 12, dtype=torch.float64), grad_slots)
    assert (dA[~grad_slots] == 0).all() and (dB[~grad_slots] == 0).all()
    assert (dx[c["ids"] < 0] == 0).all()
    for slot, k in enumerate(c["ranks"].tolist()):
        assert (dA[slot, k:] == 0).all() and (dB[slot, :, k:] == 0).all()
    trained = [s for s in (0, 2) if int(c["ranks"][s]) > 0 and (c["ids"] == s).any()]
    assert trained and all(dA[s].abs().sum() > 0 for s in trained)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_requested_gradients_are_computed(backend):
    c = random_case(20, 3, 8, 6, 4)
    A = c["A"].detach().requires_grad_()
    with lora_fast.use_backend(backend):
        y = lora_fast.lora_delta(c["x"], A, c["B"], c["batch"], c["scales"], c["ranks"])
    y.sum().backward()
    expected = reference.lora_delta_backward(
        torch.ones_like(y), c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"]
    )[1]
    torch.testing.assert_close(A.grad, expected)


def test_out_path_is_differentiable_and_keeps_out_history():
    c = random_case(16, 3, 8, 6, 4)
    x = c["x"].detach().requires_grad_()
    base = torch.nn.Linear(8, 6, dtype=torch.float64)
    y = base(x)
    lora_fast.lora_delta(x, c["A"], c["B"], c["batch"], c["scales"], c["ranks"], out=y)
    y.sum().backward()
    expected = (
        base.weight.sum(0).expand(16, 8)
        + reference.lora_delta_backward(
            torch.ones(16, 6, dtype=torch.float64),
            c["x"],
            c["A"],
            c["B"],
            c["batch"],
            c["scales"],
            c["ranks"],
        )[0]
    )
    torch.testing.assert_close(x.grad, expected)
    assert base.weight.grad is not None


def test_compiled_training_step():
    torch._dynamo.reset()
    c = random_case(24, 3, 16, 12, 8, dtype=torch.float32)
    A = c["A"].detach().requires_grad_()
    B = c["B"].detach().requires_grad_()

    @torch.compile(fullgraph=True)
    def loss_fn(x, A, B, batch, scales, ranks):
        return lora_fast.lora_delta(x, A, B, batch, scales, ranks).square().sum()

    loss_fn(c["x"], A, B, c["batch"], c["scales"], c["ranks"]).backward()
    A_eager = c["A"].detach().requires_grad_()
    B_eager = c["B"].detach().requires_grad_()
    lora_fast.lora_delta(
        c["x"], A_eager, B_eager, c["batch"], c["scales"], c["ranks"]
    ).square().sum().backward()
    assert_close(A.grad, A_eager.grad, torch.float32)
    assert_close(B.grad, B_eager.grad, torch.float32)


def test_grad_slots_is_validated():
    c = random_case(4, 2, 8, 8, 2)
    with pytest.raises(TypeError, match="grad_slots must be a bool tensor"):
        lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], grad_slots=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"grad_slots.shape\[0\] must be num_slots"):
        lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"], grad_slots=torch.tensor([True]))


@pytest.mark.parametrize("sum_coef", [0, 1], ids=["planes_read", "planes_summed"])
@pytest.mark.parametrize("split_m", [1, 3], ids=["whole_segments", "split_segments"])
@pytest.mark.parametrize("segmented", [0, 1, 2], ids=["positions", "segments", "compact"])
def test_triton_backward_kernels_with_split_segments(split_m, segmented, sum_coef):
    """The weight gradients with each slot's segment split over programs (float32 partial planes,
    summed afterwards), reading the shrinks' two split-K planes or their sum (SUM_COEF), and the
    shrink/expand of the backward in either grid mode."""
    kernels = pytest.importorskip("lora_fast.kernels")
    c = random_case(150, 4, 40, 36, 24, dtype=torch.float32, device=DEVICE, none_fraction=0.2)
    b = c["batch"]
    grad_slots = torch.tensor([True, False, True, True], device=DEVICE)
    grad_out = torch.randn(150, 36, device=DEVICE)
    small = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1, "MAX_BLOCK_R": 16, "SEGMENTED": segmented}
    configs = {
        "shrink": dict(small, BLOCK_K=16, SPLIT_K=2),
        "expand": dict(small, BLOCK_N=32),
        "weight_grad": {
            "BLOCK_M": 16,
            "BLOCK_D": 32,
            "MAX_BLOCK_R": 16,
            "SPLIT_M": split_m,
            "SUM_COEF": sum_coef,
            "num_warps": 4,
            "num_stages": 1,
        },
    }
    got = kernels.lora_delta_backward(
        grad_out,
        c["x"],
        c["A"],
        c["B"],
        b.token_order,
        b.token_slots,
        b.segment_starts,
        b.segment_lengths,
        c["scales"],
        c["ranks"],
        grad_slots,
        configs=configs,
    )
    expected = reference_grads(c, grad_out, grad_slots)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, torch.float32)


def test_dy_pass_pays_while_its_planes_cost_at_most_half_of_the_dy_read_it_saves():
    backward = importlib.import_module("lora_fast.kernels.lora_delta_backward")
    assert backward.dy_pass_pays(16, 128, 2) and not backward.dy_pass_pays(17, 128, 2)
    assert backward.dy_pass_pays(32, 256, 2) and backward.dy_pass_pays(32, 128, 4)
    assert not backward.dy_pass_pays(64, 256, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["column_planes", "rank_passes"])
@pytest.mark.parametrize(
    "needs", [(True, True, True), (False, True, True), (True, False, True)], ids=["x_A_B", "A_B", "x_B"]
)
@pytest.mark.parametrize("kept_t", [False, True], ids=["t_computed", "t_kept"])
def test_triton_fused_dy_pass(dtype, case, needs, kept_t, monkeypatch):
    """FUSE_DY: one kernel reads dy for both u = B^T dy (one plane per block of dy's columns,
    summed) and dB, in place of the shrink of dy and dB's weight gradient: the gradients match
    the reference with frozen slots, -1 tokens, mixed ranks (a slot of rank 0 included), and
    the forward's split-K shrink planes of x given or computed; and the shrink of dy no longer
    runs. ``column_planes``: rank 8, five (fp32) or three (bf16) column blocks, split segments;
    ``rank_passes``: rank 24 in two passes of 16 (with the rank rule lifted), whole segments."""
    kernels = pytest.importorskip("lora_fast.kernels")
    backward = importlib.import_module("lora_fast.kernels.lora_delta_backward")
    r_max, d_out = (8, 150) if case == "column_planes" else (24, 36)
    c = random_case(150, 4, 40, d_out, r_max, dtype=dtype, device=DEVICE, none_fraction=0.2)
    c["ranks"][3] = 0
    if dtype == torch.bfloat16:  # B rank-major, as the stacks keep it (the dy pass reads B's strides)
        c["B"] = c["B"].transpose(1, 2).contiguous().transpose(1, 2)
    b = c["batch"]
    grad_slots = torch.tensor([True, False, True, True], device=DEVICE)
    grad_out = torch.randn(150, d_out, dtype=torch.float64).to(dtype).to(DEVICE)
    small = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1, "MAX_BLOCK_R": 16, "SEGMENTED": 0}
    block_d = 32 if dtype == torch.float32 else 64  # the narrowest that pays at rank 8
    configs = {
        "shrink": dict(small, BLOCK_K=16, SPLIT_K=2),
        "expand": dict(small, BLOCK_N=32),
        "weight_grad": {
            "BLOCK_M": 16,
            "BLOCK_D": block_d,
            "MAX_BLOCK_R": 16,
            "SPLIT_M": 3 if case == "column_planes" else 1,
            "FUSE_DY": 1,
            "num_warps": 4,
            "num_stages": 1,
        },
    }
    if case == "rank_passes":
        monkeypatch.setattr(backward, "dy_pass_pays", lambda *args: True)
    segments = (b.segment_starts, b.segment_lengths)
    t = None
    if kept_t:
        t = kernels.lora_shrink_partials(
            c["x"],
            c["A"],
            b.token_order,
            b.token_slots,
            c["ranks"],
            configs["shrink"],
            segments,
            zeroed=False,
        )
    shrunk = []
    real_shrink = backward.lora_shrink_partials
    monkeypatch.setattr(
        backward,
        "lora_shrink_partials",
        lambda rows, *args, **kw: shrunk.append(rows) or real_shrink(rows, *args, **kw),
    )
    got = kernels.lora_delta_backward(
        grad_out,
        c["x"],
        c["A"],
        c["B"],
        b.token_order,
        b.token_slots,
        *segments,
        c["scales"],
        c["ranks"],
        grad_slots,
        needs=needs,
        configs=configs,
        t_partials=t,
    )
    assert not any(rows is grad_out for rows in shrunk), "the shrink of dy ran beside the dy pass"
    assert len(shrunk) == (0 if kept_t else 1)  # the shrink of x, for dB, when not kept
    expected = reference_grads(c, grad_out, grad_slots)
    for wanted, g, e in zip(needs, got, expected, strict=True):
        assert (g is None) != wanted
        if wanted:
            assert_close(g, e, dtype)


@pytest.mark.parametrize("training_split", [1, 3])
def test_triton_training_shrinks_take_the_train_shrink_entry(training_split, monkeypatch, tmp_path):
    """A table's ``train_shrink`` entry configures the shrinks whose partials a backward reads:
    the training forward's (kept for dB) and the backward's shrink of dy. An inference call keeps
    the ``shrink`` entry. With a split different from the forward's, the gradients still match
    the reference, and a table without the entry falls back to ``shrink``."""
    kernels = pytest.importorskip("lora_fast.kernels")
    if not kernels.AVAILABLE:
        pytest.skip("triton is not installed")
    shrink_module = importlib.import_module("lora_fast.kernels.lora_shrink")
    table = json.loads((kernels.configs.CONFIG_DIR / "interpreter.json").read_text())
    train_config = table["shrink"][-1]["config"] | {"SPLIT_K": training_split, "SEGMENTED": 0}
    table["train_shrink"] = [{"config": train_config}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("LORA_FAST_TRITON_CONFIG", str(path))
    kinds = []
    real_lookup = shrink_module.lookup

    def lookup(kind, *args):
        kinds.append(kind)
        return real_lookup(kind, *args)

    monkeypatch.setattr(shrink_module, "lookup", lookup)
    c = random_case(45, 4, 80, 56, 24, dtype=torch.float32)  # 45 tokens: no one-launch kernel
    grad_out = torch.randn(45, 56, dtype=torch.float64).float()
    b = c["batch"].to(DEVICE)
    x, A, B = (c[k].to(DEVICE).requires_grad_() for k in ("x", "A", "B"))
    with lora_fast.use_backend("triton"):  # the backward too (on the CPU it would be C++ outside)
        lora_fast.lora_delta(x, A, B, b, c["scales"].to(DEVICE), c["ranks"].to(DEVICE)).backward(
            grad_out.to(DEVICE)
        )
    assert kinds == ["train_shrink", "train_shrink"]  # the backward reused the forward's shrink of x
    for g, e in zip((x.grad, A.grad, B.grad), reference_grads(c, grad_out), strict=True):
        assert_close(g, e, torch.float32)
    x, A, B = (t.detach() for t in (x, A, B))
    args = (x, A, B, b.token_order, b.token_slots, c["scales"].to(DEVICE), c["ranks"].to(DEVICE))
    kept = kernels.lora_delta_(*args, torch.empty(45, 56, device=DEVICE), accumulate=False, training=True)
    assert kept.shape[0] == training_split
    kinds.clear()
    with torch.no_grad(), lora_fast.use_backend("triton"):
        lora_fast.lora_delta(x, A, B, b, c["scales"].to(DEVICE), c["ranks"].to(DEVICE))
    assert kinds == ["shrink"]
    del table["train_shrink"]
    path.write_text(json.dumps(table))
    monkeypatch.setenv("LORA_FAST_TRITON_CONFIG", str(path.with_name("plain.json")))
    path.rename(path.with_name("plain.json"))
    assert real_lookup("train_shrink", x.device, 45, 24, 80) == table["shrink"][-1]["config"]


def test_a_fuse_dy_table_row_reaches_lora_delta_autograd(monkeypatch, tmp_path):
    """Through lora_delta's autograd with the Triton backend, a weight_grad row with FUSE_DY runs
    the dy pass on the forward's kept shrink partials of x; the gradients match the reference."""
    kernels = pytest.importorskip("lora_fast.kernels")
    if not kernels.AVAILABLE:
        pytest.skip("triton is not installed")
    backward = importlib.import_module("lora_fast.kernels.lora_delta_backward")
    table = json.loads((kernels.configs.CONFIG_DIR / "interpreter.json").read_text())
    table["weight_grad"] = [{"config": table["weight_grad"][0]["config"] | {"FUSE_DY": 1}}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("LORA_FAST_TRITON_CONFIG", str(path))
    passes = []
    real_pass = backward._dy_pass
    monkeypatch.setattr(
        backward, "_dy_pass", lambda *args, **kw: passes.append(args[2]) or real_pass(*args, **kw)
    )
    c = random_case(90, 4, 40, 72, 8, dtype=torch.float32)
    grad_out = torch.randn(90, 72, dtype=torch.float64).float()
    b = c["batch"].to(DEVICE)
    x, A, B = (c[k].to(DEVICE).requires_grad_() for k in ("x", "A", "B"))
    with lora_fast.use_backend("triton"):  # the backward too (on the CPU it would be C++ outside)
        lora_fast.lora_delta(x, A, B, b, c["scales"].to(DEVICE), c["ranks"].to(DEVICE)).backward(
            grad_out.to(DEVICE)
        )
    assert len(passes) == 1 and passes[0].dim() == 3  # the forward's split-K partials of x
    for g, e in zip((x.grad, A.grad, B.grad), reference_grads(c, grad_out), strict=True):
        assert_close(g, e, torch.float32)


@pytest.mark.parametrize("split_m", [1, 3], ids=["whole_segments", "split_segments"])
def test_triton_weight_gradients_write_every_entry(split_m):
    """The weight-gradient kernel writes its whole output (zeros for a frozen slot, an empty
    segment and rank rows past a slot's rank), so the backward allocates dA and dB unfilled: a
    NaN-filled output comes back finite and equal to the reference."""
    pytest.importorskip("lora_fast.kernels")
    backward = importlib.import_module("lora_fast.kernels.lora_delta_backward")

    ids = torch.randint(0, 3, (60,))
    ids[:7] = -1
    c = random_case(60, 4, 40, 36, 24, dtype=torch.float32, device=DEVICE, ids=ids)  # slot 3: empty
    c["ranks"][1] = 5
    b = c["batch"]
    grad_slots = torch.tensor([True, True, False, True], device=DEVICE)
    grad_out = torch.randn(60, 36, device=DEVICE)
    config = {
        "BLOCK_M": 16,
        "BLOCK_D": 32,
        "MAX_BLOCK_R": 16,
        "SPLIT_M": split_m,
        "num_warps": 4,
        "num_stages": 1,
    }
    t = reference.lora_shrink(c["x"], c["A"], b, c["ranks"]).float()
    dB = torch.full_like(c["B"], float("nan"))
    strides = (dB.stride(0), dB.stride(2), dB.stride(1))
    segments = (b.token_order, b.segment_starts, b.segment_lengths)
    backward._weight_grad(t, grad_out, dB, strides, c["scales"], *segments, c["ranks"], grad_slots, config)
    expected = reference_grads(c, grad_out, grad_slots)[2]
    assert not dB.isnan().any()
    assert_close(dB, expected, torch.float32)
    assert (dB[2] == 0).all() and (dB[3] == 0).all() and (dB[1, :, 5:] == 0).all()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b_layout", ["contiguous", "rank_major"])
def test_cpu_weight_gradients_write_every_entry(monkeypatch, isa, dtype, b_layout):
    """The C++ backward allocates dA and dB unfilled: its weight-gradient items write every entry
    of a trained slot (rank rows past the slot's rank as zeros) and the skipped slots (frozen,
    empty segment, rank 0) are zero-filled. With torch's deterministic mode, unfilled memory comes
    from the allocator as NaN, so an entry left unwritten shows. Ranks 5, 8, 16 and 19 with
    r_max 19 cover the 8- and 16-wide register transposes and their scalar edges."""
    monkeypatch.setenv("LORA_FAST_CPU_ISA", isa)
    ids = torch.randint(0, 4, (90,))
    ids[:7] = -1
    c = random_case(90, 5, 300, 270, 19, dtype=dtype, ids=ids)  # slot 4: empty segment
    c["ranks"] = torch.tensor([19, 5, 16, 8, 19])
    if b_layout == "rank_major":
        c["B"] = c["B"].transpose(1, 2).contiguous().transpose(1, 2)
    grad_slots = torch.tensor([True, True, True, False, True])
    grad_out = torch.randn(90, 270, dtype=torch.float64).to(dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(4, dtype=dtype).isnan().all()  # the fill this test relies on
        got = grads_of(c, "cpu", dtype, grad_out, grad_slots)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    expected = reference_grads(c, grad_out, grad_slots)
    for g, e in zip(got, expected, strict=True):
        assert not g.isnan().any()
        assert_close(g, e, dtype)
    _, dA, dB = got
    assert (dA[3] == 0).all() and (dA[4] == 0).all() and (dA[1, 5:] == 0).all()
    assert (dB[3] == 0).all() and (dB[4] == 0).all() and (dB[1, :, 5:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_takes_the_forward_shrink(dtype):
    """Eager autograd keeps the C++ forward's ``t = A x`` (lora_shrink's output) and hands it to
    the C++ backward, which then skips its own shrink: same bits as recomputing it, dB made
    from the t passed (a changed t changes dB and nothing else), and a t of the wrong shape or
    dtype is refused."""
    if lora_fast.backends.cpu_isa() is None:
        pytest.skip("the C++ extension is not built")
    ops = torch.ops.lora_fast_C
    c = random_case(50, 4, 40, 30, 8, dtype=dtype)
    b = c["batch"]
    segments = (b.token_order, b.segment_starts, b.segment_lengths)
    grad_out = torch.randn(50, 30).to(dtype)
    args = (grad_out, c["x"], c["A"], c["B"], *segments, c["scales"], c["ranks"], None, True, True, True)
    t = ops.lora_shrink(c["x"], c["A"], *segments, c["ranks"])
    recomputed = ops.lora_delta_backward(*args)
    kept = ops.lora_delta_backward(*args, t)
    for g, h in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=0)
    changed = ops.lora_delta_backward(*args, 2 * t)
    torch.testing.assert_close(changed[0], kept[0], rtol=0, atol=0)
    torch.testing.assert_close(changed[1], kept[1], rtol=0, atol=0)
    assert_close(changed[2], 2 * kept[2].double(), dtype)
    with pytest.raises(ValueError, match="lora_shrink output"):
        ops.lora_delta_backward(*args, t[:, :4])
    with pytest.raises(ValueError, match="lora_shrink output"):
        ops.lora_delta_backward(*args, t.double())


def _backend_device_dtype(backend):
    """Where and in what dtype a backend's eager/custom-op comparison runs."""
    if backend != "triton":
        return "cpu", torch.float64
    kernels = pytest.importorskip("lora_fast.kernels")
    if not kernels.AVAILABLE:
        pytest.skip("triton is not installed")
    return DEVICE, torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_eager_autograd_function_and_custom_op_give_the_same_gradients(backend):
    """Eager training goes through a plain autograd.Function (less host time per step; Triton's
    keeps the forward's shrink for dB); the custom op (what torch.compile and dispatch modes see)
    must give the same bits."""
    device, dtype = _backend_device_dtype(backend)
    c = random_case(40, 3, 24, 20, 8, dtype=dtype, device=device, none_fraction=0.2)
    grad_out = torch.randn(40, 20, dtype=dtype, device=device)
    grad_slots = torch.tensor([True, False, True], device=device)
    results = []
    for use_op in (False, True):
        x, A, B = (c[k].detach().clone().requires_grad_() for k in ("x", "A", "B"))
        with lora_fast.use_backend(backend):
            if use_op:
                y = torch.ops.lora_fast.lora_delta(
                    x, A, B, *c["batch"].metadata, c["scales"], c["ranks"], grad_slots
                )
            else:
                y = lora_fast.lora_delta(x, A, B, c["batch"], c["scales"], c["ranks"], grad_slots=grad_slots)
                assert "DeltaFunction" in type(y.grad_fn).__name__
            y.backward(grad_out)
        results.append((y.detach(), x.grad, A.grad, B.grad))
    for eager, op in zip(*results, strict=True):
        torch.testing.assert_close(eager, op, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("view", [False, True], ids=["rows", "view_of_3d"])
def test_in_place_training_delta_matches_the_out_of_place_one(backend, view, monkeypatch):
    """lora_delta(out=y) with autograd adds into y in place (no delta tensor): y, and the
    gradients of x, A, B and of what produced y, equal an out-of-place delta added to y."""
    device, dtype = _backend_device_dtype(backend)
    c = random_case(42, 3, 24, 20, 8, dtype=dtype, device=device, none_fraction=0.2)
    grad_out = torch.randn(42, 20, dtype=dtype, device=device)
    in_place_calls = []
    forward = lora_fast.ops._DeltaIntoFunction.forward
    monkeypatch.setattr(
        lora_fast.ops._DeltaIntoFunction,
        "forward",
        staticmethod(lambda *args: in_place_calls.append(1) or forward(*args)),
    )
    results = []
    for in_place in (True, False):
        torch.manual_seed(0)
        base = torch.nn.Linear(24, 20, dtype=dtype, device=device)
        x, A, B = (c[k].detach().clone().requires_grad_() for k in ("x", "A", "B"))
        with lora_fast.use_backend(backend):
            y = base(x.view(6, 7, 24) if view else x)
            rows = y.view(-1, 20) if view else y
            if in_place:
                lora_fast.lora_delta(x, A, B, c["batch"], c["scales"], c["ranks"], out=rows)
                assert in_place_calls == [1]
            else:
                y = y + lora_fast.lora_delta(x, A, B, c["batch"], c["scales"], c["ranks"]).view(y.shape)
            y.backward(grad_out.view(y.shape))
        results.append((y.detach().reshape(42, 20), x.grad, A.grad, B.grad, base.weight.grad, base.bias.grad))
    for in_place, separate in zip(*results, strict=True):
        assert_close(in_place, separate, dtype)


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_float64_scales_reach_float64_results_unrounded(backend, monkeypatch):
    """float64 inputs take float64 scales (float32 ones are still accepted): non-dyadic scales
    (1/3, 2/7, 1/10) reach the delta and every gradient unrounded, equal to an explicit float64
    computation to 1e-12 (a float32 copy of 1/3 is off by 1e-8), on every backend that runs
    float64, fused_lora_linear's CPU kernel included."""
    if backend == "cpu" and lora_fast.backends.cpu_isa() is None:
        pytest.skip("the C++ extension is not built")
    device = "cuda" if backend == "cuda" else "cpu"
    c = random_case(23, 3, 16, 12, 4, device=device)
    scales = torch.tensor([1 / 3, 2 / 7, 1 / 10], dtype=torch.float64, device=device)
    x, A, B = (c[k].clone().requires_grad_() for k in ("x", "A", "B"))
    slots, ranks = c["ids"].tolist(), c["ranks"].tolist()
    expected = torch.stack(
        [
            scales[a] * (B[a, :, : ranks[a]] @ (A[a, : ranks[a]] @ x[i])) if a >= 0 else x.new_zeros(12)
            for i, a in enumerate(slots)
        ]
    )
    grad_out = torch.randn(23, 12, dtype=torch.float64, device=device)
    expected_grads = torch.autograd.grad(expected, (x, A, B), grad_out)

    def assert_equal_to_rounding(got, want):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-12

    fused_calls = count_fused_kernel_calls(monkeypatch)
    with lora_fast.use_backend(backend):
        delta = lora_fast.lora_delta(x, A, B, c["batch"], scales, c["ranks"])
        grads = torch.autograd.grad(delta, (x, A, B), grad_out)
        W = torch.randn(12, 16, dtype=torch.float64, device=device)
        with torch.no_grad(), torch_threads(1):  # one thread: the CPU's one-kernel linear
            linear = lora_fast.fused_lora_linear(x, W, None, A, B, c["batch"], scales, c["ranks"])
    assert_equal_to_rounding(delta.detach(), expected.detach())
    for got, want in zip(grads, expected_grads, strict=True):
        assert_equal_to_rounding(got, want)
    assert_equal_to_rounding(linear, x.detach() @ W.T + expected.detach())
    assert fused_calls == ([23] if backend == "cpu" else [])
    with pytest.raises(TypeError, match="float64 with float64 inputs"):
        lora_fast.lora_delta(x.float(), A.float(), B.float(), c["batch"], scales, c["ranks"])

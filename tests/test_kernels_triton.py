"""Triton kernels against the reference: on a GPU when present, else in the CPU interpreter."""

from pathlib import Path

import pytest
import torch

import lora_fast
from lora_fast import reference

from .helpers import assert_close, random_case

kernels = pytest.importorskip("lora_fast.kernels")
if not kernels.AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    # T, S, d_in, d_out, r_max
    (1, 1, 64, 48, 8),
    (5, 3, 33, 70, 4),
    (37, 5, 53, 41, 8),
    (70, 4, 40, 65, 40),  # rank above one 32-column pass of the interpreter config
]
# Small blocks and an uneven split so the K loop, the split planes and the rank passes all iterate.
SMALL = {
    "fused": {
        "BLOCK_M": 16,
        "BLOCK_N": 32,
        "BLOCK_K": 16,
        "MAX_BLOCK_R": 16,
        "num_warps": 4,
        "num_stages": 1,
    },
    "shrink": {
        "BLOCK_M": 16,
        "BLOCK_K": 16,
        "SPLIT_K": 3,
        "MAX_BLOCK_R": 16,
        "num_warps": 4,
        "num_stages": 1,
    },
    "expand": {"BLOCK_M": 16, "BLOCK_N": 32, "MAX_BLOCK_R": 16, "num_warps": 4, "num_stages": 1},
}


def expected(c, start=None):
    delta = reference.lora_delta(
        c["x"].double(), c["A"].double(), c["B"].double(), c["batch"], c["scales"], c["ranks"]
    )
    return delta if start is None else start.double() + delta


def magnitude(c):
    return float(expected(c).abs().max()) if c["x"].shape[0] else 0.0


# grid modes (SEGMENTED): positions, segments, compact segments
GRIDS = [0, 1, 2]
GRID_IDS = ["positions", "segments", "compact"]


def small(segmented: int) -> dict:
    """SMALL with every kernel in segments mode (one program per block of one slot's segment) or
    positions mode (one program per block of the slot-sorted order, walking its slots)."""
    return {name: dict(config, SEGMENTED=segmented) for name, config in SMALL.items()}


def run_delta(c, out, fused, x=None, batch=None, ranks="case", segmented=0):
    """kernels.lora_delta_ on a random case with the small test configs (x/batch/ranks overridable)."""
    batch = c["batch"] if batch is None else batch
    kernels.lora_delta_(
        c["x"] if x is None else x,
        c["A"],
        c["B"],
        batch.token_order,
        batch.token_slots,
        c["scales"],
        c["ranks"] if ranks == "case" else ranks,
        out,
        fused=fused,
        configs=small(segmented),
        segments=(batch.segment_starts, batch.segment_lengths),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "shrink_expand"])
@pytest.mark.parametrize("segmented", GRIDS, ids=GRID_IDS)
def test_delta_kernels_match_reference(dtype, shape, fused, segmented):
    c = random_case(*shape, dtype=dtype, device=DEVICE)
    start = (torch.randn(shape[0], shape[3], device=DEVICE) * 3).to(dtype)
    out = start.clone()
    run_delta(c, out, fused, segmented=segmented)
    assert_close(out, expected(c, start), dtype, magnitude=magnitude(c) + 3)
    untouched = c["ids"] < 0
    assert torch.equal(out[untouched], start[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "shrink_expand"])
@pytest.mark.parametrize("segmented", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("none_fraction", [0.0, 0.3, 1.0], ids=["all_slots", "some_none", "all_none"])
def test_delta_written_over_a_poisoned_out(dtype, fused, segmented, none_fraction):
    """accumulate=False writes every token (the delta; zeros without a slot) and reads nothing
    of out: a NaN-filled out comes back finite and equal to the delta."""
    c = random_case(37, 5, 53, 41, 24, dtype=dtype, device=DEVICE, none_fraction=none_fraction)
    b = c["batch"]
    out = torch.full((37, 41), float("nan"), dtype=dtype, device=DEVICE)
    partials = kernels.lora_delta_(
        c["x"],
        c["A"],
        c["B"],
        b.token_order,
        b.token_slots,
        c["scales"],
        c["ranks"],
        out,
        fused=fused,
        configs=small(segmented),
        segments=(b.segment_starts, b.segment_lengths),
        accumulate=False,
    )
    assert (partials is None) == fused
    assert not out.isnan().any()
    assert_close(out, expected(c), dtype, magnitude=magnitude(c) + 1)
    assert (out[c["ids"] < 0] == 0).all()


@pytest.mark.parametrize("segmented", GRIDS, ids=GRID_IDS)
def test_expand_written_over_a_poisoned_out_with_split_partials(segmented):
    c = random_case(70, 4, 40, 65, 40, dtype=torch.float32, device=DEVICE, none_fraction=0.25)
    b = c["batch"]
    segments = (b.segment_starts, b.segment_lengths)
    configs = small(segmented)
    partials = kernels.lora_shrink_partials(
        c["x"], c["A"], b.token_order, b.token_slots, c["ranks"], configs["shrink"], segments, zeroed=False
    )
    assert partials.shape[0] == 3
    out = torch.full((70, 65), float("nan"), device=DEVICE)
    kernels.lora_expand_(
        partials,
        c["B"],
        b.token_order,
        b.token_slots,
        c["scales"],
        c["ranks"],
        out,
        configs["expand"],
        segments,
        accumulate=False,
    )
    assert_close(out, expected(c), torch.float32)
    assert (out[c["ids"] < 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_ops_on_the_triton_backend(dtype):
    c = random_case(45, 6, 72, 56, 16, dtype=dtype, device=DEVICE)
    args = (c["x"], c["A"], c["B"], c["batch"], c["scales"], c["ranks"])
    with lora_fast.use_backend("triton"):
        delta = lora_fast.lora_delta(*args)
        t = lora_fast.lora_shrink(c["x"], c["A"], c["batch"], c["ranks"])
        out = torch.zeros(45, 56, dtype=dtype, device=DEVICE)
        lora_fast.lora_expand(t, c["B"], c["batch"], c["scales"], out, c["ranks"])
    assert_close(delta, expected(c), dtype)
    assert_close(out, expected(c), dtype)
    expected_t = reference.lora_shrink(c["x"].double(), c["A"].double(), c["batch"], c["ranks"])
    assert t.dtype == torch.float32
    assert_close(t, expected_t, torch.float32 if dtype == torch.float32 else dtype)


@pytest.mark.parametrize("segmented", GRIDS, ids=GRID_IDS)
def test_shrink_owns_nothing_past_the_rank_and_expand_never_reads_it(segmented):
    c = random_case(40, 4, 48, 24, 16, dtype=torch.float32, device=DEVICE)
    b = c["batch"]
    segments = (b.segment_starts, b.segment_lengths)
    configs = small(segmented)
    t = kernels.lora_shrink(
        c["x"], c["A"], b.token_order, b.token_slots, c["ranks"], configs["shrink"], segments
    )
    k = torch.where(c["ids"] >= 0, c["ranks"][c["ids"].clamp(min=0)], 0)
    beyond = torch.arange(16, device=DEVICE)[None, :] >= k[:, None]
    assert (t[beyond] == 0).all()
    t[beyond] = float("nan")
    for slot, rank in enumerate(c["ranks"].tolist()):
        c["B"][slot, :, rank:] = float("nan")
    out = torch.zeros(40, 24, device=DEVICE)
    kernels.lora_expand_(
        t, c["B"], b.token_order, b.token_slots, c["scales"], c["ranks"], out, configs["expand"], segments
    )
    c["B"] = c["B"].nan_to_num(0.0)
    assert_close(out, expected(c), torch.float32)


def test_weights_past_the_rank_are_never_read_by_the_fused_kernel():
    c = random_case(20, 3, 40, 30, 16, dtype=torch.float16, device=DEVICE)
    for slot, rank in enumerate(c["ranks"].tolist()):
        c["A"][slot, rank:] = float("nan")
        c["B"][slot, :, rank:] = float("nan")
    out = torch.zeros(20, 30, dtype=torch.float16, device=DEVICE)
    run_delta(c, out, True)
    c["A"], c["B"] = c["A"].nan_to_num(0.0), c["B"].nan_to_num(0.0)
    assert_close(out, expected(c), torch.float16)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "shrink_expand"])
@pytest.mark.parametrize("segmented", GRIDS, ids=GRID_IDS)
def test_edge_batches(fused, segmented):
    empty = random_case(0, 2, 16, 16, 4, dtype=torch.float32, device=DEVICE)
    none = random_case(20, 3, 16, 24, 4, dtype=torch.float32, device=DEVICE, ids=torch.full((20,), -1))
    for c in (empty, none):
        out = torch.randn(c["x"].shape[0], c["B"].shape[1], device=DEVICE)
        start = out.clone()
        run_delta(c, out, fused, ranks=None, segmented=segmented)
        assert torch.equal(out, start)


@pytest.mark.parametrize("accumulate", [True, False], ids=["add_into", "write"])
@pytest.mark.parametrize("segmented", GRIDS, ids=GRID_IDS)
def test_many_slots_few_tokens_each(segmented, accumulate):
    """Decode-like batches over a stack of many slots (most of them empty, one with several
    blocks of tokens, slots past a power of two): the compact grid's block numbering."""
    ids = torch.full((50,), -1)
    ids[:35] = 3  # three blocks of 16 (two full, one partial) for slot 3
    ids[35:45] = torch.tensor([0, 5, 9, 16, 17, 30, 36, 36, 2, 35])
    ids = ids[torch.randperm(50)]
    c = random_case(50, 37, 40, 24, 8, dtype=torch.float32, device=DEVICE, ids=ids)
    b = c["batch"]
    start = torch.randn(50, 24, device=DEVICE)
    out = start.clone() if accumulate else torch.full((50, 24), float("nan"), device=DEVICE)
    kernels.lora_delta_(
        c["x"],
        c["A"],
        c["B"],
        b.token_order,
        b.token_slots,
        c["scales"],
        c["ranks"],
        out,
        fused=False,
        configs=small(segmented),
        segments=(b.segment_starts, b.segment_lengths),
        accumulate=accumulate,
    )
    assert_close(out, expected(c, start if accumulate else None), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("accumulate", [True, False], ids=["add_into", "write"])
@pytest.mark.parametrize("segmented", GRIDS, ids=GRID_IDS)
def test_programmatic_dependent_launch(segmented, accumulate):
    """Configs with PDL: the expand launches while the shrink runs and waits for its writes (on
    a Hopper GPU; elsewhere the row runs without it). Same bits as without PDL."""
    from lora_fast.kernels import _common

    if not _common._pdl_available(torch.device(DEVICE)):
        pytest.skip("no programmatic dependent launch on this GPU or Triton")
    c = random_case(300, 37, 256, 192, 16, dtype=torch.bfloat16, device=DEVICE, none_fraction=0.1)
    b = c["batch"]
    results = []
    for pdl in (0, 1):
        configs = {name: dict(config, PDL=pdl) for name, config in small(segmented).items()}
        torch.manual_seed(0)
        out = torch.randn(300, 192, device=DEVICE).to(torch.bfloat16)
        start = out.clone()
        kernels.lora_delta_(
            c["x"],
            c["A"],
            c["B"],
            b.token_order,
            b.token_slots,
            c["scales"],
            c["ranks"],
            out,
            fused=False,
            configs=configs,
            segments=(b.segment_starts, b.segment_lengths),
            accumulate=accumulate,
        )
        results.append(out)
    assert torch.equal(results[0], results[1])
    assert_close(results[1], expected(c, start if accumulate else None), torch.bfloat16)


@pytest.mark.parametrize("segmented", GRIDS, ids=GRID_IDS)
def test_results_are_bitwise_repeatable_and_order_independent(segmented):
    c = random_case(64, 5, 64, 48, 16, dtype=torch.bfloat16, device=DEVICE)
    order = torch.randperm(64, device=DEVICE)
    shuffled = lora_fast.AdapterBatch(c["ids"][order], 5)
    runs = []
    for batch, x in ((c["batch"], c["x"]), (c["batch"], c["x"]), (shuffled, c["x"][order])):
        out = torch.zeros(64, 48, dtype=torch.bfloat16, device=DEVICE)
        run_delta(c, out, False, x=x, batch=batch, segmented=segmented)
        runs.append(out)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][order], runs[2])


def test_non_contiguous_inputs_through_the_op():
    c = random_case(33, 4, 24, 18, 8, dtype=torch.float32, device=DEVICE)
    x = c["x"].t().contiguous().t()
    out = torch.zeros(18, 33, device=DEVICE).t()
    with lora_fast.use_backend("triton"):
        lora_fast.lora_delta(x, c["A"], c["B"], c["batch"], c["scales"], c["ranks"], out=out)
    assert_close(out, expected(c), torch.float32)


def test_float64_is_not_offered_to_triton():
    c = random_case(4, 2, 16, 16, 4, dtype=torch.float64, device=DEVICE)
    assert "triton" not in lora_fast.backends.available(DEVICE, torch.float64)
    with lora_fast.use_backend("triton"), pytest.raises(ValueError, match="backend 'triton' cannot run"):
        lora_fast.lora_delta(c["x"], c["A"], c["B"], c["batch"], c["scales"])


def test_config_table_lookup():
    from lora_fast.kernels import configs

    device = torch.device(DEVICE)
    for kernel in ("shrink", "expand"):
        for T in (1, 64, 5000, 10**6):
            config = configs.lookup(kernel, device, T, 16, 4096)
            assert config["BLOCK_M"] >= 16 and config["MAX_BLOCK_R"] >= 16


SHIPPED_TABLES = sorted(p.stem for p in (Path(__file__).parent.parent / "kernels" / "configs").glob("*.json"))


@pytest.mark.parametrize("table", SHIPPED_TABLES)
def test_every_shipped_table_covers_every_shape(table, monkeypatch):
    """Each GPU table answers every (T, r, d) for shrink, expand and weight_grad with a config
    the launchers take, and the fused kernel with a config or None."""
    from lora_fast.kernels import configs

    monkeypatch.setenv(configs.ENV_VAR, str(configs.CONFIG_DIR / f"{table}.json"))
    device = torch.device("cpu")
    for T in (1, 2, 16, 17, 64, 65, 256, 257, 1024, 1025, 4096, 5000, 10**6):
        for r in (1, 8, 9, 16, 64, 65, 256):
            for kernel in ("shrink", "expand", "weight_grad"):
                config = configs.lookup(kernel, device, T, r, 4096)
                assert config["BLOCK_M"] >= 16 and config["MAX_BLOCK_R"] >= 16
                assert config.get("SEGMENTED", 0) in (0, 1, 2)
            try:
                fused = configs.lookup("fused", device, T, r, 4096)
            except ValueError:  # no fused row reaches T: shrink + expand
                fused = None
            assert fused is None or fused["BLOCK_M"] >= 16


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "shrink_expand"])
def test_strided_weights_are_read_through_their_strides(fused):
    c = random_case(33, 4, 48, 40, 16, dtype=torch.float32, device=DEVICE)
    c["B"] = c["B"].transpose(1, 2).contiguous().transpose(1, 2)  # rank-major B
    c["A"] = c["A"].transpose(1, 2).contiguous().transpose(1, 2)  # column-major A
    out = torch.zeros(33, 40, device=DEVICE)
    run_delta(c, out, fused)
    assert_close(out, expected(c), torch.float32)


def test_unknown_grid_mode_is_refused():
    c = random_case(8, 2, 16, 16, 4, dtype=torch.float32, device=DEVICE)
    out = torch.zeros(8, 16, device=DEVICE)
    configs = {name: dict(config, SEGMENTED=3) for name, config in SMALL.items()}
    with pytest.raises(ValueError, match="SEGMENTED must be 0, 1 or 2"):
        kernels.lora_delta_(
            c["x"],
            c["A"],
            c["B"],
            c["batch"].token_order,
            c["batch"].token_slots,
            c["scales"],
            None,
            out,
            fused=False,
            configs=configs,
            segments=None,
        )


# fused_lora_linear's one kernel takes the fused delta's small blocks (the K loop, the split
# planes and the rank passes all iterate)
LINEAR_SMALL = SMALL["fused"]


def linear_inputs(shape, dtype, bias=True, transposed_w=False, rank_major=False, **case_args):
    T, S, d_in, d_out, r_max = shape
    c = random_case(*shape, dtype=dtype, device=DEVICE, **case_args)
    W = torch.randn(d_out, d_in, dtype=torch.float64).div(d_in**0.5)
    c["W"] = (W.T.contiguous().T if transposed_w else W).to(DEVICE, dtype)  # column-major view
    c["bias"] = torch.randn(d_out, dtype=torch.float64).to(DEVICE, dtype) if bias else None
    if rank_major:
        c["B"] = c["B"].transpose(1, 2).contiguous().transpose(1, 2)
    return c


def run_linear(c, out=None, ranks="case", config=LINEAR_SMALL):
    b = c["batch"]
    return kernels.lora_linear(
        c["x"],
        c["W"],
        c["bias"],
        c["A"],
        c["B"],
        b.token_order,
        b.token_slots,
        c["scales"],
        c["ranks"] if ranks == "case" else ranks,
        config,
        out=out,
        shrink_config=SMALL["shrink"] | {"SEGMENTED": 0},
        segments=(b.segment_starts, b.segment_lengths),
    )


def expected_linear(c):
    wide = {k: c[k].double() if c[k] is not None else None for k in ("x", "W", "bias", "A", "B")}
    return reference.fused_lora_linear(
        wide["x"], wide["W"], wide["bias"], wide["A"], wide["B"], c["batch"], c["scales"], c["ranks"]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 2, 5, 1, 2)], ids=lambda s: "x".join(map(str, s)))
def test_linear_kernel_matches_reference(dtype, shape):
    """Base GEMM + bias + every token's delta (tokens without a slot: the base alone), written
    over a NaN-poisoned out: every entry written, none read."""
    c = linear_inputs(shape, dtype)
    out = torch.full((shape[0], shape[3]), float("nan"), dtype=dtype, device=DEVICE)
    got = run_linear(c, out=out)
    assert got is out
    want = expected_linear(c)
    assert_close(got, want, dtype, magnitude=float(want.abs().max()))


@pytest.mark.parametrize(
    "case",
    [
        "no_bias",
        "strided_bias",
        "column_major_w",
        "rank_major_b",
        "no_ranks",
        "all_none",
        "empty_segments",
        "zero_rank",
    ],
)
def test_linear_kernel_layouts_and_edge_batches(case):
    shape = (29, 4, 70, 45, 24)
    args = {
        "no_bias": {"bias": False},
        "strided_bias": {},
        "column_major_w": {"transposed_w": True},
        "rank_major_b": {"rank_major": True},
        "no_ranks": {"mixed_ranks": False},
        "all_none": {"none_fraction": 1.0},
        # slots 1 and 3 own no token
        "empty_segments": {"ids": torch.tensor([0, 2, -1] * 9 + [0, 2])},
        "zero_rank": {},
    }[case]
    c = linear_inputs(shape, torch.float32, **args)
    ranks = "case"
    if case == "no_ranks":
        ranks = None
        c["ranks"] = None
    if case == "zero_rank":
        c["ranks"] = torch.tensor([24, 0, 0, 7], device=DEVICE)
    if case == "strided_bias":  # every other entry of a longer vector
        c["bias"] = torch.stack([c["bias"], torch.full_like(c["bias"], float("nan"))], 1).reshape(-1)[::2]
    got = run_linear(c, ranks=ranks)
    want = expected_linear(c)
    assert_close(got, want, torch.float32, magnitude=float(want.abs().max()))
    if case == "all_none":  # exactly the base layer's GEMM and bias, to fp32 rounding
        base = c["x"].double() @ c["W"].double().T + c["bias"].double()
        assert_close(got, base, torch.float32, magnitude=float(base.abs().max()))


def test_linear_kernel_without_rank_columns_is_the_base_layer():
    c = linear_inputs((9, 2, 33, 20, 0), torch.float32)
    got = run_linear(c)
    base = c["x"].double() @ c["W"].double().T + c["bias"].double()
    assert_close(got, base, torch.float32, magnitude=float(base.abs().max()))

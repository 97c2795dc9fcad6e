"""Measure candidate launch configurations on this GPU and write its config table.

    python -m benchmarks.tune_triton                  # bf16, D=4096, the bench_lora_ops shapes
    python -m benchmarks.tune_triton --quick          # two shapes, two candidates (smoke test)

The Triton kernels never autotune in the hot path: they read a table (kernels/configs/<GPU>.json,
else default.json) keyed by token count, rank and d. This script times every candidate of a
small fixed list on the op sweep's shapes (each candidate is a whole table: fused delta or not,
the grid mode, the shrink's and the expand's blocks), with the same timer as bench_lora_ops
(CUDA-graph replay, L2 flushed, median), and builds the table bucket by bucket: for each token
count T of the sweep and each rank r, the candidate with the lowest geometric mean of
time / best-time over that bucket's shapes (adapter counts, token orders). It writes the table
to kernels/configs/<GPU>.json (or --table) and every measurement beside the benchmark results.
Two more phases time whole calls with the delta's rows in place: fused_lora_linear at decode
sizes (the ``linear`` rows) and bench_lora_train's training step at prefill sizes (the
``train_shrink`` rows: the shrink whose split-K planes the backward reads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import lora_fast
from benchmarks import bench_lora_ops, bench_lora_train, common

CONFIG_DIR = Path(__file__).resolve().parent.parent / "kernels" / "configs"

# Blocks for a few tokens: 16 rows (tl.dot's minimum), split-K wide over d_in.
_DECODE_SHRINK = {
    "BLOCK_M": 16,
    "BLOCK_K": 128,
    "SPLIT_K": 16,
    "MAX_BLOCK_R": 64,
    "num_warps": 4,
    "num_stages": 2,
}
_DECODE_EXPAND = {"BLOCK_M": 16, "BLOCK_N": 128, "MAX_BLOCK_R": 64, "num_warps": 4, "num_stages": 2}
_PREFILL_SHRINK = {
    "BLOCK_M": 64,
    "BLOCK_K": 64,
    "SPLIT_K": 1,
    "MAX_BLOCK_R": 64,
    "num_warps": 4,
    "num_stages": 3,
}
_PREFILL_EXPAND = {"BLOCK_M": 64, "BLOCK_N": 128, "MAX_BLOCK_R": 64, "num_warps": 4, "num_stages": 3}


def _candidate(fused: dict | None, shrink: dict, expand: dict, segmented: int) -> dict:
    with_mode = {"SEGMENTED": segmented}
    return {
        "fused": None if fused is None else fused | with_mode,
        "shrink": shrink | with_mode,
        "expand": expand | with_mode,
    }


# The fused one-launch delta (positions or segments grid) and a 32-way split with 64-wide expand
# blocks were also candidates; on an H200 they never won a decode shape (the fused kernel took 2x
# to 10x the split path's time: benchmarks/results/tune_triton_nvidia-h200.md), so they are no
# longer timed.
DECODE_CANDIDATES = {
    "split16_positions": _candidate(None, _DECODE_SHRINK, _DECODE_EXPAND, 0),
    "split16_segments": _candidate(None, _DECODE_SHRINK, _DECODE_EXPAND, 1),
    "split8_segments": _candidate(None, _DECODE_SHRINK | {"SPLIT_K": 8, "BLOCK_K": 256}, _DECODE_EXPAND, 1),
    # rank passes of 16 columns: a rank-8 slot beside rank-64 ones does one pass, not a 64-wide one
    # (mixed ranks ran slower than uniform rank 64 with 64-wide passes on the H100)
    "split16_segments_r16": _candidate(
        None, _DECODE_SHRINK | {"MAX_BLOCK_R": 16}, _DECODE_EXPAND | {"MAX_BLOCK_R": 16}, 1
    ),
    # compact segments: the segments grid without its empty programs. On the H200 the segments
    # grid lost T=256, L=64 to the positions grid by 2x (63 against 27 us at r=8), most likely
    # for its 15 empty programs per busy one; the compact grid launches cdiv(T, 16) + min(S, T).
    "split16_compact": _candidate(None, _DECODE_SHRINK, _DECODE_EXPAND, 2),
    "split8_compact": _candidate(None, _DECODE_SHRINK | {"SPLIT_K": 8, "BLOCK_K": 256}, _DECODE_EXPAND, 2),
    # programmatic dependent launch: the expand's launch overlaps the shrink's tail (Hopper; the
    # two-launch decode shapes took 10-14 us on the H200, about two launch latencies)
    "split16_compact_pdl": _candidate(None, _DECODE_SHRINK | {"PDL": 1}, _DECODE_EXPAND | {"PDL": 1}, 2),
}
_FUSED_RETIRED = {
    "BLOCK_M": 16,
    "BLOCK_N": 128,
    "BLOCK_K": 256,
    "MAX_BLOCK_R": 64,
    "num_warps": 4,
    "num_stages": 2,
}
# candidates of earlier runs, no longer timed, so that their rows can still build a table
RETIRED_CANDIDATES = {
    "fused_positions": _candidate(_FUSED_RETIRED, _DECODE_SHRINK, _DECODE_EXPAND, 0),
    "fused_segments": _candidate(_FUSED_RETIRED, _DECODE_SHRINK, _DECODE_EXPAND, 1),
    "split32_n64_segments": _candidate(
        None, _DECODE_SHRINK | {"SPLIT_K": 32, "BLOCK_K": 64}, _DECODE_EXPAND | {"BLOCK_N": 64}, 1
    ),
    "m128_positions": _candidate(
        None,
        _PREFILL_SHRINK | {"BLOCK_M": 128, "num_warps": 8},
        _PREFILL_EXPAND | {"BLOCK_M": 128, "num_warps": 8},
        0,
    ),
    "m64_segments": _candidate(None, _PREFILL_SHRINK, _PREFILL_EXPAND, 1),
    # lost every shape of the H100's tuning run of 2026-11-26 (tune_triton_nvidia-h100-80gb-hbm3):
    # the one-launch delta with wide output blocks and a deep K pipeline, 1.5x-3x the two-launch
    # time (15.3-18.9 against 9.5-11.5 us at T=1; the CUDA C++ one-launch kernel is the T=1
    # candidate now), and the unsplit and 256-wide prefill rows, 4-30% behind the split-K 2 one
    "fused_n256_k512": _candidate(
        {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 512, "MAX_BLOCK_R": 64, "num_warps": 8, "num_stages": 3},
        _DECODE_SHRINK,
        _DECODE_EXPAND,
        2,
    ),
    "m64_positions": _candidate(None, _PREFILL_SHRINK, _PREFILL_EXPAND, 0),
    "m64_n256_positions": _candidate(
        None, _PREFILL_SHRINK | {"BLOCK_K": 128}, _PREFILL_EXPAND | {"BLOCK_N": 256, "num_warps": 8}, 0
    ),
}
PREFILL_CANDIDATES = {
    "m64_split2_positions": _candidate(None, _PREFILL_SHRINK | {"SPLIT_K": 2}, _PREFILL_EXPAND, 0),
    "m64_split2_r16_positions": _candidate(
        None,
        _PREFILL_SHRINK | {"SPLIT_K": 2, "MAX_BLOCK_R": 16},
        _PREFILL_EXPAND | {"MAX_BLOCK_R": 16},
        0,
    ),
    # one slot per program (a positions block that straddles two segments walks both)
    "m64_split2_compact": _candidate(None, _PREFILL_SHRINK | {"SPLIT_K": 2}, _PREFILL_EXPAND, 2),
    # more programs for the shortest prefill: at T = 1024 the shrink above launches 16 x 2 = 32
    # programs for 132 SMs (29-31 us on the H100 against an 8.5-9.8 us floor); 32-row blocks and
    # an 8-way split launch 256
    "m32_split8_positions": _candidate(
        None,
        _PREFILL_SHRINK | {"BLOCK_M": 32, "SPLIT_K": 8},
        _PREFILL_EXPAND | {"BLOCK_M": 32},
        0,
    ),
    # the expand's launch overlapping the shrink's tail, as at decode sizes
    "m64_split4_pdl_positions": _candidate(
        None, _PREFILL_SHRINK | {"SPLIT_K": 4, "PDL": 1}, _PREFILL_EXPAND | {"PDL": 1}, 0
    ),
}
# fused_lora_linear at decode sizes: F.linear then lora_delta ("composed"; captured in a graph,
# the shrink runs beside the GEMM on a side stream), or the shrink then one kernel for the base
# GEMM + expand (kernels/lora_linear.py), launched as the shrink's programmatic dependent so its
# GEMM overlaps the shrink. Blocks for a few rows, streaming W once: narrow N blocks for enough
# programs at d_out = 4096 (64 or 128 of them), a deep K pipeline.
LINEAR_CANDIDATES = {
    "composed": None,
    "linear_m16_n32_k256": {
        "BLOCK_M": 16,
        "BLOCK_N": 32,
        "BLOCK_K": 256,
        "MAX_BLOCK_R": 64,
        "PDL": 1,
        "num_warps": 4,
        "num_stages": 3,
    },
    "linear_m16_n64_k128": {
        "BLOCK_M": 16,
        "BLOCK_N": 64,
        "BLOCK_K": 128,
        "MAX_BLOCK_R": 64,
        "PDL": 1,
        "num_warps": 4,
        "num_stages": 4,
    },
    "linear_m64_n64_k64": {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_K": 64,
        "MAX_BLOCK_R": 64,
        "PDL": 1,
        "num_warps": 4,
        "num_stages": 4,
    },
}
WEIGHT_GRAD = {
    "BLOCK_M": 64,
    "BLOCK_D": 128,
    "MAX_BLOCK_R": 64,
    "SPLIT_M": 0,
    "num_warps": 4,
    "num_stages": 3,
}

# The shrink whose partials a training step's backward reads (the table's train_shrink kind:
# the training forward's shrink of x, kept for dB, and the backward's shrink of dy). The weight
# gradients read every split-K plane of both, so the forward's best split is not the training
# step's: on the H100 the forward's BLOCK_M 32 / split-K 8 row at T <= 4096 made the T = 4096
# training step 12-18% slower than the split-K 2 row before it (gpu_2026-11-26_h100_run5.md).
# The weight-gradient kernel is timed with it: each of its programs (one block of BLOCK_D
# columns) reloads the slot's coefficients, every split-K plane of them, so at d = 4096 with
# 128-wide blocks and split-K 8 it reads twice as many coefficient bytes (from L2) as rows of x
# or dy; 256-wide blocks halve that. On the H100 the weight gradients and the sum of their
# split-M planes took half of the T = 4096 step's GPU time (gpu_logs/h100_run5_profile.log).
# Timed on bench_lora_train's step (forward and backward, graph-replayed) at the prefill sizes.
_WEIGHT_GRAD_D256 = WEIGHT_GRAD | {"BLOCK_D": 256, "num_warps": 8}


def _train_candidate(shrink: dict, weight_grad: dict = WEIGHT_GRAD) -> dict:
    return {"train_shrink": shrink | {"SEGMENTED": 0}, "weight_grad": weight_grad}


TRAIN_CANDIDATES = {
    "train_m64_split1": _train_candidate(_PREFILL_SHRINK),
    "train_m64_split2": _train_candidate(_PREFILL_SHRINK | {"SPLIT_K": 2}),
    "train_m32_split2": _train_candidate(_PREFILL_SHRINK | {"BLOCK_M": 32, "SPLIT_K": 2}),
    "train_m32_split8": _train_candidate(_PREFILL_SHRINK | {"BLOCK_M": 32, "SPLIT_K": 8}),
    "train_m64_split1_d256": _train_candidate(_PREFILL_SHRINK, _WEIGHT_GRAD_D256),
    "train_m64_split2_d256": _train_candidate(_PREFILL_SHRINK | {"SPLIT_K": 2}, _WEIGHT_GRAD_D256),
    # the forward's shrink, its 8 planes summed once before the weight gradients read them
    "train_m32_split8_sum": _train_candidate(
        _PREFILL_SHRINK | {"BLOCK_M": 32, "SPLIT_K": 8}, WEIGHT_GRAD | {"SUM_COEF": 1}
    ),
    # More rows in flight per weight-gradient program. In run 5's profile each weight gradient
    # took 30 us at T = 4096, L = 4, d = 4096, about 37% of HBM bandwidth for its 33.5 MB of
    # rows: its programs walk about 6 tiles each, so the 3-stage pipeline is mostly filling and
    # draining. Twice the tokens per tile, or whole segments per program (no split-M planes to
    # write and sum: one launch fewer per gradient) with a deeper pipeline.
    "train_m64_split2_wg_m128": _train_candidate(
        _PREFILL_SHRINK | {"SPLIT_K": 2}, WEIGHT_GRAD | {"BLOCK_M": 128}
    ),
    "train_m64_split2_wg_whole": _train_candidate(
        _PREFILL_SHRINK | {"SPLIT_K": 2}, WEIGHT_GRAD | {"SPLIT_M": 1, "num_stages": 4}
    ),
    # One pass over dy for both u = B^T dy and dB (FUSE_DY): dy is read once instead of twice
    # (33.5 MB less at T = d = 4096, bf16), at the cost of u's per-column-block planes (8.4 MB
    # written and summed with 128-wide blocks at rank 16, half that with 256-wide).
    "train_m64_split2_fused_dy": _train_candidate(
        _PREFILL_SHRINK | {"SPLIT_K": 2}, WEIGHT_GRAD | {"FUSE_DY": 1}
    ),
    "train_m64_split2_fused_dy_d256": _train_candidate(
        _PREFILL_SHRINK | {"SPLIT_K": 2}, _WEIGHT_GRAD_D256 | {"FUSE_DY": 1}
    ),
}
# the CUDA C++ backend's one-launch delta (csrc/lora_cuda.cu, up to kFusedMaxTokens tokens): a
# decode candidate where that backend is built; a bucket it wins gets a cuda_delta row, which
# sends lora_delta's in-place inference calls there (the Triton rows stay for everything else)
CUDA_CANDIDATE = "cuda_fused"
CUDA_MAX_TOKENS = 64
LINEAR_MAX_TOKENS = 256  # the decode shapes; prefill stays on cuBLAS + lora_delta


def candidate_table(candidate: dict) -> dict:
    """A whole table holding one candidate for every shape."""
    return {
        kernel: [{"config": candidate[kernel]}] if candidate[kernel] is not None else []
        for kernel in ("fused", "shrink", "expand")
    } | {"weight_grad": [{"config": WEIGHT_GRAD}]}


def _time_rows(
    shapes: Sequence[dict],
    paths: dict[str, Path],
    repetitions: int,
    problem: Callable[[dict], object],
    measure: Callable[[object, str], tuple[float, Callable[[], object]] | None],
    phase: str | None = None,
) -> list[dict]:
    """What both tuner phases do per shape: build ``problem(shape)`` once, then for each candidate
    (its table in LORA_FAST_TRITON_CONFIG) ``measure(problem, name)`` gives its error against the
    reference and the call to time (None: not timed here). A candidate that fails or disagrees
    gets None, so it is never chosen; the row also names the fastest."""
    rows = []
    previous = os.environ.get("LORA_FAST_TRITON_CONFIG")
    try:
        for shape in shapes:
            p = problem(shape)
            row = {"phase": phase or shape["phase"], "T": shape["T"], "L": shape["L"], "r": shape["r"]}
            row["order"] = shape["order"] + ("+mixed_ranks" if shape["mixed"] else "")
            for name, path in paths.items():
                os.environ["LORA_FAST_TRITON_CONFIG"] = str(path)
                row[name] = None
                try:
                    measured = measure(p, name)
                    if measured is None:
                        continue
                    error, fn = measured
                    if error < 0.05:
                        row[name] = common.gpu_median_us(fn, repetitions)
                    else:
                        print(f"{name} disagrees with the reference on {shape}: {error:.3g}")
                except Exception as err:  # noqa: BLE001 - report and go on with the others
                    print(f"{name} failed on {shape}: {type(err).__name__}: {str(err)[:200]}")
            timed = [n for n in paths if row[n] is not None]
            if not timed:
                raise RuntimeError(f"no candidate ran on {shape}")
            row["best"] = best = min(timed, key=lambda n: row[n])
            rows.append(row)
            common.record_row(row)
            print(
                f"{row['phase']:7s} T={row['T']:5d} L={row['L']:2d} r={row['r']:2d} {row['order']:12s} "
                f"best {best:22s} {row[best]:8.1f} us  " + " ".join(f"{n}={row[n]:.1f}" for n in timed),
                flush=True,
            )
    finally:
        if previous is None:
            os.environ.pop("LORA_FAST_TRITON_CONFIG", None)
        else:
            os.environ["LORA_FAST_TRITON_CONFIG"] = previous
    return rows


def time_candidates(
    shapes: Sequence[dict],
    candidates: dict[str, dict],
    d: int,
    dtype: torch.dtype,
    repetitions: int,
    workdir: Path,
    device: str = "cuda",
) -> list[dict]:
    """One row per shape: the median microseconds of lora_fast.lora_delta under each candidate
    (``device`` is for the CPU test of this code, with the timer swapped for a stand-in).
    ``CUDA_CANDIDATE`` (value None) is the CUDA C++ backend, timed up to its one-launch kernel's
    largest token count."""
    paths = {}
    for name, candidate in candidates.items():
        paths[name] = workdir / f"{name}.json"
        if candidate is not None:
            paths[name].write_text(json.dumps(candidate_table(candidate)))

    def problem(shape: dict) -> dict:
        return bench_lora_ops.make_problem(
            shape["T"], shape["L"], d, shape["r"], dtype, shape["order"], shape["mixed"], device
        )

    def measure(p: dict, name: str):
        backend = "cuda" if name == CUDA_CANDIDATE else "triton"
        if backend == "cuda" and p["x"].shape[0] > CUDA_MAX_TOKENS:
            return None
        return bench_lora_ops.check_agreement(p, backend), bench_lora_ops.lora_fast_op(p, backend)

    return _time_rows(shapes, paths, repetitions, problem, measure)


def time_linear_candidates(
    shapes: Sequence[dict],
    candidates: dict[str, dict | None],
    d: int,
    dtype: torch.dtype,
    repetitions: int,
    workdir: Path,
    base_table: dict,
    device: str = "cuda",
) -> list[dict]:
    """One row per shape (phase "linear"): the median microseconds of lora_fast.fused_lora_linear
    (d_in = d_out = d, no bias) with ``base_table`` and each candidate as its ``linear`` row
    (None: no row, F.linear then lora_delta)."""
    paths = {}
    for name, candidate in candidates.items():
        paths[name] = workdir / f"{name}.json"
        rows_of = [] if candidate is None else [{"config": candidate}]
        paths[name].write_text(json.dumps(base_table | {"linear": rows_of}))

    def problem(shape: dict) -> tuple:
        p = bench_lora_ops.make_problem(
            shape["T"], shape["L"], d, shape["r"], dtype, shape["order"], shape["mixed"], device
        )
        W = (torch.randn(d, d, generator=torch.Generator().manual_seed(1)) / d**0.5).to(device, dtype)
        batch = lora_fast.AdapterBatch(p["adapter_ids"], p["A"].shape[0])
        args = (p["x"], W, None, p["A"], p["B"], batch, p["scales"], p["ranks"])
        with lora_fast.use_backend("torch"):
            return args, lora_fast.fused_lora_linear(*args).double()

    def measure(problem: tuple, name: str):
        args, expected = problem
        with torch.no_grad(), lora_fast.use_backend("triton"):
            got = lora_fast.fused_lora_linear(*args).double()
        error = float((got - expected).abs().max() / expected.abs().max())

        def run():
            with lora_fast.use_backend("triton"):
                return lora_fast.fused_lora_linear(*args)

        return error, run

    return _time_rows(shapes, paths, repetitions, problem, measure, phase="linear")


def time_train_candidates(
    shapes: Sequence[dict],
    candidates: dict[str, dict],
    d: int,
    dtype: torch.dtype,
    repetitions: int,
    workdir: Path,
    base_table: dict,
    device: str = "cuda",
) -> list[dict]:
    """One row per shape (phase "train"): the median microseconds of bench_lora_train's step
    (lora_delta forward and backward, the tokens' adapters interleaved) on the Triton backend,
    with ``base_table`` and each candidate's ``train_shrink`` and ``weight_grad`` as those rows."""
    paths = {}
    for name, candidate in candidates.items():
        paths[name] = workdir / f"{name}.json"
        rows_of = {kind: [{"config": config}] for kind, config in candidate.items()}
        paths[name].write_text(json.dumps(base_table | rows_of))

    def problem(shape: dict) -> tuple[dict, tuple]:
        p = bench_lora_train.make_problem(shape["T"], shape["L"], d, shape["r"], dtype, device)
        with lora_fast.use_backend("torch"):
            expected = bench_lora_train.lora_fast_step(p)()
        return p, tuple(g.double() for g in expected)

    def measure(problem: tuple, name: str):
        p, expected = problem
        step = bench_lora_train.lora_fast_step(p)

        def run():
            with lora_fast.use_backend("triton"):
                return step()

        got = run()
        error = max(
            float((g.double() - e).abs().max() / e.abs().max()) for g, e in zip(got, expected, strict=True)
        )
        return error, run

    return _time_rows(shapes, paths, repetitions, problem, measure, phase="train")


def choose(rows: Sequence[dict], names: Sequence[str]) -> str:
    """The candidate with the lowest geometric mean of time / best time over ``rows``."""

    def score(name: str) -> float:
        if any(row[name] is None for row in rows):
            return math.inf
        best = [min(row[n] for n in names if row[n] is not None) for row in rows]
        return math.fsum(math.log(row[name] / b) for row, b in zip(rows, best, strict=True)) / len(rows)

    return min(names, key=score)


FULL_RANK_BLOCK = 64  # the widest rank pass of the candidates (a rank-64 slot in one pass)


def _rank_cap(candidate: dict) -> int:
    """The narrowest MAX_BLOCK_R among a candidate's kernels."""
    return min(
        candidate[kernel]["MAX_BLOCK_R"]
        for kernel in ("fused", "shrink", "expand")
        if candidate[kernel] is not None
    )


def build_table(
    rows: Sequence[dict], candidates: dict[str, dict], gpu: str, tail: dict | None = None
) -> dict:
    """Entries per measured (T bucket, rank bucket), ascending; then, for token counts above the
    largest measured, the entries of ``tail`` (a table, default.json by default) that reach them."""
    if tail is None:
        tail = json.loads((CONFIG_DIR / "default.json").read_text())
    linear_rows = [row for row in rows if row["phase"] == "linear"]
    train_rows = [row for row in rows if row["phase"] == "train"]
    rows = [row for row in rows if row["phase"] not in ("linear", "train")]
    token_buckets = sorted({row["T"] for row in rows})
    largest = token_buckets[-1] if token_buckets else 0
    table: dict = {
        "_note": f"Measured by benchmarks/tune_triton.py on {gpu} (bf16, d=4096) up to "
        f"T={largest}; each bucket holds the candidate with the lowest geometric-mean time "
        "ratio over its shapes. Above that, default.json's entries.",
        "fused": [],
        "shrink": [],
        "expand": [],
        "cuda_delta": [],
        "weight_grad": tail.get("weight_grad", [{"config": WEIGHT_GRAD}]),
    }
    choices = {}
    for T in token_buckets:
        in_bucket = [row for row in rows if row["T"] == T]
        rank_buckets = sorted({row["r"] for row in in_bucket})
        names = [n for n in candidates if all(n in row for row in in_bucket)]
        for j, r in enumerate(rank_buckets):
            allowed = [n for n in names if n != CUDA_CANDIDATE]  # the Triton rows: every path
            if j == len(rank_buckets) - 1 and r < FULL_RANK_BLOCK:
                # the last rank bucket also serves every larger rank (a mixed-rank batch's r_max
                # too): a candidate whose rank passes are narrower than that, timed at rank r
                # only, would walk a rank-64 slot in several passes (H100: 126 against 86 us
                # at T=4096, ranks 8 and 64)
                allowed = [n for n in allowed if _rank_cap(candidates[n]) >= FULL_RANK_BLOCK] or allowed
            name = choose([row for row in in_bucket if row["r"] == r], allowed)
            choices[f"T<={T} r<={r}"] = name
            when = {"max_tokens": T}
            if j < len(rank_buckets) - 1:
                when["max_rank"] = r
            for kernel in ("fused", "shrink", "expand"):
                table[kernel].append({"when": when, "config": candidates[name][kernel]})
            if CUDA_CANDIDATE in names:
                in_rank = [row for row in in_bucket if row["r"] == r]
                to_cuda = choose(in_rank, [name, CUDA_CANDIDATE]) == CUDA_CANDIDATE
                choices[f"cuda T<={T} r<={r}"] = to_cuda
                table["cuda_delta"].append({"when": when, "config": {} if to_cuda else None})
    table["cuda_delta"].append({"config": None})
    for kernel in ("fused", "shrink", "expand"):
        table[kernel] += [
            entry
            for entry in tail.get(kernel, [])
            if entry.get("when", {}).get("max_tokens", math.inf) > largest
        ]
        if not any(not entry.get("when", {}).get("max_tokens") for entry in table[kernel]):
            if kernel != "fused" and table[kernel]:  # every shape needs a shrink and an expand
                table[kernel].append({"config": table[kernel][-1]["config"]})
    table["linear"] = (
        _linear_entries(linear_rows, candidates, choices) if linear_rows else tail.get("linear", [])
    )
    if train_rows:
        table["train_shrink"], weight_grad = _train_entries(train_rows, candidates, choices)
        table["weight_grad"] = weight_grad + table["weight_grad"][-1:]  # the catch-all above them
    else:
        table["train_shrink"] = tail.get("train_shrink", [])
    table["_choices"] = choices
    return table


def _bucket_winners(rows: Sequence[dict], candidates: dict, choices: dict, label: str):
    """``(when, name)`` per measured (T bucket, rank bucket), ascending: the candidate ``choose``
    picks there (recorded in ``choices`` as "<label> T<=.. r<=.."); the last rank bucket of a T
    bucket has no rank bound."""
    for T in sorted({row["T"] for row in rows}):
        in_bucket = [row for row in rows if row["T"] == T]
        rank_buckets = sorted({row["r"] for row in in_bucket})
        names = [n for n in candidates if all(n in row for row in in_bucket)]
        for j, r in enumerate(rank_buckets):
            name = choose([row for row in in_bucket if row["r"] == r], names)
            choices[f"{label} T<={T} r<={r}"] = name
            yield {"max_tokens": T} | ({"max_rank": r} if j < len(rank_buckets) - 1 else {}), name


def _train_entries(rows: Sequence[dict], candidates: dict, choices: dict) -> tuple[list, list]:
    """(train_shrink rows, weight_grad rows): per measured (T bucket, rank bucket) those of the
    fastest training step; none above the largest measured T (there the ``shrink`` rows and the
    weight_grad table's last row serve). Training batches of decode sizes, below the smallest
    measured T, keep the shrink rows tuned for them (a null train_shrink row)."""
    entries, weight_grad = [], []
    if rows and min(row["T"] for row in rows) > LINEAR_MAX_TOKENS:
        entries.append({"when": {"max_tokens": LINEAR_MAX_TOKENS}, "config": None})
    for when, name in _bucket_winners(rows, candidates, choices, "train"):
        entries.append({"when": when, "config": candidates[name]["train_shrink"]})
        weight_grad.append({"when": when, "config": candidates[name]["weight_grad"]})
    return entries, weight_grad


def _linear_entries(rows: Sequence[dict], candidates: dict, choices: dict) -> list[dict]:
    """fused_lora_linear's rows: per measured (T bucket, rank bucket) the best of F.linear +
    lora_delta ("composed": ``"config": null``) and the one-kernel candidates; above the largest
    measured T, composed."""
    entries = [
        {"when": when, "config": candidates[name]}
        for when, name in _bucket_winners(rows, candidates, choices, "linear")
    ]
    return entries + [{"config": None}]


def sweep_shapes(quick: bool) -> tuple[list[dict], list[dict]]:
    """(decode shapes, prefill shapes) of bench_lora_ops, the mixed-rank cases included (they
    count in their T and r_max bucket like any other shape), in contiguous token order only: the
    kernels read tokens in slot-sorted order either way, and on the H200 every candidate's time
    in interleaved order was within 4.1% of its contiguous time on all 16 measured pairs (the
    op sweep still times both orders). That leaves the tuner's step limit to the prefill shapes.
    ``quick`` keeps the op sweep's two quick shapes whatever their order (one decode, one prefill)."""
    shapes = [s for s in bench_lora_ops.gpu_shapes(quick) if quick or s["order"] != "interleaved"]
    return [s for s in shapes if s["phase"] == "decode"], [s for s in shapes if s["phase"] == "prefill"]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="two shapes, two candidates each")
    parser.add_argument("--table", default=None, help="where to write the table (default: this GPU's file)")
    parser.add_argument("--out-dir", default=None, help="where to write the measurements")
    parser.add_argument(
        "--from-rows",
        default=None,
        help="build the table from an earlier run's rows (its .json, or the .rows.jsonl of a run cut "
        "short) instead of measuring; needs --gpu and --table",
    )
    parser.add_argument("--gpu", default=None, help="with --from-rows: the card the rows were measured on")
    parser.add_argument(
        "--resume",
        default=None,
        help="an earlier run's rows on this card (its .json or .rows.jsonl): their shapes are not "
        "timed again, and the table is built from them and the new rows together",
    )
    parser.add_argument(
        "--retime",
        nargs="+",
        choices=["decode", "prefill", "linear", "train"],
        default=[],
        help="with --resume: drop the resumed rows of these phases, so their shapes are timed again "
        "(after a kernel change)",
    )
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=["decode", "prefill", "linear", "train"],
        default=["decode", "prefill", "linear", "train"],
        help="which shapes to time: lora_delta at decode and prefill sizes, fused_lora_linear at "
        "decode sizes, the training step at prefill sizes (the last two with the table the other "
        "phases wrote, or this GPU's table)",
    )
    args = parser.parse_args(argv)
    candidates = DECODE_CANDIDATES | PREFILL_CANDIDATES | LINEAR_CANDIDATES | TRAIN_CANDIDATES
    if args.from_rows:
        every = candidates | RETIRED_CANDIDATES | {CUDA_CANDIDATE: None}
        return write_table(read_rows(args.from_rows), every, args.gpu, Path(args.table))
    if not torch.cuda.is_available():
        raise SystemExit("tune_triton needs a CUDA device")
    from lora_fast.kernels import configs

    info = common.machine()
    decode, prefill = sweep_shapes(args.quick)
    linear_shapes = [shape | {"phase": "linear"} for shape in decode if shape["T"] <= LINEAR_MAX_TOKENS]
    # bench_lora_train's problems: one rank, the tokens' adapters interleaved
    train = [s | {"phase": "train", "order": "interleaved"} for s in prefill if not s["mixed"]]
    decode_candidates, prefill_candidates = DECODE_CANDIDATES, PREFILL_CANDIDATES
    linear_candidates, train_candidates = LINEAR_CANDIDATES, TRAIN_CANDIDATES
    d = args.d
    if args.quick:
        decode_candidates = dict(list(DECODE_CANDIDATES.items())[:2])
        prefill_candidates = dict(list(PREFILL_CANDIDATES.items())[:2])
        linear_candidates = dict(list(LINEAR_CANDIDATES.items())[:2])
        train_candidates = dict(list(TRAIN_CANDIDATES.items())[:2])
        d = 512
    if "cuda" in lora_fast.backends.available("cuda", torch.bfloat16):
        decode_candidates = decode_candidates | {CUDA_CANDIDATE: None}
    every = decode_candidates | prefill_candidates | linear_candidates | train_candidates
    known = every | RETIRED_CANDIDATES  # an earlier run's rows (--resume) may hold retired ones
    table_path = (
        Path(args.table) if args.table else CONFIG_DIR / f"{configs.device_key(torch.device('cuda'))}.json"
    )
    rows: list[dict] = read_rows(args.resume) if args.resume else []
    rows = [row for row in rows if row["phase"] not in args.retime]
    with tempfile.TemporaryDirectory() as workdir:
        # the table is written after each phase, so a run cut short still leaves the decode rows'
        table = None
        for phase, shapes, phase_candidates in (
            ("decode", decode, decode_candidates),
            ("prefill", prefill, prefill_candidates),
        ):
            if phase in args.phases:
                shapes = remaining_shapes(shapes, rows)
                rows += time_candidates(
                    shapes, phase_candidates, d, torch.bfloat16, args.repetitions, Path(workdir)
                )
                table = write_table(rows, known, info["gpu"], table_path)
        # whole calls timed with the delta's rows of the table just written, else of this GPU's
        # table, each candidate in place of the kind its phase tunes
        for phase, timer, shapes, phase_candidates, tuned in (
            ("linear", time_linear_candidates, linear_shapes, linear_candidates, "linear"),
            ("train", time_train_candidates, train, train_candidates, "train_shrink"),
        ):
            if phase in args.phases:
                base = table or json.loads(configs.table_path(torch.device("cuda")).read_text())
                base = {k: v for k, v in base.items() if k != tuned}
                rows += timer(
                    remaining_shapes(shapes, rows),
                    phase_candidates,
                    d,
                    torch.bfloat16,
                    args.repetitions,
                    Path(workdir),
                    base,
                )
                table = write_table(rows, known, info["gpu"], table_path)
    columns = ["phase", "T", "L", "r", "order", *every, "best"]
    markdown = common.markdown_table(rows, columns)
    stem = f"tune_triton_{common.slug(info['gpu'])}" + ("_quick" if args.quick else "")
    payload = {
        "benchmark": "tune_triton",
        "machine": info,
        "config": vars(args),
        "rows": rows,
        "table": table,
    }
    paths = common.write_results(stem, payload, markdown, args.out_dir)
    print("wrote " + ", ".join(str(p) for p in paths))
    return table


def read_rows(path: str) -> list[dict]:
    """The rows of an earlier run: its results .json, or the .rows.jsonl of a run cut short."""
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)["rows"]


def remaining_shapes(shapes: Sequence[dict], done: Sequence[dict]) -> list[dict]:
    """The shapes that no row of ``done`` has measured."""

    def key(shape: dict) -> tuple:
        order = shape["order"] + ("+mixed_ranks" if shape.get("mixed") else "")
        return (shape["phase"], shape["T"], shape["L"], shape["r"], order)

    measured = {(row["phase"], row["T"], row["L"], row["r"], row["order"]) for row in done}
    return [shape for shape in shapes if key(shape) not in measured]


def write_table(rows: Sequence[dict], candidates: dict[str, dict], gpu: str, path: Path) -> dict:
    table = build_table(rows, candidates, gpu)
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"\nwrote {path}: " + json.dumps(table["_choices"], indent=1), flush=True)
    return table


if __name__ == "__main__":
    main()

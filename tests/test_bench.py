"""Smoke test of the op benchmark: it runs, agrees with the reference, and writes its files."""

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

import lora_fast
from benchmarks import bench_lora_ops
from lora_fast.cli import main


def test_quick_benchmark_writes_results(tmp_path):
    rows = bench_lora_ops.main(["--quick", "--out-dir", str(tmp_path)])
    assert len(rows) == 4
    for row in rows:
        assert row["lora_fast_us"] > 0 and row["peft_loop_us"] > 0
        assert row["max_rel_error_vs_reference"] < 1e-4
    (written,) = tmp_path.glob("*.json")
    payload = json.loads(written.read_text())
    assert payload["machine"]["torch"] and payload["rows"] == rows
    assert list(tmp_path.glob("*.md"))


def test_cli_bench_forwards_arguments(tmp_path, capsys):
    assert main(["bench", "--quick", "--tokens", "8", "--adapters", "2", "--out-dir", str(tmp_path)]) == 0
    assert "T=    8 L=  2" in capsys.readouterr().out


def test_every_baseline_computes_the_same_delta():
    """The timed baselines are only worth comparing against if they compute the same thing."""
    import lora_fast

    for order, mixed in (("interleaved", False), ("contiguous", True), ("random", False)):
        p = bench_lora_ops.make_problem(40, 4, 32, 16, torch.float32, order=order, mixed_ranks=mixed)
        batch = lora_fast.AdapterBatch(p["adapter_ids"], 4)
        expected = lora_fast.reference.lora_delta(p["x"], p["A"], p["B"], batch, p["scales"], p["ranks"])
        outputs = {
            "lora_fast": bench_lora_ops.lora_fast_op(p, None)(),
            "peft_loop": bench_lora_ops.peft_style_loop(p)(),
            "torch_loop": bench_lora_ops.torch_loop(p)(),
            "gather_bmm": bench_lora_ops.torch_gather_bmm(p)(),
        }
        assert bench_lora_ops.dense_base(p)().shape == expected.shape
        model, names = bench_lora_ops.build_peft_model(p)
        with torch.no_grad():
            outputs["peft"] = model(p["x"], adapter_names=names) - model.base_model.model.proj.base_layer(
                p["x"]
            )
        for name, got in outputs.items():
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)
    assert bench_lora_ops.bytes_moved(1, 1, 4096, [8], 2) == 155680  # the reference CSV's first row


def test_gpu_sweep_covers_the_issue_shapes():
    shapes = bench_lora_ops.gpu_shapes(quick=False)
    decode = {(s["T"], s["L"], s["r"]) for s in shapes if s["phase"] == "decode" and not s["mixed"]}
    assert (64, 64, 64) in decode and (1, 1, 8) in decode and (256, 8, 16) in decode
    prefill = {(s["T"], s["L"]) for s in shapes if s["phase"] == "prefill" and not s["mixed"]}
    assert prefill == {(T, L) for T in (1024, 4096, 16384) for L in (1, 4, 16)}
    assert any(s["mixed"] for s in shapes)


def test_quick_training_benchmark(tmp_path, monkeypatch):
    from benchmarks import bench_lora_train

    # each row is also appended to $BENCH_ROW_LOG the moment it is measured (gpu_session.sh)
    row_log = tmp_path / "rows.jsonl"
    monkeypatch.setenv("BENCH_ROW_LOG", str(row_log))
    rows = bench_lora_train.main(["--quick", "--out-dir", str(tmp_path)])
    assert [json.loads(line) for line in row_log.read_text().splitlines()] == json.loads(json.dumps(rows))
    assert [row["L"] for row in rows] == [1, 4]
    for row in rows:
        assert row["max_rel_grad_error_vs_loop"] < 1e-4
        assert row["lora_fast_us"] > 0 and row["torch_loop_us"] > 0 and row["single_adapter_us"] > 0
    assert list(tmp_path.glob("lora_train_cpu_*_quick.json"))


def test_quick_peft_benchmark(tmp_path):
    from benchmarks import bench_peft

    rows = bench_peft.main(["--quick", "--out-dir", str(tmp_path)])
    assert {row["phase"] for row in rows} == {"decode", "prefill", "generate", "train"}
    for row in rows:
        if row["phase"] == "train":  # PEFT one pass per adapter, lora_fast one mixed pass
            assert row["max_rel_grad_error_vs_peft"] < 1e-4
            assert row["peft_us"] > 0 and row["lora_fast_us"] > 0
            continue
        if row["phase"] == "generate":
            assert row["same_tokens_as_peft"]
            assert row["same_sequences_fraction"] == 1.0 and row["same_first_token_fraction"] == 1.0
        else:
            assert row["max_rel_logit_error_vs_peft"] < 1e-4
        assert row["adapter_mb"] > 0 and row["adapter_read_floor"] > 1.0


def test_interleaved_rounds_give_every_function_each_predecessor_equally_often():
    from benchmarks import common

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = common.interleaved_median_us(fns, min_run_time=0.0, min_rounds=6)
    assert set(times) == set("abc") and all(t >= 0 for t in times.values())
    timed = calls[3:]  # after one untimed warm-up call each
    assert len(timed) == 18 and all(timed.count(name) == 6 for name in "abc")
    rounds = [timed[i : i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == list("abc") for r in rounds)
    followers = {}
    for before, after in zip(timed, timed[1:], strict=False):
        followers.setdefault(after, []).append(before)
    # within and across rounds, no function always runs right after the same one
    for name in "abc":
        assert len(set(followers[name]) - {name}) == 2


def test_peft_benchmark_times_the_base_model_on_the_accelerated_models_own_weights():
    from benchmarks import bench_peft

    base = bench_peft.tiny_llama()
    base_model, model, fast = bench_peft.build_models(base, 2, 4, torch.float32)
    assert base_model is not base and not base_model.training
    # every base weight is one of the accelerated twin's, none PEFT's or the original's
    fast_weights = {id(p) for n, p in fast.named_parameters() if "lora_" not in n}
    assert {id(p) for p in base_model.parameters()} == fast_weights
    assert fast_weights.isdisjoint(id(p) for p in model.parameters())
    assert fast_weights.isdisjoint(id(p) for p in base.parameters())
    ids = torch.randint(1, 512, (3, 5))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        assert torch.equal(base_model(input_ids=ids).logits, expected)
        with fast.disable_adapter():
            torch.testing.assert_close(fast(input_ids=ids).logits, expected)
    # the frozen output projection gets the accelerated model's hook: one GEMM, not a bmm
    head = base_model.get_output_embeddings()
    assert not head.weight.requires_grad
    assert list(head._forward_pre_hooks.values()) == [lora_fast.layers.contiguous_rows]


def test_peft_benchmark_counts_the_adapter_bytes_a_batch_reads():
    from benchmarks import bench_peft
    from lora_fast.integrations import hf_models

    base = bench_peft.tiny_llama()
    _, model, _ = bench_peft.build_models(base, 3, 4, torch.float32)
    per_adapter = sum(
        (module.in_features + module.out_features) * 4 * 4
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in hf_models.LLAMA_PROJECTIONS
    )
    assert per_adapter > 0
    assert bench_peft.adapter_bytes(model, ["a0", "a2", "a0", "__base__"]) == 2 * per_adapter
    assert bench_peft.adapter_bytes(model, ["__base__"]) == 0
    # 1 MB read at 1 GB/s is 1000 us: twice a 1000 us base forward
    assert bench_peft.read_floor(10**6, 1.0, 1000.0) == pytest.approx(2.0)


def test_eigenlora_serving_benchmark_is_exact_and_writes_results(tmp_path):
    from benchmarks import bench_eigenlora

    rows = bench_eigenlora.main(["--quick", "--out-dir", str(tmp_path)])
    assert len(rows) == 2
    for row in rows:
        assert row["max_rel_error"] < 1e-5
        assert row["loadings_us"] > 0 and row["materialised_us"] > 0
        assert row["memory_ratio"] > 1
    assert len(list(tmp_path.glob("eigenlora_serving_*"))) == 2


def test_quick_fused_linear_benchmark(tmp_path):
    from benchmarks import bench_fused_linear

    rows = bench_fused_linear.main(["--quick", "--out-dir", str(tmp_path)])
    assert [(row["tokens"], row["adapters"]) for row in rows] == [(1, 2), (8, 2)]
    assert all(row["fused_path"] == "kernel" and row["fused_us"] > 0 for row in rows)
    assert list(tmp_path.glob("fused_linear_cpu_*_1t_quick.md"))


@pytest.mark.gpu
def test_peft_benchmark_on_cuda_captures_the_accelerated_forward(tmp_path):
    """Where the base model's forward can be replayed from a CUDA graph, the accelerated one
    can too (no host synchronisation or host-to-device copy inside the ops of a step)."""
    from benchmarks import bench_peft

    rows = bench_peft.main(["--device", "cuda", "--quick", "--out-dir", str(tmp_path)])
    forward = [row for row in rows if row["phase"] in ("decode", "prefill")]  # train: eager only
    assert forward and all("lora_fast_graph_us" in row for row in forward)
    for row in forward:  # in one stream, and with the shrink beside the base GEMM
        assert row["base_graph_us"] is None or row["lora_fast_graph_us"] is not None
        assert row["base_graph_us"] is None or row["lora_fast_overlap_graph_us"] is not None
        assert row["max_rel_logit_error_vs_peft"] < 1e-4


def test_gpu_sweep_code_path_runs_on_the_cpu(monkeypatch, tmp_path):
    """Every line of the GPU sweep but the CUDA timers, so a GPU session does not find its bugs."""
    from benchmarks import common

    timed = []

    def fake_median_us(fn, repetitions, graph=True, captured=None):
        fn()
        timed.append(graph)
        return 2.0

    monkeypatch.setattr(common, "gpu_median_us", fake_median_us)
    monkeypatch.setattr(common, "copy_bandwidth_gbps", lambda device="cuda": 1000.0)
    shapes = [
        {"phase": "decode", "T": 5, "L": 3, "r": 4, "order": "interleaved", "mixed": False},
        {"phase": "prefill", "T": 40, "L": 2, "r": 8, "order": "contiguous", "mixed": True},
    ]
    rows = bench_lora_ops.run_gpu_sweep(shapes, ["float16"], 32, 3, device="cpu")
    assert [(row["T"], row["order"]) for row in rows] == [(5, "interleaved"), (40, "contiguous+mixed_ranks")]
    for row in rows:
        assert row["lora_fast_triton_max_rel_error"] < 1e-2
        assert row["lora_fast_us"] == 2.0 and row["hbm_floor_us"] > 0
        assert row["torch_loop_us"] == 2.0 and row["dense_base_us"] == 2.0
    assert rows[0]["peft_us"] == 2.0 and rows[1]["peft_us"] is None  # PEFT has no per-slot ranks
    assert False in timed  # PEFT's forward is timed eagerly
    table = common.markdown_table(rows, bench_lora_ops.GPU_COLUMNS)
    assert table.count("\n") == 3
    assert bench_lora_ops.plot_gpu(rows, tmp_path / "sweep.png").stat().st_size > 0


def test_tuner_times_every_candidate_and_builds_a_bucketed_table(monkeypatch, tmp_path):
    """benchmarks/tune_triton on the CPU (interpreter, stand-in timer): every candidate runs and
    agrees with the reference, and the table it builds sends each bucket to its best candidate."""
    from lora_fast.kernels import configs

    from benchmarks import common, tune_triton

    fake_times = {"split16_positions": 3.0, "split16_segments": 2.0}
    current = {}

    def fake_median_us(fn, repetitions, graph=True, captured=None):
        fn()
        return fake_times[current["name"]]

    real_op = bench_lora_ops.lora_fast_op

    def op(p, backend):
        current["name"] = Path(os.environ["LORA_FAST_TRITON_CONFIG"]).stem
        return real_op(p, backend)

    monkeypatch.setattr(common, "gpu_median_us", fake_median_us)
    monkeypatch.setattr(bench_lora_ops, "lora_fast_op", op)
    candidates = {name: tune_triton.DECODE_CANDIDATES[name] for name in fake_times}
    shapes = [
        {"phase": "decode", "T": 5, "L": 3, "r": 8, "order": "interleaved", "mixed": False},
        {"phase": "decode", "T": 20, "L": 2, "r": 16, "order": "contiguous", "mixed": False},
    ]
    rows = tune_triton.time_candidates(shapes, candidates, 32, torch.float16, 2, tmp_path, device="cpu")
    assert [row["best"] for row in rows] == ["split16_segments"] * 2
    table = tune_triton.build_table(rows, candidates, "test GPU")
    assert table["_choices"] == {"T<=5 r<=8": "split16_segments", "T<=20 r<=16": "split16_segments"}
    assert table["shrink"][0]["when"] == {"max_tokens": 5} and table["shrink"][1]["when"] == {
        "max_tokens": 20
    }
    assert "max_tokens" not in table["shrink"][-1].get("when", {})  # default.json's rows above T=20
    assert table["fused"][0]["config"] is None  # the split path: no fused launch
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("LORA_FAST_TRITON_CONFIG", str(path))
    assert configs.lookup("fused", torch.device("cpu"), 3, 8, 32) is None
    assert configs.lookup("shrink", torch.device("cpu"), 20, 64, 32)["SEGMENTED"] == 1
    assert configs.lookup("shrink", torch.device("cpu"), 300, 64, 32)["SEGMENTED"] == 0  # default.json
    rows[1]["split16_positions"] = 1.0  # positions wins the second bucket
    assert (
        tune_triton.build_table(rows, candidates, "test GPU")["_choices"]["T<=20 r<=16"]
        == "split16_positions"
    )
    # --resume: a run cut short after the first shape times only the second (and the mixed-rank
    # variant of the first, which is another shape)
    log = tmp_path / "tune.rows.jsonl"
    log.write_text(json.dumps(rows[0]) + "\n")
    mixed = shapes[0] | {"mixed": True}
    left = tune_triton.remaining_shapes([*shapes, mixed], tune_triton.read_rows(str(log)))
    assert left == [shapes[1], mixed]


def test_tuner_keeps_full_rank_passes_for_the_ranks_it_did_not_time():
    """A token bucket's last rank bucket also serves every larger rank (a mixed-rank batch's
    r_max): a candidate with 16-wide rank passes may win a rank bucket below it, but not that
    one, however fast it was at the rank that was timed."""
    from benchmarks import tune_triton

    names = ("split16_segments", "split16_segments_r16")
    candidates = {name: tune_triton.DECODE_CANDIDATES[name] for name in names}

    def row(T, r):
        return {
            "phase": "decode",
            "T": T,
            "L": 4,
            "r": r,
            "order": "contiguous",
            "split16_segments": 2.0,
            "split16_segments_r16": 1.0,
        }

    rows = [row(16, 8), row(16, 64), row(64, 16)]
    rows[1]["split16_segments_r16"] = None  # failed at rank 64: never chosen there anyway
    choices = tune_triton.build_table(rows, candidates, "test GPU")["_choices"]
    assert choices == {
        "T<=16 r<=8": "split16_segments_r16",  # rank 8 only
        "T<=16 r<=64": "split16_segments",
        "T<=64 r<=16": "split16_segments",  # serves ranks above 16 too
    }


def test_tuner_times_fused_linear_candidates_and_builds_linear_rows(monkeypatch, tmp_path):
    """The tuner's linear phase on the CPU (interpreter, stand-in timer): fused_lora_linear runs
    composed (no linear row) and with the one-kernel candidate, both agree with the reference,
    and the table's linear rows send each bucket to the faster (null where composed won)."""
    from lora_fast.kernels import configs

    from benchmarks import common, tune_triton
    from lora_fast import kernels

    timed = []

    def fake_median_us(fn, repetitions, graph=True, captured=None):
        fn()
        name = Path(os.environ["LORA_FAST_TRITON_CONFIG"]).stem
        timed.append(name)
        return {"composed": 5.0, "linear_m16_n32_k256": 4.0}[name]

    monkeypatch.setattr(common, "gpu_median_us", fake_median_us)
    calls = []
    real = kernels.lora_linear
    monkeypatch.setattr(kernels, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    names = ("composed", "linear_m16_n32_k256")
    candidates = {name: tune_triton.LINEAR_CANDIDATES[name] for name in names}
    shapes = [
        {"phase": "linear", "T": 5, "L": 3, "r": 8, "order": "interleaved", "mixed": False},
        {"phase": "linear", "T": 20, "L": 2, "r": 16, "order": "contiguous", "mixed": True},
    ]
    base = json.loads((configs.CONFIG_DIR / "interpreter.json").read_text())
    rows = tune_triton.time_linear_candidates(
        shapes, candidates, 48, torch.float32, 2, tmp_path, base, device="cpu"
    )
    assert timed == list(names) * 2 and len(calls) == 2 * 2  # agreement check + timing
    assert [row["best"] for row in rows] == ["linear_m16_n32_k256"] * 2
    rows[1]["composed"] = 3.0  # composed wins the second bucket
    delta_rows = [{"phase": "decode", "T": 5, "L": 3, "r": 8, "order": "contiguous", "split16_segments": 1.0}]
    every = tune_triton.DECODE_CANDIDATES | candidates
    table = tune_triton.build_table(delta_rows + rows, every, "test GPU")
    assert table["linear"] == [
        {"when": {"max_tokens": 5}, "config": candidates["linear_m16_n32_k256"]},
        {"when": {"max_tokens": 20}, "config": None},
        {"config": None},
    ]
    assert table["_choices"]["linear T<=5 r<=8"] == "linear_m16_n32_k256"
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("LORA_FAST_TRITON_CONFIG", str(path))
    assert configs.find("linear", torch.device("cpu"), 4, 16, 48)["BLOCK_N"] == 32
    assert configs.find("linear", torch.device("cpu"), 6, 16, 48) is None  # composed
    assert configs.find("linear", torch.device("cpu"), 300, 16, 48) is None


def test_tuner_times_the_training_step_and_builds_train_shrink_rows(monkeypatch, tmp_path):
    """The tuner's train phase on the CPU (interpreter, stand-in timer): bench_lora_train's step
    runs on the Triton backend under each candidate's train_shrink row and agrees with the
    reference; the table's train_shrink rows send each bucket to the faster step, and above the
    largest timed T the shrink rows serve training too."""
    from lora_fast.kernels import configs

    from benchmarks import common, tune_triton

    shrink_module = importlib.import_module("lora_fast.kernels.lora_shrink")
    timed, kinds = [], []

    def fake_median_us(fn, repetitions, graph=True, captured=None):
        fn()
        name = Path(os.environ["LORA_FAST_TRITON_CONFIG"]).stem
        timed.append(name)
        return {"train_m64_split1": 5.0, "train_m64_split2": 4.0}[name]

    real_lookup = shrink_module.lookup

    def lookup(kind, *args):
        kinds.append(kind)
        return real_lookup(kind, *args)

    monkeypatch.setattr(common, "gpu_median_us", fake_median_us)
    monkeypatch.setattr(shrink_module, "lookup", lookup)
    names = ("train_m64_split1", "train_m64_split2")
    candidates = {name: tune_triton.TRAIN_CANDIDATES[name] for name in names}
    shapes = [
        {"phase": "train", "T": 24, "L": 3, "r": 8, "order": "interleaved", "mixed": False},
        {"phase": "train", "T": 50, "L": 2, "r": 8, "order": "interleaved", "mixed": False},
    ]
    base = json.loads((configs.CONFIG_DIR / "interpreter.json").read_text())
    rows = tune_triton.time_train_candidates(
        shapes, candidates, 40, torch.float32, 2, tmp_path, base, device="cpu"
    )
    assert timed == list(names) * 2
    # each step: the forward's shrink kept for dB and the backward's shrink of dy (twice per
    # candidate and shape: the agreement check, then the timed call)
    assert kinds == ["train_shrink"] * 2 * 2 * 2 * 2
    assert [row["best"] for row in rows] == ["train_m64_split2"] * 2
    assert all(row["phase"] == "train" for row in rows)
    rows[1]["train_m64_split1"] = 3.0  # split 1 wins the second bucket
    delta_rows = [{"phase": "decode", "T": 5, "L": 3, "r": 8, "order": "contiguous", "split16_segments": 1.0}]
    table = tune_triton.build_table(delta_rows + rows, tune_triton.DECODE_CANDIDATES | candidates, "test GPU")
    assert table["train_shrink"] == [
        {"when": {"max_tokens": 24}, "config": candidates["train_m64_split2"]["train_shrink"]},
        {"when": {"max_tokens": 50}, "config": candidates["train_m64_split1"]["train_shrink"]},
    ]
    assert table["weight_grad"][:2] == [
        {"when": {"max_tokens": 24}, "config": candidates["train_m64_split2"]["weight_grad"]},
        {"when": {"max_tokens": 50}, "config": candidates["train_m64_split1"]["weight_grad"]},
    ]
    assert "when" not in table["weight_grad"][-1]  # every larger T still has a weight_grad row
    # prefill-sized training rows only: decode-sized training keeps the shrink rows (null row)
    prefill_rows = [row | {"T": row["T"] + 1000} for row in rows]
    assert tune_triton.build_table(prefill_rows, candidates, "test GPU")["train_shrink"][0] == {
        "when": {"max_tokens": tune_triton.LINEAR_MAX_TOKENS},
        "config": None,
    }
    assert table["_choices"]["train T<=50 r<=8"] == "train_m64_split1"
    assert table["shrink"][0]["config"] == tune_triton.DECODE_CANDIDATES["split16_segments"]["shrink"]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("LORA_FAST_TRITON_CONFIG", str(path))
    cpu = torch.device("cpu")
    assert configs.lookup("train_shrink", cpu, 20, 8, 40)["SPLIT_K"] == 2
    assert configs.lookup("train_shrink", cpu, 40, 8, 40)["SPLIT_K"] == 1
    assert configs.lookup("train_shrink", cpu, 300, 8, 40) == configs.lookup("shrink", cpu, 300, 8, 40)
    # a null row (a table written by hand: decode sizes left to the shrink rows) falls back too
    table["train_shrink"].insert(0, {"when": {"max_tokens": 10}, "config": None})
    path = tmp_path / "with_null.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("LORA_FAST_TRITON_CONFIG", str(path))
    assert configs.lookup("train_shrink", cpu, 5, 8, 40) == configs.lookup("shrink", cpu, 5, 8, 40)
    assert configs.lookup("train_shrink", cpu, 20, 8, 40)["SPLIT_K"] == 2


def test_tuner_sends_buckets_the_cuda_backend_wins_to_it(tmp_path):
    """Where the CUDA C++ one-launch delta beat the chosen Triton candidate (rank bucket by rank
    bucket), the table gets a cuda_delta row; its Triton rows stay, for every other path. Above
    the CUDA kernel's token limit it was not timed, so never chosen."""
    from lora_fast.kernels import configs

    from benchmarks import tune_triton

    cuda = tune_triton.CUDA_CANDIDATE
    names = ("split16_segments", cuda)
    candidates = {"split16_segments": tune_triton.DECODE_CANDIDATES["split16_segments"], cuda: None}

    def row(T, r, triton_us, cuda_us):
        return {"phase": "decode", "T": T, "L": 1, "r": r, "order": "contiguous"} | dict(
            zip(names, (triton_us, cuda_us), strict=True)
        )

    rows = [row(1, 8, 9.5, 5.0), row(1, 64, 11.0, 14.0), row(256, 16, 13.0, None)]
    table = tune_triton.build_table(rows, candidates, "test GPU")
    assert table["cuda_delta"] == [
        {"when": {"max_tokens": 1, "max_rank": 8}, "config": {}},
        {"when": {"max_tokens": 1}, "config": None},
        {"when": {"max_tokens": 256}, "config": None},
        {"config": None},
    ]
    assert table["shrink"][0]["config"] == candidates["split16_segments"]["shrink"]  # Triton's rows stay
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    assert configs._lookup(path, "cuda_delta", 1, 8, 4096) == (True, {})
    assert configs._lookup(path, "cuda_delta", 1, 16, 4096) == (True, None)


def test_tuner_main_resumes_and_runs_only_the_phases_asked(monkeypatch, tmp_path):
    """tune_triton's main on the CPU with its timers stubbed: ``--resume`` keeps an earlier run's
    rows and times only the shapes they lack, ``--phases`` picks what is timed, and the table
    and results it writes hold the old rows and the new ones (what a GPU session's
    ``tune_linear`` step runs)."""
    from lora_fast.kernels import configs

    from benchmarks import common, tune_triton

    timed = {"decode": [], "linear": []}

    def fake_delta(shapes, candidates, *args, **kwargs):
        timed["decode"] += shapes
        name = next(iter(candidates))
        return [
            {k: shape[k] for k in ("phase", "T", "L", "r", "order")} | {name: 1.0, "best": name}
            for shape in shapes
        ]

    def fake_linear(shapes, candidates, d, dtype, repetitions, workdir, base, device="cuda"):
        assert "shrink" in base and "linear" not in base  # the delta's rows, its own left out
        timed["linear"] += shapes
        return [
            {k: shape[k] for k in ("phase", "T", "L", "r", "order")} | {"composed": 2.0, "best": "composed"}
            for shape in shapes
        ]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune_triton, "time_candidates", fake_delta)
    monkeypatch.setattr(tune_triton, "time_linear_candidates", fake_linear)
    monkeypatch.setattr(common, "machine", lambda: {"gpu": "Test GPU"})
    monkeypatch.setattr(configs, "table_path", lambda device: configs.CONFIG_DIR / "interpreter.json")
    decode, _ = tune_triton.sweep_shapes(quick=False)
    earlier = fake_delta(decode, {"split16_segments": None})
    resume = tmp_path / "earlier.rows.jsonl"
    resume.write_text("".join(json.dumps(row) + "\n" for row in earlier))
    timed["decode"].clear()
    table_path = tmp_path / "table.json"
    argv = ["--table", str(table_path), "--out-dir", str(tmp_path), "--resume", str(resume)]
    table = tune_triton.main([*argv, "--phases", "decode", "linear"])
    assert timed["decode"] == []  # every decode shape was in the earlier rows
    assert [s["T"] for s in timed["linear"]] == [
        s["T"] for s in decode if s["T"] <= tune_triton.LINEAR_MAX_TOKENS
    ]
    assert table["linear"][-1] == {"config": None} and table["linear"][0]["config"] is None  # composed
    assert json.loads(table_path.read_text())["_choices"] == table["_choices"]
    (written,) = tmp_path.glob("tune_triton_test-gpu.json")
    assert [row["phase"] for row in json.loads(written.read_text())["rows"]] == ["decode"] * len(decode) + [
        "linear"
    ] * len(timed["linear"])
    # --retime: the resumed decode rows are dropped, so every decode shape is timed again
    tune_triton.main([*argv, "--phases", "decode", "--retime", "decode"])
    assert timed["decode"] == decode


def test_reference_anchors_are_keyed_like_the_sweep_rows():
    """The H100 vLLM numbers must be found for the sweep's shapes (a key mismatch once left the
    comparison column empty on a GPU run)."""
    anchors = bench_lora_ops.reference_anchors()
    shapes = bench_lora_ops.gpu_shapes(quick=False)
    found = [
        (s["phase"], "bfloat16", s["T"], s["L"], s["r"], s["order"]) in anchors
        for s in shapes
        if not s["mixed"]
    ]
    assert all(found) and len(found) > 50


def test_training_benchmark_graph_columns(monkeypatch):
    """The CUDA-graph columns of bench_lora_train, with the GPU timer swapped for a stand-in that
    runs the step (and reports grouped_mm as not capturable)."""
    from benchmarks import bench_lora_train, common

    def fake_median_us(fn, repetitions, graph=True, captured=None):
        fn()
        if captured is not None:
            captured.append(getattr(fn, "__qualname__", "").startswith("grouped_mm") is False)
        return 4.0

    monkeypatch.setattr(common, "gpu_median_us", fake_median_us)
    monkeypatch.setattr(common, "copy_bandwidth_gbps", lambda device: 2.0)  # bytes per ns
    rows = bench_lora_train.run_sweep("cpu", 32, 16, [2], [4], torch.float32, 0.01, 2, graphs=True)
    (row,) = rows
    assert row["lora_fast_graph_us"] == 4.0 and row["torch_loop_graph_us"] == 4.0
    # 5 activation passes of 32 x 16 and 3 passes over 2 slots' A and B, 4 bytes each, at 2 GB/s
    floor_bytes = (5 * 32 * 16 + 3 * 2 * 2 * 4 * 16) * 4
    assert row["hbm_floor_us"] == pytest.approx(floor_bytes / 2e3)
    assert row["floor_fraction_graph"] == pytest.approx(row["hbm_floor_us"] / 4.0)
    if row["grouped_mm_us"] is not None:  # torch._grouped_mm runs here
        assert row["grouped_mm_graph_us"] is None and row["speedup_vs_grouped_mm_graph"] is None


@pytest.mark.slow
def test_host_launch_times_every_case_without_a_gpu():
    """benchmarks/host_launch compiles the kernels for sm_90 with a stand-in driver, stubs their
    launches and times the host's share of each case (a fresh process: no interpreter)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.host_launch", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "us of host thread time" in line]
    assert len(lines) == 6
    assert all(0 < float(line.split("us of host")[0].split()[-1]) < 1e5 for line in lines)


@pytest.mark.parametrize(
    "phase, steps",
    [
        ("all", ["build", "backends", "cpp-errors", "gpu-tests", "linear", "ops", "train", "peft"]),
        ("tune", ["build", "backends", "cpp-errors", "gpu-tests", "tune", "train", "ops", "profile", "peft"]),
        ("resume", ["build", "check", "tune", "ops"]),
        ("check-peft", ["build", "cpp-errors", "check", "peft"]),
        ("tune-train", ["build", "backward-tests", "tune", "train", "profile"]),
    ],
)
def test_gpu_session_script_runs_its_steps_in_order(phase, steps, tmp_path):
    """benchmarks/gpu_session.sh with ``true`` standing in for Python: every step of a phase runs,
    in order, is logged in steps.txt, and the results come back packed in one archive (a broken
    script would otherwise be found on a lent GPU, in its limited time)."""
    import shutil
    import subprocess
    import tarfile

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_session.sh"
    env = dict(os.environ, PY="true", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"))
    env |= {"RESUME_ROWS": "rows.jsonl", "CHECK_TESTS": "tests/none.py"}
    result = subprocess.run(
        ["bash", str(script), phase], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    logged = (tmp_path / "out" / "steps.txt").read_text().splitlines()
    if phase == "resume" and shutil.which("gdb"):  # a native backtrace of the checks, where it can
        steps = [*steps[:2], "check-gdb", *steps[2:]]
    assert [line.split()[0] for line in logged] == steps
    # (gdb's step ends with rc=1 when the program it ran exits normally: no stack to print)
    assert all(" rc=0 " in line for line in logged if not line.startswith("check-gdb"))
    with tarfile.open(tmp_path / "out" / f"gpu_{phase}.tar.gz") as archive:
        assert "./steps.txt" in archive.getnames()

"""Each method's experiment runs end to end on a tiny config (a smoke test, not a result)."""

import json

import pytest

from lora_fast.cli import main


def test_eigen_demo_tiny(tmp_path, capsys):
    args = ["eigen", "demo", "--tiny", "--k", "2", "8", "--lora-steps", "3", "--eigen-steps", "3"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "eigenlora_tiny.json").read_text())
    assert result["held_out"] == ["repeat3", "first2"]
    assert [row["k"] for row in result["sweep"]] == [2, 8]
    # 2 layers x 7 projections x r=8 x (K_A + K_B)
    assert [row["trainable_parameters"] for row in result["sweep"]] == [2 * 7 * 8 * 4, 2 * 7 * 8 * 16]
    assert all(0 < row["fraction_of_lora"] < 1 for row in result["sweep"])
    assert (
        set(result["sweep"][0]["eigenlora"])
        == set(result["sweep"][0]["random_basis"])
        == {"repeat3", "first2"}
    )
    assert set(result["explained_variance"]) == {"1", "2", "4", "8"}
    assert "Goal: EigenLoRAx >= 0.95" in capsys.readouterr().out


def test_mtlora_demo_tiny_text(tmp_path):
    assert (
        main(["mtlora", "demo", "--tiny", "--steps", "2", "--timing-repeats", "1", "--out", str(tmp_path)])
        == 0
    )
    result = json.loads((tmp_path / "mtlora_text_tiny.json").read_text())
    variants = result["variants"]
    assert list(variants) == [
        "base model",
        "single-task LoRA",
        "shared LoRA",
        "full fine-tuning",
        "MTLoRA (matrix)",
        "MTLoRA (add)",
    ]
    # the text setting's headline mode is matrix (chosen on validation words), vision's add
    assert result["tasks"] == ["upper", "repeat", "first2", "plural"] and result["headline_mode"] == "matrix"
    assert variants["MTLoRA (matrix)"]["trainable_parameters"] == result["mtlora_parameters"]["total"] > 0
    assert variants["single-task LoRA"]["delta_m"] == 0.0
    assert result["mtlora_step_time"]["mixed_s"] > 0


def test_mtlora_demo_runs_a_subset_of_variants(tmp_path, capsys):
    argv = ["mtlora", "demo", "--tiny", "--steps", "1", "--timing-repeats", "1", "--out", str(tmp_path)]
    assert main([*argv, "--variants", "mtlora", "--modes", "matrix"]) == 0
    result = json.loads((tmp_path / "mtlora_text_tiny.json").read_text())
    assert list(result["variants"]) == ["base model", "MTLoRA (matrix)"]
    assert result["variants"]["MTLoRA (matrix)"]["delta_m"] is None  # no single-task row to compare with
    out = capsys.readouterr().out
    assert "MTLoRA (matrix) training step" in out and "goal: at least as high" not in out


def test_mtlora_demo_tiny_vision(tmp_path):
    assert (
        main(["mtlora", "demo", "--vision", "--tiny", "--timing-repeats", "1", "--out", str(tmp_path)]) == 0
    )
    result = json.loads((tmp_path / "mtlora_vision_tiny.json").read_text())
    variants = result["variants"]
    # several seeds: per-task scores averaged, delta_m from the averages and per seed
    argv = ["mtlora", "demo", "--vision", "--tiny", "--timing-repeats", "1", "--out", str(tmp_path)]
    assert main([*argv, "--seeds", "0", "1"]) == 0
    both = json.loads((tmp_path / "mtlora_vision_tiny.json").read_text())
    assert both["seeds"] == [0, 1] and both["config"]["seed"] == 0
    for name, variant in both["variants"].items():
        assert len(variant["delta_m_per_seed"]) == 2
        assert variant["delta_m_per_seed"][0] == pytest.approx(variants[name]["delta_m"])
    assert "delta_m % per seed" in (tmp_path / "mtlora_vision_tiny.md").read_text()
    assert set(result["tasks"]) == {"parity", "above_four", "flipped", "rotated_digit"}
    full, multi = variants["full fine-tuning"], variants["MTLoRA (add)"]
    assert "MTLoRA (matrix)" in variants and result["headline_mode"] == "add"
    assert full["trainable_parameters"] > 3 * multi["trainable_parameters"]
    for variant in variants.values():
        assert all(0.0 <= score <= 1.0 for score in variant["scores"].values())


ICM_TINY = [
    "--tiny",
    "--steps",
    "4",
    "--keep-last",
    "4",
    "--keep-every",
    "2",
    "--epochs",
    "2",
    "--draws",
    "2",
    "--demos",
    "2",
]


def test_icm_demo_tiny(tmp_path, capsys):
    assert main(["icm", "demo", *ICM_TINY, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "icm_lora_tiny.json").read_text())
    assert result["held_out"] == ["repeat_x4", "prefix_3"] and len(result["seen"]) == 8
    assert result["checkpoints_per_task"] == 2
    scores = result["scores"]
    assert set(scores) == {
        "base model",
        "trained LoRA",
        "generated (predicted stats)",
        "generated (oracle stats)",
        "mean of checkpoints",
        "unconditional VAE",
    }
    assert scores["trained LoRA"]["prefix_3"]["delta_error"] == 0.0
    assert result["generation_seconds_per_adapter"] > 0
    assert "Generated / trained on seen tasks" in capsys.readouterr().out


def test_icm_train_then_generate_writes_peft_adapters(tmp_path):
    generator = tmp_path / "generator.safetensors"
    assert main(["icm", "train", *ICM_TINY, "--generator", str(generator)]) == 0
    out = tmp_path / "adapters"
    assert (
        main(
            [
                "icm",
                "generate",
                "--tiny",
                "--generator",
                str(generator),
                "--task",
                "prefix_3",
                "repeat_x2",
                "--demos",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    import lora_fast

    stacks = lora_fast.AdapterStacks(num_slots=2, max_rank=4)
    for name in ("prefix_3", "repeat_x2"):
        stacks.load_peft(out / name)
    assert stacks.slot_names == ["prefix_3", "repeat_x2"]

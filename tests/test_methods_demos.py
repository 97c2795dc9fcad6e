"""Each method's experiment runs end to end on a tiny config (a smoke test, not a result)."""

import json

from lora_fast.cli import main


def test_eigen_demo_tiny(tmp_path, capsys):
    assert (
        main(
            [
                "eigen",
                "demo",
                "--tiny",
                "--k",
                "8",
                "--lora-steps",
                "3",
                "--eigen-steps",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "eigenlora_tiny.json").read_text())
    assert [row["task"] for row in result["rows"]] == ["repeat3", "first2"]
    params = result["trainable_parameters"]
    # 2 layers x 7 projections x r=8 x (K_A + K_B) = 8 + 8
    assert params["eigenlora"] == 2 * 7 * 8 * 16
    assert 0 < params["eigenlora"] < params["lora"]
    assert set(result["explained_variance"]) == {"1", "2", "4", "8"}
    assert "EigenLoRAx / LoRA score" in capsys.readouterr().out


def test_mtlora_demo_tiny_text(tmp_path):
    assert (
        main(["mtlora", "demo", "--tiny", "--steps", "2", "--timing-repeats", "1", "--out", str(tmp_path)])
        == 0
    )
    result = json.loads((tmp_path / "mtlora_text_tiny.json").read_text())
    variants = result["variants"]
    assert list(variants) == ["base model", "single-task LoRA", "shared LoRA", "full fine-tuning", "MTLoRA"]
    assert result["tasks"] == ["upper", "repeat", "first2", "plural"]
    assert variants["MTLoRA"]["trainable_parameters"] == result["mtlora_parameters"]["total"] > 0
    assert result["mtlora_step_time"]["mixed_s"] > 0


def test_mtlora_demo_tiny_vision(tmp_path):
    assert (
        main(["mtlora", "demo", "--vision", "--tiny", "--timing-repeats", "1", "--out", str(tmp_path)]) == 0
    )
    result = json.loads((tmp_path / "mtlora_vision_tiny.json").read_text())
    variants = result["variants"]
    assert set(result["tasks"]) == {"parity", "above_four", "flipped", "rotated_digit"}
    full, multi = variants["full fine-tuning"], variants["MTLoRA"]
    assert full["trainable_parameters"] > 3 * multi["trainable_parameters"]
    for variant in variants.values():
        assert all(0.0 <= score <= 1.0 for score in variant["scores"].values())

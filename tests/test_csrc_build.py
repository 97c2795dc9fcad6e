"""The CUDA sources compile here even without a GPU: nvcc for the kernels, the host compiler for the
torch binding (against torch's and CUDA's headers)."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", Path(NVCC).resolve().parent.parent]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root) / "include"
    return None


@needs_nvcc
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    result = subprocess.run(
        [
            NVCC,
            "-c",
            str(CSRC / "lora_cuda.cu"),
            "-o",
            str(tmp_path / "lora_cuda.o"),
            "-std=c++17",
            "-gencode=arch=compute_90,code=sm_90",
            "-Xcompiler",
            "-Wall",
            "-Werror=all-warnings",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lora_cuda.o").stat().st_size > 0


@needs_nvcc
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or cuda_include() is None:
        pytest.skip("no host compiler or CUDA headers")
    # A CPU build of torch ships c10/cuda headers but not the one its CUDA build generates.
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [
        f"-I{tmp_path}",
        f"-I{cuda_include()}",
        f"-I{CSRC}",
    ]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    result = subprocess.run(
        [
            cxx,
            "-fsyntax-only",
            "-std=c++17",
            "-DLORA_FAST_WITH_CUDA=1",
            *includes,
            str(CSRC / "lora_cuda_binding.cpp"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_python_version_has_a_compiled_extension():
    import lora_fast

    ext = lora_fast.backends.extension()
    assert ext is not None, f"lora_fast._C is missing for Python {sys.version}"
    assert ext.cpu_isa() in ("avx512", "avx2", "baseline")

"""Build lora_fast and its compiled extension ``lora_fast._C``.

C++ CPU kernels are always built. CUDA kernels are added when the installed torch has CUDA and
nvcc is found (set ``LORA_FAST_NO_CUDA=1`` to skip them). The top-level ``kernels/`` folder
(Triton) ships as the package ``lora_fast.kernels``.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CSRC = "csrc"


def want_cuda() -> bool:
    if os.environ.get("LORA_FAST_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def cxx_runtime() -> list[str]:
    """Link arguments naming the shared C++ runtime: the libstdc++ this process runs (torch loaded
    it), by path, so that its symbols cannot come from anywhere else.

    On the H100 image of 2026-11-26 (Ubuntu 24.04, g++ 13.3) the module linked with a plain
    ``-lstdc++`` (with or without ``--no-as-needed``) had no libstdc++ among its needed libraries,
    and every failed C++ check we tried there (each message formats numbers) crashed the process
    instead of raising ValueError. Linked this way it lists libstdc++.so.6 and raises (checked
    there). Why the plain link left the runtime out was not found; a module linked with
    ``-static-libstdc++`` on our CPU machine shows the same symptom in milder form (its messages
    lose every number), and a shared object given by path wins over a static archive the driver
    adds later."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path:
                    return [path]
    except OSError:  # not Linux
        pass
    return ["-lstdc++"]


# before the compiler driver's own -lstdc++, so the runtime's symbols resolve to the shared object
LINK_ARGS = ["-Wl,--no-as-needed", *cxx_runtime()]


def extension():
    sources = [f"{CSRC}/bindings.cpp", f"{CSRC}/lora_cpu.cpp"]
    cxx_flags = ["-O3"]
    if want_cuda():
        sources += [f"{CSRC}/lora_cuda.cu", f"{CSRC}/lora_cuda_binding.cpp"]
        nvcc_flags = ["-O3", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "lora_fast._C",
            sources,
            define_macros=[("LORA_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=LINK_ARGS,
        )
    return cpp_extension.CppExtension(
        "lora_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=LINK_ARGS
    )


setup(
    packages=find_packages(include=["lora_fast", "lora_fast.*"]) + ["lora_fast.kernels"],
    package_dir={"lora_fast.kernels": "kernels"},
    package_data={"lora_fast.kernels": ["configs/*.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)

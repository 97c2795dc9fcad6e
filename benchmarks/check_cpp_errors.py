"""Does a C++ error raised inside lora_fast._C reach Python as an exception on this machine?

    python -m benchmarks.check_cpp_errors

On the H100 image of 2026-11-26 (g++ 13.3, torch 2.11.0+cu130, the extension built with its CUDA
kernels) every TORCH_CHECK that failed inside lora_fast._C killed the process with a segmentation
fault instead of raising ValueError; on the CPU machines it raises. Each probe below runs in its
own process, so one crash does not hide the others, and prints one line:

- ``ours``: lora_fast._C's lora_delta_ with a token index out of range (must raise ValueError);
- ``inline_pybind`` / ``inline_op``: a minimal extension compiled here and now by
  torch.utils.cpp_extension.load_inline (same compiler, same torch) whose function fails a
  TORCH_CHECK_VALUE, called as a pybind11 function and as a torch.library op.

If ``ours`` crashes and the inline probes raise, the fault is in how lora_fast._C is built or
linked (its NEEDED libraries are printed first); if all crash, it is the image's toolchain.
"""

from __future__ import annotations

import glob
import subprocess
import sys
import tempfile
import textwrap

OURS = """
import torch, lora_fast
from lora_fast import AdapterBatch
x = torch.randn(4, 8); A = torch.randn(2, 4, 8); B = torch.randn(2, 8, 4); out = torch.zeros(4, 8)
batch = AdapterBatch(torch.tensor([0, 1, 0, 1]), 2)
order = batch.token_order.clone(); order[0] = 99
try:
    torch.ops.lora_fast_C.lora_delta_(x, A, B, order, batch.segment_starts, batch.segment_lengths,
                                      torch.ones(2), None, out)
    print("no error raised")
except ValueError as err:
    print("ValueError:", str(err).splitlines()[0][:80])
"""

INLINE = """
import sys, torch
from torch.utils.cpp_extension import load_inline
source = '''
#include <torch/extension.h>
#include <torch/library.h>
at::Tensor fail(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 99, "x must have 99 dims");
  return x;
}
TORCH_LIBRARY(lf_check_errors, m) { m.def("fail(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(lf_check_errors, CPU, m) { m.impl("fail", &fail); }
'''
module = load_inline("lf_check_errors", cpp_sources=source, functions=["fail"], build_directory=sys.argv[1])
call = module.fail if sys.argv[2] == "pybind" else torch.ops.lf_check_errors.fail
try:
    call(torch.zeros(2))
    print("no error raised")
except ValueError as err:
    print("ValueError:", str(err).splitlines()[0][:80])
"""


def probe(name: str, code: str, *args: str) -> None:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    last = (result.stdout.strip().splitlines() or [""])[-1]
    status = f"signal {-result.returncode}" if result.returncode < 0 else f"rc {result.returncode}"
    print(f"{name:14s} {status:10s} {last}", flush=True)
    if result.returncode > 0:
        print(textwrap.indent(result.stderr.strip()[-1500:], "    "), flush=True)


def main() -> None:
    import lora_fast

    for path in glob.glob(f"{lora_fast.__path__[0]}/_C*.so"):
        dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
        needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "NEEDED" in line]
        print(path, "NEEDED:", " ".join(needed))
    probe("ours", OURS)
    with tempfile.TemporaryDirectory() as build:
        probe("inline_pybind", INLINE, build, "pybind")
        probe("inline_op", INLINE, build, "op")


if __name__ == "__main__":
    main()

"""Does a C++ error raised inside lora_fast._C reach Python as an exception on this machine?

    python -m benchmarks.check_cpp_errors

On the H100 image of 2026-11-26 (g++ 13.3, torch 2.11.0+cu130, the extension built with its CUDA
kernels) every TORCH_CHECK that failed inside lora_fast._C killed the process with a segmentation
fault instead of raising ValueError; on the CPU machines it raises. The module had no libstdc++
among its needed libraries there; since setup.py links the shared runtime by path
(``cxx_runtime``), a later H100 run of the same day printed ValueError for ``ours``. The lines
printed first (the module's NEEDED libraries, the runtime this process loaded, and what ``c++``
finds for ``-lstdc++``) show whether a new image links it the same way. Each probe below runs in its
own process, so one crash does not hide the others, and prints one line:

- ``ours``: lora_fast._C's lora_delta_ with a token index out of range (must raise ValueError);
- ``inline_pybind`` / ``inline_op``: a minimal extension compiled here and now by
  torch.utils.cpp_extension.load_inline (same compiler, same torch) whose function fails a
  TORCH_CHECK_VALUE, called as a pybind11 function and as a torch.library op.

If ``ours`` crashes and the inline probes raise, the fault is in how lora_fast._C is built or
linked (its NEEDED libraries are printed first), and a fourth probe follows:

- ``ours_cpu_only``: lora_fast's own C++ sources without the CUDA ones (bindings.cpp and
  lora_cpu.cpp), compiled here by torch.utils.cpp_extension.load (torch's ninja build and link
  line, not setuptools'), and the same bad call as ``ours``.

If that one raises, the CUDA sources or setuptools' link of the installed module are to blame;
if it crashes too, something in our C++ sources. If all crash, it is the image's toolchain.
"""

from __future__ import annotations

import glob
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# lora_delta_ on 4 tokens of 2 slots (tokens 0, 2 to slot 0; 1, 3 to slot 1) whose token_order
# names token 99: the C++ check must raise ValueError
BAD_CALL = """
x = torch.randn(4, 8); A = torch.randn(2, 4, 8); B = torch.randn(2, 8, 4); out = torch.zeros(4, 8)
order, starts, lengths = torch.tensor([99, 2, 1, 3]), torch.tensor([0, 2]), torch.tensor([2, 2])
try:
    torch.ops.lora_fast_C.lora_delta_(x, A, B, order, starts, lengths, torch.ones(2), None, out)
    print("no error raised")
except ValueError as err:
    print("ValueError:", str(err).splitlines()[0][:80])
"""
OURS = "import torch, lora_fast\n" + BAD_CALL

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


CPU_ONLY = (
    """
import sys, torch
from torch.utils.cpp_extension import load
root = sys.argv[2]
load("lf_cpu_only", [f"{root}/csrc/bindings.cpp", f"{root}/csrc/lora_cpu.cpp"], extra_cflags=["-O3"],
     build_directory=sys.argv[1])
"""
    + BAD_CALL
)


def probe(name: str, code: str, *args: str) -> bool:
    """Runs ``code`` in a new process and prints how it ended; True where it raised ValueError."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    last = (result.stdout.strip().splitlines() or [""])[-1]
    status = f"signal {-result.returncode}" if result.returncode < 0 else f"rc {result.returncode}"
    print(f"{name:14s} {status:10s} {last}", flush=True)
    if result.returncode > 0:
        print(textwrap.indent(result.stderr.strip()[-1500:], "    "), flush=True)
    return result.returncode == 0 and last.startswith("ValueError")


def main() -> None:
    import lora_fast

    for path in glob.glob(f"{lora_fast.__path__[0]}/_C*.so"):
        dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
        needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "NEEDED" in line]
        print(path, "NEEDED:", " ".join(needed))
    # the runtime this process runs, and the one `-lstdc++` finds (a bare name: only the archive)
    with open("/proc/self/maps") as maps:
        print("loaded:", sorted({line.split()[-1] for line in maps if "/libstdc++.so" in line}))
    for name in ("libstdc++.so", "libstdc++.a"):
        asked = subprocess.run(["c++", f"-print-file-name={name}"], capture_output=True, text=True)
        found = asked.stdout.strip()
        print(f"c++ finds {name}: {found} ({'exists' if Path(found).exists() else 'missing'})")
    ours = probe("ours", OURS)
    with tempfile.TemporaryDirectory() as build:
        inline = probe("inline_pybind", INLINE, build, "pybind") & probe("inline_op", INLINE, build, "op")
    if not ours and inline:
        root = str(Path(__file__).resolve().parent.parent)
        with tempfile.TemporaryDirectory() as build:
            probe("ours_cpu_only", CPU_ONLY, build, root)


if __name__ == "__main__":
    main()

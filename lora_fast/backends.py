"""Which implementation runs an op: the compiled extension, Triton, or the torch reference.

Backends: ``cpu`` (C++ in lora_fast._C), ``cuda`` (CUDA in lora_fast._C), ``triton`` (kernels/),
``torch`` (lora_fast.reference, runs everywhere). The default is the fastest available for the
tensors' device. ``LORA_FAST_BACKEND=<name>`` or ``with use_backend(name):`` forces one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "LORA_FAST_BACKEND"

_forced: str | None = None
_extension: ModuleType | None = None
_extension_error: str | None = None


def _load_extension() -> None:
    global _extension, _extension_error
    try:
        _extension = importlib.import_module("lora_fast._C")
    except ImportError as err:
        _extension_error = str(err)
        warnings.warn(
            f"lora_fast._C is not built ({err}); lora_fast ops fall back to the torch reference. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


_load_extension()


def extension() -> ModuleType | None:
    """The compiled extension module, or None when it is not built."""
    return _extension


def cpu_isa() -> str | None:
    """Instruction set of the C++ CPU kernels on this machine (None without the extension)."""
    return _extension.cpu_isa() if _extension is not None else None


def available(device: torch.device | str, dtype: torch.dtype | None = None) -> list[str]:
    """Backends that can run on ``device`` (and ``dtype`` when given), fastest first."""
    return list(_available(torch.device(device).type, dtype))


@functools.cache
def _available(device_type: str, dtype: torch.dtype | None) -> tuple[str, ...]:
    # What is built and importable is fixed once lora_fast is imported, so every op call after
    # the first reads the answer from this cache.
    kernels = _triton_kernels()
    triton_ok = kernels is not None and (dtype is None or dtype in kernels.SUPPORTED_DTYPES)
    found = []
    if device_type == "cuda":
        if triton_ok and not _triton_interpreted():
            found.append("triton")
        if _extension is not None and _extension.cuda_compiled():
            found.append("cuda")
    elif device_type == "cpu":
        if _extension is not None:
            found.append("cpu")
        if triton_ok and _triton_interpreted():
            found.append("triton")
    found.append("torch")
    return tuple(found)


def _triton_kernels() -> ModuleType | None:
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels if kernels.AVAILABLE else None


def _triton_interpreted() -> bool:
    # Decided when the kernels were decorated: TRITON_INTERPRET=1 must be set before import.
    from .kernels._common import INTERPRETED

    return INTERPRETED


def forced() -> str | None:
    """The backend forced by ``use_backend`` or the environment, if any."""
    name = _forced if _forced is not None else os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose one of {BACKENDS}")
    return name


def select(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend an op on ``device`` with ``dtype`` inputs runs with."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    choices = _available(device_type, dtype)
    name = forced()
    if name is None:
        return choices[0]
    if name not in choices:
        what = device_type + ("" if dtype is None else f" {dtype}")
        raise ValueError(f"backend {name!r} cannot run on {what} tensors here; available: {list(choices)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for the ops called inside the block (None: no override from this block)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous

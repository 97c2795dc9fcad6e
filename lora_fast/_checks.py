"""Argument checks shared by the ops: each failure names the argument and what was expected."""

from __future__ import annotations

import torch

from .batch import AdapterBatch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(value: object, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def float_tensor(value: object, name: str, ndim: int) -> torch.Tensor:
    value = tensor(value, name, ndim)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def batch(value: object) -> AdapterBatch:
    if not isinstance(value, AdapterBatch):
        raise TypeError(f"batch must be a lora_fast.AdapterBatch, got {type(value).__name__}")
    return value


def same_dtype(value: torch.Tensor, name: str, expected: torch.dtype, other: str) -> None:
    if value.dtype != expected:
        raise TypeError(f"{name} has dtype {value.dtype} but {other} has {expected}; they must match")


def dim_size(value: torch.Tensor, name: str, dim: int, expected: int, meaning: str) -> None:
    if value.shape[dim] != expected:
        raise ValueError(
            f"{name}.shape[{dim}] must be {meaning} = {expected}, got shape {tuple(value.shape)}"
        )


def same_device(device: torch.device, named: dict[str, torch.Tensor | None]) -> None:
    for name, value in named.items():
        if value is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but the batch is on {device}; move them together")


def scales_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a stack keeps its scales in for adapters of ``dtype``: float64 for float64 (a
    scale such as rsLoRA's alpha / sqrt(r) is not exact in float32), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scales(value: object, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """``scales [num_slots]``: float32, or float64 where the inputs (``dtype``) are float64."""
    value = tensor(value, "scales", 1)
    if value.dtype != torch.float32 and not (value.dtype == torch.float64 == dtype):
        raise TypeError(
            f"scales must be float32 (or float64 with float64 inputs), got {value.dtype} with {dtype} inputs"
        )
    dim_size(value, "scales", 0, num_slots, "num_slots")
    return value


def ranks(value: object, num_slots: int, r_max: int) -> torch.Tensor | None:
    if value is None:
        return None
    value = tensor(value, "ranks", 1)
    if value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ranks must be int32 or int64, got {value.dtype}")
    dim_size(value, "ranks", 0, num_slots, "num_slots")
    # Values are checked where reading them is free (CPU, eager). Device ranks come from an
    # AdapterStack, which checks them when slots are set; the device kernels clamp them.
    if value.device.type == "cpu" and value.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(value))
        if low < 0 or high > r_max:
            bad = low if low < 0 else high
            raise ValueError(f"ranks must lie in [0, r_max={r_max}], found {bad}")
    return value


def grad_slots(value: object, num_slots: int) -> torch.Tensor | None:
    if value is None:
        return None
    value = tensor(value, "grad_slots", 1)
    if value.dtype != torch.bool:
        raise TypeError(f"grad_slots must be a bool tensor, got {value.dtype}")
    dim_size(value, "grad_slots", 0, num_slots, "num_slots")
    return value


def no_overlap(out: torch.Tensor, name: str, inputs: dict[str, torch.Tensor]) -> None:
    if torch.compiler.is_compiling() or out.numel() == 0:
        return
    for other_name, other in inputs.items():
        if other.numel() and out.untyped_storage().data_ptr() == other.untyped_storage().data_ptr():
            raise ValueError(f"{name} shares memory with {other_name}; pass a separate output tensor")

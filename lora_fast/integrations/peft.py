"""One call to run an existing PEFT model's LoRA layers through lora_fast's ops.

    model = lora_fast.accelerate(peft_model)     # returns the same model; report on model.lora_fast_report
    model(**inputs, adapter_names=["math", "__base__", "code"])   # PEFT's API, one op per layer
    lora_fast.restore(model)                      # back to PEFT's own forward

Each accelerated ``peft.tuners.lora.Linear`` gets an instance ``forward`` that computes the base
layer, then adds the LoRA delta of every token's adapter with ``lora_fast.lora_delta``: all the
adapters of a mixed batch in one call, reading PEFT's own ``lora_A`` / ``lora_B`` weights (so
training, optimizers and checkpoints keep working on them). Anything lora_fast does not cover
(DoRA and other variants, LoRA bias, merged or disabled adapters, several active adapters at
once, aLoRA offsets) falls back to PEFT's forward for that call.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import NO_ADAPTER, AdapterBatch
from ..ops import lora_delta

BASE_ADAPTER_NAME = "__base__"


@dataclass
class AccelerationReport:
    """What ``accelerate`` routed through lora_fast and what it left on PEFT's path, and why."""

    accelerated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"lora_fast accelerated {len(self.accelerated)} LoRA layer(s), skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in sorted(self.skipped.items())]
        return "\n".join(lines)


def accelerate(model: nn.Module) -> nn.Module:
    """Route every supported LoRA Linear of a PEFT model through lora_fast; returns ``model``.

    ``model.lora_fast_report`` holds an AccelerationReport. Raises ValueError, leaving the model
    as it was, when it holds no LoRA layer.
    """
    lora_layers = _lora_layers(model)
    if not lora_layers:
        raise ValueError(
            f"{type(model).__name__} has no PEFT LoRA layers to accelerate; "
            "wrap it with peft.get_peft_model first"
        )
    state = getattr(model, "_lora_fast_model_state", None) or _ModelState(model)
    report = AccelerationReport()
    for name, layer in lora_layers.items():
        reason = _unsupported(layer)
        if reason is not None:
            report.skipped[name] = reason
            continue
        if not isinstance(getattr(layer, "_lora_fast_state", None), _LayerState):
            layer._lora_fast_state = _LayerState(state)
            layer.forward = types.MethodType(_accelerated_forward, layer)
        report.accelerated.append(name)
    model._lora_fast_model_state = state
    model.lora_fast_report = report
    state.known_layers = set(lora_layers)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: every LoRA layer runs PEFT's own forward again."""
    for layer in _lora_layers(model).values():
        if isinstance(getattr(layer, "_lora_fast_state", None), _LayerState):
            del layer.forward
            del layer._lora_fast_state
    for attribute in ("_lora_fast_model_state", "lora_fast_report"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


def is_accelerated(model: nn.Module) -> bool:
    return hasattr(model, "_lora_fast_model_state")


# ---------------------------------------------------------------------------------------------


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _unsupported(layer: nn.Module) -> str | None:
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(layer, LoraLinear):
        kind = type(layer).__name__
        return f"{kind} LoRA layers (embeddings, convolutions, quantized bases) stay on PEFT's path"
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear) and type(base).__name__ != "Conv1D":
        return f"base layer {type(base).__name__} is not a plain Linear (quantized or custom)"
    if layer.lora_variant:
        return f"adapters {sorted(layer.lora_variant)} use a LoRA variant (e.g. DoRA)"
    return None


class _ModelState:
    """Shared by the accelerated layers of one model: slot numbering and the step's AdapterBatch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tuner = getattr(model, "base_model", model)
        self.known_layers: set[str] = set()
        self._slot_names: tuple[str, ...] = ()
        self._slot_of: dict[str, int] = {}
        self._batch_key: object = None
        self._batch: AdapterBatch | None = None

    def slot_of(self) -> dict[str, int]:
        """Adapter name -> slot over every adapter of the model (re-read when adapters change)."""
        names = tuple(getattr(self.tuner, "peft_config", {}).keys())
        if names != self._slot_names:
            self._slot_names = names
            self._slot_of = {name: slot for slot, name in enumerate(names)}
            self._batch_key = None
            self._accelerate_new_layers()
        return self._slot_of

    def _accelerate_new_layers(self) -> None:
        # adapters added after accelerate() may have created LoRA layers for new target modules
        if self.known_layers and set(_lora_layers(self.model)) - self.known_layers:
            accelerate(self.model)

    def batch(self, key: tuple, ids: list[int], seq_len: int, device: torch.device) -> AdapterBatch:
        """The AdapterBatch of this forward, built by the first layer and reused by the others."""
        if key != self._batch_key:
            self._batch = AdapterBatch(
                torch.tensor(ids, dtype=torch.int64),
                max(len(self._slot_of), 1),
                seq_len=seq_len,
                device=device,
            )
            self._batch_key = key
        return self._batch


class _LayerState:
    """Per layer: the stacked weights of its adapters, rebuilt only when PEFT's weights change."""

    def __init__(self, model_state: _ModelState) -> None:
        self.model_state = model_state
        self._key: object = None
        self._stacks: tuple[torch.Tensor, ...] = ()

    def stacks(self, layer: nn.Module, slot_of: dict[str, int], differentiable: bool):
        """``(A [S, r_max, d_in], B [S, d_out, r_max], scales [S], ranks [S], grad_slots)``."""
        present = [name for name in slot_of if name in layer.lora_A]
        weights = {name: (layer.lora_A[name].weight, layer.lora_B[name].weight) for name in present}
        if not differentiable:
            key = (
                tuple(slot_of),
                tuple(
                    (name, id(a), a._version, id(b), b._version, layer.scaling[name])
                    for name, (a, b) in weights.items()
                ),
            )
            if key == self._key:
                return self._stacks
        any_weight = next(iter(weights.values()))[0]
        r_max = max(a.shape[0] for a, _ in weights.values())
        A_slots, B_slots = [], []
        for name in slot_of:
            if name in weights:
                a, b = weights[name]
                A_slots.append(F.pad(a, (0, 0, 0, r_max - a.shape[0])))
                B_slots.append(F.pad(b, (0, r_max - b.shape[1])))
            else:
                A_slots.append(any_weight.new_zeros(r_max, layer.in_features))
                B_slots.append(any_weight.new_zeros(layer.out_features, r_max))
        device = any_weight.device
        scales = torch.tensor(
            [float(layer.scaling.get(n, 0.0)) for n in slot_of], dtype=torch.float32, device=device
        )
        ranks = torch.tensor([weights[n][0].shape[0] if n in weights else 0 for n in slot_of], device=device)
        grad_slots = torch.tensor(
            [n in weights and weights[n][0].requires_grad for n in slot_of], dtype=torch.bool, device=device
        )
        stacks = (torch.stack(A_slots), torch.stack(B_slots), scales, ranks, grad_slots)
        if not differentiable:
            self._key, self._stacks = key, tuple(t.detach() for t in stacks[:4]) + (None,)
            return self._stacks
        return stacks


def _original_forward(layer: nn.Module):
    return type(layer).forward.__get__(layer)


def _fallback_reason(layer: nn.Module, adapter_names, kwargs) -> str | None:
    if layer.disable_adapters or layer.merged:
        return "adapters disabled or merged"
    if any(kwargs.get(key) is not None for key in ("alora_offsets",)):
        return "aLoRA offsets"
    names = (
        set(adapter_names) - {BASE_ADAPTER_NAME} if adapter_names is not None else set(layer.active_adapters)
    )
    names &= set(layer.lora_A.keys())
    if adapter_names is None and len(names) > 1:
        return "several active adapters summed"
    if any(name in layer.lora_variant for name in names):
        return "a LoRA variant (e.g. DoRA)"
    if any(layer.lora_B[name].bias is not None for name in names):
        return "LoRA bias"
    dtypes = {layer.lora_A[name].weight.dtype for name in names}
    if len(dtypes) > 1:
        return "adapters of different dtypes"
    if adapter_names is not None and layer.training:
        if any(getattr(layer.lora_dropout[name], "p", 0.0) > 0 for name in names):
            return "per-adapter dropout in a mixed training batch"
    return None


def _accelerated_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    state: _LayerState = self._lora_fast_state
    adapter_names = kwargs.get("adapter_names")
    if _fallback_reason(self, adapter_names, kwargs) is not None:
        return _original_forward(self)(x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)  # PEFT's own checks (adapter_names length, merged)
    kwargs.pop("adapter_names", None)
    kwargs.pop("alora_offsets", None)
    result = self.base_layer(x, *args, **kwargs)
    slot_of = state.model_state.slot_of()

    if adapter_names is None:
        active = [name for name in self.active_adapters if name in self.lora_A]
        if not active:
            return result
        return _single_adapter(self, x, result, active[0])

    names_here = {name for name in adapter_names if name in self.lora_A}
    if not names_here:
        return result
    rows = x.reshape(-1, x.shape[-1])
    seq_len = rows.shape[0] // len(adapter_names)
    key = (tuple(adapter_names), seq_len, x.device, tuple(slot_of))
    ids = [
        slot_of.get(name, NO_ADAPTER) if name != BASE_ADAPTER_NAME else NO_ADAPTER for name in adapter_names
    ]
    batch = state.model_state.batch(key, ids, seq_len, x.device)
    differentiable = torch.is_grad_enabled() and any(self.lora_A[n].weight.requires_grad for n in names_here)
    A, B, scales, ranks, grad_slots = state.stacks(self, slot_of, differentiable)
    lora_input = self._cast_input_dtype(rows, A.dtype)
    return _add_delta(result, lora_input, A, B, batch, scales, ranks, grad_slots)


def _single_adapter(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
    """Every token through one adapter: its weights as a one-slot stack (views, no copy)."""
    weight_A, weight_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    rows = layer._cast_input_dtype(x, weight_A.dtype).reshape(-1, x.shape[-1])
    rows = layer.lora_dropout[name](rows)
    batch = AdapterBatch.from_metadata(*_one_slot_metadata(rows.shape[0], rows.device))
    scales = torch.tensor([float(layer.scaling[name])], dtype=torch.float32, device=rows.device)
    return _add_delta(result, rows, weight_A[None], weight_B[None], batch, scales, None, None)


_ONE_SLOT_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}


def _one_slot_metadata(num_tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    key = (num_tokens, device)
    if key not in _ONE_SLOT_CACHE:
        if len(_ONE_SLOT_CACHE) > 64:
            _ONE_SLOT_CACHE.clear()
        _ONE_SLOT_CACHE[key] = AdapterBatch(
            torch.zeros(num_tokens, dtype=torch.int64), 1, device=device
        ).metadata
    return _ONE_SLOT_CACHE[key]


def _add_delta(result, lora_input, A, B, batch, scales, ranks, grad_slots) -> torch.Tensor:
    out_rows = result.reshape(-1, result.shape[-1])
    if result.dtype == A.dtype and result.is_contiguous():
        lora_delta(lora_input, A, B, batch, scales, ranks, out=out_rows, grad_slots=grad_slots)
        return result
    delta = lora_delta(lora_input, A, B, batch, scales, ranks, grad_slots=grad_slots)
    return (result + delta.view(result.shape)).to(result.dtype)

"""One call to run an existing PEFT model's LoRA layers through lora_fast's ops.

    model = lora_fast.accelerate(peft_model)     # the same model; report on model.lora_fast_report
    model(**inputs, adapter_names=["math", "__base__", "code"])   # PEFT's API, one op per layer
    lora_fast.restore(model)                      # back to PEFT's own forward

Each accelerated ``peft.tuners.lora.Linear`` gets an instance ``forward`` that computes the base
layer, then adds the LoRA delta of every token's adapter with ``lora_fast.lora_delta``: all the
adapters of a mixed batch in one call, reading PEFT's own ``lora_A`` / ``lora_B`` weights (so
training, optimizers and checkpoints keep working on them). Anything lora_fast does not cover
(DoRA and other variants, LoRA bias, merged or disabled adapters, several active adapters at
once, aLoRA offsets) falls back to PEFT's forward for that call.

PEFT hands ``adapter_names`` to its layers by registering a hook on every LoRA module for every
forward call. When every LoRA layer of the model is accelerated, the model's names are handed to
its layers directly instead (same checks, same errors), which saves that per-call walk, and a
mixed batch may then also train: ``model.train(); model(**inputs, adapter_names=[...]).loss
.backward()`` puts each adapter's gradients, from its own tokens only, in its PEFT parameters
(PEFT itself refuses ``adapter_names`` in training mode).

In that mode an inference call on the CPU that repeats a layer's last one (same names, shapes and
state; see ``_fast_forward``) skips the lookups and goes straight to the C++ kernels (the fused
kernel for decode-sized batches, the base GEMM and the delta kernel past it), after the same
check of the adapters' weights and scalings.

accelerate() also hooks the model's output projection when it is a plain Linear outside the
LoRA layers: generate()'s strided last-position slice is copied before the GEMM, which torch
otherwise runs as one GEMV per sequence on a frozen weight (``_fold_output_rows``).
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as check
from .. import backends
from ..batch import NO_ADAPTER, AdapterBatch
from ..layers import _GLOBAL_HOOKS, contiguous_rows, plain_linear
from ..ops import (
    _cpu_kernels_run,
    _dispatch_mode_active,
    _fused_cpu_kernel_runs,
    fused_lora_linear,
    lora_delta,
)

BASE_ADAPTER_NAME = "__base__"


@dataclass
class AccelerationReport:
    """What ``accelerate`` routed through lora_fast and what it left on PEFT's path, and why."""

    accelerated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # modules outside the LoRA layers that accelerate() changed, and how (restore() undoes it)
    adjusted: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"lora_fast accelerated {len(self.accelerated)} LoRA layer(s), skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in sorted(self.skipped.items())]
        lines += [f"  adjusted {name}: {change}" for name, change in sorted(self.adjusted.items())]
        return "\n".join(lines)


# Bumped whenever any module registers a parameter, or a ModuleDict gains or becomes a submodule
# (PEFT keeps each layer's adapters in the ModuleDicts lora_A / lora_B): an adapter's weights
# replaced, reloaded with assign=True, or its Linear swapped. Accelerated layers then look their
# parameters up again. (Submodules registered elsewhere do not count: transformers slices its
# ModuleList of decoder layers, which registers each layer anew, on every forward.)
_registration_epoch = [0]
_registration_hooks: list = []


def _parameter_registered(module, name, param) -> None:
    _registration_epoch[0] += 1


def _module_registered(module, name, submodule) -> None:
    if isinstance(module, nn.ModuleDict) or isinstance(submodule, nn.ModuleDict):
        _registration_epoch[0] += 1


def _watch_registrations() -> None:
    if not _registration_hooks:
        from torch.nn.modules import module

        _registration_hooks.append(module.register_module_parameter_registration_hook(_parameter_registered))
        _registration_hooks.append(module.register_module_module_registration_hook(_module_registered))


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
    _watch_registrations()
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
    _fold_output_rows(model, state, report)
    model._lora_fast_model_state = state
    model.lora_fast_report = report
    state.known_layers = set(lora_layers)
    state.hand_names_directly(not report.skipped and not _has_auxiliary_wrappers(model))
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: every LoRA layer runs PEFT's own forward again."""
    state = getattr(model, "_lora_fast_model_state", None)
    if state is not None:
        state.hand_names_directly(False)
        if state.output_rows_hook is not None:
            state.output_rows_hook.remove()
            state.output_rows_hook = None
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


OUTPUT_ROWS_CHANGE = (
    "3-D inputs that are not contiguous (generate()'s last-position slice) are copied first, so "
    "that torch's matmul folds them into one GEMM instead of a bmm that reads the frozen weight "
    "once per sequence"
)


def _fold_output_rows(model: nn.Module, state: _ModelState, report: AccelerationReport) -> None:
    """Hooks the model's output projection (a plain Linear that is not a LoRA layer) so that a
    3-D input that is not contiguous is copied before the GEMM.

    generate() runs its first step's output projection on ``hidden[:, -1:, :]``, a view whose
    batch strides do not merge. torch's matmul folds such an input into one GEMM only when the
    weight requires grad (it copies the input then); a frozen weight, as in every PEFT model,
    sends it to bmm: one GEMV per sequence, each reading the whole weight. SmolLM2 (49152 x 576),
    16 sequences, one thread: 90 ms against 17 ms for the copy and one GEMM, a third of a
    decode step. The base model outside PEFT, its weight not frozen, never pays it."""
    if state.output_rows_hook is not None:
        report.adjusted[state.output_rows_name] = OUTPUT_ROWS_CHANGE
        return
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        output = get_output() if callable(get_output) else None
    except (AttributeError, NotImplementedError):
        output = None
    if output is None or not plain_linear(output):
        return
    name = next((n for n, module in model.named_modules() if module is output), None)
    if name is None:
        return
    state.output_rows_hook = output.register_forward_pre_hook(contiguous_rows)
    state.output_rows_name = name
    report.adjusted[name] = OUTPUT_ROWS_CHANGE


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _has_auxiliary_wrappers(model: nn.Module) -> bool:
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # older PEFT: modules_to_save wrappers only
        from peft.utils.other import ModulesToSaveWrapper as AuxiliaryTrainingWrapper
    return any(isinstance(module, AuxiliaryTrainingWrapper) for module in model.modules())


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
    """Shared by the accelerated layers of one model: slot numbering, the adapter names of the
    current call and the AdapterBatch built from them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tuner = getattr(model, "base_model", model)
        self.known_layers: set[str] = set()
        self.output_rows_hook = None  # _fold_output_rows' hook on the output projection
        self.output_rows_name = ""
        self.current_names: list[str] | None = None
        self.slot_names: tuple[str, ...] = ()
        self._config_key: object = None
        self._slot_of: dict[str, int] = {}
        self._batch_key: object = None
        self._batch: AdapterBatch | None = None
        self.batch_names: frozenset[str] = frozenset()
        # the names of the current call once a layer has checked the model-level state for it
        # (slot numbering, AdapterBatch): a new list each forward call, the same one all through
        # a generate() call
        self.validated_names: list[str] | None = None
        self._one_slot_key: object = None
        self._one_slot: AdapterBatch | None = None
        self._training_key: object = None
        self._training: tuple = ()
        self._groups_key: object = None
        self._groups: tuple = ()

    def slot_of(self) -> dict[str, int]:
        """Adapter name -> slot over every adapter of the model (re-read when adapters change)."""
        config = getattr(self.tuner, "peft_config", {})
        # Adding an adapter registers its modules (bumping the epoch), deleting one shrinks the
        # config: only then are the names read again (a tuple of every name per layer call
        # would make a model with many adapters pay for all of them).
        key = (_registration_epoch[0], len(config))
        if key == self._config_key:
            return self._slot_of
        self._config_key = key
        names = tuple(config.keys())
        if names != self.slot_names:
            self.slot_names = names
            self._slot_of = {name: slot for slot, name in enumerate(names)}
            self._batch_key = None
            # adapters added after accelerate() may have created LoRA layers for new target modules
            if self.known_layers and set(_lora_layers(self.model)) - self.known_layers:
                accelerate(self.model)
        return self._slot_of

    def batch(self, adapter_names: list[str], seq_len: int, device: torch.device) -> AdapterBatch:
        """The AdapterBatch of this call, built by the first layer and reused by the others."""
        slot_of = self.slot_of()
        key = (tuple(adapter_names), seq_len, device, self.slot_names)
        if key != self._batch_key:
            ids = [slot_of.get(name, NO_ADAPTER) for name in adapter_names]  # "__base__" -> -1
            self._batch = AdapterBatch(
                torch.tensor(ids, dtype=torch.int64), max(len(slot_of), 1), seq_len=seq_len, device=device
            )
            self.batch_names = frozenset(adapter_names) - {BASE_ADAPTER_NAME}
            self._batch_key = key
        return self._batch

    def training_batch(self, adapter_names: list[str], seq_len: int, device: torch.device) -> tuple:
        """``(AdapterBatch, names)`` numbered over the call's own adapters (``names[slot]``), not
        the model's: a training stack is rebuilt every call, so it holds only the adapters the
        batch uses and its cost does not grow with the adapters the model has loaded."""
        key = (tuple(adapter_names), seq_len, device)
        if key != self._training_key:
            names = tuple(dict.fromkeys(n for n in adapter_names if n != BASE_ADAPTER_NAME))
            local = {name: slot for slot, name in enumerate(names)}
            ids = [local.get(name, NO_ADAPTER) for name in adapter_names]
            batch = AdapterBatch(
                torch.tensor(ids, dtype=torch.int64), max(len(names), 1), seq_len=seq_len, device=device
            )
            self._training, self._training_key = (batch, names), key
        return self._training

    def dropout_groups(self, adapter_names: list[str], device: torch.device) -> tuple:
        """``((name, sequence indices), ...)`` in the order PEFT's mixed-batch forward visits the
        adapters (iterating ``set(adapter_names)``), "__base__" left out; made once per call."""
        key = (tuple(adapter_names), device)
        if key != self._groups_key:
            self._groups = tuple(
                (name, torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=device))
                for name in set(adapter_names)
                if name != BASE_ADAPTER_NAME
            )
            self._groups_key = key
        return self._groups

    def one_slot_batch(self, num_tokens: int, device: torch.device) -> AdapterBatch:
        """Every token in slot 0 of a one-slot stack (training through PEFT's own parameters)."""
        key = (num_tokens, device)
        if key != self._one_slot_key:
            self._one_slot = AdapterBatch(torch.zeros(num_tokens, dtype=torch.int64), 1, device=device)
            self._one_slot_key = key
        return self._one_slot

    def hand_names_directly(self, enable: bool) -> None:
        if enable:
            self.tuner._enable_peft_forward_hooks = types.MethodType(_names_to_layers, self.tuner)
            self.tuner._lora_fast_model_state = self
        elif "_enable_peft_forward_hooks" in vars(self.tuner):
            del self.tuner._enable_peft_forward_hooks
            del self.tuner._lora_fast_model_state


@contextlib.contextmanager
def _names_to_layers(tuner: nn.Module, *args, **kwargs):
    """Stands in for LoraModel._enable_peft_forward_hooks with PEFT's checks and errors."""
    state: _ModelState = tuner._lora_fast_model_state
    adapter_names = kwargs.get("adapter_names")
    num_beams = kwargs.get("num_beams")
    beam_search = isinstance(num_beams, int) and num_beams > 1
    encoder = getattr(getattr(tuner, "model", None), "get_encoder", None)
    if (
        adapter_names is None
        or kwargs.get("alora_offsets") is not None
        or (beam_search and encoder is not None)
    ):
        with type(tuner)._enable_peft_forward_hooks(tuner, *args, **kwargs):
            yield
        return
    # (PEFT refuses adapter_names in training mode; here a mixed batch trains: each adapter's
    # gradients come from its own tokens through lora_fast's backward, with lora_dropout masks
    # drawn as PEFT's mixed-batch forward draws them: see _dropped_like_peft.)
    unexpected = {name for name in adapter_names if name != BASE_ADAPTER_NAME} - set(state.slot_of())
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
    if beam_search:
        adapter_names = [name for name in adapter_names for _ in range(num_beams)]
    previous, state.current_names = state.current_names, list(adapter_names)
    try:
        yield
    finally:
        state.current_names = previous


class _LayerState:
    """Per layer: what its adapters allow, and a stacked copy of their weights for inference.

    The copy holds A as [S, r_max, d_in] and B rank-major ([S, r_max, d_out], handed to the op as
    its transpose) so the kernels read every slot in place. A slot is refreshed when the adapter's
    weights change (PEFT parameter replaced or updated in place, or its scaling changed); only the
    adapters a call uses are checked, so a model with many loaded adapters pays for the few in
    the batch. The check per call is one compiled pass over those parameters' version counters
    and data pointers; the parameters themselves are looked up again only after a parameter or
    an adapter module was registered somewhere (``_registration_epoch``), which is how PEFT adds,
    reloads or replaces adapters. Not seen: one parameter swapped into ``module._parameters``
    directly, by hand, while this layer's first parameter stays (conversions swap them all).
    """

    def __init__(self, model_state: _ModelState) -> None:
        self.model_state = model_state
        self._adapters_key: object = None
        self.unsupported: frozenset[str] = frozenset()  # variants or LoRA bias: PEFT's path
        self.dtypes: dict[str, torch.dtype] = {}
        self.r_max = 0
        self._layout_key: object = None
        self._stacks: tuple = ()
        self._stamps: dict[str, tuple] = {}
        self._names_key: object = None
        self._names: tuple[frozenset[str], bool] = (frozenset(), False)
        self._params: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        self._params_epoch = -1
        self._resolved_names: object = None
        self._resolved: list[tuple[str, nn.Parameter, nn.Parameter]] = []
        self._resolved_tensors: list[nn.Parameter] = []
        self._resolved_rows = torch.empty(0, dtype=torch.int64)
        self._version_table = torch.empty(0, 2, dtype=torch.int64)
        self._scaling_seen: dict[str, float] = {}
        self._scaling_subset: dict[str, float | None] = {}
        # the same values as float64 in the resolved names' order (NaN: none seen, or not a
        # float), for the extension's adapters_changed
        self._resolved_name_list: list[str] = []
        self._scaling_values = torch.empty(0, dtype=torch.float64)
        self._slot_values_key: object = None
        self._slot_values: tuple = ()
        self._zero_slot_key: object = None
        self._zero_slots: tuple = ()
        self._one_scale_key: object = None
        self._one_scale = torch.empty(0)
        self.fast: tuple | None = None  # see _fast_forward

    def names_in_batch(self, batch_names: frozenset[str]) -> tuple[frozenset[str], bool]:
        """``(names, peft_path)``: the batch's adapters this layer has, and whether this call must
        take PEFT's path (one of them is a variant or has a bias, or they mix dtypes)."""
        if batch_names is not self._names_key:
            names = batch_names & self.dtypes.keys()
            peft_path = bool(names & self.unsupported) or len({self.dtypes[n] for n in names}) > 1
            self._names_key, self._names = batch_names, (names, peft_path)
        return self._names

    def refresh(self, layer: nn.Module) -> None:
        # adapters added (their modules registered: a new epoch) or deleted (fewer of them)
        key = (_registration_epoch[0], len(layer._modules["lora_A"]._modules), len(layer.lora_variant))
        if key == self._adapters_key:
            return
        self._adapters_key = key
        self._names_key = self._resolved_names = None
        self.unsupported = frozenset(
            name for name in layer.lora_A if name in layer.lora_variant or layer.lora_B[name].bias is not None
        )
        self.dtypes = {name: layer.lora_A[name].weight.dtype for name in layer.lora_A}
        self.r_max = max((layer.lora_A[name].weight.shape[0] for name in layer.lora_A), default=0)
        # deleted adapters: drop what is kept of them (stamps and kept pairs hold their parameters)
        self._stamps = {name: stamp for name, stamp in self._stamps.items() if name in layer.lora_A}
        self._params = {name: pair for name, pair in self._params.items() if name in layer.lora_A}

    def inference_stacks(self, layer: nn.Module, slot_of: dict[str, int], names) -> tuple:
        """``(A, B, scales, ranks)`` with the slots of ``names`` up to date."""
        lora_A = layer._modules["lora_A"]._modules
        first_name = next(iter(names))
        first = lora_A[first_name]._parameters["weight"]
        layout = (self.model_state.slot_names, self.r_max, first.dtype, first.device)
        if layout != self._layout_key:
            num_slots = len(slot_of)
            A = first.new_zeros(num_slots, self.r_max, layer.in_features)
            B_rank_major = first.new_zeros(num_slots, self.r_max, layer.out_features)
            scales = torch.zeros(num_slots, dtype=check.scales_dtype(first.dtype), device=first.device)
            ranks = torch.zeros(num_slots, dtype=torch.int64, device=first.device)
            # (version, data pointer) of each slot's A and B when last checked
            self._version_table = torch.full((2 * num_slots, 2), -1, dtype=torch.int64)
            self._stacks = (A, B_rank_major, scales, ranks, B_rank_major.transpose(1, 2))
            self._layout_key, self._resolved_names = layout, None
            self._stamps, self._params, self._scaling_seen = {}, {}, {}
        A, B_rank_major, scales, ranks, B = self._stacks
        # Walking the modules to a parameter costs more than the rest of this call (those
        # objects are cold in cache after the base GEMMs), so each adapter's parameters are kept
        # here and walked to again only after a parameter or module was registered anywhere (an
        # adapter replaced or reloaded), or when this layer's first parameter is not the one
        # kept (parameters swapped without registration, e.g. by a conversion).
        params = self._params
        kept = params.get(first_name)
        if self._params_epoch != _registration_epoch[0] or (kept is not None and kept[0] is not first):
            params.clear()
            self._version_table.fill_(-1)  # new parameter objects: check each one in full
            self._params_epoch, self._resolved_names = _registration_epoch[0], None
        if names is not self._resolved_names and names != self._resolved_names:
            lora_B = layer._modules["lora_B"]._modules
            resolved = []
            for name in names:
                pair = params.get(name)
                if pair is None:
                    pair = params[name] = (
                        lora_A[name]._parameters["weight"],
                        lora_B[name]._parameters["weight"],
                    )
                resolved.append((name, *pair))
            self._resolved, self._resolved_names = resolved, names
            self._resolved_tensors = [weight for _, a, b in resolved for weight in (a, b)]
            self._resolved_rows = torch.tensor(
                [2 * slot_of[name] + k for name, _, _ in resolved for k in (0, 1)], dtype=torch.int64
            )
            self._scaling_subset = {name: self._scaling_seen.get(name) for name, _, _ in resolved}
            self._resolved_name_list = [name for name, _, _ in resolved]
            self._scaling_values = torch.tensor(
                [_as_seen(self._scaling_subset[name]) for name in self._resolved_name_list],
                dtype=torch.float64,
            )
        self.sync_slots(layer.scaling, slot_of)
        return A, B, scales, ranks

    def sync_slots(self, scaling: dict[str, float], slot_of: dict[str, int]) -> None:
        """Copies into the stacks each adapter of the last resolved names whose scaling or weights
        changed since it was last copied (``scaling``: the layer's own dict)."""
        A, B_rank_major, scales, ranks, _ = self._stacks
        # Which adapters may have changed: those whose scaling moved (one C-level subset test of
        # the (name, scaling) pairs last seen) or whose parameters were updated in place or got
        # new storage (one compiled pass over their version counters and data pointers).
        extension = backends.extension()
        suspects = {}
        if not self._scaling_subset.items() <= scaling.items():
            for index, entry in enumerate(self._resolved):
                name = entry[0]
                if scaling[name] != self._scaling_subset[name]:
                    self._scaling_subset[name] = self._scaling_seen[name] = scaling[name]
                    self._scaling_values[index] = _as_seen(scaling[name])
                    suspects[name] = entry
        if extension is None:
            suspects = {entry[0]: entry for entry in self._resolved}
        else:
            moved = extension.changed_since(self._resolved_tensors, self._version_table, self._resolved_rows)
            for index in moved:
                entry = self._resolved[index // 2]
                suspects[entry[0]] = entry
        stamps = self._stamps
        for name, a, b in suspects.values():
            # The stamp holds the parameters themselves, so a parameter replaced by another one
            # never matches (the old one cannot be freed and its address reused meanwhile).
            stamp = stamps.get(name)
            version = (a._version, b._version, a.data_ptr(), b.data_ptr(), scaling[name])
            if stamp is None or stamp[0] is not a or stamp[1] is not b or stamp[2] != version:
                slot, rank = slot_of[name], a.shape[0]
                with torch.no_grad():
                    A[slot].zero_()
                    A[slot, :rank].copy_(a)
                    B_rank_major[slot].zero_()
                    B_rank_major[slot, :rank].copy_(b.T)
                    scales[slot] = float(scaling[name])
                    ranks[slot] = rank
                stamps[name] = (a, b, version)

    def training_stacks(self, layer: nn.Module, slot_names: tuple[str, ...], names: frozenset[str]) -> tuple:
        """``(A, B, scales, ranks, grad_slots)`` stacked from PEFT's parameters with autograd,
        slot s holding adapter ``slot_names[s]`` (the training batch's own numbering).

        The stack is rebuilt every call (gradients must reach PEFT's own parameters through it),
        so it holds the batch's adapters only: an adapter the model has but the batch does not
        use gets no gradient at all (its ``.grad`` stays None, as in PEFT, and an optimizer leaves
        it alone) and costs no copy. A batch adapter this layer lacks (``names`` are the ones it
        has) gets a shared zero filler. A full-rank adapter's weights go in as they are (no pad),
        and the small per-slot tensors are made on the device only when their values change: a
        tensor built from a Python list on a GPU is a blocking copy, which would stall every
        layer of every training step.
        """
        lora_A, lora_B, scaling = layer.lora_A, layer.lora_B, layer.scaling
        r_max = self.r_max
        A_slots, B_slots, values = [], [], []
        filler = None
        for name in slot_names:
            if name in names:
                a, b = lora_A[name].weight, lora_B[name].weight.T  # B rank-major: [r, d_out]
                rank = a.shape[0]
                if rank != r_max:
                    a, b = F.pad(a, (0, 0, 0, r_max - rank)), F.pad(b, (0, 0, 0, r_max - rank))
                A_slots.append(a)
                B_slots.append(b)
                values.append((float(scaling.get(name, 0.0)), rank, a.requires_grad))
            else:  # this adapter does not target this layer: rank 0
                if filler is None:
                    filler = self._zero_slot(lora_A, layer)
                A_slots.append(filler[0])
                B_slots.append(filler[1])
                values.append((0.0, 0, False))
        device, dtype = A_slots[0].device, A_slots[0].dtype
        key = (tuple(values), device, dtype)
        if key != self._slot_values_key:
            scales, ranks, grad = zip(*values, strict=True)
            self._slot_values = (
                torch.tensor(scales, dtype=check.scales_dtype(dtype)).to(device),
                torch.tensor(ranks, dtype=torch.int64).to(device),
                torch.tensor(grad, dtype=torch.bool).to(device),
            )
            self._slot_values_key = key
        # B stacked rank-major ([S, r_max, d_out], passed transposed), as the inference stacks
        # keep it: the kernels read its rank rows in place instead of transposing each slot
        return (torch.stack(A_slots), torch.stack(B_slots).transpose(1, 2), *self._slot_values)

    def one_scale(self, scale: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[scale]`` on ``device`` for adapters of ``dtype`` (float32, float64 for float64),
        made again only when the scale changes."""
        key = (scale, device, dtype)
        if key != self._one_scale_key:
            self._one_scale = torch.tensor([scale], dtype=check.scales_dtype(dtype)).to(device)
            self._one_scale_key = key
        return self._one_scale

    def _zero_slot(self, lora_A, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero A and B for a slot whose adapter does not target this layer (kept, not remade)."""
        weight = next(iter(lora_A.values())).weight
        key = (weight.dtype, weight.device, self.r_max)
        if self._zero_slot_key != key:
            self._zero_slots = (
                weight.new_zeros(self.r_max, layer.in_features),
                weight.new_zeros(self.r_max, layer.out_features),  # rank-major, like the others
            )
            self._zero_slot_key = key
        return self._zero_slots


def _as_seen(value) -> float:
    return value if type(value) is float else math.nan


def _original_forward(layer: nn.Module):
    return type(layer).forward.__get__(layer)


def _accelerated_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    layer_state: _LayerState = self._lora_fast_state
    plain_call = not args and not kwargs
    if plain_call and layer_state.fast is not None:
        y = _fast_forward(self, layer_state, x)
        if y is not None:
            return y
    layer_state.fast = None
    model_state = layer_state.model_state
    layer_state.refresh(self)
    adapter_names = kwargs.pop("adapter_names", None)
    from_model = adapter_names is None  # the names the model handed over (hand_names_directly)
    if adapter_names is None:
        adapter_names = model_state.current_names
    if self.disable_adapters or self.merged or kwargs.get("alora_offsets") is not None:
        return _peft_forward(self, x, adapter_names, args, kwargs)
    kwargs.pop("alora_offsets", None)

    if adapter_names is None:
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) > 1 or (active and active[0] in layer_state.unsupported):
            return _peft_forward(self, x, None, args, kwargs)  # several adapters summed, or a variant
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return _single_adapter(self, layer_state, x, args, kwargs, active[0])

    if len(x) != len(adapter_names):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )
    rows = x.reshape(-1, x.shape[-1])
    seq_len = rows.shape[0] // len(adapter_names)
    batch = model_state.batch(adapter_names, seq_len, x.device)
    if from_model:
        model_state.validated_names = adapter_names
    names_here, peft_path = layer_state.names_in_batch(model_state.batch_names)
    if peft_path:
        return _peft_forward(self, x, adapter_names, args, kwargs)
    if not names_here:
        return self.base_layer(x, *args, **kwargs)
    dropout = self.training and any(getattr(self.lora_dropout[n], "p", 0.0) > 0 for n in names_here)
    if dropout or (torch.is_grad_enabled() and any(self.lora_A[n].weight.requires_grad for n in names_here)):
        batch, slot_names = model_state.training_batch(adapter_names, seq_len, x.device)
        A, B, scales, ranks, grad_slots = layer_state.training_stacks(self, slot_names, names_here)
        result = _base_output(self, x, rows, args, kwargs)
        if dropout:
            groups = model_state.dropout_groups(adapter_names, x.device)
            lora_input = _dropped_like_peft(self, x, groups, A.dtype).reshape(rows.shape)
        else:
            lora_input = self._cast_input_dtype(rows, A.dtype)
        result = _add_delta(result, lora_input, A, B, batch, scales, ranks, grad_slots)
        return result.view(*x.shape[:-1], result.shape[-1])
    slot_of = model_state.slot_of()
    A, B, scales, ranks = layer_state.inference_stacks(self, slot_of, names_here)
    if plain_call and from_model:
        layer_state.fast = _fast_entry(self, x, rows, A, B, batch, scales, ranks, slot_of)
    return _base_and_delta(self, x, args, kwargs, rows, rows, A, B, batch, scales, ranks)


_FUSED_OP: list = []  # the kernels _fast_forward calls, once needed: see _short_path_kernel
_COMPOSED_OP: list = []


def _short_path_kernel(fused: bool = True):
    """The CPU kernel _fast_forward calls: for decode-sized batches the fused kernel
    (``fused_lora_linear_cpu``), past them the base GEMM then the delta
    (``linear_then_delta_cpu``), each the extension's own binding, which skips the dispatcher's
    argument parsing (1.9 instead of 3.5 us a call warm for the fused kernel, more with cold
    caches: SmolLM2 decode 1.104 -> 1.085 of the base model), once _fast_forward's guard has
    ruled out all the dispatcher would add (autograd, dispatch modes, tracing). With an
    extension built before a binding existed: the fused op itself, or no short path (None)."""
    ops = _FUSED_OP if fused else _COMPOSED_OP
    if not ops:
        extension = backends.extension()
        if fused:
            ops.append(
                getattr(extension, "fused_lora_linear_cpu", None)
                or torch.ops.lora_fast_C.fused_lora_linear.default
            )
        else:
            ops.append(getattr(extension, "linear_then_delta_cpu", None))
    return ops[0]


def _fast_entry(layer: nn.Module, x, rows, A, B, batch, scales, ranks, slot_of) -> tuple | None:
    """What _fast_forward needs to repeat this inference call, when it is one that runs the C++
    CPU kernels directly (``fused_lora_linear`` of a plain Linear, no autograd: the fused kernel,
    or past its token limit ``F.linear`` and the delta kernel); else None."""
    if torch.is_grad_enabled() or layer.training:
        return None
    fusable = _fusable_base(layer, rows, A)
    if fusable is None:
        return None
    base, weight, bias = fusable
    fused = _fused_cpu_kernel_runs(rows, weight, bias, A, B)
    if not fused and not _cpu_kernels_run(rows, weight, bias, A, B):
        return None
    if _short_path_kernel(fused) is None:
        return None
    segments = (batch.token_order, batch.segment_starts, batch.segment_lengths)
    first_A = layer._modules["lora_A"]._modules[next(iter(layer._lora_fast_state._resolved_names))]
    return (
        batch,
        _registration_epoch[0],
        x.shape,
        x.dtype,
        layer._modules,
        base,
        base._parameters,
        weight,
        bias,
        first_A._parameters,
        first_A._parameters["weight"],
        layer.scaling,
        slot_of,
        (weight, bias, A, B, *segments, scales, ranks),
        getattr(backends.extension(), "adapters_changed", None),
        fused,
    )


def _fast_forward(layer: nn.Module, layer_state: _LayerState, x: torch.Tensor) -> torch.Tensor | None:
    """This layer's output for x when the call repeats the layer's last one (``layer_state.fast``,
    made by _fast_entry) in everything but x's values and the adapters' weights and scalings, which
    are brought up to date here as on the full path; else None, and the full path runs.

    On a CPU decode step the full path's lookups and checks, each on objects that the previous
    layer's weight streams pushed out of the caches, cost about as much as the adapters' GEMMs.
    This one checks what could differ between two such calls: a new call's names (the first layer
    of each forward takes the full path, which checks them against the model's adapters; a layer
    then goes fast only with the AdapterBatch it was set up with), adapters or parameters
    registered anywhere, x's shape and dtype, the layer disabled, merged or put in training mode,
    autograd, tracing or a dispatch mode, a forced backend, the base layer or its parameters
    swapped or hooked, and the layer's first adapter parameter replaced without registration.
    """
    (
        batch,
        epoch,
        shape,
        dtype,
        modules,
        base,
        base_params,
        weight,
        bias,
        first_params,
        first,
        scaling,
        slot_of,
        op_args,
        adapters_changed,
        fused,
    ) = layer_state.fast
    model_state = layer_state.model_state
    if not (
        model_state.current_names is model_state.validated_names
        and batch is model_state._batch
        and epoch == _registration_epoch[0]
        and type(x) is torch.Tensor
        and x.shape == shape
        and x.dtype is dtype
        and x.is_cpu
        and not layer._disable_adapters
        and not layer.merged_adapters
        and not layer.training
        and modules["base_layer"] is base
        and base_params["weight"] is weight
        and base_params["bias"] is bias
        and not base._forward_hooks
        and (not base._forward_pre_hooks or plain_linear(base))
        and not _GLOBAL_HOOKS[0]
        and not _GLOBAL_HOOKS[1]
        and first_params["weight"] is first
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not _dispatch_mode_active()
        and backends.forced() in (None, "cpu")
    ):
        return None
    if adapters_changed is None or adapters_changed(
        layer_state._resolved_tensors,
        layer_state._version_table,
        layer_state._resolved_rows,
        scaling,
        layer_state._resolved_name_list,
        layer_state._scaling_values,
    ):
        layer_state.sync_slots(scaling, slot_of)
    y = (_FUSED_OP if fused else _COMPOSED_OP)[0](x.reshape(-1, shape[-1]), *op_args)
    return y.view(*shape[:-1], y.shape[-1])


def _dropped_like_peft(layer: nn.Module, x: torch.Tensor, groups: tuple, dtype) -> torch.Tensor:
    """x in ``dtype`` with each adapter's ``lora_dropout`` applied to its own sequences, with the
    masks PEFT's mixed-batch forward draws: the same sub-batch shapes, in the same order
    (``groups``: :meth:`_ModelState.dropout_groups`), from the same RNG (a dropout mask depends
    on its input's shape, dtype and device, not its values, so it is drawn on ones). The masks
    go into one tensor outside autograd and x is multiplied by it once: no per-adapter gather,
    scatter or autograd node, which in PEFT's loop cost more than the LoRA itself."""
    mask = None
    with torch.no_grad():
        for name, indices in groups:
            module = layer.lora_dropout[name] if name in layer.lora_dropout else None
            if module is None or isinstance(module, nn.Identity):
                continue
            drawn = module(torch.ones((len(indices), *x.shape[1:]), dtype=dtype, device=x.device))
            if mask is None:
                mask = torch.ones(x.shape, dtype=dtype, device=x.device)
            mask[indices] = drawn
    rows = x.to(dtype)
    return rows if mask is None else rows * mask


def _base_and_delta(layer, x, args, kwargs, rows, lora_input, A, B, batch, scales, ranks) -> torch.Tensor:
    """The base layer's output for x plus the inference delta of ``lora_input``: one
    fused_lora_linear call when the base layer is a plain Linear and the delta reads x's own
    ``rows`` (no dropout applied; one kernel for decode-sized CPU batches), else the base layer
    then the delta."""
    fusable = _fusable_base(layer, rows, A) if not args and not kwargs and lora_input is rows else None
    if fusable is not None:
        _, weight, bias = fusable
        y = fused_lora_linear(lora_input, weight, bias, A, B, batch, scales, ranks, check_args=False)
        return y.view(*x.shape[:-1], y.shape[-1])  # half the cost of building a Size
    result = layer._modules["base_layer"](x, *args, **kwargs)
    return _add_delta(result, layer._cast_input_dtype(lora_input, A.dtype), A, B, batch, scales, ranks, None)


def _fusable_base(layer: nn.Module, rows: torch.Tensor, A: torch.Tensor) -> tuple | None:
    """``(base layer, weight, bias)`` when the base layer is a plain Linear of the dtype of
    ``rows`` and ``A``, so that ``fused_lora_linear`` may compute it with the delta; else None."""
    base = layer._modules["base_layer"]
    if not plain_linear(base):
        return None
    weight = base._parameters["weight"]
    if not rows.dtype == A.dtype == weight.dtype:
        return None
    return base, weight, base._parameters["bias"]


def _peft_forward(layer, x, adapter_names, args, kwargs):
    if adapter_names is not None:
        kwargs = dict(kwargs, adapter_names=adapter_names)
    return _original_forward(layer)(x, *args, **kwargs)


def _single_adapter(layer: nn.Module, layer_state: _LayerState, x, args, kwargs, name: str) -> torch.Tensor:
    """Every token through the one active adapter."""
    weight_A, weight_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    rows = layer._cast_input_dtype(x, weight_A.dtype).reshape(-1, x.shape[-1])
    lora_input = layer.lora_dropout[name](rows)  # rows itself when dropout is off or in eval
    model_state = layer_state.model_state
    if torch.is_grad_enabled() and (weight_A.requires_grad or weight_B.requires_grad):
        # training: PEFT's parameters themselves as a one-slot stack (views), so gradients reach them
        result = _base_output(layer, x, x.reshape(-1, x.shape[-1]), args, kwargs)
        batch = model_state.one_slot_batch(rows.shape[0], rows.device)
        scales = layer_state.one_scale(float(layer.scaling[name]), rows.device, weight_A.dtype)
        result = _add_delta(result, lora_input, weight_A[None], weight_B[None], batch, scales, None, None)
        return result.view(*x.shape[:-1], result.shape[-1])
    slot_of = model_state.slot_of()
    batch = model_state.batch([name], rows.shape[0], rows.device)
    A, B, scales, ranks = layer_state.inference_stacks(layer, slot_of, (name,))
    return _base_and_delta(layer, x, args, kwargs, rows, lora_input, A, B, batch, scales, ranks)


def _base_output(layer: nn.Module, x: torch.Tensor, rows: torch.Tensor, args, kwargs) -> torch.Tensor:
    """The base layer's output for a training call, ``[T, d_out]`` for a plain Linear (computed on
    x's rows: the same GEMM), so that the delta goes in place into a tensor of its own. Added in
    place into a view of a ``[batch, seq, d_out]`` output instead, it would make autograd copy
    the whole output gradient in the backward (CopySlices: a clone and two copies per layer)."""
    base = layer._modules["base_layer"]
    if not args and not kwargs and plain_linear(base):
        return base(rows)
    return base(x, *args, **kwargs)


def _add_delta(result, lora_input, A, B, batch, scales, ranks, grad_slots) -> torch.Tensor:
    if result.dtype == A.dtype and result.is_contiguous():
        # (a 2-D result itself, not a view of it: see _base_output)
        out_rows = result if result.dim() == 2 else result.view(-1, result.shape[-1])
        lora_delta(
            lora_input, A, B, batch, scales, ranks, out=out_rows, grad_slots=grad_slots, check_args=False
        )
        return result
    delta = lora_delta(lora_input, A, B, batch, scales, ranks, grad_slots=grad_slots, check_args=False)
    return (result + delta.view(result.shape)).to(result.dtype)

"""Adapter stacks: many LoRA adapters side by side in slots, loaded from and saved to PEFT's format.

``AdapterStack`` holds one target module's slots (``A [S, max_rank, d_in]``, ``B [S, d_out,
max_rank]``, ``ranks [S]``, ``scales [S]``), the tensors lora_fast.ops take. ``AdapterStacks``
holds the stacks of every target module of a model and maps adapter names to slots. A slot that
an adapter leaves empty in some module has rank 0 there and adds nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from . import _checks as check
from .batch import NO_ADAPTER

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
BASE_ADAPTER_NAME = "__base__"  # PEFT's name for "no adapter" in mixed batches

# PEFT's keys: "base_model.model.<module>.lora_A.weight" (the adapter name is stripped on save;
# an unprocessed state dict has "lora_A.<adapter>.weight").
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA",
    "lora_embedding_A": "embedding LoRA",
    "lora_embedding_B": "embedding LoRA",
    "lora_B.bias": "LoRA bias (lora_bias=True)",
}


class AdapterStack(nn.Module):
    """Slots of one target module: the tensors that ``lora_fast.ops.lora_delta`` takes.

    Args:
        num_slots: S, how many adapters fit.
        d_in, d_out: the module's input and output features.
        max_rank: r_max; each slot's own rank may be anything in [0, max_rank].
    """

    def __init__(
        self,
        num_slots: int,
        d_in: int,
        d_out: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_slots", num_slots),
            ("d_in", d_in),
            ("d_out", d_out),
            ("max_rank", max_rank),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.A = nn.Parameter(
            torch.zeros(num_slots, max_rank, d_in, dtype=dtype, device=device), requires_grad=False
        )
        self.B = nn.Parameter(
            torch.zeros(num_slots, d_out, max_rank, dtype=dtype, device=device), requires_grad=False
        )
        self.register_buffer("ranks", torch.zeros(num_slots, dtype=torch.int64, device=device))
        self.register_buffer("scales", torch.zeros(num_slots, dtype=check.scales_dtype(dtype), device=device))

    def _apply(self, fn, recurse=True):
        # module.half() / .double() / .to(dtype) convert every floating buffer; the scales stay
        # in the dtype the ops take for the new weights (float32, float64 for float64 weights)
        super()._apply(fn, recurse)
        wanted = check.scales_dtype(self.A.dtype)
        if self.scales.dtype != wanted:
            self.scales = self.scales.to(wanted)
        return self

    @property
    def num_slots(self) -> int:
        return self.A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.A.shape[1]

    @property
    def d_in(self) -> int:
        return self.A.shape[2]

    @property
    def d_out(self) -> int:
        return self.B.shape[1]

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Put an adapter's ``A [r, d_in]``, ``B [d_out, r]`` and scale into ``slot``."""
        self._check_slot(slot)
        if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[1] != self.d_in:
            raise ValueError(f"A must be [rank, d_in={self.d_in}], got {_shape(A)}")
        rank = A.shape[0]
        if not isinstance(B, torch.Tensor) or B.dim() != 2 or tuple(B.shape) != (self.d_out, rank):
            raise ValueError(f"B must be [d_out={self.d_out}, rank={rank}] to match A, got {_shape(B)}")
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds max_rank={self.max_rank} of this stack")
        if not A.dtype.is_floating_point or not B.dtype.is_floating_point:
            raise TypeError(f"A and B must be floating point, got {A.dtype} and {B.dtype}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.A[slot, :rank].copy_(A)
            self.B[slot, :, :rank].copy_(B)
            self.ranks[slot] = rank
            self.scales[slot] = float(scale)

    def clear_slot(self, slot: int) -> None:
        """Empty ``slot``: rank 0, zero weights."""
        self._check_slot(slot)
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.ranks[slot] = 0
            self.scales[slot] = 0.0

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A [r, d_in], B [d_out, r], scale)`` of ``slot`` (views, r = its rank)."""
        self._check_slot(slot)
        rank = int(self.ranks[slot])
        return self.A[slot, :rank], self.B[slot, :, :rank], float(self.scales[slot])

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in [0, {self.num_slots}), got {slot!r}")

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, d_in={self.d_in}, d_out={self.d_out}, max_rank={self.max_rank}"


class AdapterStacks:
    """Named adapters in slots across every target module of a model.

    Args:
        num_slots: how many adapters can be loaded at once.
        max_rank: the largest rank any adapter may have in any module.
        dtype, device: of the stacked weights.

    Module names are the base model's (``model.layers.0.self_attn.q_proj``), as in PEFT's files
    after their ``base_model.model.`` prefix.
    """

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("num_slots", num_slots), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._stacks: dict[str, AdapterStack] = {}
        self._slot_names: list[str | None] = [None] * num_slots
        self._configs: dict[str, dict] = {}

    # -- lookup -------------------------------------------------------------------------------

    def __getitem__(self, module: str) -> AdapterStack:
        if module not in self._stacks:
            raise KeyError(f"no adapter targets module {module!r}; modules: {sorted(self._stacks)}")
        return self._stacks[module]

    def __contains__(self, name: object) -> bool:
        return name in self._slot_names

    def __len__(self) -> int:
        return sum(name is not None for name in self._slot_names)

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._slot_names if name is not None)

    @property
    def modules(self) -> list[str]:
        return sorted(self._stacks)

    @property
    def slot_names(self) -> list[str | None]:
        """Adapter name per slot (None for a free slot)."""
        return list(self._slot_names)

    def slot_of(self, name: str) -> int:
        if name not in self._slot_names:
            loaded = [n for n in self._slot_names if n is not None]
            raise KeyError(f"adapter {name!r} is not loaded; loaded adapters: {loaded}")
        return self._slot_names.index(name)

    def slot_ids(self, names: Sequence[str | None]) -> torch.Tensor:
        """Slot per name (int64), ``-1`` for None or ``"__base__"``: the ids an AdapterBatch takes."""
        ids = [NO_ADAPTER if n is None or n == BASE_ADAPTER_NAME else self.slot_of(n) for n in names]
        return torch.tensor(ids, dtype=torch.int64)

    def config(self, name: str) -> dict:
        """The adapter's PEFT config as a dict (as loaded, or synthesised for added adapters)."""
        self.slot_of(name)
        return dict(self._configs[name])

    # -- add / remove / replace ---------------------------------------------------------------

    def add(
        self,
        name: str,
        weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        scales: float | Mapping[str, float],
        config: dict | None = None,
    ) -> int:
        """Load an adapter into a free slot and return the slot.

        Args:
            weights: module name -> ``(A [r, d_in], B [d_out, r])`` (PEFT's lora_A / lora_B weights).
            scales: one scale for every module, or one per module.
            config: the PEFT config to save with it; synthesised from ranks and scales if None.
        """
        if not isinstance(name, str) or not name or name == BASE_ADAPTER_NAME:
            raise ValueError(
                f"adapter name must be a non-empty str other than {BASE_ADAPTER_NAME!r}, got {name!r}"
            )
        if name in self._slot_names:
            raise ValueError(f"adapter {name!r} is already loaded (slot {self.slot_of(name)}); use replace()")
        if None not in self._slot_names:
            raise ValueError(f"no free slot for adapter {name!r}: all {self.num_slots} slots are in use")
        slot = self._slot_names.index(None)
        self._write(slot, name, weights, scales, config)
        return slot

    def replace(
        self,
        name: str,
        weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        scales: float | Mapping[str, float],
        config: dict | None = None,
    ) -> int:
        """Swap a loaded adapter's weights in place (same slot); returns the slot."""
        slot = self.slot_of(name)
        self._write(slot, name, weights, scales, config)
        return slot

    def remove(self, name: str) -> int:
        """Unload an adapter; returns the slot it freed."""
        slot = self.slot_of(name)
        for stack in self._stacks.values():
            stack.clear_slot(slot)
        self._slot_names[slot] = None
        del self._configs[name]
        return slot

    def adapter_weights(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Module -> ``(A [r, d_in], B [d_out, r], scale)`` for every module the adapter targets."""
        slot = self.slot_of(name)
        found = {}
        for module, stack in sorted(self._stacks.items()):
            if int(stack.ranks[slot]) > 0:
                found[module] = stack.slot_weights(slot)
        return found

    def _write(self, slot, name, weights, scales, config) -> None:
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(f"adapter {name!r}: weights must be a non-empty mapping module -> (A, B)")
        checked = {}
        for module, pair in weights.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"adapter {name!r}, module {module!r}: expected an (A, B) pair")
            A, B = pair
            if (
                not isinstance(A, torch.Tensor)
                or not isinstance(B, torch.Tensor)
                or A.dim() != 2
                or B.dim() != 2
            ):
                raise ValueError(
                    f"adapter {name!r}, module {module!r}: A and B must be 2-D tensors, "
                    f"got {_shape(A)} and {_shape(B)}"
                )
            if not A.dtype.is_floating_point or not B.dtype.is_floating_point:
                raise TypeError(f"adapter {name!r}, module {module!r}: A and B must be floating point")
            if B.shape[1] != A.shape[0]:
                raise ValueError(
                    f"adapter {name!r}, module {module!r}: A is {tuple(A.shape)} and B is {tuple(B.shape)}; "
                    "B.shape[1] must equal the rank A.shape[0]"
                )
            if A.shape[0] > self.max_rank:
                raise ValueError(
                    f"adapter {name!r}, module {module!r}: rank {A.shape[0]} exceeds max_rank={self.max_rank}"
                )
            existing = self._stacks.get(module)
            if existing is not None and (existing.d_in, existing.d_out) != (A.shape[1], B.shape[0]):
                raise ValueError(
                    f"adapter {name!r}, module {module!r}: shape d_in={A.shape[1]}, d_out={B.shape[0]} "
                    f"differs from the loaded adapters' d_in={existing.d_in}, d_out={existing.d_out}"
                )
            if isinstance(scales, Mapping) and module not in scales:
                raise ValueError(f"adapter {name!r}, module {module!r}: scales has no entry for this module")
            scale = scales[module] if isinstance(scales, Mapping) else scales
            checked[module] = (A, B, float(scale))
        for module, (A, B, _) in checked.items():
            if module not in self._stacks:
                self._stacks[module] = AdapterStack(
                    self.num_slots, A.shape[1], B.shape[0], self.max_rank, self.dtype, self.device
                )
        for module, stack in self._stacks.items():
            if module in checked:
                A, B, scale = checked[module]
                stack.set_slot(slot, A, B, scale)
            else:
                stack.clear_slot(slot)
        self._slot_names[slot] = name
        self._configs[name] = config if config is not None else _synthesised_config(checked)

    # -- PEFT files ---------------------------------------------------------------------------

    def load_peft(self, path: str | Path, name: str | None = None) -> int:
        """Load a PEFT LoRA adapter folder (adapter_config.json + weights); returns its slot."""
        path = Path(path)
        name = name if name is not None else path.name
        config = _read_config(path)
        weights = _read_weights(path, name)
        scales = {}
        for module, (A, _) in weights.items():
            rank, alpha = _rank_and_alpha(config, module)
            if rank != A.shape[0]:
                raise ValueError(
                    f"adapter {name!r}, module {module!r}: the config gives rank {rank} but lora_A has "
                    f"{A.shape[0]} rows"
                )
            scales[module] = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        return self.add(name, weights, scales, config)

    def save_peft(self, name: str, path: str | Path) -> Path:
        """Write adapter ``name`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads."""
        from safetensors.torch import save_file

        weights = self.adapter_weights(name)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module, (A, B, _) in weights.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = A.detach().to("cpu").contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = B.detach().to("cpu").contiguous()
        save_file(tensors, str(path / SAFETENSORS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(
            json.dumps(self._configs[name], indent=2, sort_keys=True, default=list)
        )
        return path

    # -- placement ----------------------------------------------------------------------------

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AdapterStacks:
        """Move every stack (in place) and return self."""
        for stack in self._stacks.values():
            stack.to(device=device)
            if dtype is not None:
                stack.A.data = stack.A.data.to(dtype)
                stack.B.data = stack.B.data.to(dtype)
                stack.scales = stack.scales.to(check.scales_dtype(dtype))
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def __repr__(self) -> str:
        return (
            f"AdapterStacks(num_slots={self.num_slots}, max_rank={self.max_rank}, adapters={list(self)}, "
            f"modules={len(self._stacks)})"
        )


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _read_config(path: Path) -> dict:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"{path} is not a PEFT adapter folder: {CONFIG_NAME} is missing")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters (use_dora=true) are not supported by lora_fast stacks")
    if config.get("lora_bias"):
        raise ValueError(f"{path}: adapters with lora_bias=true are not supported by lora_fast stacks")
    return config


def _read_weights(path: Path, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if (path / SAFETENSORS_NAME).is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / SAFETENSORS_NAME))
    elif (path / BIN_NAME).is_file():
        state = torch.load(path / BIN_NAME, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: neither {SAFETENSORS_NAME} nor {BIN_NAME} is present")
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise ValueError(f"adapter {name!r}: {key} is {what}, which lora_fast stacks do not support")
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"adapter {name!r}: unexpected tensor {key!r} in the adapter file")
        if tensor.dim() != 2:
            raise ValueError(
                f"adapter {name!r}, module {match['module']!r}: lora_{match['side']} has shape "
                f"{tuple(tensor.shape)}; only Linear LoRA (2-D weights) is supported"
            )
        sides.setdefault(match["module"], {})[match["side"]] = tensor
    weights = {}
    for module, pair in sides.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter {name!r}, module {module!r}: lora_A or lora_B is missing")
        weights[module] = (pair["A"], pair["B"])
    if not weights:
        raise ValueError(f"adapter {name!r}: the adapter file holds no LoRA weights")
    return weights


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    # PEFT's rule: a pattern key matches a module whose name ends with it (at a dot boundary).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _rank_and_alpha(config: Mapping, module: str) -> tuple[int, float]:
    rank = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return rank, alpha


def _synthesised_config(checked: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict:
    """A LoraConfig (as a dict) whose r / lora_alpha / patterns reproduce these ranks and scales."""
    from peft import LoraConfig

    ranks = {module: A.shape[0] for module, (A, _, _) in checked.items()}
    alphas = {module: scale * ranks[module] for module, (_, _, scale) in checked.items()}
    r = max(ranks.values(), key=list(ranks.values()).count)
    alpha = max(alphas.values(), key=list(alphas.values()).count)
    rank_pattern = {re.escape(m): v for m, v in ranks.items() if v != r}
    alpha_pattern = {re.escape(m): v for m, v in alphas.items() if v != alpha}
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    ).to_dict()
    return json.loads(json.dumps(config, default=_json_default))


def _json_default(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # enums such as TaskType
        return value.value
    return str(value)

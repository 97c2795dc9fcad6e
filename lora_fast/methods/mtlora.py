"""MTLoRA (arXiv 2403.20320): task-agnostic + task-specific LoRA, trained on mixed-task batches.

Generalised from the paper's Swin code to any model built of nn.Linear layers:

- **Task-agnostic LoRA** (TA, one per targeted Linear, shared by every task) on the layers an
  ``MTLoRAPlacement`` names as shared; **task-specific LoRA** (TS, one slot per task) on the layers
  it names as task-specific (paper: the last block of each stage; for a decoder LLM, the o / MLP
  projections of the last N layers: ``MTLoRAPlacement.decoder``).
- **Mixed-task batches**: each token's task is its slot in an ``AdapterBatch`` (``task_batch``);
  the TS delta of every task is one ``lora_delta`` launch per layer, forward and backward, and the
  TA delta is one dense low-rank product for all tokens. No per-task Python loop.
- **Modes** at a layer with TS modules: ``"matrix"`` (the paper's task path: a task's tokens get
  ``W x + s_t B_t A_t x``, the shared delta only reaching tokens without a task) or ``"add"``
  (``W x + s B A x + s_t B_t A_t x``).
- **Recipe** (paper, scaled to the model): TA rank 64 / TS rank 4 on a ViT-B-sized model (here
  defaults 32 / 4), scale 4, LoRA dropout 0.05, per-task loss weights, per-task heads where the tasks
  need them (``check_task_heads``).
- **Files**: ``save_task_peft`` writes one PEFT adapter per task (TA merged with that task's TS:
  ranks concatenated, exact), ``save_modules_peft`` the raw TA and TS modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import AdapterStacks
from ..batch import AdapterBatch
from ..layers import current_batch, remove_adapters
from ..ops import lora_delta

MODES = ("matrix", "add")
DECODER_SHARED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DECODER_TASK = ("o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MTLoRAPlacement:
    """Which nn.Linear layers get TA modules and which get TS modules: regular expressions that
    must match a module's full name (``re.fullmatch``)."""

    shared: tuple[str, ...]
    task_specific: tuple[str, ...]

    @classmethod
    def decoder(
        cls,
        num_layers: int,
        last_n: int = 2,
        shared: Sequence[str] = DECODER_SHARED,
        task_specific: Sequence[str] = DECODER_TASK,
        layers_prefix: str = "model.layers",
    ) -> MTLoRAPlacement:
        """A decoder LLM: TA on ``shared`` projections of every layer, TS on ``task_specific``
        projections of the last ``last_n`` layers."""
        if not 1 <= last_n <= num_layers:
            raise ValueError(f"last_n must be in [1, num_layers={num_layers}], got {last_n}")
        prefix = re.escape(layers_prefix)
        last = "|".join(str(i) for i in range(num_layers - last_n, num_layers))
        return cls(
            shared=(rf"{prefix}\.\d+\..*\.({'|'.join(shared)})",),
            task_specific=(rf"{prefix}\.({last})\..*\.({'|'.join(task_specific)})",),
        )

    def resolve(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """``(shared layer names, task-specific layer names)``; ValueError for a pattern that
        matches no nn.Linear of ``model``."""
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        found = []
        for kind, patterns in (("shared", self.shared), ("task_specific", self.task_specific)):
            names = []
            for pattern in patterns:
                matched = [name for name in linears if re.fullmatch(pattern, name)]
                if not matched:
                    raise ValueError(
                        f"placement {kind} pattern {pattern!r} matches no nn.Linear of the model"
                    )
                names += [name for name in matched if name not in names]
            found.append(names)
        return found[0], found[1]


class MTLoRALinear(nn.Module):
    """A base nn.Linear with a task-agnostic LoRA (``shared_rank`` > 0) and one task-specific LoRA
    per task (``task_rank`` > 0). Run it inside ``lora_fast.adapter_batch(task_batch(...))``.

    Parameters: ``shared_A [r_sh, d_in]``, ``shared_B [d_out, r_sh]``, ``task_A [tasks, r_t, d_in]``,
    ``task_B [tasks, d_out, r_t]`` (PEFT's initialisation: A kaiming-uniform, B zero).
    """

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        shared_rank: int,
        task_rank: int,
        shared_scale: float = 4.0,
        task_scale: float = 4.0,
        mode: str = "matrix",
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if shared_rank < 0 or task_rank < 0 or shared_rank + task_rank == 0:
            raise ValueError(f"ranks must be >= 0 and not both 0, got shared {shared_rank}, task {task_rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.mode = mode
        self.dropout = dropout
        self.shared_scale = float(shared_scale)
        d_in, d_out = base.in_features, base.out_features
        dtype, device = base.weight.dtype, base.weight.device
        bound = 1.0 / d_in**0.5  # kaiming_uniform_(a=sqrt(5)), as PEFT initialises lora_A

        def uniform(*shape: int) -> nn.Parameter:
            values = (torch.rand(*shape, generator=generator) * 2 - 1) * bound
            return nn.Parameter(values.to(device, dtype))

        self.shared_A = uniform(shared_rank, d_in) if shared_rank else None
        self.shared_B = (
            nn.Parameter(torch.zeros(d_out, shared_rank, dtype=dtype, device=device)) if shared_rank else None
        )
        self.task_A = uniform(num_tasks, task_rank, d_in) if task_rank else None
        self.task_B = (
            nn.Parameter(torch.zeros(num_tasks, d_out, task_rank, dtype=dtype, device=device))
            if task_rank
            else None
        )
        self.register_buffer("task_scales", torch.full((num_tasks,), float(task_scale), device=device))

    @property
    def num_tasks(self) -> int:
        return self.task_scales.shape[0]

    @property
    def has_task_modules(self) -> bool:
        return self.task_A is not None

    def forward(self, x: torch.Tensor, batch: AdapterBatch | None = None) -> torch.Tensor:
        batch = batch if batch is not None else current_batch()
        y = self.base(x)
        rows = x.reshape(-1, x.shape[-1])
        if self.dropout and self.training:
            rows = nn.functional.dropout(rows, self.dropout, training=True)
        delta = None
        if self.shared_A is not None:
            delta = (rows @ self.shared_A.T) @ self.shared_B.T * self.shared_scale
            if self.has_task_modules and self.mode == "matrix" and batch is not None:
                delta = delta * (batch.token_slots < 0).unsqueeze(1).to(delta.dtype)
        if self.has_task_modules and batch is not None and not batch.all_none:
            if batch.num_tokens != rows.shape[0]:
                raise ValueError(f"x has {rows.shape[0]} tokens but the task batch has {batch.num_tokens}")
            task_delta = lora_delta(rows, self.task_A, self.task_B, batch, self.task_scales, check_args=False)
            delta = task_delta if delta is None else delta + task_delta
        return y if delta is None else y + delta.view(y.shape).to(y.dtype)

    def task_weights(self, task: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The plain LoRA ``(A [r, d_in], B [d_out, r])`` with scale 1 that task ``task``'s tokens
        get here (TA and TS ranks concatenated, scales folded into B), None when there is none."""
        pieces = []
        if self.shared_A is not None and not (self.has_task_modules and self.mode == "matrix"):
            pieces.append((self.shared_A, self.shared_B * self.shared_scale))
        if self.has_task_modules:
            pieces.append((self.task_A[task], self.task_B[task] * self.task_scales[task]))
        if not pieces:
            return None
        return torch.cat([a for a, _ in pieces]).detach(), torch.cat([b for _, b in pieces], dim=1).detach()

    def extra_repr(self) -> str:
        shared = 0 if self.shared_A is None else self.shared_A.shape[0]
        task = 0 if self.task_A is None else self.task_A.shape[1]
        return f"tasks={self.num_tasks}, shared_rank={shared}, task_rank={task}, mode={self.mode!r}"


class MTLoRA:
    """MTLoRA layers injected into a model, with the task names their slots stand for."""

    def __init__(self, model: nn.Module, layers: Mapping[str, MTLoRALinear], tasks: Sequence[str]) -> None:
        self.model = model
        self.layers = dict(layers)
        self.tasks = list(tasks)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: every TA and TS module."""
        return [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]

    def num_parameters(self) -> dict[str, int]:
        shared = sum(
            layer.shared_A.numel() + layer.shared_B.numel()
            for layer in self.layers.values()
            if layer.shared_A is not None
        )
        task = sum(
            layer.task_A.numel() + layer.task_B.numel()
            for layer in self.layers.values()
            if layer.has_task_modules
        )
        return {"shared": shared, "task_specific": task, "total": shared + task}

    def task_ids(self, tasks: Sequence[str | None]) -> torch.Tensor:
        """Slot per task name (-1 for None); ValueError naming an unknown task."""
        ids = []
        for name in tasks:
            if name is not None and name not in self.tasks:
                raise ValueError(f"unknown task {name!r}; this MTLoRA has tasks {self.tasks}")
            ids.append(-1 if name is None else self.tasks.index(name))
        return torch.tensor(ids, dtype=torch.int64)

    def task_batch(self, tasks: Sequence[str | None], seq_len: int = 1) -> AdapterBatch:
        """The AdapterBatch of one step: one task name per sequence of ``seq_len`` tokens."""
        device = next(iter(self.layers.values())).base.weight.device
        return AdapterBatch(self.task_ids(tasks).to(device), len(self.tasks), seq_len=seq_len)

    def adapter_weights(self, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A, B)}`` of the plain LoRA (scale 1) equal to this task's MTLoRA delta."""
        slot = self.task_ids([task])[0].item()
        found = {}
        for name, layer in self.layers.items():
            weights = layer.task_weights(slot)
            if weights is not None:
                found[name] = weights
        return found

    def save_task_peft(self, task: str, path: str | Path) -> Path:
        """One PEFT adapter for ``task``: TA merged with its TS (exact), loadable by PEFT and lora_fast."""
        weights = self.adapter_weights(task)
        stacks = AdapterStacks(num_slots=1, max_rank=max(a.shape[0] for a, _ in weights.values()))
        stacks.add(task, {m: (a.float(), b.float()) for m, (a, b) in weights.items()}, scales=1.0)
        return stacks.save_peft(task, path)

    def save_modules_peft(self, path: str | Path) -> list[Path]:
        """The raw modules as PEFT adapters: ``<path>/shared`` (TA) and ``<path>/<task>_specific`` (TS)."""
        path = Path(path)
        written = []
        shared = {
            name: (layer.shared_A.detach().float(), layer.shared_B.detach().float())
            for name, layer in self.layers.items()
            if layer.shared_A is not None
        }
        if shared:
            rank = max(a.shape[0] for a, _ in shared.values())
            stacks = AdapterStacks(num_slots=1, max_rank=rank)
            scales = {name: self.layers[name].shared_scale for name in shared}
            stacks.add("shared", shared, scales=scales)
            written.append(stacks.save_peft("shared", path / "shared"))
        for slot, task in enumerate(self.tasks):
            specific = {
                name: (layer.task_A[slot].detach().float(), layer.task_B[slot].detach().float())
                for name, layer in self.layers.items()
                if layer.has_task_modules
            }
            if specific:
                rank = max(a.shape[0] for a, _ in specific.values())
                stacks = AdapterStacks(num_slots=1, max_rank=rank)
                scales = {name: float(self.layers[name].task_scales[slot]) for name in specific}
                stacks.add(f"{task}_specific", specific, scales=scales)
                written.append(stacks.save_peft(f"{task}_specific", path / f"{task}_specific"))
        return written

    def remove(self) -> None:
        """Put the base layers back."""
        remove_adapters(self.model, self.layers)


def inject_mtlora(
    model: nn.Module,
    placement: MTLoRAPlacement,
    tasks: Sequence[str],
    shared_rank: int = 32,
    task_rank: int = 4,
    shared_scale: float = 4.0,
    task_scale: float = 4.0,
    mode: str = "matrix",
    dropout: float = 0.05,
    seed: int = 0,
) -> MTLoRA:
    """Replace the placement's nn.Linear layers by MTLoRALinear layers (base weights frozen)."""
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct names, at least one, got {tasks}")
    shared, specific = placement.resolve(model)
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name in sorted(set(shared) | set(specific), key=[n for n, _ in model.named_modules()].index):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        base.requires_grad_(False)
        layer = MTLoRALinear(
            base,
            len(tasks),
            shared_rank if name in shared else 0,
            task_rank if name in specific else 0,
            shared_scale,
            task_scale,
            mode,
            dropout,
            generator,
        )
        setattr(parent, child, layer)
        layers[name] = layer
    return MTLoRA(model, layers, tasks)


def check_task_heads(tasks: Iterable[str], heads: Mapping[str, nn.Module]) -> None:
    """ValueError naming the first task without a head (before any training starts)."""
    missing = [task for task in tasks if task not in heads]
    if missing:
        raise ValueError(f"task {missing[0]!r} has no head; heads exist for {sorted(heads)}")


def delta_m(multi_task: Mapping[str, float], single_task: Mapping[str, float], lower_is_better=()) -> float:
    """The paper's multi-task gain: mean over tasks of ``(-1)^l (M_t - S_t) / S_t`` (l = 1 when
    lower is better for task t), in percent."""
    total = 0.0
    for task, single in single_task.items():
        sign = -1.0 if task in lower_is_better else 1.0
        total += sign * (multi_task[task] - single) / max(abs(single), 1e-12)
    return 100.0 * total / len(single_task)

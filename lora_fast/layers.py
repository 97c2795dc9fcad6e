"""MultiLoRALinear: a base nn.Linear plus a stack of LoRA adapters, each token using its own.

The AdapterBatch of a step is passed to ``forward`` or, for models whose forward does not know
about it (any Hugging Face model), set once around the model call with ``adapter_batch(batch)``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AdapterStack, AdapterStacks
from .batch import AdapterBatch
from .ops import fused_lora_linear, lora_delta

_current_batch: contextvars.ContextVar[AdapterBatch | None] = contextvars.ContextVar(
    "lora_fast_batch", default=None
)


def plain_linear(module: nn.Module) -> bool:
    """True when ``module(x)`` is exactly ``F.linear(x, module.weight, module.bias)``: an
    ``nn.Linear`` itself (no subclass) with no forward hooks but ``contiguous_rows`` (which
    changes no value), so its GEMM may run fused with a LoRA delta (``fused_lora_linear``)
    without changing what the model computes."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and all(hook is contiguous_rows for hook in module._forward_pre_hooks.values())
        and not _GLOBAL_HOOKS[0]
        and not _GLOBAL_HOOKS[1]
    )


def contiguous_rows(module: nn.Module, args: tuple):
    """Forward pre-hook: a 3-D (or higher) input that is not contiguous is copied first, so that
    torch's matmul runs it as one GEMM over all rows rather than one GEMM per leading index
    (``lora_fast.accelerate`` puts it on a PEFT model's frozen output projection)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


_GLOBAL_HOOKS = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)


@contextlib.contextmanager
def adapter_batch(batch: AdapterBatch | None) -> Iterator[AdapterBatch | None]:
    """Every MultiLoRALinear called inside the block without a batch uses this one."""
    token = _current_batch.set(batch)
    try:
        yield batch
    finally:
        _current_batch.reset(token)


def current_batch() -> AdapterBatch | None:
    return _current_batch.get()


class MultiLoRALinear(nn.Module):
    """``y = base(x) + scales[a] * B[a] A[a] dropout(x)`` with each token's slot a (none: base only).

    Args:
        base: the frozen base layer.
        stack: the adapters of this layer (``stack.d_in == base.in_features`` etc.).
        dropout: LoRA dropout on the adapter input, as PEFT's ``lora_dropout`` (training only).

    Slots are frozen until ``train_slots`` makes some of them trainable; their weights then live
    in ``self.lora_A[str(slot)] [rank, d_in]`` / ``self.lora_B[str(slot)] [d_out, rank]`` (PEFT's
    shapes) and only they receive gradients, the frozen slots costing no gradient work.
    ``freeze_slots`` writes them back into the stack.
    """

    def __init__(self, base: nn.Linear, stack: AdapterStack, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(stack, AdapterStack):
            raise TypeError(f"stack must be an AdapterStack, got {type(stack).__name__}")
        if (stack.d_in, stack.d_out) != (base.in_features, base.out_features):
            raise ValueError(
                f"stack is d_in={stack.d_in}, d_out={stack.d_out} but base is "
                f"in_features={base.in_features}, out_features={base.out_features}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.stack = stack
        self.dropout = dropout
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.register_buffer(
            "grad_slots", torch.zeros(stack.num_slots, dtype=torch.bool, device=stack.A.device)
        )

    # -- training -----------------------------------------------------------------------------

    def train_slots(self, slots: Iterable[int]) -> list[nn.Parameter]:
        """Make ``slots`` trainable; returns their new parameters (A then B per slot)."""
        created = []
        for slot in slots:
            self.stack._check_slot(slot)
            if str(slot) in self.lora_A:
                continue
            A, B, _ = self.stack.slot_weights(slot)
            self.lora_A[str(slot)] = nn.Parameter(A.detach().clone())
            self.lora_B[str(slot)] = nn.Parameter(B.detach().clone())
            self.grad_slots[slot] = True
            created += [self.lora_A[str(slot)], self.lora_B[str(slot)]]
        return created

    def freeze_slots(self, slots: Iterable[int] | None = None) -> None:
        """Write trained slots (default: all) back into the stack and make them frozen again."""
        for slot in list(int(s) for s in self.lora_A) if slots is None else slots:
            if str(slot) not in self.lora_A:
                continue
            A = self.lora_A.pop(str(slot))
            B = self.lora_B.pop(str(slot))
            with torch.no_grad():
                self.stack.A[slot, : A.shape[0]].copy_(A)
                self.stack.B[slot, :, : B.shape[1]].copy_(B)
            self.grad_slots[slot] = False

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(A [S, r_max, d_in], B [S, d_out, r_max])`` the op takes: trained slots from
        their parameters (so gradients reach them), the rest from the stack."""
        if not len(self.lora_A):
            return self.stack.A, self.stack.B
        r_max = self.stack.max_rank
        a_slots, b_slots = [], []
        for slot in range(self.stack.num_slots):
            if str(slot) in self.lora_A:
                A, B = self.lora_A[str(slot)], self.lora_B[str(slot)]
                if A.shape[0] != r_max:  # (a full-rank slot goes in as it is: no copy)
                    A, B = F.pad(A, (0, 0, 0, r_max - A.shape[0])), F.pad(B, (0, r_max - B.shape[1]))
                a_slots.append(A)
                b_slots.append(B)
            else:
                a_slots.append(self.stack.A[slot])
                b_slots.append(self.stack.B[slot])
        return torch.stack(a_slots), torch.stack(b_slots)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, batch: AdapterBatch | None = None) -> torch.Tensor:
        batch = batch if batch is not None else current_batch()
        if batch is None or batch.all_none:
            return self.base(x)
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] != batch.num_tokens:
            raise ValueError(
                f"x has {rows.shape[0]} tokens (shape {tuple(x.shape)}) but the batch has {batch.num_tokens}"
            )
        A, B = self.weights()
        lora_input = rows.to(A.dtype)
        if self.dropout and self.training:
            lora_input = F.dropout(lora_input, self.dropout, training=True)
        grad_slots = self.grad_slots if len(self.lora_A) else None
        scales, ranks = self.stack.scales, self.stack.ranks
        if (
            grad_slots is None
            and lora_input is rows
            and plain_linear(self.base)
            and self.base.weight.dtype == A.dtype
        ):
            y = fused_lora_linear(
                rows, self.base.weight, self.base.bias, A, B, batch, scales, ranks, check_args=False
            )
            return y.view(*x.shape[:-1], y.shape[-1])
        # A plain Linear's output is computed on x's rows: the delta then goes in place into a
        # tensor of its own. In place into a view of a [batch, seq, d_out] output, it would make
        # autograd copy the whole output gradient in the backward (CopySlices).
        y = self.base(rows) if plain_linear(self.base) else self.base(x)
        if y.dtype == A.dtype:  # add into the base output (autograd-aware inside lora_delta)
            out = y if y.dim() == 2 else y.view(-1, y.shape[-1])
            lora_delta(
                lora_input, A, B, batch, scales, ranks, out=out, grad_slots=grad_slots, check_args=False
            )
            return y.view(*x.shape[:-1], y.shape[-1])
        delta = lora_delta(lora_input, A, B, batch, scales, ranks, grad_slots=grad_slots, check_args=False)
        return (y.reshape(-1, y.shape[-1]) + delta.to(y.dtype)).view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        trained = sorted(int(s) for s in self.lora_A)
        return f"dropout={self.dropout}, trained_slots={trained}"


def inject_adapters(
    model: nn.Module, stacks: AdapterStacks, dropout: float = 0.0
) -> dict[str, MultiLoRALinear]:
    """Replace every nn.Linear of ``model`` that ``stacks`` has adapters for by a MultiLoRALinear.

    Returns the new layers by module name. Run the model inside ``adapter_batch(batch)``.
    """
    replaced = {}
    for name in stacks.modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child, None)
        if isinstance(base, MultiLoRALinear):
            base = base.base
        if not isinstance(base, nn.Linear):
            raise ValueError(f"module {name!r} of the model is {type(base).__name__}, not an nn.Linear")
        layer = MultiLoRALinear(base, stacks[name], dropout)
        setattr(parent, child, layer)
        replaced[name] = layer
    return replaced


def remove_adapters(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Undo ``inject_adapters`` (or any injection of wrappers with a ``.base``): put each layer's
    base nn.Linear back in its place."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)

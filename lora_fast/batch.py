"""AdapterBatch: which adapter slot each token of a batch uses, prepared once per forward step.

Every LoRA layer of a model reuses the same AdapterBatch, so the sort that groups tokens by slot
happens once per step, never once per layer.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from functools import cached_property

import torch

NO_ADAPTER = -1


class AdapterBatch:
    """Token-to-slot mapping of one batch, grouped by slot.

    Args:
        adapter_ids: integer slot per token, or per sequence when ``seq_len`` is given;
            ``-1`` means no adapter. Any shape (flattened in row-major order, the order of
            ``x.reshape(-1, d)``), a tensor or a sequence of ints.
        num_slots: number of slots S of the adapter stacks the batch will be used with.
        seq_len: ``None`` (ids are per token), an int (every sequence has that many tokens), or
            one length per sequence (an int sequence or 1-D tensor).
        device: where the metadata lives; defaults to the device of ``adapter_ids``.
        validate: check that ids lie in ``[-1, num_slots)``. On CUDA ids this reads one scalar back
            to the host, once per step.

    Attributes (all int64 tensors on ``device``):
        token_slots: ``[T]`` slot of each token, ``-1`` for none.
        token_order: ``[T]`` token indices sorted by slot (stable), no-adapter tokens first.
        segment_starts: ``[S]`` where slot s's tokens begin in ``token_order``.
        segment_lengths: ``[S]`` how many tokens use slot s (0 for an inactive slot).
    """

    def __init__(
        self,
        adapter_ids: torch.Tensor | Sequence[int],
        num_slots: int,
        seq_len: int | Sequence[int] | torch.Tensor | None = None,
        device: torch.device | str | None = None,
        validate: bool = True,
    ) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        ids = _as_id_tensor(adapter_ids, "adapter_ids")
        if device is not None:
            ids = ids.to(device)
        ids = ids.reshape(-1).to(torch.int64)
        if seq_len is not None:
            ids = _expand_per_sequence(ids, seq_len)
        if validate and ids.numel() > 0:
            low, high = torch.aminmax(ids)
            low, high = int(low), int(high)
            if low < NO_ADAPTER or high >= num_slots:
                bad = low if low < NO_ADAPTER else high
                raise ValueError(
                    f"adapter_ids must lie in [-1, {num_slots}) (num_slots={num_slots}), found {bad}"
                )

        self.num_slots = num_slots
        self.token_slots = ids
        sorted_slots, self.token_order = torch.sort(ids, stable=True)
        slots = torch.arange(num_slots, device=ids.device, dtype=torch.int64)
        # searchsorted keeps this on the device: bincount would read its output size back.
        self.segment_starts = torch.searchsorted(sorted_slots, slots)
        segment_ends = torch.searchsorted(sorted_slots, slots, right=True)
        self.segment_lengths = segment_ends - self.segment_starts

    @property
    def num_tokens(self) -> int:
        return self.token_slots.numel()

    @property
    def device(self) -> torch.device:
        return self.token_slots.device

    # The properties below read values back to the host (free on CPU, one sync on CUDA) and are
    # computed on first use only.

    @cached_property
    def active_slots(self) -> torch.Tensor:
        """Slots used by at least one token, ascending (int64)."""
        return torch.nonzero(self.segment_lengths).reshape(-1)

    @cached_property
    def num_no_adapter(self) -> int:
        return int(self.num_tokens - self.segment_lengths.sum())

    @property
    def no_adapter_tokens(self) -> torch.Tensor:
        """Indices of the tokens with no adapter, ascending."""
        return self.token_order[: self.num_no_adapter]

    @property
    def all_none(self) -> bool:
        """True when no token uses an adapter (including an empty batch)."""
        return self.num_no_adapter == self.num_tokens

    @cached_property
    def single_slot(self) -> int | None:
        """The slot when every token uses the same one, else None."""
        if self.num_tokens == 0 or self.num_no_adapter > 0:
            return None
        first = int(self.token_slots[0])
        return first if int(self.segment_lengths[first]) == self.num_tokens else None

    @property
    def metadata(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token_slots, token_order, segment_starts, segment_lengths): what the ops hand to kernels."""
        return self.token_slots, self.token_order, self.segment_starts, self.segment_lengths

    @classmethod
    def from_metadata(
        cls,
        token_slots: torch.Tensor,
        token_order: torch.Tensor,
        segment_starts: torch.Tensor,
        segment_lengths: torch.Tensor,
    ) -> AdapterBatch:
        """Rebuild a batch from its ``metadata`` tensors, without sorting or checking again."""
        batch = object.__new__(cls)
        batch.num_slots = segment_starts.numel()
        batch.token_slots = token_slots
        batch.token_order = token_order
        batch.segment_starts = segment_starts
        batch.segment_lengths = segment_lengths
        return batch

    def to(self, device: torch.device | str) -> AdapterBatch:
        """The same batch with its metadata on ``device``."""
        return AdapterBatch.from_metadata(*(t.to(device) for t in self.metadata))

    def __repr__(self) -> str:
        return f"AdapterBatch(num_tokens={self.num_tokens}, num_slots={self.num_slots}, device={self.device})"


def _as_id_tensor(values: torch.Tensor | Sequence[int], name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {values.dtype}")
        return values
    values = list(values)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be an integer tensor or a sequence of ints")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def _expand_per_sequence(
    sequence_ids: torch.Tensor, seq_len: int | Sequence[int] | torch.Tensor
) -> torch.Tensor:
    if isinstance(seq_len, int) and not isinstance(seq_len, bool):
        if seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {seq_len}")
        return sequence_ids.repeat_interleave(seq_len)
    lengths = _as_id_tensor(seq_len, "seq_len").reshape(-1).to(sequence_ids.device, torch.int64)
    if lengths.numel() != sequence_ids.numel():
        raise ValueError(
            f"seq_len has {lengths.numel()} lengths but adapter_ids has {sequence_ids.numel()} sequences"
        )
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("seq_len lengths must be >= 0")
    return sequence_ids.repeat_interleave(lengths)

import pytest
import torch

from lora_fast import AdapterBatch


def test_groups_tokens_by_slot_stably_with_no_adapter_tokens_first():
    ids = torch.tensor([2, -1, 0, 2, 0, -1, 2])
    batch = AdapterBatch(ids, num_slots=4)
    assert batch.token_order.tolist() == [1, 5, 2, 4, 0, 3, 6]
    assert batch.segment_starts.tolist() == [2, 4, 4, 7]
    assert batch.segment_lengths.tolist() == [2, 0, 3, 0]
    assert batch.active_slots.tolist() == [0, 2]
    assert batch.no_adapter_tokens.tolist() == [1, 5]
    assert batch.num_tokens == 7 and not batch.all_none and batch.single_slot is None
    for slot in range(4):
        start, length = int(batch.segment_starts[slot]), int(batch.segment_lengths[slot])
        assert (batch.token_slots[batch.token_order[start : start + length]] == slot).all()


def test_random_ids_partition_every_token_exactly_once():
    ids = torch.randint(-1, 9, (1000,))
    batch = AdapterBatch(ids, num_slots=9)
    assert sorted(batch.token_order.tolist()) == list(range(1000))
    assert int(batch.segment_lengths.sum()) + batch.num_no_adapter == 1000
    assert batch.segment_lengths.tolist() == [int((ids == s).sum()) for s in range(9)]


def test_per_sequence_ids_expand_by_fixed_and_variable_lengths():
    fixed = AdapterBatch([1, -1, 0], num_slots=2, seq_len=2)
    assert fixed.token_slots.tolist() == [1, 1, -1, -1, 0, 0]
    variable = AdapterBatch(torch.tensor([1, 0, -1]), num_slots=2, seq_len=[1, 3, 2])
    assert variable.token_slots.tolist() == [1, 0, 0, 0, -1, -1]
    as_tensor = AdapterBatch(torch.tensor([1, 0]), num_slots=2, seq_len=torch.tensor([2, 0]))
    assert as_tensor.token_slots.tolist() == [1, 1]


def test_two_dimensional_ids_flatten_in_row_major_order():
    batch = AdapterBatch(torch.tensor([[0, 1], [1, -1]]), num_slots=2)
    assert batch.token_slots.tolist() == [0, 1, 1, -1]


def test_flags():
    assert AdapterBatch([-1, -1], 3).all_none
    assert AdapterBatch(torch.empty(0, dtype=torch.long), 3).all_none
    assert AdapterBatch([2, 2, 2], 3).single_slot == 2
    assert AdapterBatch([2, 2, -1], 3).single_slot is None
    assert AdapterBatch([2, 1], 3).single_slot is None
    assert AdapterBatch(torch.empty(0, dtype=torch.long), 3).single_slot is None


def test_metadata_round_trip_and_move():
    batch = AdapterBatch([0, 2, -1, 2], 3)
    rebuilt = AdapterBatch.from_metadata(*batch.metadata)
    assert rebuilt.num_slots == 3
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.metadata, batch.metadata, strict=True))
    moved = batch.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(moved.metadata, batch.metadata, strict=True))


@pytest.mark.parametrize(
    "ids, num_slots, error, match",
    [
        ([0, 3], 3, ValueError, r"\[-1, 3\).*found 3"),
        ([0, -2], 3, ValueError, r"found -2"),
        (torch.tensor([0.0, 1.0]), 3, TypeError, "integer tensor"),
        (torch.tensor([True]), 3, TypeError, "integer tensor"),
        ([0, 1.5], 3, TypeError, "sequence of ints"),
        ([0], 0, ValueError, "num_slots"),
        ([0], 2.0, ValueError, "num_slots"),
    ],
)
def test_bad_ids_raise(ids, num_slots, error, match):
    with pytest.raises(error, match=match):
        AdapterBatch(ids, num_slots)


def test_bad_sequence_lengths_raise():
    with pytest.raises(ValueError, match="seq_len has 2 lengths"):
        AdapterBatch([0, 1, 0], 2, seq_len=[1, 2])
    with pytest.raises(ValueError, match="seq_len"):
        AdapterBatch([0], 2, seq_len=-1)
    with pytest.raises(ValueError, match="seq_len lengths"):
        AdapterBatch([0, 1], 2, seq_len=[1, -1])

import copy

import pytest
import torch

import lora_fast
from lora_fast import layers
from lora_fast.adapters import AdapterStack, AdapterStacks
from lora_fast.layers import MultiLoRALinear, adapter_batch, inject_adapters

from .helpers import assert_close, tiny_llama_config


def make_layer(d_in=12, d_out=10, slots=4, rank=4, dropout=0.0):
    base = torch.nn.Linear(d_in, d_out)
    stack = AdapterStack(slots, d_in, d_out, max_rank=8)
    for slot in range(slots):
        k = rank + slot % 2 * 4
        stack.set_slot(slot, torch.randn(k, d_in), torch.randn(d_out, k), scale=0.5 + slot)
    return MultiLoRALinear(base, stack, dropout)


def test_forward_adds_each_tokens_adapter_for_any_leading_shape():
    layer = make_layer()
    x = torch.randn(3, 5, 12)
    ids = torch.randint(-1, 4, (3, 5))
    batch = lora_fast.AdapterBatch(ids, 4)
    with torch.no_grad():
        got = layer(x, batch)
        expected = layer.base(x).reshape(15, 10) + lora_fast.reference.lora_delta(
            x.reshape(15, 12), layer.stack.A, layer.stack.B, batch, layer.stack.scales, layer.stack.ranks
        )
    assert got.shape == (3, 5, 10)
    assert_close(got.reshape(15, 10), expected, torch.float32)


def test_a_batch_without_adapters_costs_exactly_the_base_layer(monkeypatch):
    layer = make_layer()
    x = torch.randn(6, 12)

    def fail(*args, **kwargs):
        raise AssertionError("lora_delta must not run for an adapter-free batch")

    monkeypatch.setattr(layers, "lora_delta", fail)
    out = layer(x, lora_fast.AdapterBatch([-1] * 6, 4))
    assert torch.equal(out, layer.base(x))
    assert torch.equal(layer(x), layer.base(x))  # no batch at all


def test_batch_from_context_and_token_count_check():
    layer = make_layer()
    x = torch.randn(4, 12)
    batch = lora_fast.AdapterBatch([0, 1, 2, 3], 4)
    with torch.no_grad(), adapter_batch(batch):
        assert torch.equal(layer(x), layer(x, batch))
    with pytest.raises(ValueError, match="x has 4 tokens"):
        layer(x, lora_fast.AdapterBatch([0, 1], 4))


def test_train_a_subset_of_slots():
    layer = make_layer()
    params = layer.train_slots([1, 3])
    assert len(params) == 4 and params[0].shape == (8, 12) and params[1].shape == (10, 8)
    frozen_A = layer.stack.A.clone()
    x = torch.randn(20, 12)
    batch = lora_fast.AdapterBatch(torch.arange(20) % 4, 4)
    layer(x, batch).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert layer.stack.A.grad is None and layer.base.weight.requires_grad
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    layer.freeze_slots()
    assert not len(layer.lora_A) and not layer.grad_slots.any()
    assert torch.equal(layer.stack.A[1, :8], frozen_A[1, :8] + 1.0)
    assert torch.equal(layer.stack.A[0], frozen_A[0])


def test_training_adds_the_delta_into_a_tensor_of_its_own():
    """With a 3-D input the base Linear runs on the rows, so the delta goes in place into a tensor
    that is no view: no CopySlices node (a clone and two copies of the output gradient in the
    backward), and the gradients are those of the base output plus the delta."""
    layer = make_layer()
    layer.train_slots([0, 2])
    x = torch.randn(3, 5, 12, requires_grad=True)
    batch = lora_fast.AdapterBatch(torch.randint(-1, 4, (3, 5)), 4)
    y = layer(x, batch)
    assert y.shape == (3, 5, 10)
    node, seen, stack = None, set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    assert "CopySlices" not in {type(n).__name__ for n in seen}
    grad = torch.randn(3, 5, 10)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    A, B = (w.detach().double() for w in layer.weights())
    expected = layer.base.double()(x64).reshape(15, 10) + lora_fast.reference.lora_delta(
        x64.reshape(15, 12), A, B, batch, layer.stack.scales.double(), layer.stack.ranks
    )
    expected.backward(grad.double().reshape(15, 10))
    assert_close(x.grad, x64.grad, torch.float32)


def test_dropout_matches_peft_lora_layer():
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 10)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(One(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["proj"]))
    peft_layer = model.base_model.model.proj
    torch.nn.init.normal_(peft_layer.lora_B["default"].weight)
    stack = AdapterStack(2, 12, 10, 4)
    stack.set_slot(
        1, peft_layer.lora_A["default"].weight.detach(), peft_layer.lora_B["default"].weight.detach(), 2.0
    )
    ours = MultiLoRALinear(peft_layer.base_layer, stack, dropout=0.3).train()
    peft_layer.train()
    x = torch.randn(7, 12)
    torch.manual_seed(7)
    expected = peft_layer(x)
    torch.manual_seed(7)
    got = ours(x, lora_fast.AdapterBatch([1] * 7, 2))
    assert_close(got, expected, torch.float32)
    ours.eval()
    peft_layer.eval()
    assert_close(ours(x, lora_fast.AdapterBatch([1] * 7, 2)), peft_layer(x), torch.float32)


def test_layer_rejects_mismatched_stack():
    with pytest.raises(ValueError, match="stack is d_in=12"):
        MultiLoRALinear(torch.nn.Linear(13, 10), AdapterStack(2, 12, 10, 4))
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        MultiLoRALinear(torch.nn.Conv1d(1, 1, 1), AdapterStack(2, 12, 10, 4))


# -- many adapters trained in one mixed batch == each trained alone ------------------------------


def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).float()


def adapter_stacks(model, num_adapters, rank=4):
    torch.manual_seed(1)
    stacks = AdapterStacks(num_slots=num_adapters, max_rank=rank)
    targets = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))]
    for a in range(num_adapters):
        weights = {}
        for name in targets:
            linear = model.get_submodule(name)
            weights[name] = (
                torch.randn(rank, linear.in_features) * 0.1,
                torch.randn(linear.out_features, rank) * 0.1,
            )
        stacks.add(f"task{a}", weights, 2.0)
    return stacks


def train(model, stacks, slots, sequences, sequence_slots, steps):
    model = copy.deepcopy(model)
    stacks = copy.deepcopy(stacks)
    for p in model.parameters():
        p.requires_grad_(False)
    lora_layers = inject_adapters(model, stacks)
    params = [p for layer in lora_layers.values() for p in layer.train_slots(slots)]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    seq_len = sequences.shape[1]
    batch = lora_fast.AdapterBatch(sequence_slots, stacks.num_slots, seq_len=seq_len)
    for _ in range(steps):
        with adapter_batch(batch):
            logits = model(sequences).logits
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), sequences[:, 1:].reshape(-1), reduction="none"
        ).view(len(sequences), -1)
        # summed over adapters of each adapter's mean loss: the adapters' gradients do not mix
        loss = sum(losses[sequence_slots == s].mean() for s in sequence_slots.unique())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for layer in lora_layers.values():
        layer.freeze_slots()
    return stacks


def test_mixed_batch_training_equals_training_each_adapter_alone():
    model = tiny_llama()
    stacks = adapter_stacks(model, 4)
    torch.manual_seed(2)
    sequences = torch.randint(0, 97, (8, 12))
    sequence_slots = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    mixed = train(model, stacks, [0, 1, 2, 3], sequences, sequence_slots, steps=4)
    for slot in range(4):
        mine = sequence_slots == slot
        alone = train(model, stacks, [slot], sequences[mine], sequence_slots[mine], steps=4)
        for module in stacks.modules:
            got, expected = mixed[module], alone[module]
            assert not torch.equal(expected.A[slot], stacks[module].A[slot]), "training changed nothing"
            torch.testing.assert_close(got.A[slot], expected.A[slot], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.B[slot], expected.B[slot], rtol=1e-4, atol=1e-5)

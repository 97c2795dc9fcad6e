"""MTLoRA: placement, mixed-task forward/backward, the two modes, PEFT export, bad input."""

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast.methods import mtlora

from .helpers import assert_close, tiny_llama_config

TASKS = ["alpha", "beta", "gamma"]


def tiny_model(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def injected(mode="matrix", seed=0):
    model = tiny_model()
    placement = mtlora.MTLoRAPlacement.decoder(num_layers=2, last_n=1)
    mt = mtlora.inject_mtlora(
        model, placement, TASKS, shared_rank=4, task_rank=2, mode=mode, dropout=0.0, seed=seed
    )
    with torch.no_grad():  # B starts at zero: give every module a non-zero delta to compare
        for param in mt.parameters():
            param.normal_(0, 0.3)
    return model, mt


def test_placement_resolves_and_rejects_unmatched_patterns():
    model = tiny_model()
    shared, specific = mtlora.MTLoRAPlacement.decoder(num_layers=2, last_n=1).resolve(model)
    assert len(shared) == 14 and len(specific) == 4
    assert all(name.startswith("model.layers.1.") for name in specific)
    with pytest.raises(ValueError, match="task_specific pattern 'nothing' matches no nn.Linear"):
        mtlora.MTLoRAPlacement(shared=(r".*q_proj",), task_specific=("nothing",)).resolve(model)
    with pytest.raises(ValueError, match="last_n"):
        mtlora.MTLoRAPlacement.decoder(num_layers=2, last_n=3)


@pytest.mark.parametrize("mode", ["matrix", "add"])
def test_mixed_task_batch_equals_each_task_alone(mode):
    model, mt = injected(mode)
    ids = torch.randint(1, 97, (4, 7))
    tasks = ["gamma", None, "alpha", "beta"]
    with lora_fast.adapter_batch(mt.task_batch(tasks, seq_len=7)):
        mixed = model(input_ids=ids).logits
    for row, task in enumerate(tasks):
        with lora_fast.adapter_batch(mt.task_batch([task], seq_len=7)):
            alone = model(input_ids=ids[row : row + 1]).logits
        assert_close(mixed[row], alone[0], torch.float32, 1.0)


@pytest.mark.parametrize("mode", ["matrix", "add"])
def test_layer_formula(mode):
    base = nn.Linear(6, 5)
    layer = mtlora.MTLoRALinear(
        base, 2, shared_rank=3, task_rank=2, shared_scale=1.5, task_scale=0.5, mode=mode
    )
    with torch.no_grad():
        for p in (layer.shared_B, layer.task_B):
            p.normal_()
    x = torch.randn(4, 6)
    batch = lora_fast.AdapterBatch(torch.tensor([1, -1, 0, 1]), 2)
    got = layer(x, batch)
    for i, slot in enumerate([1, -1, 0, 1]):
        expected = base(x[i])
        shared = 1.5 * layer.shared_B @ (layer.shared_A @ x[i])
        if slot < 0 or mode == "add":
            expected = expected + shared
        if slot >= 0:
            expected = expected + 0.5 * layer.task_B[slot] @ (layer.task_A[slot] @ x[i])
        assert_close(got[i], expected, torch.float32, 1.0)


def test_mixed_batch_gradients_are_the_sum_of_per_task_gradients():
    model, mt = injected("matrix")
    ids = torch.randint(1, 97, (3, 5))
    tasks = ["beta", "alpha", "beta"]

    def grads(rows, names):
        for p in mt.parameters():
            p.grad = None
        with lora_fast.adapter_batch(mt.task_batch(names, seq_len=5)):
            model(input_ids=ids[rows]).logits.square().sum().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in mt.parameters()]

    mixed = grads([0, 1, 2], tasks)
    separate = [grads([i], [t]) for i, t in enumerate(tasks)]
    for index, got in enumerate(mixed):
        expected = sum(s[index] for s in separate)
        assert_close(got, expected, torch.float32, float(expected.abs().max()) + 1e-6)
    # the TS gradients of a task absent from the batch are zero
    layer = mt.layers["model.layers.1.mlp.down_proj"]
    for p in mt.parameters():
        p.grad = None
    with lora_fast.adapter_batch(mt.task_batch(["alpha"] * 3, seq_len=5)):
        model(input_ids=ids).logits.sum().backward()
    assert layer.task_A.grad[1:].eq(0).all() and layer.task_A.grad[0].abs().sum() > 0


@pytest.mark.parametrize("mode", ["matrix", "add"])
def test_per_task_peft_adapter_reproduces_the_task(tmp_path, mode):
    from peft import PeftModel

    model, mt = injected(mode)
    ids = torch.randint(1, 97, (2, 6))
    with lora_fast.adapter_batch(mt.task_batch(["beta", "beta"], seq_len=6)):
        expected = model(input_ids=ids).logits
    mt.save_task_peft("beta", tmp_path / "beta")
    written = mt.save_modules_peft(tmp_path / "raw")
    assert [p.name for p in written] == ["shared", "alpha_specific", "beta_specific", "gamma_specific"]
    mt.remove()
    peft_model = PeftModel.from_pretrained(model, tmp_path / "beta").eval()
    assert_close(peft_model(input_ids=ids).logits, expected, torch.float32)


def test_bad_input_is_caught_before_training():
    model, mt = injected()
    with pytest.raises(ValueError, match="unknown task 'delta'"):
        mt.task_batch(["alpha", "delta"])
    with pytest.raises(ValueError, match="task 'gamma' has no head"):
        mtlora.check_task_heads(TASKS, {"alpha": nn.Linear(2, 2), "beta": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="distinct"):
        mtlora.inject_mtlora(tiny_model(), mtlora.MTLoRAPlacement.decoder(2), ["a", "a"])
    with pytest.raises(ValueError, match="mode"):
        mtlora.MTLoRALinear(nn.Linear(2, 2), 1, 1, 1, mode="sum")


def test_delta_m_matches_the_paper_definition():
    single = {"a": 0.5, "b": 0.8, "loss": 2.0}
    multi = {"a": 0.6, "b": 0.6, "loss": 1.0}
    assert mtlora.delta_m(multi, single, lower_is_better={"loss"}) == pytest.approx(
        100 * (0.2 - 0.25 + 0.5) / 3
    )


def test_vision_model_gives_each_stage_its_task_batch():
    from lora_fast.methods import mtlora_vision

    torch.manual_seed(0)
    model = mtlora_vision.HierarchicalViT({"a": 2, "b": 3}).eval()
    shared, specific = mtlora_vision.PLACEMENT.resolve(model)
    assert len(shared) == 16 and len(specific) == 6
    mt = mtlora.inject_mtlora(
        model, mtlora_vision.PLACEMENT, ["a", "b"], shared_rank=2, task_rank=1, dropout=0.0
    )
    with torch.no_grad():
        for param in mt.parameters():
            param.normal_(0, 0.3)
    images = torch.rand(3, 8, 8)
    slots = torch.tensor([1, 0, -1])
    mixed = model.features(images, slots, 2)
    for i in range(3):
        assert_close(mixed[i], model.features(images[i : i + 1], slots[i : i + 1], 2)[0], torch.float32, 1.0)
    assert not torch.allclose(mixed[0], model.features(images[:1], torch.tensor([0]), 2)[0])


def test_vision_placements_and_validation_split():
    from lora_fast.methods import mtlora_vision

    model = mtlora_vision.HierarchicalViT({"a": 2})
    shared, every = mtlora_vision.PLACEMENT_EVERY_BLOCK.resolve(model)
    _, last = mtlora_vision.PLACEMENT.resolve(model)
    assert len(every) == 12 and set(last) < set(every) <= set(shared)
    train_x, _, test_x, _ = mtlora_vision.load_digits(3)
    fit_x, _, valid_x, valid_y = mtlora_vision.load_digits(3, validation=True)
    assert len(fit_x) + len(valid_x) == len(train_x) and len(valid_x) == len(valid_y) > 0.15 * len(train_x)
    # the training split cut in two: the test images stay unseen
    assert torch.equal(fit_x, train_x[: len(fit_x)]) and torch.equal(valid_x, train_x[len(fit_x) :])
    assert len(test_x) > 0.25 * (len(train_x) + len(test_x))


def test_vision_training_schedule():
    """Cosine decay: the first step at the full learning rate, the second at half of it (2 steps),
    so one step matches the constant schedule and two do not; unknown schedules are refused."""
    from lora_fast.methods import mtlora_vision

    images, labels = torch.rand(6, 8, 8), torch.tensor([0, 1, 1, 0, 1, 0])
    data = {"a": (images, labels)}

    def trained(schedule, steps):
        torch.manual_seed(0)
        model = mtlora_vision.HierarchicalViT({"a": 2})
        params = list(model.heads["a"].parameters())
        mtlora_vision.train_tasks(
            model, ["a"], data, params, lambda t: -1, 1, steps, 3, 0.1, 0, "test", schedule
        )
        return model.heads["a"].weight.detach().clone()

    assert torch.equal(trained("cosine", 1), trained("constant", 1))
    assert not torch.allclose(trained("cosine", 2), trained("constant", 2))
    with pytest.raises(ValueError, match="schedule"):
        trained("linear", 1)

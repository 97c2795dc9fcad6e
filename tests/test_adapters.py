import json

import pytest
import torch

import lora_fast
from lora_fast.adapters import AdapterStack, AdapterStacks

from .helpers import assert_close, tiny_llama_config


def test_stack_slots_set_clear_and_mixed_ranks():
    stack = AdapterStack(num_slots=3, d_in=6, d_out=5, max_rank=8)
    A2, B2 = torch.randn(2, 6), torch.randn(5, 2)
    A8, B8 = torch.randn(8, 6), torch.randn(5, 8)
    stack.set_slot(0, A2, B2, scale=0.5)
    stack.set_slot(2, A8, B8, scale=2.0)
    assert stack.ranks.tolist() == [2, 0, 8]
    assert stack.scales.tolist() == [0.5, 0.0, 2.0]
    A, B, scale = stack.slot_weights(0)
    assert torch.equal(A, A2) and torch.equal(B, B2) and scale == 0.5
    assert (stack.A[0, 2:] == 0).all() and (stack.B[0, :, 2:] == 0).all()
    x = torch.randn(4, 6)
    batch = lora_fast.AdapterBatch([0, 1, 2, -1], 3)
    got = lora_fast.lora_delta(x, stack.A, stack.B, batch, stack.scales, stack.ranks)
    expected = torch.stack([0.5 * B2 @ A2 @ x[0], torch.zeros(5), 2.0 * B8 @ A8 @ x[2], torch.zeros(5)])
    assert_close(got, expected, torch.float32)
    stack.clear_slot(2)
    assert stack.ranks.tolist() == [2, 0, 0] and (stack.A[2] == 0).all()


def test_stack_dtype_conversions_keep_scales_in_the_ops_dtype():
    """module.half() / .double() / .to(dtype) convert every floating buffer; a stack's scales stay
    float32 (float64 with float64 weights), so the checked ops take the stack's tensors, and a
    float64 stack keeps a non-dyadic scale exactly."""
    stack = AdapterStack(num_slots=2, d_in=6, d_out=5, max_rank=4)
    A, B = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    batch = lora_fast.AdapterBatch(torch.tensor([0, 1, 0, -1]), 2)
    for convert, dtype, scales_dtype in (
        (lambda m: m.half(), torch.float16, torch.float32),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16, torch.float32),
        (lambda m: m.double(), torch.float64, torch.float64),
        (lambda m: m.float(), torch.float32, torch.float32),
    ):
        convert(stack)
        assert stack.A.dtype == dtype and stack.scales.dtype == scales_dtype
        stack.set_slot(0, A, B, 1 / 3)
        x = torch.randn(4, 6, dtype=torch.float64).to(dtype)
        with lora_fast.use_backend("torch"):
            delta = lora_fast.lora_delta(x, stack.A, stack.B, batch, stack.scales, stack.ranks)
        expected = (x[0].double() @ A.to(dtype).double().T) @ B.to(dtype).double().T / 3
        if dtype == torch.float64:
            torch.testing.assert_close(delta[0], expected, rtol=1e-13, atol=0)
        else:
            assert_close(delta[0], expected, dtype)


@pytest.mark.parametrize(
    "slot, A, B, match",
    [
        (3, torch.randn(2, 6), torch.randn(5, 2), "slot must be an int in"),
        (0, torch.randn(2, 7), torch.randn(5, 2), r"A must be \[rank, d_in=6\]"),
        (0, torch.randn(2, 6), torch.randn(5, 3), r"B must be \[d_out=5, rank=2\]"),
        (0, torch.randn(9, 6), torch.randn(5, 9), "rank 9 exceeds max_rank=8"),
    ],
)
def test_stack_rejects_bad_slots(slot, A, B, match):
    stack = AdapterStack(3, 6, 5, 8)
    with pytest.raises(ValueError, match=match):
        stack.set_slot(slot, A, B, 1.0)


def weights(d_in=6, d_out=5, rank=2, modules=("m.q", "m.v")):
    return {m: (torch.randn(rank, d_in), torch.randn(d_out, rank)) for m in modules}


def test_stacks_add_remove_replace_and_slot_ids():
    stacks = AdapterStacks(num_slots=2, max_rank=4)
    assert stacks.add("a", weights(rank=2), 0.5) == 0
    assert stacks.add("b", weights(rank=4, modules=("m.q", "m.o")), {"m.q": 1.0, "m.o": 2.0}) == 1
    assert stacks.modules == ["m.o", "m.q", "m.v"]
    assert stacks["m.q"].ranks.tolist() == [2, 4] and stacks["m.v"].ranks.tolist() == [2, 0]
    assert stacks.slot_ids(["b", None, "__base__", "a"]).tolist() == [1, -1, -1, 0]
    with pytest.raises(ValueError, match="no free slot"):
        stacks.add("c", weights(), 1.0)
    with pytest.raises(ValueError, match="already loaded"):
        stacks.add("a", weights(), 1.0)
    replacement = weights(rank=3, modules=("m.v",))
    assert stacks.replace("a", replacement, 3.0) == 0
    assert stacks["m.q"].ranks.tolist() == [0, 4] and stacks["m.v"].ranks.tolist() == [3, 0]
    assert torch.equal(stacks.adapter_weights("a")["m.v"][0], replacement["m.v"][0])
    assert stacks.remove("b") == 1 and "b" not in stacks and len(stacks) == 1
    assert stacks.add("c", weights(), 1.0) == 1
    with pytest.raises(KeyError, match="adapter 'zzz' is not loaded"):
        stacks.slot_ids(["zzz"])


def test_stacks_reject_disagreeing_adapters_naming_adapter_and_module():
    stacks = AdapterStacks(num_slots=3, max_rank=4)
    stacks.add("a", weights(), 1.0)
    with pytest.raises(ValueError, match=r"adapter 'b', module 'm.q': shape d_in=7"):
        stacks.add("b", weights(d_in=7), 1.0)
    with pytest.raises(ValueError, match=r"adapter 'b', module 'm.q': rank 5 exceeds max_rank=4"):
        stacks.add("b", weights(rank=5), 1.0)
    with pytest.raises(ValueError, match=r"adapter 'b', module 'm.v': scales has no entry"):
        stacks.add("b", weights(), {"m.q": 1.0})
    with pytest.raises(ValueError, match="B.shape\\[1\\] must equal the rank"):
        stacks.add("b", {"m.q": (torch.randn(2, 6), torch.randn(5, 3))}, 1.0)
    assert list(stacks) == ["a"], "a failed add must leave the stacks unchanged"


# -- PEFT round trip ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=64, intermediate_size=48)
    base = LlamaForCausalLM(config)
    first = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    model = get_peft_model(base, first, adapter_name="plain")
    model.add_adapter(
        "rs", LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()  # PEFT initialises lora_B to zero; make every weight count
    return model, config


def lora_layers(model, adapter):
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            yield name, module


def test_load_peft_files_reproduces_peft_layers(peft_model, tmp_path):
    model, _ = peft_model
    model.save_pretrained(tmp_path)
    stacks = AdapterStacks(num_slots=4, max_rank=8)
    assert stacks.load_peft(tmp_path / "plain") == 0
    assert stacks.load_peft(tmp_path / "rs") == 1
    x = torch.randn(10, 48)  # wide enough for every module; each takes its first d_in columns
    batch = lora_fast.AdapterBatch([0, 1, -1, 1, 0, 0, 1, -1, 0, 1], 4)
    checked = 0
    for adapter, slot in (("plain", 0), ("rs", 1)):
        for name, layer in lora_layers(model, adapter):
            stack = stacks[name]
            assert int(stack.ranks[slot]) == layer.r[adapter]
            assert float(stack.scales[slot]) == pytest.approx(layer.scaling[adapter])
            assert torch.equal(stack.A[slot, : layer.r[adapter]], layer.lora_A[adapter].weight)
            rows = (batch.token_slots == slot).nonzero().reshape(-1)
            x_in = x[:, : stack.d_in]
            with torch.no_grad():
                peft_delta = layer.lora_B[adapter](layer.lora_A[adapter](x_in[rows])) * layer.scaling[adapter]
            delta = lora_fast.lora_delta(x_in, stack.A, stack.B, batch, stack.scales, stack.ranks)
            assert_close(delta[rows], peft_delta, torch.float32)
            checked += 1
    assert checked == 6 + 4


def test_save_peft_files_load_in_peft_unchanged(peft_model, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model, config = peft_model
    model.save_pretrained(tmp_path / "original")
    stacks = AdapterStacks(num_slots=2, max_rank=8)
    stacks.load_peft(tmp_path / "original" / "plain", name="plain")
    stacks.load_peft(tmp_path / "original" / "rs", name="rs")
    stacks.save_peft("plain", tmp_path / "ours" / "plain")
    stacks.save_peft("rs", tmp_path / "ours" / "rs")
    reloaded = PeftModel.from_pretrained(
        LlamaForCausalLM(config), tmp_path / "ours" / "plain", adapter_name="plain"
    )
    reloaded.load_adapter(tmp_path / "ours" / "rs", adapter_name="rs")
    for adapter in ("plain", "rs"):
        ours = dict(lora_layers(reloaded, adapter))
        for name, layer in lora_layers(model, adapter):
            assert torch.equal(ours[name].lora_A[adapter].weight, layer.lora_A[adapter].weight)
            assert torch.equal(ours[name].lora_B[adapter].weight, layer.lora_B[adapter].weight)
            assert ours[name].scaling[adapter] == pytest.approx(layer.scaling[adapter])


def test_synthesised_config_round_trips_ranks_and_scales(tmp_path):
    stacks = AdapterStacks(num_slots=2, max_rank=8)
    mixed = {
        "model.a.q": (torch.randn(4, 6), torch.randn(5, 4)),
        "model.a.v": (torch.randn(8, 6), torch.randn(5, 8)),
    }
    stacks.add("made", mixed, {"model.a.q": 0.25, "model.a.v": 3.0})
    stacks.save_peft("made", tmp_path / "made")
    config = json.loads((tmp_path / "made" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["model.a.q", "model.a.v"]
    again = AdapterStacks(num_slots=1, max_rank=8)
    again.load_peft(tmp_path / "made")
    for module in mixed:
        assert again[module].ranks.tolist() == stacks[module].ranks[:1].tolist()
        assert again[module].scales.tolist() == pytest.approx(stacks[module].scales[:1].tolist())


def test_load_peft_rejects_what_it_cannot_represent(tmp_path):
    stacks = AdapterStacks(num_slots=2, max_rank=8)
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        stacks.load_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        stacks.load_peft(tmp_path)
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file(
        {"base_model.model.emb.lora_embedding_A": torch.randn(2, 5)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match="embedding LoRA"):
        stacks.load_peft(tmp_path)
    save_file(
        {
            "base_model.model.m.lora_A.weight": torch.randn(3, 5),
            "base_model.model.m.lora_B.weight": torch.randn(4, 3),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match="config gives rank 2 but lora_A has 3 rows"):
        stacks.load_peft(tmp_path)

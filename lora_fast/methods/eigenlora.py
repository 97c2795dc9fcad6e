"""EigenLoRAx (arXiv 2502.04700): the principal subspace of many adapters, coefficient-only training.

Recipe:

1. **Fit** (``fit_basis``): per target module and separately for A and B, stack the rank rows of
   every adapter (A's rows, d_in long; B's columns, d_out long), mean-centre them, and keep the
   top-K principal components (a thin or randomized SVD of the stacked rows: never a d x d
   covariance). ``EigenBasis.explained_variance`` tells how much each K keeps. Optionally pad the
   basis with random orthonormal directions (``augment_to``) for tasks far from the fitted ones.
2. **Project** (``project_adapters``): existing adapters become loadings on the basis, with the
   relative error of each (``lora_fast.ops.subspace_project``: one launch per module side).
3. **Train** (``EigenLoRALinear``, ``inject_eigenlora``): a layer whose adapters are
   ``A = loadings_A @ basis_A`` and ``B = basis_B^T @ loadings_B``; only the loadings (r x K per
   side) train. A slot starts from a projected LoRA or from scratch (loadings_A random with the
   row norms of PEFT's kaiming-uniform A, loadings_B zero: the same start as LoRA, restricted to
   the subspace).
4. **Serve**: many slots stored as loadings only; the forward is ``ops.subspace_lora_delta`` (one
   dense GEMM onto basis_A for all tokens, the per-token r x K loadings batched like lora_delta,
   one dense GEMM out of basis_B), exact against materialising every adapter.

Rank rows have no preferred sign (flipping row i of A and column i of B together leaves an adapter
unchanged), so their mean is near zero and centring changes little; it is kept as in the paper.
Adapters are always represented without the mean: ``A = loadings_A @ basis_A``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import _checks as check
from ..adapters import AdapterStacks
from ..batch import AdapterBatch
from ..layers import current_batch, remove_adapters
from ..ops import subspace_lora_delta, subspace_project

EXACT_SVD_MAX = 2048  # thin SVD when the stacked rows or d are at most this; randomized above
SIDES = ("A", "B")

AdapterWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SubspaceBasis:
    """One side of one module: ``components [K, d]`` with orthonormal rows.

    ``explained_variance [K_pca]``: the fraction of the centred rows' variance each principal
    component holds (augmented random directions hold none and are not listed).
    """

    components: torch.Tensor
    mean: torch.Tensor
    explained_variance: torch.Tensor

    @property
    def num_components(self) -> int:
        return self.components.shape[0]

    @property
    def num_principal(self) -> int:
        return self.explained_variance.shape[0]


class EigenBasis:
    """The bases of every target module: ``bases[module] = (basis of A rows, basis of B columns)``."""

    def __init__(self, bases: Mapping[str, tuple[SubspaceBasis, SubspaceBasis]], fitted_on: Sequence[str]):
        self.bases = dict(bases)
        self.fitted_on = list(fitted_on)

    @property
    def modules(self) -> list[str]:
        return sorted(self.bases)

    def __getitem__(self, module: str) -> tuple[SubspaceBasis, SubspaceBasis]:
        if module not in self.bases:
            raise KeyError(f"the basis has no module {module!r}; modules: {self.modules}")
        return self.bases[module]

    def explained_variance(self, k: int) -> dict[str, float]:
        """Mean over modules of the variance the first ``k`` components keep, per side."""
        kept = {}
        for index, side in enumerate(SIDES):
            values = [float(pair[index].explained_variance[:k].sum()) for pair in self.bases.values()]
            kept[side] = sum(values) / len(values)
        return kept

    def truncate(self, k: int, k_B: int | None = None) -> EigenBasis:
        """The first ``k`` (``k_B`` for B) components of every basis: the PCA for a smaller K."""
        k_B = k if k_B is None else k_B
        bases = {}
        for module, (basis_A, basis_B) in self.bases.items():
            for side, basis, keep in (("A", basis_A, k), ("B", basis_B, k_B)):
                if not 1 <= keep <= basis.num_components:
                    raise ValueError(
                        f"module {module!r}, {side}: cannot keep {keep} of {basis.num_components} components"
                    )
            bases[module] = tuple(
                SubspaceBasis(b.components[:keep], b.mean, b.explained_variance[:keep])
                for b, keep in ((basis_A, k), (basis_B, k_B))
            )
        return EigenBasis(bases, self.fitted_on)

    def num_parameters(self) -> int:
        """Numbers stored by the bases (shared by every adapter)."""
        return sum(b.components.numel() for pair in self.bases.values() for b in pair)

    def save(self, path: str | Path) -> Path:
        """Write the bases as one safetensors file (plus the fitted adapter names in its metadata)."""
        from safetensors.torch import save_file

        tensors = {}
        for module, pair in self.bases.items():
            for side, basis in zip(SIDES, pair, strict=True):
                tensors[f"{module}.{side}.components"] = basis.components.contiguous()
                tensors[f"{module}.{side}.mean"] = basis.mean.contiguous()
                tensors[f"{module}.{side}.explained_variance"] = basis.explained_variance.contiguous()
        path = Path(path)
        save_file(tensors, str(path), metadata={"fitted_on": json.dumps(self.fitted_on)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> EigenBasis:
        from safetensors import safe_open

        parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        with safe_open(str(path), framework="pt") as handle:
            fitted_on = json.loads((handle.metadata() or {}).get("fitted_on", "[]"))
            for key in handle.keys():
                module, side, field = key.rsplit(".", 2)
                parts.setdefault(module, {}).setdefault(side, {})[field] = handle.get_tensor(key)
        bases = {
            module: tuple(SubspaceBasis(**sides[side]) for side in SIDES) for module, sides in parts.items()
        }
        return cls(bases, fitted_on)


# -- adapters in -----------------------------------------------------------------------------


def collect_adapters(
    adapters: AdapterStacks | Sequence[str | Path] | Mapping[str, AdapterWeights],
    names: Sequence[str] | None = None,
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{adapter: {module: (A [r, d_in], B [d_out, r])}}`` from stacks, PEFT folders or a mapping.

    Every adapter must target the same modules with the same shapes and dtype: a mismatch is a
    ValueError / TypeError naming the adapter and the module.
    """
    if isinstance(adapters, AdapterStacks):
        chosen = list(adapters) if names is None else list(names)
        found = {
            name: {m: (A, B) for m, (A, B, _) in adapters.adapter_weights(name).items()} for name in chosen
        }
    elif isinstance(adapters, Mapping):
        found = {name: dict(adapters[name]) for name in (adapters if names is None else names)}
    else:
        found = {}
        for folder in adapters:
            stacks = AdapterStacks(num_slots=1, max_rank=4096)
            name = Path(folder).name
            stacks.load_peft(folder, name)
            found[name] = {m: (A.clone(), B.clone()) for m, (A, B, _) in stacks.adapter_weights(name).items()}
    if not found:
        raise ValueError("adapters holds no adapter to fit a basis on")
    first_name, first = next(iter(found.items()))
    for name, weights in found.items():
        missing = sorted(set(first) - set(weights))
        extra = sorted(set(weights) - set(first))
        if missing or extra:
            module = (missing or extra)[0]
            what = "lacks" if missing else "has"
            raise ValueError(
                f"adapter {name!r} {what} module {module!r} that adapter {first_name!r} "
                f"{'has' if missing else 'lacks'}; every adapter must target the same modules"
            )
        for module, (A, B) in weights.items():
            A0, B0 = first[module]
            if A.shape[1] != A0.shape[1] or B.shape[0] != B0.shape[0] or A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"adapter {name!r}, module {module!r}: A {tuple(A.shape)} / B {tuple(B.shape)} do not "
                    f"match adapter {first_name!r}'s d_in={A0.shape[1]}, d_out={B0.shape[0]}"
                )
            if A.dtype != A0.dtype or B.dtype != B0.dtype:
                raise TypeError(
                    f"adapter {name!r}, module {module!r}: dtypes {A.dtype}/{B.dtype} differ from adapter "
                    f"{first_name!r}'s {A0.dtype}/{B0.dtype}"
                )
    return found


# -- fit -------------------------------------------------------------------------------------


def principal_components(
    rows: torch.Tensor,
    k: int,
    center: bool = True,
    generator: torch.Generator | None = None,
    what: str = "rows",
) -> SubspaceBasis:
    """Top-``k`` principal directions of ``rows [M, d]`` (float64 inside).

    A thin SVD of the M x d rows when they are small, else ``torch.svd_lowrank``; a d x d
    covariance is never formed. ``k`` above the number of rows (or d) is a ValueError.
    """
    M, d = rows.shape
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > min(M, d):
        raise ValueError(
            f"{what}: k={k} components asked for but only {min(M, d)} are available "
            f"({M} stacked rank rows of length {d})"
        )
    data = rows.to(torch.float64)
    mean = data.mean(dim=0) if center else torch.zeros(d, dtype=torch.float64, device=rows.device)
    centred = data - mean
    total = centred.square().sum().clamp_min(torch.finfo(torch.float64).tiny)
    if min(M, d) <= EXACT_SVD_MAX:
        _, singular, components = torch.linalg.svd(centred, full_matrices=False)
    else:
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        _, singular, V = torch.svd_lowrank(centred, q=min(k + 16, M, d), niter=4)
        components = V.T
    components, singular = components[:k], singular[:k]
    return SubspaceBasis(
        components.to(rows.dtype).contiguous(),
        mean.to(rows.dtype),
        (singular.square() / total).to(torch.float32),
    )


def random_orthonormal(
    k: int, d: int, generator: torch.Generator, against: torch.Tensor | None = None
) -> torch.Tensor:
    """``[k, d]`` random orthonormal rows, orthogonal to the rows of ``against [K, d]`` when given."""
    taken = 0 if against is None else against.shape[0]
    if taken + k > d:
        raise ValueError(f"cannot add {k} orthonormal directions to {taken} in dimension {d}")
    samples = torch.randn(d, k, generator=generator, dtype=torch.float64)
    if against is not None:
        basis = against.to(torch.float64)
        for _ in range(2):  # Gram-Schmidt twice: orthogonal to machine precision
            samples = samples - basis.T @ (basis @ samples)
    q, r = torch.linalg.qr(samples)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))[None]
    return q.T.contiguous()


def augment(basis: SubspaceBasis, total: int, generator: torch.Generator) -> SubspaceBasis:
    """``basis`` padded with random orthonormal directions up to ``total`` components."""
    extra = total - basis.num_components
    if extra < 0:
        raise ValueError(f"augment_to={total} is below the {basis.num_components} fitted components")
    if extra == 0:
        return basis
    components = basis.components.to(torch.float64)
    added = random_orthonormal(extra, components.shape[1], generator, components)
    return SubspaceBasis(
        torch.cat([components, added]).to(basis.components.dtype), basis.mean, basis.explained_variance
    )


def fit_basis(
    adapters: AdapterStacks | Sequence[str | Path] | Mapping[str, AdapterWeights],
    k: int,
    k_B: int | None = None,
    names: Sequence[str] | None = None,
    center: bool = True,
    augment_to: int | None = None,
    seed: int = 0,
) -> EigenBasis:
    """The EigenLoRAx bases of ``adapters``: ``k`` components for A rows, ``k_B`` (default k) for B."""
    found = collect_adapters(adapters, names)
    generator = torch.Generator().manual_seed(seed)
    bases = {}
    for module in next(iter(found.values())):
        a_rows = torch.cat([weights[module][0] for weights in found.values()])
        b_rows = torch.cat([weights[module][1].T for weights in found.values()])
        pair = (
            principal_components(a_rows, k, center, generator, f"module {module!r}, A"),
            principal_components(
                b_rows, k if k_B is None else k_B, center, generator, f"module {module!r}, B"
            ),
        )
        if augment_to is not None:
            pair = tuple(augment(basis, augment_to, generator) for basis in pair)
        bases[module] = pair
    return EigenBasis(bases, list(found))


def random_basis_like(basis: EigenBasis, seed: int = 0) -> EigenBasis:
    """Random orthonormal bases of the same sizes: the ablation that shows what the fit buys."""
    generator = torch.Generator().manual_seed(seed)
    bases = {}
    for module, pair in basis.bases.items():
        bases[module] = tuple(
            SubspaceBasis(
                random_orthonormal(b.num_components, b.components.shape[1], generator).to(b.components.dtype),
                torch.zeros_like(b.mean),
                torch.zeros(0),
            )
            for b in pair
        )
    return EigenBasis(bases, [])


@dataclass
class Projection:
    """An adapter on a basis: per module ``loadings_A [r, K_A]``, ``loadings_B [K_B, r]``, and
    ``error[module] = (|A - A_hat| / |A|, |B - B_hat| / |B|)`` of the reconstruction."""

    loadings: dict[str, tuple[torch.Tensor, torch.Tensor]]
    error: dict[str, tuple[float, float]]

    def mean_error(self) -> tuple[float, float]:
        values = list(self.error.values())
        return tuple(sum(v[i] for v in values) / len(values) for i in range(2))


def project_adapters(
    basis: EigenBasis,
    adapters: AdapterStacks | Sequence[str | Path] | Mapping[str, AdapterWeights],
    names: Sequence[str] | None = None,
) -> dict[str, Projection]:
    """Every adapter expressed on ``basis``: one ``subspace_project`` call per module and side."""
    found = collect_adapters(adapters, names)
    projections = {name: Projection({}, {}) for name in found}
    for module in next(iter(found.values())):
        if module not in basis.bases:
            raise ValueError(f"module {module!r} of the adapters has no basis; the basis has {basis.modules}")
        basis_A, basis_B = basis[module]
        ranks = {weights[module][0].shape[0] for weights in found.values()}
        if len(ranks) != 1:
            raise ValueError(f"module {module!r}: adapters of ranks {sorted(ranks)} must be projected apart")
        A = torch.stack([weights[module][0] for weights in found.values()])
        B_rows = torch.stack([weights[module][1].T for weights in found.values()])
        coeff_A, residual_A = subspace_project(A, basis_A.components.to(A.dtype))
        coeff_B, residual_B = subspace_project(B_rows, basis_B.components.to(B_rows.dtype))
        norm_A = A.double().square().sum((1, 2)).clamp_min(1e-30)
        norm_B = B_rows.double().square().sum((1, 2)).clamp_min(1e-30)
        for index, name in enumerate(found):
            projections[name].loadings[module] = (coeff_A[index].to(A.dtype), coeff_B[index].T.to(A.dtype))
            projections[name].error[module] = (
                float((residual_A[index] / norm_A[index]).sqrt()),
                float((residual_B[index] / norm_B[index]).sqrt()),
            )
    return projections


# -- train and serve ---------------------------------------------------------------------------


class EigenLoRALinear(nn.Module):
    """``y = base(x) + scales[a] * basis_B^T loadings_B[a] loadings_A[a] basis_A dropout(x)``.

    Args:
        base: the frozen base layer.
        basis_A: ``[K_A, d_in]`` orthonormal rows; basis_B: ``[K_B, d_out]`` orthonormal rows.
        num_slots, rank: how many adapters the layer holds, and their rank r.
        dropout: LoRA dropout on the adapter input (training only).

    Slots hold only loadings (``r * (K_A + K_B)`` numbers each). ``train_slots`` makes some
    slots trainable: their loadings then live in ``trained_A[str(slot)] [r, K_A]`` /
    ``trained_B[str(slot)] [K_B, r]`` and only they get gradients; ``freeze_slots`` writes them back.
    """

    def __init__(
        self,
        base: nn.Linear,
        basis_A: torch.Tensor,
        basis_B: torch.Tensor,
        num_slots: int,
        rank: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if basis_A.dim() != 2 or basis_A.shape[1] != base.in_features:
            raise ValueError(f"basis_A must be [K_A, d_in={base.in_features}], got {tuple(basis_A.shape)}")
        if basis_B.dim() != 2 or basis_B.shape[1] != base.out_features:
            raise ValueError(f"basis_B must be [K_B, d_out={base.out_features}], got {tuple(basis_B.shape)}")
        for name, value in (("num_slots", num_slots), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        dtype, device = base.weight.dtype, base.weight.device
        self.base = base
        self.dropout = dropout
        self.register_buffer("basis_A", basis_A.detach().to(device, dtype).contiguous())
        self.register_buffer("basis_B", basis_B.detach().to(device, dtype).contiguous())
        K_A, K_B = basis_A.shape[0], basis_B.shape[0]
        self.loadings_A = nn.Parameter(torch.zeros(num_slots, rank, K_A, dtype=dtype, device=device), False)
        self.loadings_B = nn.Parameter(torch.zeros(num_slots, K_B, rank, dtype=dtype, device=device), False)
        self.register_buffer("scales", torch.zeros(num_slots, dtype=check.scales_dtype(dtype), device=device))
        self.register_buffer("grad_slots", torch.zeros(num_slots, dtype=torch.bool, device=device))
        self.trained_A = nn.ParameterDict()
        self.trained_B = nn.ParameterDict()

    def _apply(self, fn, recurse=True):
        # as AdapterStack: dtype conversions leave the scales in the dtype the ops take
        super()._apply(fn, recurse)
        wanted = check.scales_dtype(self.loadings_A.dtype)
        if self.scales.dtype != wanted:
            self.scales = self.scales.to(wanted)
        return self

    @property
    def num_slots(self) -> int:
        return self.loadings_A.shape[0]

    @property
    def rank(self) -> int:
        return self.loadings_A.shape[1]

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in [0, {self.num_slots}), got {slot!r}")

    # -- slots --------------------------------------------------------------------------------

    def set_slot(self, slot: int, loadings_A: torch.Tensor, loadings_B: torch.Tensor, scale: float) -> None:
        """Store an adapter's ``loadings_A [r, K_A]``, ``loadings_B [K_B, r]`` and scale in ``slot``."""
        self._check_slot(slot)
        if tuple(loadings_A.shape) != tuple(self.loadings_A.shape[1:]):
            raise ValueError(
                f"loadings_A must be {tuple(self.loadings_A.shape[1:])}, got {tuple(loadings_A.shape)}"
            )
        if tuple(loadings_B.shape) != tuple(self.loadings_B.shape[1:]):
            raise ValueError(
                f"loadings_B must be {tuple(self.loadings_B.shape[1:])}, got {tuple(loadings_B.shape)}"
            )
        self.freeze_slots([slot])
        with torch.no_grad():
            self.loadings_A[slot].copy_(loadings_A)
            self.loadings_B[slot].copy_(loadings_B)
            self.scales[slot] = float(scale)

    def init_slot(
        self,
        slot: int,
        scale: float,
        lora: tuple[torch.Tensor, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Start ``slot`` from a LoRA's ``(A [r, d_in], B [d_out, r])`` projected onto the bases, or
        from scratch: loadings_A random with the row norms of PEFT's kaiming-uniform A
        (``|row|^2 = 1/3``), loadings_B zero, so the adapter starts at zero like LoRA."""
        if lora is not None:
            A, B = lora
            loadings_A, _ = subspace_project(A[None].to(self.basis_A.dtype), self.basis_A)
            loadings_B, _ = subspace_project(B.T[None].to(self.basis_B.dtype), self.basis_B)
            self.set_slot(slot, loadings_A[0], loadings_B[0].T, scale)
            return
        K_A = self.basis_A.shape[0]
        loadings_A = torch.randn(self.rank, K_A, generator=generator, dtype=torch.float64) / (3 * K_A) ** 0.5
        self.set_slot(slot, loadings_A, torch.zeros_like(self.loadings_B[slot]), scale)

    def train_slots(self, slots) -> list[nn.Parameter]:
        """Make ``slots`` trainable; returns their new loadings parameters."""
        created = []
        for slot in slots:
            self._check_slot(slot)
            if str(slot) in self.trained_A:
                continue
            self.trained_A[str(slot)] = nn.Parameter(self.loadings_A[slot].detach().clone())
            self.trained_B[str(slot)] = nn.Parameter(self.loadings_B[slot].detach().clone())
            self.grad_slots[slot] = True
            created += [self.trained_A[str(slot)], self.trained_B[str(slot)]]
        return created

    def freeze_slots(self, slots=None) -> None:
        """Write trained slots (default: all) back into the stored loadings and freeze them."""
        for slot in [int(s) for s in self.trained_A] if slots is None else slots:
            if str(slot) not in self.trained_A:
                continue
            with torch.no_grad():
                self.loadings_A[slot].copy_(self.trained_A.pop(str(slot)))
                self.loadings_B[slot].copy_(self.trained_B.pop(str(slot)))
            self.grad_slots[slot] = False

    def loadings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loadings_A [S, r, K_A], loadings_B [S, K_B, r])``: trained slots from their parameters."""
        if not len(self.trained_A):
            return self.loadings_A, self.loadings_B
        rows_A, rows_B = [], []
        for slot in range(self.num_slots):
            trained = str(slot) in self.trained_A
            rows_A.append(self.trained_A[str(slot)] if trained else self.loadings_A[slot])
            rows_B.append(self.trained_B[str(slot)] if trained else self.loadings_B[slot])
        return torch.stack(rows_A), torch.stack(rows_B)

    def lora_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain LoRA ``(A [r, d_in], B [d_out, r])`` that ``slot`` stands for."""
        self._check_slot(slot)
        loadings_A, loadings_B = self.loadings()
        return (loadings_A[slot] @ self.basis_A).detach(), (self.basis_B.T @ loadings_B[slot]).detach()

    @torch.no_grad()
    def merge_(self, slot: int) -> None:
        """Add ``slot``'s adapter into the base weight in place (then serve it with no adapter)."""
        A, B = self.lora_weights(slot)
        self.base.weight.add_((B.float() @ A.float() * float(self.scales[slot])).to(self.base.weight.dtype))

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, batch: AdapterBatch | None = None) -> torch.Tensor:
        batch = batch if batch is not None else current_batch()
        y = self.base(x)
        if batch is None or batch.all_none:
            return y
        rows = x.reshape(-1, x.shape[-1]).to(self.basis_A.dtype)
        if rows.shape[0] != batch.num_tokens:
            raise ValueError(f"x has {rows.shape[0]} tokens but the batch has {batch.num_tokens}")
        if self.dropout and self.training:
            rows = nn.functional.dropout(rows, self.dropout, training=True)
        loadings_A, loadings_B = self.loadings()
        grad_slots = self.grad_slots if len(self.trained_A) else None
        out = y.view(-1, y.shape[-1]) if y.dtype == rows.dtype else None
        delta = subspace_lora_delta(
            rows,
            self.basis_A,
            loadings_A,
            loadings_B,
            self.basis_B,
            batch,
            self.scales,
            out=out,
            grad_slots=grad_slots,
            check_args=False,
        )
        return y if out is not None else y + delta.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_slots={self.num_slots}, rank={self.rank}, K_A={self.basis_A.shape[0]}, "
            f"K_B={self.basis_B.shape[0]}, trained_slots={sorted(int(s) for s in self.trained_A)}"
        )


def inject_eigenlora(
    model: nn.Module, basis: EigenBasis, num_slots: int, rank: int, dropout: float = 0.0
) -> dict[str, EigenLoRALinear]:
    """Replace every nn.Linear that ``basis`` has a module for by an EigenLoRALinear (empty slots).

    Run the model inside ``lora_fast.adapter_batch(batch)``; ``remove_eigenlora`` undoes it.
    """
    layers = {}
    for name in basis.modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child, None)
        if isinstance(base, EigenLoRALinear):
            base = base.base
        if not isinstance(base, nn.Linear):
            raise ValueError(f"module {name!r} of the model is {type(base).__name__}, not an nn.Linear")
        basis_A, basis_B = basis[name]
        layer = EigenLoRALinear(base, basis_A.components, basis_B.components, num_slots, rank, dropout)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def remove_eigenlora(model: nn.Module, layers: Mapping[str, EigenLoRALinear]) -> None:
    """Put the base layers back in place of ``layers``."""
    remove_adapters(model, layers)


def adapter_weights(
    layers: Mapping[str, EigenLoRALinear], slot: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` of ``slot`` materialised: for ``AdapterStacks.add`` and PEFT files."""
    return {name: layer.lora_weights(slot) for name, layer in layers.items()}


def save_loadings(layers: Mapping[str, EigenLoRALinear], slot: int, path: str | Path) -> Path:
    """Write ``slot``'s loadings and scales (all an adapter on a known basis needs) as safetensors."""
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in layers.items():
        loadings_A, loadings_B = layer.loadings()
        tensors[f"{name}.loadings_A"] = loadings_A[slot].detach().contiguous()
        tensors[f"{name}.loadings_B"] = loadings_B[slot].detach().contiguous()
        tensors[f"{name}.scale"] = layer.scales[slot].reshape(1).clone()
    save_file(tensors, str(path))
    return Path(path)


def load_loadings(layers: Mapping[str, EigenLoRALinear], slot: int, path: str | Path) -> None:
    """Read a ``save_loadings`` file into ``slot`` of every layer (ValueError on a module mismatch)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    saved = {key.rsplit(".", 1)[0] for key in tensors}
    if saved != set(layers):
        missing = sorted(set(layers) - saved) or sorted(saved - set(layers))
        raise ValueError(f"{path}: loadings do not match the layers' modules (first mismatch {missing[0]!r})")
    for name, layer in layers.items():
        layer.set_slot(
            slot,
            tensors[f"{name}.loadings_A"],
            tensors[f"{name}.loadings_B"],
            float(tensors[f"{name}.scale"]),
        )

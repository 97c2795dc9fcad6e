"""ICM-LoRA (arXiv 2501.17635): generate a task's LoRA with a conditional VAE from a task vector.

Recipe:

1. **Data** (``FlatLayout``): for each task of a family, LoRA checkpoints from the last part of
   training, each flattened into one vector with every tensor normalised to zero mean and unit
   variance; the layout and the per-tensor statistics invert it into a PEFT adapter.
2. **Task vector** (``task_vector``): the model's last-layer hidden state at the last token,
   averaged over k in-context demonstrations of the task.
3. **Generator** (``ConditionalVAE``): a 1-D convolutional encoder to a hidden vector, the
   (projected) condition concatenated, mu / logvar heads; a linear + transposed-convolution
   decoder from ``[z, condition]``; loss = MSE + 0.005 KL, all sized from the flattened length.
   The released code de-normalises generated vectors with the statistics of a real checkpoint of
   the target task; here a head also predicts those statistics from the condition, so generation
   needs nothing but demonstrations (``stats="predicted"``), and the oracle variant stays
   available (``stats=<tensor>``).
4. **Generate** (``ICMGenerator.generate``): task vectors -> z ~ N(0, I) -> decoder -> adapters
   (``{module: (A, B)}``, ready for ``AdapterStacks.add`` / ``save_peft``), many in one call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..layers import adapter_batch
from . import tasks as task_data

KL_WEIGHT = 0.005  # the paper's loss = MSE + 0.005 * KL

Weights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FlatLayout:
    """Where each LoRA tensor sits in the flat vector: ``entries[i] = (module, side, shape)``."""

    entries: tuple[tuple[str, str, tuple[int, int]], ...]

    @classmethod
    def from_weights(cls, weights: Weights) -> FlatLayout:
        entries = []
        for module in sorted(weights):
            A, B = weights[module]
            entries += [(module, "A", tuple(A.shape)), (module, "B", tuple(B.shape))]
        return cls(tuple(entries))

    @property
    def length(self) -> int:
        return sum(rows * cols for _, _, (rows, cols) in self.entries)

    @property
    def num_tensors(self) -> int:
        return len(self.entries)

    def check(self, weights: Weights, what: str = "weights") -> None:
        expected = {(m, s): shape for m, s, shape in self.entries}
        got = {(m, s): tuple(t.shape) for m, (A, B) in weights.items() for s, t in (("A", A), ("B", B))}
        for key in sorted(set(expected) | set(got)):
            if expected.get(key) != got.get(key):
                raise ValueError(
                    f"{what}: module {key[0]!r} lora_{key[1]} is {got.get(key)} but the generator's "
                    f"layout has {expected.get(key)}"
                )

    def flatten(self, weights: Weights) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vector [length], stats [num_tensors, 2])``: each tensor normalised by its mean and std;
        stats hold ``(mean / std, log std)``, so an error in either is relative to the tensor's scale."""
        self.check(weights)
        pieces, stats = [], []
        for module, side, _ in self.entries:
            tensor = weights[module][0 if side == "A" else 1].detach().float().reshape(-1)
            mean, std = tensor.mean(), tensor.std().clamp_min(1e-8)
            pieces.append((tensor - mean) / std)
            stats.append(torch.stack([mean / std, std.log()]))
        return torch.cat(pieces), torch.stack(stats)

    def unflatten(
        self, vector: torch.Tensor, stats: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter a vector and its ``stats [num_tensors, 2]`` (mean / std, log std) stand for."""
        if vector.shape != (self.length,) or stats.shape != (self.num_tensors, 2):
            raise ValueError(
                f"vector must be [{self.length}] and stats [{self.num_tensors}, 2], got "
                f"{tuple(vector.shape)} and {tuple(stats.shape)}"
            )
        found: dict[str, dict[str, torch.Tensor]] = {}
        offset = 0
        for (module, side, shape), (relative_mean, log_std) in zip(self.entries, stats, strict=True):
            size = shape[0] * shape[1]
            tensor = (vector[offset : offset + size].reshape(shape) + relative_mean) * log_std.exp()
            found.setdefault(module, {})[side] = tensor
            offset += size
        return {module: (sides["A"], sides["B"]) for module, sides in found.items()}


@torch.no_grad()
def task_vector(model, codec, demonstrations: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean over the demonstrations of the last layer's hidden state at each one's last token
    (prompt followed by its answer), computed by the base model (no adapter): ``[hidden]``."""
    if not demonstrations:
        raise ValueError("task_vector needs at least one demonstration")
    ids, _, attention = task_data.encode(codec, demonstrations)
    with adapter_batch(None):
        hidden = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
    last = attention.sum(1) - 1
    return hidden[torch.arange(len(demonstrations)), last].float().mean(0)


class StridedConv1d(nn.Module):
    """``Conv1d(c_in, c_out, kernel_size=stride, stride=stride)`` on channels-last ``[B, L, c_in]``:
    with kernel = stride the windows do not overlap, so the convolution is one GEMM on a free view
    (no im2col, and the layout stays channels-last between layers)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.linear = nn.Linear(c_in * stride, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        return self.linear(x.reshape(B, L // self.stride, self.stride * C))


class StridedConvTranspose1d(nn.Module):
    """``ConvTranspose1d(c_in, c_out, kernel_size=stride, stride=stride)`` on channels-last tensors."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.c_out = c_out
        self.linear = nn.Linear(c_in, c_out * stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return self.linear(x).reshape(B, -1, self.c_out)


class InstanceNorm(nn.Module):
    """InstanceNorm1d (no affine) on channels-last ``[B, L, C]``: each channel over its positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + 1e-5)


class ConditionalVAE(nn.Module):
    """The ICM-LoRA generator over flattened, normalised LoRA vectors of ``length`` numbers.

    Encoder: ``len(channels)`` 1-D convolutions of kernel = stride (each with instance norm and
    LeakyReLU; channels-last, see ``StridedConv1d``), a linear map to ``hidden``; the condition is
    projected to ``hidden`` and concatenated; mu / logvar heads to ``latent``. Decoder: a linear
    map from ``[z, condition]`` back to the last conv shape, then transposed convolutions to the
    padded length, plus a learned per-position mean and low-rank per-position basis (see
    ``__init__``). A stats head predicts each tensor's (mean / std, log std) from the condition.
    ``condition_dim=0`` makes it the unconditional VAE of the ablation.
    """

    def __init__(
        self,
        length: int,
        condition_dim: int,
        num_tensors: int,
        latent: int = 64,
        hidden: int = 256,
        channels: Sequence[int] = (8, 16, 32, 64),
        stride: int = 4,
        position_rank: int = 16,
    ) -> None:
        super().__init__()
        self.length = length
        self.condition_dim = condition_dim
        self.num_tensors = num_tensors
        self.latent = latent
        reduction = stride ** len(channels)
        self.positions = math.ceil(length / reduction)
        self.padded = self.positions * reduction
        self.channels = tuple(channels)
        layers, previous = [], 1
        for width in channels:
            layers += [StridedConv1d(previous, width, stride), InstanceNorm(), nn.LeakyReLU(0.2)]
            previous = width
        self.encoder = nn.Sequential(*layers)
        flat = channels[-1] * self.positions
        self.to_hidden = nn.Sequential(nn.Linear(flat, hidden), nn.LeakyReLU(0.2))
        condition_width = hidden if condition_dim else 0
        self.condition = (
            nn.Sequential(nn.Linear(condition_dim, hidden), nn.LeakyReLU(0.2)) if condition_dim else None
        )
        self.mu = nn.Linear(hidden + condition_width, latent)
        self.logvar = nn.Linear(hidden + condition_width, latent)
        self.from_latent = nn.Linear(latent + condition_width, flat)
        layers = []
        widths = list(channels[::-1]) + [1]
        for index, (width, out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(StridedConvTranspose1d(width, out, stride))
            if index < len(channels) - 1:
                layers += [InstanceNorm(), nn.LeakyReLU(0.2)]
        self.decoder = nn.Sequential(*layers)
        self.stats = nn.Linear(condition_width, 2 * num_tensors) if condition_dim else None
        # the head predicts standardised stats: log std sits near -4 for a LoRA tensor, which a head
        # starting at 0 would need thousands of Adam steps to reach (``set_stats_normalisation``)
        self.register_buffer("stats_mean", torch.zeros(num_tensors, 2))
        self.register_buffer("stats_std", torch.ones(num_tensors, 2))
        # A transposed-conv decoder of kernel = stride builds each block of stride^depth outputs
        # from one position of the last conv shape through weights shared by all blocks, so it
        # cannot put position-specific values (a LoRA's weights) where they belong. A learned
        # per-position mean and a rank-``position_rank`` per-position basis, driven by [z, c],
        # give the decoder that; the conv path models what the blocks share.
        self.position_rank = position_rank
        self.position_mean = nn.Parameter(torch.zeros(length))
        self.position_basis = nn.Parameter(torch.randn(position_rank, length) * 0.01)
        self.to_position = nn.Linear(latent + condition_width, position_rank)

    def _condition(self, condition: torch.Tensor | None, batch: int) -> torch.Tensor:
        if self.condition is None:
            return torch.zeros(batch, 0, device=self.mu.weight.device)
        return self.condition(condition)

    def encode(
        self, vectors: torch.Tensor, condition: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = nn.functional.pad(vectors, (0, self.padded - self.length)).unsqueeze(2)  # [B, L, 1]
        h = torch.cat(
            [self.to_hidden(self.encoder(x).flatten(1)), self._condition(condition, len(vectors))], 1
        )
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        zc = torch.cat([z, self._condition(condition, len(z))], 1)
        h = self.from_latent(zc)
        shared = self.decoder(h.view(len(z), self.positions, self.channels[-1])).squeeze(2)[:, : self.length]
        return shared + self.position_mean + self.to_position(zc) @ self.position_basis

    def predict_stats(self, condition: torch.Tensor) -> torch.Tensor:
        """``[B, num_tensors, 2]`` (mean / std, log std) of each tensor, from the condition alone."""
        if self.stats is None:
            raise ValueError("the unconditional VAE has no stats head; pass stats explicitly")
        return self._standardised_stats(condition) * self.stats_std + self.stats_mean

    def _standardised_stats(self, condition: torch.Tensor) -> torch.Tensor:
        return self.stats(self.condition(condition)).view(len(condition), self.num_tensors, 2)

    def set_stats_normalisation(self, stats: torch.Tensor) -> None:
        """Standardise the stats head's targets by the mean and std of ``stats [N, tensors, 2]``."""
        self.stats_mean.copy_(stats.mean(0))
        self.stats_std.copy_(stats.std(0, unbiased=False).clamp_min(1e-3))

    def loss(self, vectors, condition, stats) -> tuple[torch.Tensor, dict[str, float]]:
        mu, logvar = self.encode(vectors, condition)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        reconstruction = nn.functional.mse_loss(self.decode(z, condition), vectors)
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.square() - logvar.exp(), dim=1))
        total = reconstruction + KL_WEIGHT * kl
        parts = {"mse": reconstruction.item(), "kl": kl.item()}
        if self.stats is not None:
            stats_loss = nn.functional.mse_loss(
                self._standardised_stats(condition), (stats - self.stats_mean) / self.stats_std
            )
            total = total + stats_loss
            parts["stats"] = stats_loss.item()
        return total, parts


class ICMGenerator:
    """A trained generator: the VAE, the LoRA layout it writes, scales, and condition statistics."""

    def __init__(
        self,
        vae: ConditionalVAE,
        layout: FlatLayout,
        scale: float,
        condition_mean: torch.Tensor,
        condition_std: torch.Tensor,
    ) -> None:
        self.vae = vae.eval()
        self.layout = layout
        self.scale = float(scale)
        self.condition_mean = condition_mean
        self.condition_std = condition_std

    @property
    def conditional(self) -> bool:
        return self.vae.condition_dim > 0

    def _normalised(self, conditions: torch.Tensor) -> torch.Tensor | None:
        if not self.conditional:
            return None
        if conditions.dim() != 2 or conditions.shape[1] != self.vae.condition_dim:
            raise ValueError(
                f"conditions must be [num_adapters, {self.vae.condition_dim}] task vectors, got "
                f"{tuple(conditions.shape)}"
            )
        return (conditions.float() - self.condition_mean) / self.condition_std

    @torch.no_grad()
    def generate_vectors(
        self, conditions: torch.Tensor | int, seed: int = 0, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(normalised vectors [B, length], predicted stats [B, tensors, 2] or None)``.

        ``conditions``: ``[B, condition_dim]`` task vectors, or a count for the unconditional VAE.
        """
        condition = None if isinstance(conditions, int) else self._normalised(conditions)
        count = conditions if isinstance(conditions, int) else conditions.shape[0]
        if isinstance(conditions, int) and self.conditional:
            raise ValueError("this generator is conditional: pass task vectors, not a count")
        generator = torch.Generator().manual_seed(seed)
        z = (
            torch.randn(count, self.vae.latent, generator=generator)
            if sample
            else torch.zeros(count, self.vae.latent)
        )
        vectors = self.vae.decode(z, condition)
        stats = self.vae.predict_stats(condition) if condition is not None else None
        return vectors, stats

    def generate(
        self, conditions: torch.Tensor | int, stats: torch.Tensor | None = None, seed: int = 0
    ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Adapters (``{module: (A, B)}``, scale ``self.scale``) for each condition, in one batched call.

        ``stats [B, tensors, 2]`` de-normalises with given (e.g. a real checkpoint's) statistics;
        by default the predicted ones are used.
        """
        vectors, predicted = self.generate_vectors(conditions, seed)
        stats = predicted if stats is None else stats
        if stats is None:
            raise ValueError("the unconditional generator needs stats to de-normalise its vectors")
        return [self.layout.unflatten(v, s) for v, s in zip(vectors, stats, strict=True)]

    def check_model(self, model: nn.Module) -> None:
        """ValueError when ``model`` lacks a module of the layout or its shape differs."""
        for module, side, (rows, cols) in self.layout.entries:
            try:
                linear = model.get_submodule(module)
            except AttributeError:
                raise ValueError(
                    f"the generator targets module {module!r}, which the model does not have"
                ) from None
            expected = (rows, linear.in_features) if side == "A" else (linear.out_features, cols)
            if (rows, cols) != expected:
                raise ValueError(
                    f"the generator's lora_{side} of {module!r} is {(rows, cols)}; "
                    f"the model's layer needs {expected}"
                )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.vae.parameters())

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {f"vae.{k}": v.contiguous() for k, v in self.vae.state_dict().items()}
        tensors["condition_mean"] = self.condition_mean.contiguous()
        tensors["condition_std"] = self.condition_std.contiguous()
        vae = self.vae
        config = {
            "layout": [[m, s, list(shape)] for m, s, shape in self.layout.entries],
            "scale": self.scale,
            "vae": {
                "length": vae.length,
                "condition_dim": vae.condition_dim,
                "num_tensors": vae.num_tensors,
                "latent": vae.latent,
                "hidden": vae.to_hidden[0].out_features,
                "channels": list(vae.channels),
                "stride": vae.encoder[0].stride,
                "position_rank": vae.position_rank,
            },
        }
        save_file(tensors, str(path), metadata={"icm_lora": json.dumps(config)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ICMGenerator:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "icm_lora" not in metadata:
                raise ValueError(f"{path} is not an ICM-LoRA generator file (no icm_lora metadata)")
            config = json.loads(metadata["icm_lora"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        vae = ConditionalVAE(**config["vae"])
        vae.load_state_dict({k.removeprefix("vae."): v for k, v in tensors.items() if k.startswith("vae.")})
        layout = FlatLayout(tuple((m, s, tuple(shape)) for m, s, shape in config["layout"]))
        return cls(vae, layout, config["scale"], tensors["condition_mean"], tensors["condition_std"])


def train_generator(
    vectors: torch.Tensor,
    stats: torch.Tensor,
    conditions: torch.Tensor | None,
    layout: FlatLayout,
    scale: float,
    epochs: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    desc: str = "training the ICM-LoRA generator",
    **vae_options,
) -> ICMGenerator:
    """Fit a ConditionalVAE on ``vectors [N, length]`` (normalised checkpoints), their ``stats
    [N, tensors, 2]`` and ``conditions [N, condition_dim]`` (None: the unconditional VAE)."""
    if vectors.dim() != 2 or vectors.shape[1] != layout.length:
        raise ValueError(f"vectors must be [N, {layout.length}], got {tuple(vectors.shape)}")
    if stats.shape != (vectors.shape[0], layout.num_tensors, 2):
        raise ValueError(
            f"stats must be [N={vectors.shape[0]}, {layout.num_tensors}, 2], got {tuple(stats.shape)}"
        )
    if conditions is not None and (conditions.dim() != 2 or conditions.shape[0] != vectors.shape[0]):
        raise ValueError(
            f"conditions must be [N={vectors.shape[0]}, condition_dim], got {tuple(conditions.shape)}"
        )
    torch.manual_seed(seed)
    condition_dim = 0 if conditions is None else conditions.shape[1]
    if conditions is not None:
        condition_mean = conditions.float().mean(0)
        condition_std = conditions.float().std(0).clamp_min(1e-6)
        normalised = (conditions.float() - condition_mean) / condition_std
    else:
        condition_mean = condition_std = torch.zeros(0)
        normalised = None
    vae = ConditionalVAE(layout.length, condition_dim, layout.num_tensors, **vae_options)
    vae.set_stats_normalisation(stats.float())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    progress = tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=None)
    for _ in progress:
        order = torch.randperm(len(vectors))
        for start in range(0, len(vectors), batch_size):
            index = order[start : start + batch_size]
            condition = None if normalised is None else normalised[index]
            loss, parts = vae.loss(vectors[index], condition, stats[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        progress.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
    return ICMGenerator(vae, layout, scale, condition_mean, condition_std)

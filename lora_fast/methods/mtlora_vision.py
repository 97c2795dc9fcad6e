"""MTLoRA's image setting: a small hierarchical vision transformer on scikit-learn's digits.

The model (``HierarchicalViT``) is built of nn.Linear layers in the shape of the paper's Swin
backbone, scaled down to 8x8 images: 2x2 patches (16 tokens, width 32) through a stage of two
blocks, a patch-merging layer (4 tokens, width 64), a second stage of two blocks, mean pooling,
one head per task. It is pre-trained in code on digit classification, then adapted to several
tasks with per-task heads. ``forward(images, image_slots, num_slots)`` runs each stage inside its
own AdapterBatch (one slot per image, the stage's tokens per image), so MultiLoRALinear and
MTLoRALinear layers see every token's slot.

Placement (paper): TA on qkv / proj / fc1 / fc2 of every block, TS on proj / fc1 / fc2 of the last
block of each stage.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from tqdm import tqdm

import lora_fast
from lora_fast.layers import remove_adapters
from lora_fast.methods import mtlora
from lora_fast.methods.mtlora_demo import table
from lora_fast.methods.tasks import seeded

PLACEMENT = mtlora.MTLoRAPlacement(
    shared=(r"stages\.\d+\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",),
    task_specific=(r"stages\.\d+\.blocks\.1\.(attn\.proj|mlp\.fc1|mlp\.fc2)",),
)
# TS modules on proj / fc1 / fc2 of every block (``--vision-task-blocks all``)
PLACEMENT_EVERY_BLOCK = mtlora.MTLoRAPlacement(
    shared=PLACEMENT.shared,
    task_specific=(r"stages\.\d+\.blocks\.\d+\.(attn\.proj|mlp\.fc1|mlp\.fc2)",),
)


def _flip(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    flipped = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flipped[:, None, None], images.flip(-1), images), flipped.long()


SCHEDULES = ("cosine", "constant")

# name -> (classes, transform(images, digit labels, generator) -> (images, task labels))
TASKS = {
    "parity": (2, lambda x, y, g: (x, y % 2)),
    "above_four": (2, lambda x, y, g: (x, (y > 4).long())),
    "flipped": (2, _flip),
    "rotated_digit": (10, lambda x, y, g: (x.rot90(1, (-2, -1)), y)),
}


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, 2 * width)
        self.mlp.fc2 = nn.Linear(2 * width, width)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, W = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(N, L, 3, self.heads, W // self.heads).unbind(2)
        attended = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.attn.proj(attended.transpose(1, 2).reshape(N, L, W))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class Stage(nn.Module):
    def __init__(self, width: int, heads: int, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class HierarchicalViT(nn.Module):
    """8x8 images ``[N, 8, 8]`` -> pooled features ``[N, 64]``; ``heads[task]`` maps them to logits."""

    def __init__(self, tasks: dict[str, int]) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(4, 32)
        self.position = nn.Parameter(torch.randn(16, 32) * 0.02)
        self.stages = nn.ModuleList([Stage(32, 2), Stage(64, 4)])
        self.merge = nn.Linear(4 * 32, 64)
        self.norm = nn.LayerNorm(64)
        self.heads = nn.ModuleDict({name: nn.Linear(64, classes) for name, classes in tasks.items()})

    def features(self, images: torch.Tensor, image_slots: torch.Tensor | None = None, num_slots: int = 1):
        N = images.shape[0]
        patches = images.view(N, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(N, 16, 4)
        x = self.patch_embed(patches) + self.position
        for index, stage in enumerate(self.stages):
            if index:  # merge 2x2 neighbouring tokens: 4x4 grid of 32 -> 2x2 grid of 64
                x = x.view(N, 2, 2, 2, 2, 32).permute(0, 1, 3, 2, 4, 5).reshape(N, 4, 128)
                x = self.merge(x)
            batch = (
                None if image_slots is None else lora_fast.AdapterBatch(image_slots, num_slots, x.shape[1])
            )
            with lora_fast.adapter_batch(batch):
                x = stage(x)
        return self.norm(x.mean(dim=1))


def load_digits(
    seed: int, validation: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digit images in [0, 1], split 70 / 30: train x, y, test x, y.
    ``validation``: the 70% split again 80 / 20 and its 20% returned in place of the test images
    (for choosing a recipe without looking at them)."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(labels))
    if validation:
        order, cut = order[:cut], int(0.8 * cut)
    return images[order[:cut]], labels[order[:cut]], images[order[cut:]], labels[order[cut:]]


def task_data(tasks, images, labels, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each task's (images, labels): the digits through the task's transform (fixed per seed)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: TASKS[name][1](images, labels, generator) for name in tasks}


def pretrain(model: HierarchicalViT, images, labels, steps: int, seed: int) -> None:
    """Digit classification (head ``digit``), every parameter trained: the backbone's pre-training."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in tqdm(
        range(steps), desc="pre-training the ViT on digits", unit="step", leave=False, disable=None
    ):
        index = torch.randint(0, len(labels), (128,))
        loss = nn.functional.cross_entropy(model.heads["digit"](model.features(images[index])), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_tasks(
    model, tasks, data, params, slot_of, num_slots, steps, per_task, lr, seed, label, schedule="cosine"
) -> float:
    """Mixed-task batches (``per_task`` images of every task), the sum of per-task losses, each
    task on its head; returns seconds per step. Dropout is seeded with ``seed`` (``tasks.seeded``).
    ``schedule``: ``"cosine"`` decays the learning rate to 0 over ``steps`` (the paper's Swin
    recipe), ``"constant"`` keeps it."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    params = list(params)
    with seeded(seed, params):
        rng = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if schedule == "cosine" else None
        model.train()
        started = time.perf_counter()
        for _ in tqdm(range(steps), desc=label, unit="step", leave=False, disable=None):
            chosen = {t: torch.randint(0, len(data[t][1]), (per_task,), generator=rng) for t in tasks}
            images = torch.cat([data[t][0][chosen[t]] for t in tasks])
            slots = torch.tensor([slot_of(t) for t in tasks for _ in range(per_task)])
            features = model.features(images, slots, num_slots)
            loss = sum(
                nn.functional.cross_entropy(
                    model.heads[t](features[i * per_task : (i + 1) * per_task]), data[t][1][chosen[t]]
                )
                for i, t in enumerate(tasks)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if decay is not None:
                decay.step()
        model.eval()
        return (time.perf_counter() - started) / steps


@torch.no_grad()
def accuracy(model, tasks, data, slot_of, num_slots) -> dict[str, float]:
    scores = {}
    for t in tasks:
        images, labels = data[t]
        slots = torch.full((len(labels),), slot_of(t))
        predicted = model.heads[t](model.features(images, slots, num_slots)).argmax(-1)
        scores[t] = float((predicted == labels).float().mean())
    return scores


def run(args: argparse.Namespace, rest) -> dict:
    parser = argparse.ArgumentParser(prog="lora-fast mtlora demo --vision")
    parser.add_argument("--vision-tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--images-per-task", type=int, default=32)
    # TA 6 / TS 4: 27,152 trainable parameters, just inside the goal's budget (a third of full
    # fine-tuning's 82,960), chosen on validation images (mtlora_vision_recipe_sweep.md)
    parser.add_argument("--vision-shared-rank", type=int, default=6)
    parser.add_argument("--vision-task-rank", type=int, default=4)
    parser.add_argument("--vision-single-rank", type=int, default=4)
    parser.add_argument("--vision-lr", type=float, default=3e-3, help="heads and LoRA variants")
    parser.add_argument("--vision-full-lr", type=float, default=1e-3, help="full fine-tuning")
    parser.add_argument(
        "--vision-schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning rate over the adaptation steps, every variant alike (default: cosine decay)",
    )
    parser.add_argument(
        "--vision-task-blocks",
        choices=("last", "all"),
        default="last",
        help="blocks with task-specific modules: the last of each stage (paper) or every block",
    )
    parser.add_argument(
        "--vision-validation",
        action="store_true",
        help="score on 20%% of the training images instead of the test images (for choosing a recipe)",
    )
    vision = parser.parse_args(rest)
    if args.tiny:
        vision.pretrain_steps, vision.vision_steps = 5, 3
    started = time.perf_counter()
    tasks = list(vision.vision_tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown vision task {unknown[0]!r}; tasks: {sorted(TASKS)}")
    train_x, train_y, test_x, test_y = load_digits(args.seed, vision.vision_validation)
    placement = PLACEMENT if vision.vision_task_blocks == "last" else PLACEMENT_EVERY_BLOCK
    torch.manual_seed(args.seed)
    model = HierarchicalViT({"digit": 10, **{t: TASKS[t][0] for t in tasks}})
    pretrain(model, train_x, train_y, vision.pretrain_steps, args.seed)
    digit_accuracy = float((model.heads["digit"](model.features(test_x)).argmax(-1) == test_y).float().mean())
    mtlora.check_task_heads(tasks, model.heads)
    train = task_data(tasks, train_x, train_y, args.seed)
    test = task_data(tasks, test_x, test_y, args.seed + 1)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    for param in model.parameters():
        param.requires_grad_(False)
    shared_names, _ = PLACEMENT.resolve(model)
    steps, per_task = vision.vision_steps, vision.images_per_task

    def heads():
        params = [p for t in tasks for p in model.heads[t].parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def reset():
        model.load_state_dict(pretrained)
        for param in model.parameters():
            param.requires_grad_(False)

    variants = {}
    head_params = heads()
    seconds = train_tasks(
        model,
        tasks,
        train,
        head_params,
        lambda t: -1,
        1,
        steps,
        per_task,
        vision.vision_lr,
        args.seed,
        "heads only",
        vision.vision_schedule,
    )
    head_count = sum(p.numel() for p in head_params)
    variants["heads only (frozen backbone)"] = (
        accuracy(model, tasks, test, lambda t: -1, 1),
        head_count,
        seconds,
    )
    reset()

    def lora_variant(num_slots, rank, slot_of, label):
        stacks = lora_fast.AdapterStacks(num_slots=num_slots, max_rank=rank)
        generator = torch.Generator().manual_seed(args.seed)
        for slot in range(num_slots):
            weights = {}
            for name in shared_names:
                linear = model.get_submodule(name)
                A = (
                    torch.rand(rank, linear.in_features, generator=generator) * 2 - 1
                ) / linear.in_features**0.5
                weights[name] = (A, torch.zeros(linear.out_features, rank))
            stacks.add(f"slot{slot}", weights, scales=args.scale)
        layers = lora_fast.inject_adapters(model, stacks, dropout=args.dropout)
        params = [p for layer in layers.values() for p in layer.train_slots(range(num_slots))] + heads()
        seconds = train_tasks(
            model,
            tasks,
            train,
            params,
            slot_of,
            num_slots,
            steps,
            per_task,
            vision.vision_lr,
            args.seed,
            label,
            vision.vision_schedule,
        )
        scores = accuracy(model, tasks, test, slot_of, num_slots)
        count = sum(p.numel() for p in params)
        remove_adapters(model, layers)
        reset()
        return scores, count, seconds

    if "single" in args.variants:
        variants["single-task LoRA"] = lora_variant(
            len(tasks), vision.vision_single_rank, tasks.index, "single-task LoRA"
        )
    if "shared" in args.variants:
        variants["shared LoRA"] = lora_variant(1, vision.vision_shared_rank, lambda t: 0, "shared LoRA")

    if "full" in args.variants:
        weights = [model.get_submodule(name).weight for name in shared_names]
        for weight in weights:
            weight.requires_grad_(True)
        params = weights + heads()
        seconds = train_tasks(
            model,
            tasks,
            train,
            params,
            lambda t: -1,
            1,
            steps,
            per_task,
            vision.vision_full_lr,
            args.seed,
            "full FT",
            vision.vision_schedule,
        )
        variants["full fine-tuning"] = (
            accuracy(model, tasks, test, lambda t: -1, 1),
            sum(p.numel() for p in params),
            seconds,
        )
        reset()

    counts = step_time = None
    for index, mode in enumerate(args.modes if "mtlora" in args.variants else ()):
        mt = mtlora.inject_mtlora(
            model,
            placement,
            tasks,
            vision.vision_shared_rank,
            vision.vision_task_rank,
            args.scale,
            args.scale,
            mode,
            args.dropout,
            args.seed,
        )
        params = mt.parameters() + heads()
        seconds = train_tasks(
            model,
            tasks,
            train,
            params,
            tasks.index,
            len(tasks),
            steps,
            per_task,
            vision.vision_lr,
            args.seed,
            f"MTLoRA ({mode})",
            vision.vision_schedule,
        )
        variants[f"MTLoRA ({mode})"] = (
            accuracy(model, tasks, test, tasks.index, len(tasks)),
            sum(p.numel() for p in params),
            seconds,
        )
        if index == 0:
            counts = mt.num_parameters()
            step_time = _step_times(model, tasks, train, mt, per_task, args.timing_repeats)
        mt.remove()
        reset()
    return {
        "setting": "vision",
        "model": "hierarchical ViT pre-trained in code on digits",
        "pretrained_accuracy": digit_accuracy,
        "tasks": tasks,
        "metric": "validation accuracy (20% of the training images)"
        if vision.vision_validation
        else "test accuracy (scikit-learn digits, 30% held out)",
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, **vars(vision)},
        "variants": table(variants),
        "headline_mode": args.modes[0],
        "mtlora_parameters": counts,
        "mtlora_step_time": step_time,
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }


def _step_times(model, tasks, data, mt, per_task, repeats) -> dict:
    """Forward + backward seconds of one MTLoRA step on the same images: tasks mixed vs one task."""
    images = torch.cat([data[t][0][:per_task] for t in tasks])
    times = {}
    model.train()
    for label, slots in (
        ("mixed", torch.tensor([i for i in range(len(tasks)) for _ in range(per_task)])),
        ("single", torch.zeros(len(tasks) * per_task, dtype=torch.long)),
    ):
        samples = []
        for repeat in range(repeats + 1):
            started = time.perf_counter()
            model.features(images, slots, len(tasks)).square().sum().backward()
            if repeat:
                samples.append(time.perf_counter() - started)
        times[label] = statistics.median(samples)
    model.eval()
    return {
        "mixed_s": times["mixed"],
        "single_s": times["single"],
        "mixed_over_single": times["mixed"] / times["single"],
    }

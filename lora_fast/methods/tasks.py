"""Generated task families and the train / evaluate loops the method experiments share.

There is no labelled dataset offline, so tasks are made in code. The family used by the method
experiments is the affine digit cipher: a prompt ``"39417="`` is answered digit by digit with
``(m * d + k) mod 10`` (``m`` in {1, 3, 7, 9}, so every cipher is a permutation of the digits).
Ciphers share structure (copy the digits, map each through a table) and differ in the table, which
is what the subspace, generator and multi-task methods need.

Accuracy is measured with teacher forcing: an answer is exact when the model's argmax at every
answer position is the right digit, which is exactly when greedy decoding would produce it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..batch import AdapterBatch
from ..layers import adapter_batch

MULTIPLIERS = (1, 3, 7, 9)  # the units mod 10: each makes the cipher a permutation
SEPARATOR = "="
Codec = Callable[[str], list[int]]


@dataclass(frozen=True)
class DigitCipher:
    """The task ``d -> (multiplier * d + offset) mod 10`` applied to every digit of the prompt."""

    multiplier: int
    offset: int

    def __post_init__(self) -> None:
        if self.multiplier not in MULTIPLIERS:
            raise ValueError(f"multiplier must be one of {MULTIPLIERS}, got {self.multiplier}")
        if not 0 <= self.offset <= 9:
            raise ValueError(f"offset must be in [0, 9], got {self.offset}")

    @property
    def name(self) -> str:
        return f"cipher_m{self.multiplier}_k{self.offset}"

    def apply(self, digits: str) -> str:
        return "".join(str((self.multiplier * int(d) + self.offset) % 10) for d in digits)

    def table(self) -> list[int]:
        return [(self.multiplier * d + self.offset) % 10 for d in range(10)]


def cipher_family(count: int, seed: int = 0, multipliers: Sequence[int] = MULTIPLIERS) -> list[DigitCipher]:
    """``count`` distinct ciphers (never the identity), in a fixed shuffled order per seed."""
    pool = [DigitCipher(m, k) for m in multipliers for k in range(10) if (m, k) != (1, 0)]
    if not 1 <= count <= len(pool):
        raise ValueError(
            f"count must be in [1, {len(pool)}] for multipliers {tuple(multipliers)}, got {count}"
        )
    random.Random(seed).shuffle(pool)
    return pool[:count]


def examples(task: DigitCipher, count: int, rng: random.Random, length: int = 3) -> list[tuple[str, str]]:
    """``count`` (prompt, answer) pairs: ``length`` random digits then ``=``, and their cipher."""
    pairs = []
    for _ in range(count):
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        pairs.append((digits + SEPARATOR, task.apply(digits)))
    return pairs


def hf_codec(tokenizer) -> Codec:
    """A Hugging Face tokenizer as a codec (no special tokens added)."""
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


class CharCodec:
    """One token per character, for small models built in code (``vocab_size`` ids, 0 = padding)."""

    alphabet = "0123456789=;|>"
    vocab_size = len(alphabet) + 1
    pad_id = 0

    def __call__(self, text: str) -> list[int]:
        try:
            return [self.alphabet.index(c) + 1 for c in text]
        except ValueError as err:
            raise ValueError(
                f"CharCodec cannot encode {text!r}: characters must be in {self.alphabet!r}"
            ) from err


def encode(
    codec: Codec, pairs: Sequence[tuple[str, str]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids [N, L]``, ``labels [N, L]`` (-100 except on answers), ``attention_mask``."""
    encoded = [(codec(prompt), codec(answer)) for prompt, answer in pairs]
    length = max(len(p) + len(a) for p, a in encoded)
    ids = torch.full((len(pairs), length), pad_id)
    labels = torch.full((len(pairs), length), -100)
    attention = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (prompt, answer) in enumerate(encoded):
        sequence = prompt + answer
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
        attention[row, : len(sequence)] = 1
    return ids, labels, attention


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (labels shifted as in causal LM training)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: ``(exact [N] bool, correct-token fraction [N])`` under teacher forcing."""
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    answer = target != -100
    correct = (predicted == target) & answer
    exact = (correct | ~answer).all(dim=1)
    return exact, correct.sum(1) / answer.sum(1).clamp_min(1)


def model_logits(model, ids, attention) -> torch.Tensor:
    output = model(input_ids=ids, attention_mask=attention)
    return output.logits if hasattr(output, "logits") else output


@torch.no_grad()
def evaluate(
    model,
    codec: Codec,
    pad_id: int,
    tasks: Sequence[DigitCipher],
    slots: Sequence[int],
    num_slots: int,
    per_task: int,
    seed: int,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """Exact-match and digit accuracy per task, each task's prompts served by its slot (-1: base).

    All tasks go through the model together, in mixed batches: one forward per ``batch_size``.
    """
    rng = random.Random(seed)
    rows = [
        (task, slot, pair)
        for task, slot in zip(tasks, slots, strict=True)
        for pair in examples(task, per_task, rng)
    ]
    was_training = model.training
    model.eval()
    exact_by_task: dict[str, list[float]] = {task.name: [] for task in tasks}
    digits_by_task: dict[str, list[float]] = {task.name: [] for task in tasks}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, labels, attention = encode(codec, [pair for _, _, pair in chunk], pad_id)
        batch = AdapterBatch([slot for _, slot, _ in chunk], num_slots, seq_len=ids.shape[1])
        with adapter_batch(batch):
            logits = model_logits(model, ids, attention)
        exact, digits = answer_accuracy(logits, labels)
        for (task, _, _), e, d in zip(chunk, exact.tolist(), digits.tolist(), strict=True):
            exact_by_task[task.name].append(float(e))
            digits_by_task[task.name].append(d)
    model.train(was_training)
    return {
        name: {"exact": sum(exact_by_task[name]) / per_task, "digits": sum(digits_by_task[name]) / per_task}
        for name in exact_by_task
    }


def train_mixed(
    model,
    params: Iterable[torch.nn.Parameter],
    codec: Codec,
    pad_id: int,
    tasks: Sequence[DigitCipher],
    slots: Sequence[int],
    num_slots: int,
    steps: int,
    per_task: int,
    lr: float,
    seed: int,
    desc: str,
    weight_decay: float = 0.0,
) -> list[float]:
    """AdamW on ``params``: every step one batch mixing ``per_task`` examples of every task, each
    sequence routed to its task's slot. Returns the loss per step."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()
    progress = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for _ in progress:
        pairs, seq_slots = [], []
        for task, slot in zip(tasks, slots, strict=True):
            pairs += examples(task, per_task, rng)
            seq_slots += [slot] * per_task
        ids, labels, attention = encode(codec, pairs, pad_id)
        batch = AdapterBatch(seq_slots, num_slots, seq_len=ids.shape[1])
        with adapter_batch(batch):
            loss = next_token_loss(model_logits(model, ids, attention), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def target_linears(model, suffixes: Sequence[str]) -> list[str]:
    """Names of the model's nn.Linear modules whose name ends with one of ``suffixes``."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(suffixes))
    ]
    if not names:
        raise ValueError(f"no nn.Linear of the model ends with any of {tuple(suffixes)}")
    return names


def fresh_lora(model, modules: Sequence[str], rank: int, generator: torch.Generator) -> dict:
    """PEFT's initialisation for one adapter: ``{module: (A [rank, d_in] kaiming-uniform, B zeros)}``."""
    weights = {}
    for name in modules:
        linear = model.get_submodule(name)
        bound = 1.0 / linear.in_features**0.5  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
        A = (torch.rand(rank, linear.in_features, generator=generator) * 2 - 1) * bound
        weights[name] = (A, torch.zeros(linear.out_features, rank))
    return weights

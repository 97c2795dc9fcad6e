"""Generated task families and the train / evaluate loops the method experiments share.

There is no labelled dataset offline, so tasks are made in code: a family of word transforms
(``WORD_TASKS``: capitals, repeat, first letters, plural, ...). A prompt is one word, the answer
its transform. The tasks share structure (read the word, write letters of it back) and differ in
what they write, which is what the subspace, generator and multi-task methods need; a pretrained
LLM learns each in tens of LoRA steps because it can already spell.

A ``Codec`` turns prompts and answers into token ids: ``ChatCodec`` for an instruct model's
tokenizer (a short chat turn, no system prompt), ``CharCodec`` for small models built in code.
Accuracy is measured with teacher forcing: an answer is exact when the model's argmax at every
answer position is the right token, which is exactly when greedy decoding would produce it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..batch import AdapterBatch
from ..layers import adapter_batch

WORDS = (
    "apple river stone cloud garden silver window candle forest bridge rocket pencil ocean planet tiger "
    "violin castle mirror basket island lemon thunder mountain pillow dragon engine jacket kitten ladder "
    "marble needle orange puzzle rabbit saddle tomato velvet wagon yellow zebra anchor butter copper "
    "desert falcon guitar hammer iceberg jungle kettle lantern meadow"
).split()
HELD_OUT_WORDS = (
    "harbor sunset button pepper camera dolphin feather goblet helmet insect jigsaw koala lizard "
    "magnet nectar oyster parrot quartz ribbon spider temple umbrella valley walnut wizard yogurt "
    "almond beaver cactus donkey eagle fossil glacier hornet igloo jelly kernel lobster mango napkin"
).split()
# A wider split for experiments that compare methods by small differences in accuracy (MTLoRA's
# delta_m): 40 held-out words make one word 2.5 points, so its relative scores swing by tens of
# percent between seeds. Alternate words of MORE_WORDS (alphabetical) join each side.
MORE_WORDS = (
    "acorn album alley amber angel ankle apron arrow attic autumn avenue badge bagel ballet bamboo "
    "banana bandit banner barrel basin beacon beard beetle bell bench berry bishop blanket blossom "
    "boat bonnet border bottle boulder bowl bracket branch brick bubble bucket buffalo bundle burrow "
    "cabin cable camel canal canoe canyon carpet carrot cattle cavern cellar cherry chimney circle "
    "circus clock closet clover coach cobra coconut coffee comet compass cookie cottage cotton county "
    "coyote crayon cricket crystal cupboard curtain cushion dagger daisy dancer diamond dinner doctor "
    "dragonfly drawer drum duck dune eel elbow ember emerald farmer fence ferry fiddle finger flame "
    "flute forge fountain frog galaxy garlic gate gazelle geyser giant ginger giraffe glove goat "
    "gorilla grape gravel griddle gull hamster harp hatchet hawk hazel hedge heron hill hinge honey "
    "hoof horizon horse hotel hunter husky icicle ink iris ivory jaguar jar jasmine jewel journal "
    "judge kayak kennel kiwi knight knot label lagoon lake lamp laptop lava lawn leaf leopard letter "
    "lettuce library lily linen lion llama locket magpie mammoth mantle maple market mask meteor "
    "mitten monkey moose moth muffin museum mussel nail necklace nest nickel noodle nugget oak oasis "
    "olive onion orchard orchid ostrich otter owl paddle palace panda panther paper parcel pasta "
    "peach peanut pearl pebble pelican penguin pickle pigeon pine pirate pistol plank plum pocket "
    "poem pony poppy potato pottery prairie prism pumpkin puppet python quill quilt raccoon radish "
    "rain raven reef rhino ring robin rope rose ruby salmon sandal satchel scarf scooter sea seal "
    "seed shadow shark shell shovel shrimp signal singer skate skull sled slipper snail socket sofa "
    "soldier sparrow spinach sponge spoon squid stable statue storm straw stream sugar summit swan "
    "sword table tablet tailor teapot tent thimble thistle thorn throne ticket timber toad toast "
    "token torch tower tractor trail trumpet tulip tunnel turkey turtle twig valve vase vessel "
    "village vine volcano waffle wallet walrus wand wheat wheel whistle willow wolf wool yacht yarn "
    "zipper"
).split()
WIDE_WORDS = WORDS + MORE_WORDS[0::2]
WIDE_HELD_OUT_WORDS = HELD_OUT_WORDS + MORE_WORDS[1::2]
# For choosing a recipe without looking at the held-out words: half of the wide training words
# added by MORE_WORDS serve as validation words, the rest (VALIDATION_TRAIN_WORDS) for training.
VALIDATION_WORDS = MORE_WORDS[0::4]
VALIDATION_TRAIN_WORDS = WORDS + MORE_WORDS[2::4]
# name -> (training words, scored words)
WORD_SPLITS = {
    "wide": (WIDE_WORDS, WIDE_HELD_OUT_WORDS),
    "narrow": (WORDS, HELD_OUT_WORDS),
    "validation": (VALIDATION_TRAIN_WORDS, VALIDATION_WORDS),
}


@dataclass(frozen=True)
class WordTask:
    """One task: ``transform(word)`` is the answer to the prompt ``word`` (or, instructed,
    ``"<instruction>: word"``, for models that must tell the tasks apart from the prompt)."""

    name: str
    transform: Callable[[str], str]
    instruction: str

    def apply(self, word: str) -> str:
        return self.transform(word)


WORD_TASKS = {
    task.name: task
    for task in (
        WordTask("upper", str.upper, "Write in capitals"),
        WordTask("title", str.title, "Capitalize"),
        WordTask("repeat", lambda w: f"{w} {w}", "Repeat twice"),
        WordTask("repeat3", lambda w: f"{w} {w} {w}", "Repeat three times"),
        WordTask("initial", lambda w: w[0], "First letter"),
        WordTask("initial_upper", lambda w: w[0].upper(), "First letter in capitals"),
        WordTask("first2", lambda w: w[:2], "First two letters"),
        WordTask("last", lambda w: w[-1], "Last letter"),
        WordTask("plural", lambda w: w + "s", "Plural"),
        WordTask("upper_repeat", lambda w: f"{w.upper()} {w.upper()}", "Capitals twice"),
    )
}


# A parametric family (for generators that must interpolate): repeat a word k times, or write its
# first k letters, k = 1..5.
PARAMETRIC_TASKS = {
    task.name: task
    for k in range(1, 6)
    for task in (
        WordTask(f"repeat_x{k}", lambda w, k=k: " ".join([w] * k), f"Repeat {k} times"),
        WordTask(f"prefix_{k}", lambda w, k=k: w[:k], f"First {k} letters"),
    )
}


def word_tasks(
    names: Sequence[str] | None = None, family: Mapping[str, WordTask] = WORD_TASKS
) -> list[WordTask]:
    """The named tasks of ``family`` (all of them by default), ValueError for unknown names."""
    names = list(family) if names is None else list(names)
    unknown = [n for n in names if n not in family]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; tasks: {sorted(family)}")
    return [family[n] for n in names]


def examples(
    task: WordTask, count: int, rng: random.Random, words: Sequence[str] = WORDS, instructed: bool = False
) -> list[tuple[str, str]]:
    """``count`` (prompt, answer) pairs on words drawn from ``words``."""
    return [prompt_pair(task, rng.choice(words), instructed) for _ in range(count)]


def prompt_pair(task: WordTask, word: str, instructed: bool = False) -> tuple[str, str]:
    """``(prompt, answer)`` of ``task`` on ``word``."""
    return (f"{task.instruction}: {word}" if instructed else word), task.apply(word)


class ChatCodec:
    """An instruct model's tokenizer: the prompt is one user turn, the answer ends with end-of-turn."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._end = tokenizer.eos_token or ""

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, text: str) -> list[int]:
        return self._ids(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")

    def answer(self, text: str) -> list[int]:
        return self._ids(text + self._end)


class CharCodec:
    """One token per character, for small models built in code (``vocab_size`` ids, 0 = padding)."""

    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :;"
    vocab_size = len(alphabet) + 1
    pad_id = 0

    def _ids(self, text: str) -> list[int]:
        try:
            return [self.alphabet.index(c) + 1 for c in text]
        except ValueError as err:
            raise ValueError(
                f"CharCodec cannot encode {text!r}: use characters of {self.alphabet!r}"
            ) from err

    def prompt(self, text: str) -> list[int]:
        return self._ids(text + ":")

    def answer(self, text: str) -> list[int]:
        return self._ids(text + ";")


Codec = ChatCodec | CharCodec
# the Linear layers the experiments adapt: the 7 projections of every Llama decoder layer
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_model(tiny: bool, seed: int):
    """``(model, codec)``: SmolLM2-135M-Instruct, or a two-layer random Llama for smoke tests."""
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        codec = CharCodec()
        config = LlamaConfig(
            vocab_size=codec.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config).eval(), codec
    from ..integrations import hf_models

    model, tokenizer = hf_models.load_smollm2()
    return model, ChatCodec(tokenizer)


def encode(codec: Codec, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids [N, L]``, ``labels [N, L]`` (-100 except on answers), ``attention_mask``."""
    encoded = [(codec.prompt(prompt), codec.answer(answer)) for prompt, answer in pairs]
    length = max(len(p) + len(a) for p, a in encoded)
    ids = torch.full((len(pairs), length), codec.pad_id)
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
    tasks: Sequence[WordTask],
    slots: Sequence[int],
    num_slots: int,
    words: Sequence[str] = HELD_OUT_WORDS,
    batch_size: int = 64,
    instructed: bool = False,
) -> dict[str, dict[str, float]]:
    """Per task, over every word of ``words``: ``exact`` (answers entirely right) and ``tokens``
    (fraction of answer tokens right), each task's prompts served by its slot (-1: the base model).

    All tasks go through the model together, in mixed batches: one forward per ``batch_size``.
    """
    rows = [
        (task, slot, prompt_pair(task, word, instructed))
        for task, slot in zip(tasks, slots, strict=True)
        for word in words
    ]
    was_training = model.training
    model.eval()
    exact_by_task: dict[str, list[float]] = {task.name: [] for task in tasks}
    tokens_by_task: dict[str, list[float]] = {task.name: [] for task in tasks}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, labels, attention = encode(codec, [pair for _, _, pair in chunk])
        batch = AdapterBatch([slot for _, slot, _ in chunk], num_slots, seq_len=ids.shape[1])
        with adapter_batch(batch):
            logits = model_logits(model, ids, attention)
        exact, tokens = answer_accuracy(logits, labels)
        for (task, _, _), e, t in zip(chunk, exact.tolist(), tokens.tolist(), strict=True):
            exact_by_task[task.name].append(float(e))
            tokens_by_task[task.name].append(t)
    model.train(was_training)
    return {
        name: {
            "exact": sum(exact_by_task[name]) / len(words),
            "tokens": sum(tokens_by_task[name]) / len(words),
        }
        for name in exact_by_task
    }


@contextlib.contextmanager
def seeded(seed: int, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """torch's generator (and the CUDA ones of ``params``' devices) seeded with ``seed`` inside, the
    caller's state restored after: dropout in a training run does not depend on what ran before."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def train_mixed(
    model,
    params: Iterable[torch.nn.Parameter],
    codec: Codec,
    tasks: Sequence[WordTask],
    slots: Sequence[int],
    num_slots: int,
    steps: int,
    per_task: int,
    lr: float,
    seed: int,
    desc: str,
    weight_decay: float = 0.0,
    instructed: bool = False,
    after_step: Callable[[int], None] | None = None,
    words: Sequence[str] = WORDS,
) -> list[float]:
    """AdamW on ``params``: every step one batch mixing ``per_task`` examples of every task (on
    words drawn from ``words``), each sequence routed to its task's slot; ``after_step(step)``
    runs after each optimizer step (e.g. to keep checkpoints). Returns the loss per step.
    Dropout draws from torch's generator seeded with ``seed`` inside (the caller's generator
    state is restored), so a run does not depend on what ran before it."""
    params = list(params)
    with seeded(seed, params):
        rng = random.Random(seed)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        losses = []
        model.train()
        progress = tqdm(range(steps), desc=desc, unit="step", leave=False, disable=None)
        for step in progress:
            pairs, seq_slots = [], []
            for task, slot in zip(tasks, slots, strict=True):
                pairs += examples(task, per_task, rng, words, instructed)
                seq_slots += [slot] * per_task
            ids, labels, attention = encode(codec, pairs)
            batch = AdapterBatch(seq_slots, num_slots, seq_len=ids.shape[1])
            with adapter_batch(batch):
                loss = next_token_loss(model_logits(model, ids, attention), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
            if after_step is not None:
                after_step(step)
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

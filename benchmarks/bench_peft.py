"""PEFT models with many adapters in one batch: base model vs PEFT vs lora_fast.accelerate(PEFT).

    python -m benchmarks.bench_peft                  # SmolLM2-135M on CPU, one thread
    python -m benchmarks.bench_peft --device cuda    # Llama-8B-shaped model (4 layers, bf16) from a config
    python -m benchmarks.bench_peft --quick          # tiny Llama from a config (CI smoke test)

Every adapter has rank 16 on the seven projections of every decoder layer. A batch of sequences
cycles through L adapters (``adapter_names``). Timed in one process: the base model alone (no
PEFT), PEFT's mixed-batch forward, and the same PeftModel after ``lora_fast.accelerate``, for a
decode-like batch (many sequences of 1 token) and a prefill-like one, plus greedy generation.
The ceiling is the base model: LoRA for free.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import statistics
import time
from collections.abc import Callable, Sequence

import torch

import lora_fast
from benchmarks import common
from lora_fast.integrations import hf_models


def build_models(base: torch.nn.Module, num_adapters: int, rank: int, dtype: torch.dtype):
    """(base model alone, PeftModel with adapters a0..a{n-1}); the PeftModel wraps a copy."""
    import peft

    torch.manual_seed(0)
    targets = list(hf_models.LLAMA_PROJECTIONS)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a0", autocast_adapter_dtype=False)
    for index in range(1, num_adapters):
        model.add_adapter(f"a{index}", config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    return base.eval(), model.to(dtype).eval()


def timer(device: str, min_run_time: float, repetitions: int) -> Callable[[Callable[[], object]], float]:
    def measure(fn: Callable[[], object]) -> float:
        if device == "cuda":
            return common.gpu_median_us(fn, repetitions, graph=False)
        return common.median_us(fn, min_run_time)

    return measure


def wall_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(
    base: torch.nn.Module,
    vocab: int,
    device: str,
    dtype: torch.dtype,
    adapter_counts: Sequence[int],
    shapes: dict[str, tuple[int, int]],
    new_tokens: int,
    min_run_time: float,
    repetitions: int,
) -> list[dict]:
    base = base.to(device, dtype)
    base_model, peft_model = build_models(base, max(adapter_counts), 16, dtype)
    peft_model.to(device)
    measure = timer(device, min_run_time, repetitions)
    rows = []
    for L in adapter_counts:
        for phase, (sequences, length) in shapes.items():
            ids = torch.randint(1, vocab, (sequences, length), device=device)
            names = [f"a{i % L}" for i in range(sequences)]
            with torch.no_grad():
                mixed = functools.partial(peft_model, input_ids=ids, adapter_names=names)
                lora_fast.restore(peft_model)
                expected = mixed().logits.float()
                peft_us = measure(mixed)
                base_us = measure(functools.partial(base_model, input_ids=ids))
                lora_fast.accelerate(peft_model)
                got = mixed().logits.float()
                fast_us = measure(mixed)
            error = float((got - expected).abs().max() / expected.abs().max())
            tokens = sequences * length
            row = {
                "phase": phase,
                "adapters": L,
                "sequences": sequences,
                "tokens_per_sequence": length,
                "base_us": base_us,
                "peft_us": peft_us,
                "lora_fast_us": fast_us,
                "peft_over_base": peft_us / base_us,
                "lora_fast_over_base": fast_us / base_us,
                "speedup_vs_peft": peft_us / fast_us,
                "lora_fast_tokens_per_s": tokens / fast_us * 1e6,
                "max_rel_logit_error_vs_peft": error,
            }
            rows.append(row)
            print(
                f"{phase:8s} L={L:3d} {sequences}x{length}: base {base_us / 1e3:8.2f} ms"
                f"  PEFT x{row['peft_over_base']:.2f}  lora_fast x{row['lora_fast_over_base']:.2f} of base"
                f"  ({row['speedup_vs_peft']:.2f}x PEFT)",
                flush=True,
            )
        rows.append(generation_row(base_model, peft_model, L, shapes["decode"][0], vocab, new_tokens, device))
    return rows


def generation_row(base_model, peft_model, L, sequences, vocab, new_tokens, device) -> dict:
    """Greedy generation of ``new_tokens`` for ``sequences`` prompts of 8 tokens, tokens/s."""
    ids = torch.randint(1, vocab, (sequences, 8), device=device)
    names = [f"a{i % L}" for i in range(sequences)]
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }
    with torch.no_grad():
        base_s = wall_seconds(lambda: base_model.generate(input_ids=ids, **kwargs), 2, device)
        lora_fast.restore(peft_model)
        peft_tokens = peft_model.generate(input_ids=ids, adapter_names=names, **kwargs)
        peft_s = wall_seconds(
            lambda: peft_model.generate(input_ids=ids, adapter_names=names, **kwargs), 2, device
        )
        lora_fast.accelerate(peft_model)
        fast_tokens = peft_model.generate(input_ids=ids, adapter_names=names, **kwargs)
        fast_s = wall_seconds(
            lambda: peft_model.generate(input_ids=ids, adapter_names=names, **kwargs), 2, device
        )
    generated = sequences * new_tokens
    row = {
        "phase": "generate",
        "adapters": L,
        "sequences": sequences,
        "tokens_per_sequence": new_tokens,
        "base_us": base_s * 1e6,
        "peft_us": peft_s * 1e6,
        "lora_fast_us": fast_s * 1e6,
        "peft_over_base": peft_s / base_s,
        "lora_fast_over_base": fast_s / base_s,
        "speedup_vs_peft": peft_s / fast_s,
        "lora_fast_tokens_per_s": generated / fast_s,
        "same_tokens_as_peft": bool(torch.equal(peft_tokens, fast_tokens)),
    }
    print(
        f"generate L={L:3d} {sequences}x{new_tokens}: base {generated / base_s:8.1f} tok/s  "
        f"PEFT {generated / peft_s:8.1f}  lora_fast {generated / fast_s:8.1f}"
        f"  same tokens: {row['same_tokens_as_peft']}",
        flush=True,
    )
    return row


COLUMNS = [
    "phase",
    "adapters",
    "sequences",
    "tokens_per_sequence",
    "base_us",
    "peft_us",
    "lora_fast_us",
    "peft_over_base",
    "lora_fast_over_base",
    "speedup_vs_peft",
    "lora_fast_tokens_per_s",
]


def llama_8b_shaped(layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to_empty(device="cpu").apply(_init_weights)


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def _init_weights(module: torch.nn.Module) -> None:
    for param in module.parameters(recurse=False):
        with torch.no_grad():
            param.normal_(std=0.02)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny Llama from a config, short timing")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device")
    torch.set_num_threads(args.threads)
    info = common.machine()
    if args.quick:
        base, vocab, dtype, model_name = tiny_llama(), 512, torch.float32, "tiny-llama"
        shapes = {"decode": (8, 1), "prefill": (4, 16)}
        args.adapters, args.min_run_time, args.repetitions, args.new_tokens = [1, 4], 0.05, 5, 4
    elif gpu:
        base, vocab, dtype, model_name = llama_8b_shaped(), 128256, torch.bfloat16, "llama-8b-shaped-4-layers"
        shapes = {"decode": (64, 1), "prefill": (16, 256)}
    else:
        base, _ = hf_models.load_smollm2()
        vocab, dtype, model_name = base.config.vocab_size, torch.float32, "SmolLM2-135M-Instruct"
        shapes = {"decode": (16, 1), "prefill": (16, 32)}
    info["model"] = model_name
    where = info.get("gpu") if gpu else f"{info['cpu']}, {info['threads']} thread(s)"
    print(f"{model_name} on {where}, {dtype}, rank-16 adapters on the 7 projections of every layer")
    rows = run(
        base,
        vocab,
        args.device,
        dtype,
        args.adapters,
        shapes,
        args.new_tokens,
        args.min_run_time,
        args.repetitions,
    )
    table = common.markdown_table(rows, COLUMNS)
    print()
    print(table)
    name = info["gpu"] if gpu else info["cpu"]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{model_name} {name}".lower()).strip("-")
    stem = f"peft_{args.device}_{slug}" + ("_quick" if args.quick else "")
    payload = {"benchmark": "peft_mixed_batch", "machine": info, "config": vars(args), "rows": rows}
    paths = common.write_results(stem, payload, table, args.out_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()

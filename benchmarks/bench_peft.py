"""PEFT models with many adapters in one batch: base model vs PEFT vs lora_fast.accelerate(PEFT).

    python -m benchmarks.bench_peft                  # SmolLM2-135M on CPU, one thread
    python -m benchmarks.bench_peft --device cuda    # Llama-8B-shaped model (4 layers, bf16) from a config
    python -m benchmarks.bench_peft --quick          # tiny Llama from a config (CI smoke test)

Every adapter has rank 16 on the seven projections of every decoder layer. A batch of sequences
cycles through L adapters (``adapter_names``). Timed in one process: the base model alone (no
PEFT), PEFT's mixed-batch forward, and a twin of that PeftModel after ``lora_fast.accelerate``,
for a decode-like batch (many sequences of 1 token) and a prefill-like one, plus greedy
generation, plus one training step of the prefill-like batch's adapters (PEFT refuses
``adapter_names`` in training, so it runs a forward and backward per adapter; the accelerated
model runs the mixed batch once; the gradients are checked equal). On the CPU the variants run
in interleaved rounds, so the drift of a shared machine falls on all of them alike. The ceiling
is the base model: LoRA for free.

Each row also states what the adapters' own bytes cost: ``adapter_mb`` is the LoRA weights of
the batch's adapters (every accelerated forward reads each of them once), and
``adapter_read_floor`` the accelerated/base ratio the model would reach if everything but
reading those bytes, at the read bandwidth measured in the same run, were free: where the base
forward is itself bound by memory (GPU decode), no kernel gets under it; where the base forward
is bound by compute (CPU), only reads hidden under the base GEMMs' arithmetic would.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
from collections.abc import Callable, Sequence

import torch

import lora_fast
from benchmarks import common
from lora_fast.integrations import hf_models
from lora_fast.layers import contiguous_rows


def build_models(base: torch.nn.Module, num_adapters: int, rank: int, dtype: torch.dtype):
    """A PeftModel with adapters a0..a{n-1} on a copy of ``base``, and its accelerated twin
    (another copy); then the base model to time against them (``sharing_base_weights``)."""
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
    model = model.to(next(base.parameters()).device, dtype).eval()
    fast_model = lora_fast.accelerate(copy.deepcopy(model))
    return sharing_base_weights(base, fast_model), model, fast_model


def sharing_base_weights(base: torch.nn.Module, peft_model: torch.nn.Module) -> torch.nn.Module:
    """``base``'s modules on ``peft_model``'s base weights: the same tensors, not a copy.

    The ratio over the base model is then the LoRA cost alone. With weights of its own, the base
    model's time depends on where they landed in memory: three copies of SmolLM2's weights ran
    a decode forward up to 5% apart (interleaved, one thread), in either direction, which moved
    every ratio over base by as much.

    PEFT freezes those weights, and a frozen output projection sends generate()'s strided last
    position through torch's bmm (see lora_fast.integrations.peft._fold_output_rows): the base
    model gets the same ``contiguous_rows`` hook as the accelerated one, so its generation is as
    fast as before the sharing."""
    owned = dict(peft_model.get_base_model().named_parameters(remove_duplicate=False))
    memo: dict[int, torch.nn.Parameter] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        module_name, _, leaf = name.rpartition(".")
        shared = owned.get(name, owned.get(f"{module_name}.base_layer.{leaf}"))
        if shared is None:
            raise ValueError(f"{name} has no counterpart in the PeftModel")
        memo[id(param)] = shared
    model = copy.deepcopy(base, memo).eval()
    output = model.get_output_embeddings()
    if output is not None and not output.weight.requires_grad:
        output.register_forward_pre_hook(contiguous_rows)
    return model


def adapter_bytes(peft_model: torch.nn.Module, names: Sequence[str]) -> int:
    """Bytes of the LoRA A and B weights of the adapters ``names`` over every LoRA layer."""
    total = 0
    used = set(names)
    for module in peft_model.modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_A, torch.nn.ModuleDict) and isinstance(lora_B, torch.nn.ModuleDict):
            for name in used & set(lora_A.keys()):
                total += lora_A[name].weight.nbytes + lora_B[name].weight.nbytes
    return total


def read_floor(adapter_bytes_read: int, bandwidth_gbps: float, base_us: float) -> float:
    """The accelerated/base ratio if only reading the adapters' bytes cost anything extra."""
    return 1.0 + adapter_bytes_read / (bandwidth_gbps * 1e3) / base_us


def measure_us(
    fns: dict[str, Callable[[], object]], device: str, min_run_time: float, repetitions: int
) -> dict[str, float]:
    """Median microseconds per call of each function: on the CPU in interleaved rounds (the
    machine's drift hits base, PEFT and lora_fast alike), on a GPU one after the other with
    CUDA events, eagerly, and for base and lora_fast also replayed from a CUDA graph
    (``<name>_graph``, None where capture failed): eager decode of a small model can be bound by
    the host's launches rather than the GPU. PEFT's mixed batch builds index tensors from Python
    lists on every call, which a graph cannot hold, so it is timed eagerly only."""
    if device == "cuda":
        times = {name: common.gpu_median_us(fn, repetitions, graph=False) for name, fn in fns.items()}
        for name in ("base", "lora_fast"):
            captured: list[bool] = []
            graph_us = common.gpu_median_us(fns[name], repetitions, graph=True, captured=captured)
            times[f"{name}_graph"] = graph_us if captured[0] else None
        # the accelerated graph again with the shrink beside the base GEMM (a side stream)
        previous = os.environ.get(lora_fast.ops.OVERLAP_ENV)
        os.environ[lora_fast.ops.OVERLAP_ENV] = "1"
        try:
            captured = []
            graph_us = common.gpu_median_us(fns["lora_fast"], repetitions, graph=True, captured=captured)
            times["lora_fast_overlap_graph"] = graph_us if captured[0] else None
        finally:
            if previous is None:
                del os.environ[lora_fast.ops.OVERLAP_ENV]
            else:
                os.environ[lora_fast.ops.OVERLAP_ENV] = previous
        return times
    return common.interleaved_median_us(fns, min_run_time)


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
    # PEFT's own forward and the accelerated one on twin models, so they can alternate
    base_model, peft_model, fast_model = build_models(base, max(adapter_counts), 16, dtype)
    del base
    bandwidth = common.read_bandwidth_gbps(device)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s", flush=True)
    rows = []
    for L in adapter_counts:
        for phase, (sequences, length) in shapes.items():
            ids = torch.randint(1, vocab, (sequences, length), device=device)
            names = [f"a{i % L}" for i in range(sequences)]
            fns = {
                "base": functools.partial(base_model, input_ids=ids),
                "peft": functools.partial(peft_model, input_ids=ids, adapter_names=names),
                "lora_fast": functools.partial(fast_model, input_ids=ids, adapter_names=names),
            }
            with torch.no_grad():
                expected = fns["peft"]().logits.float()
                got = fns["lora_fast"]().logits.float()
                times = measure_us(fns, device, min_run_time, repetitions)
            error = float((got - expected).abs().max() / expected.abs().max())
            tokens = sequences * length
            read = adapter_bytes(peft_model, names)
            # on a GPU, against the graph-replayed base (the GPU's own time) where it captured
            base_us = times.get("base_graph") or times["base"]
            extra = {
                "adapter_mb": read / 1e6,
                "adapter_read_floor": read_floor(read, bandwidth, base_us),
                "read_gbps": bandwidth,
                "max_rel_logit_error_vs_peft": error,
            }
            if device == "cuda":
                graphs = times["base_graph"], times["lora_fast_graph"], times["lora_fast_overlap_graph"]
                (
                    extra["base_graph_us"],
                    extra["lora_fast_graph_us"],
                    extra["lora_fast_overlap_graph_us"],
                ) = graphs
                extra["lora_fast_over_base_graph"] = graphs[1] / graphs[0] if None not in graphs[:2] else None
                extra["overlap_over_base_graph"] = (
                    graphs[2] / graphs[0] if None not in (graphs[0], graphs[2]) else None
                )
            rows.append(row_of(phase, L, sequences, length, times, tokens, **extra))
            common.record_row(rows[-1])
            print_row(rows[-1])
        models = (base_model, peft_model, fast_model)
        rows.append(generation_row(*models, L, shapes["decode"][0], vocab, new_tokens, device, bandwidth))
        common.record_row(rows[-1])
        rows.append(training_row(peft_model, fast_model, L, *shapes["prefill"], vocab, device, repetitions))
        common.record_row(rows[-1])
    return rows


def row_of(phase, L, sequences, length, times, tokens, **extra) -> dict:
    base_us, peft_us, fast_us = times["base"], times["peft"], times["lora_fast"]
    return {
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
        **extra,
    }


def print_row(row: dict) -> None:
    print(
        f"{row['phase']:8s} L={row['adapters']:3d} {row['sequences']}x{row['tokens_per_sequence']}:"
        f" base {row['base_us'] / 1e3:8.2f} ms  PEFT x{row['peft_over_base']:.2f}"
        f"  lora_fast x{row['lora_fast_over_base']:.2f} of base ({row['speedup_vs_peft']:.2f}x PEFT)"
        f"  adapter reads alone x{row['adapter_read_floor']:.3f}"
        + "".join(
            f"  {label} x{row[key]:.3f}"
            for label, key in (
                ("graph", "lora_fast_over_base_graph"),
                ("overlapped", "overlap_over_base_graph"),
            )
            if row.get(key) is not None
        ),
        flush=True,
    )


def generation_row(
    base_model, peft_model, fast_model, L, sequences, vocab, new_tokens, device, bandwidth
) -> dict:
    """Greedy generation of ``new_tokens`` for ``sequences`` prompts of 8 tokens (one forward per
    new token, each reading the adapters once)."""
    ids = torch.randint(1, vocab, (sequences, 8), device=device)
    names = [f"a{i % L}" for i in range(sequences)]
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }

    def generate(model, **extra):
        def call():
            out = model.generate(input_ids=ids, **extra, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        return call

    fns = {
        "base": generate(base_model),
        "peft": generate(peft_model, adapter_names=names),
        "lora_fast": generate(fast_model, adapter_names=names),
    }
    with torch.no_grad():
        expected, got = fns["peft"](), fns["lora_fast"]()
        same = bool(torch.equal(expected, got))
        # in bf16 a random model's top logits are near-ties that one rounding can flip, after which
        # a greedy sequence goes its own way: count whole sequences and first new tokens that agree
        new_expected, new_got = expected[:, ids.shape[1] :], got[:, ids.shape[1] :]
        same_sequences = float((new_expected == new_got).all(dim=1).float().mean())
        same_first = float((new_expected[:, 0] == new_got[:, 0]).float().mean())
        times = common.interleaved_median_us(fns, min_run_time=0.0, min_rounds=3)
    tokens = sequences * new_tokens
    read = new_tokens * adapter_bytes(peft_model, names)
    extra = {
        "adapter_mb": read / 1e6,
        "adapter_read_floor": read_floor(read, bandwidth, times["base"]),
        "read_gbps": bandwidth,
        "same_tokens_as_peft": same,
        "same_sequences_fraction": same_sequences,
        "same_first_token_fraction": same_first,
    }
    row = row_of("generate", L, sequences, new_tokens, times, tokens, **extra)
    print_row(row)
    print(
        f"  generated tokens equal to PEFT's: {same} (sequences {same_sequences:.0%}, "
        f"first new token {same_first:.0%})",
        flush=True,
    )
    return row


def training_row(peft_model, fast_model, L, sequences, length, vocab, device, repetitions) -> dict:
    """One training step of the batch's adapters, each on its own sequences (no optimizer).

    PEFT refuses ``adapter_names`` in training mode, so it takes one forward and backward per
    adapter: ``set_adapter``, that adapter's sequences, its share of the batch's loss. The
    accelerated twin takes the mixed batch in one forward and backward. Both give every adapter
    the same gradients (checked here); the step's speed is the difference.
    """
    ids = torch.randint(1, vocab, (sequences, length), device=device)
    names = [f"a{i % L}" for i in range(sequences)]
    adapters = sorted(set(names))
    rows_of = {a: torch.tensor([i for i, n in enumerate(names) if n == a], device=device) for a in adapters}

    def peft_step():
        peft_model.zero_grad(set_to_none=True)
        for adapter, rows in rows_of.items():
            peft_model.base_model.set_adapter(adapter)  # that adapter trainable, the others frozen
            sub = ids[rows]
            (peft_model(input_ids=sub, labels=sub).loss * (len(rows) / sequences)).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    def fast_step():
        fast_model.zero_grad(set_to_none=True)
        fast_model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    peft_model.train()
    fast_model.train()
    for name, param in fast_model.named_parameters():
        param.requires_grad_(any(f".{a}." in name for a in adapters) and "lora_" in name)
    try:
        peft_step()
        fast_step()
        expected = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
        got = {n: p.grad for n, p in fast_model.named_parameters() if p.grad is not None}
        if expected.keys() != got.keys():
            raise RuntimeError(
                f"gradients of different parameters: {sorted(expected.keys() ^ got.keys())[:4]}"
            )
        error = max(
            float((got[n].double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30))
            for n, e in expected.items()
        )
        fns = {"peft": peft_step, "lora_fast": fast_step}
        if device == "cuda":  # (a PEFT step is one pass per adapter: few repetitions keep it short)
            reps = min(repetitions, 5)
            times = {name: common.gpu_median_us(fn, reps, graph=False) for name, fn in fns.items()}
        else:
            times = common.interleaved_median_us(fns, min_run_time=0.0, min_rounds=3)
    finally:
        peft_model.eval()
        fast_model.eval()
    row = {
        "phase": "train",
        "adapters": L,
        "sequences": sequences,
        "tokens_per_sequence": length,
        "peft_us": times["peft"],
        "lora_fast_us": times["lora_fast"],
        "speedup_vs_peft": times["peft"] / times["lora_fast"],
        "lora_fast_tokens_per_s": sequences * length / times["lora_fast"] * 1e6,
        "max_rel_grad_error_vs_peft": error,
    }
    print(
        f"train    L={L:3d} {sequences}x{length}: PEFT (one pass per adapter) {times['peft'] / 1e3:8.2f} ms"
        f"  lora_fast (one mixed pass) {times['lora_fast'] / 1e3:8.2f} ms  x{row['speedup_vs_peft']:.2f}"
        f"  grad error {error:.1e}",
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
    "adapter_mb",
    "adapter_read_floor",
]
# GPU only: base and lora_fast replayed from CUDA graphs (forward rows); overlap: lora_fast
# captured with LORA_FAST_OVERLAP_SHRINK=1 (the shrink beside the base GEMM, on a side stream)
GRAPH_COLUMNS = [
    "base_graph_us",
    "lora_fast_graph_us",
    "lora_fast_over_base_graph",
    "overlap_over_base_graph",
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
    table = common.markdown_table(rows, COLUMNS + (GRAPH_COLUMNS if gpu else []))
    print()
    print(table)
    name = info["gpu"] if gpu else info["cpu"]
    slug = common.slug(f"{model_name} {name}")
    stem = f"peft_{args.device}_{slug}" + ("_quick" if args.quick else "")
    payload = {"benchmark": "peft_mixed_batch", "machine": info, "config": vars(args), "rows": rows}
    paths = common.write_results(stem, payload, table, args.out_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()

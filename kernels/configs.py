"""Launch configurations as data: a JSON table per GPU (plus a default), looked up per call.

Each kernel has a list of entries; the first whose bounds hold (``max_tokens``, ``max_rank``,
``max_d``; a missing bound always holds) is used. A ``"config": null`` entry says "not this
kernel" for its shapes (the fused delta: use shrink + expand there). Besides the delta's kernels
(``fused``, ``shrink``, ``expand``, ``weight_grad``), ``linear`` holds fused_lora_linear's
one-kernel GEMM + expand (kernels/lora_linear.py; null or absent: F.linear + lora_delta) and
``cuda_delta`` the shapes whose in-place inference deltas go to the CUDA C++ backend (``{}``).
``train_shrink`` is the shrink whose split-K partials a backward reads (the training forward's,
kept for dB, and the backward's shrink of dy): the weight-gradient kernel reads every one of their
SPLIT_K planes, so the forward's best split is not the training step's. Where it has no entry
for a shape, or a null one, the ``shrink`` entry is used.
Nothing is autotuned at run time; benchmarks/tune_triton.py writes a GPU's table from
measurements.
``LORA_FAST_TRITON_CONFIG=<file.json>`` replaces the table.

A config holds the kernel's block sizes (``BLOCK_M``, ``BLOCK_K``, ``BLOCK_N``, ``BLOCK_D``),
``SPLIT_K`` / ``SPLIT_M``, ``MAX_BLOCK_R`` (rank columns per pass), Triton's ``num_warps`` and
``num_stages``, and for the token-blocked kernels ``SEGMENTED`` (the grid: 0 positions,
1 segments, 2 compact segments; see ``_common.Grid``) and ``PDL`` (1: programmatic dependent
launch of the expand after the shrink, on Hopper; see ``_common.use_pdl``). A ``weight_grad``
config may set ``SUM_COEF`` (1: sum the shrinks' split-K planes once before the kernel reads them)
and ``FUSE_DY`` (1: one pass over dy computes both u = B^T dy and dB, where
``lora_delta_backward.dy_pass_pays`` at the call's rank).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch

from ._common import INTERPRETED

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ENV_VAR = "LORA_FAST_TRITON_CONFIG"


def device_key(device: torch.device) -> str:
    """File stem for a device: the GPU's name (``NVIDIA_H100_80GB_HBM3``) or ``interpreter``."""
    if device.type != "cuda" or INTERPRETED:
        return "interpreter"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


@functools.cache
def _table(path: str) -> dict:
    return json.loads(Path(path).read_text())


def table_path(device: torch.device) -> Path:
    return _table_path(os.environ.get(ENV_VAR, ""), device.type, device.index)


@functools.cache
def _table_path(override: str, device_type: str, index: int | None) -> Path:
    # cached: every launch looks its table up, and naming the GPU and testing for its file cost
    # more host time than the rest of a decode launch's Python
    if override:
        return Path(override)
    specific = CONFIG_DIR / f"{device_key(torch.device(device_type, index))}.json"
    return specific if specific.is_file() else CONFIG_DIR / "default.json"


# a kind with no entry for a shape, or a null one, takes the entry of the kind it falls back to
FALLBACK = {"train_shrink": "shrink"}


def lookup(kernel: str, device: torch.device, num_tokens: int, rank: int, d: int) -> dict | None:
    """Launch parameters of ``kernel`` for T tokens, rank r_max and hidden size d (None: the
    table says not to use this kernel there; ValueError: no entry covers the shape)."""
    path = table_path(device)
    found, config = _lookup(path, kernel, num_tokens, rank, d)
    if (not found or config is None) and kernel in FALLBACK:
        return lookup(FALLBACK[kernel], device, num_tokens, rank, d)
    if not found:
        raise ValueError(f"{path}: no {kernel} entry matches T={num_tokens}, r={rank}, d={d}")
    return None if config is None else dict(config)


def find(kernel: str, device: torch.device, num_tokens: int, rank: int, d: int) -> dict | None:
    """:func:`lookup`, with None also where no entry covers the shape (an optional kernel: the
    fused delta, which a table may leave out; no exception raised and caught per launch)."""
    config = _lookup(table_path(device), kernel, num_tokens, rank, d)[1]
    return None if config is None else dict(config)


@functools.lru_cache(maxsize=4096)
def _lookup(path: Path, kernel: str, num_tokens: int, rank: int, d: int) -> tuple[bool, dict | None]:
    """``(found, config)`` of the first entry whose bounds hold (cached, misses included)."""
    entries = _table(str(path)).get(kernel, [])
    for entry in entries:
        when = entry.get("when", {})
        if (
            num_tokens <= when.get("max_tokens", num_tokens)
            and rank <= when.get("max_rank", rank)
            and d <= when.get("max_d", d)
        ):
            return True, entry["config"]
    return False, None

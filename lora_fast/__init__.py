"""lora_fast: fast multi-adapter LoRA for PyTorch."""

from . import backends, ops, reference
from .adapters import AdapterStack, AdapterStacks
from .backends import use_backend
from .batch import NO_ADAPTER, AdapterBatch
from .layers import MultiLoRALinear, adapter_batch, inject_adapters
from .ops import lora_delta, lora_expand, lora_shrink

__version__ = "0.1.0"

__all__ = [
    "NO_ADAPTER",
    "AdapterBatch",
    "AdapterStack",
    "AdapterStacks",
    "MultiLoRALinear",
    "adapter_batch",
    "inject_adapters",
    "backends",
    "lora_delta",
    "lora_expand",
    "lora_shrink",
    "ops",
    "reference",
    "use_backend",
]

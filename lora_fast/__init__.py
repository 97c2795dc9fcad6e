"""lora_fast: fast multi-adapter LoRA for PyTorch."""

from . import backends, ops, reference
from .adapters import AdapterStack, AdapterStacks
from .backends import use_backend
from .batch import NO_ADAPTER, AdapterBatch
from .integrations.peft import AccelerationReport, accelerate, restore
from .layers import MultiLoRALinear, adapter_batch, inject_adapters
from .ops import fused_lora_linear, lora_delta, lora_expand, lora_shrink

__version__ = "0.1.0"

__all__ = [
    "NO_ADAPTER",
    "AccelerationReport",
    "AdapterBatch",
    "AdapterStack",
    "AdapterStacks",
    "MultiLoRALinear",
    "accelerate",
    "adapter_batch",
    "inject_adapters",
    "backends",
    "fused_lora_linear",
    "lora_delta",
    "lora_expand",
    "lora_shrink",
    "ops",
    "reference",
    "restore",
    "use_backend",
]

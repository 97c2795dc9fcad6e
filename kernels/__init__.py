"""Triton kernels for lora_fast, installed as ``lora_fast.kernels``.

Kernels and their launch functions only: no nn.Module, no autograd, no backend policy.
"""

# The triton backend is offered once kernels land here (lora_fast.backends reads this flag).
AVAILABLE = False

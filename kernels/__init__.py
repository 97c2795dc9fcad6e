"""Triton kernels for lora_fast, installed as ``lora_fast.kernels``.

Kernels and their launch functions only: no nn.Module, no autograd, no backend policy. They take
tensors and the token metadata of an AdapterBatch (``token_order``, ``token_slots``) and run on
CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (set before this package is imported).
"""

try:
    import triton  # noqa: F401
except ImportError:  # torch CPU wheels do not require triton
    AVAILABLE = False
else:
    AVAILABLE = True
    from ._common import SUPPORTED_DTYPES
    from .lora_delta import lora_delta_, lora_delta_fused_
    from .lora_delta_backward import lora_delta_backward
    from .lora_expand import lora_expand_
    from .lora_linear import linear_config, lora_linear
    from .lora_shrink import lora_shrink, lora_shrink_partials
    from .subspace_project import subspace_project

    __all__ = [
        "SUPPORTED_DTYPES",
        "lora_delta_",
        "lora_delta_backward",
        "lora_delta_fused_",
        "linear_config",
        "lora_expand_",
        "lora_linear",
        "lora_shrink",
        "lora_shrink_partials",
        "subspace_project",
    ]

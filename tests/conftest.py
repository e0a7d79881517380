"""Shared fixtures: every test gets a fresh registry and an empty resolution cache."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from quantreg.registry import Registry, set_default_registry
from quantreg.view import clear_cache

# The same examples on every run: a property test finds bugs when its examples are written,
# and a suite that can fail on a lucky draw is a flaky suite.
settings.register_profile("quantreg", derandomize=True, database=None)
settings.load_profile("quantreg")

# Without a GPU the Triton kernels run on the interpreter; it must be set before they import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_BUILDS: list[threading.Thread] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building quantreg's C++ kernels side by side while the first tests run: on a fresh
    machine each takes 30-60 s of one core, and built one after another, as the tests first
    need them, they kept the suite waiting for minutes. A test that needs a kernel waits for
    its build (each kernel's lock); where one cannot be built its reason is kept as always.
    Started once every test module is imported, with what the builds import imported here
    first: a module half-imported by another thread raises ImportError (vllm did)."""
    import torch.utils.cpp_extension  # noqa: F401

    from quantreg.kernels import cpu, cpu_avx2, cpu_float8, cpu_float8_avx512, cpu_vnni

    for kernel in (cpu, cpu_avx2, cpu_float8, cpu_vnni, cpu_float8_avx512):
        thread = threading.Thread(target=kernel.extension, name=f"build {kernel.__name__}")
        thread.start()
        _BUILDS.append(thread)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Wait for the builds: a compiler stopped halfway would leave torch's lock file in the
    build folder, and the next process would wait on it forever."""
    for thread in _BUILDS:
        thread.join()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws the same numbers from torch's global generator, whatever ran before."""
    torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, int, dict]:
    """``quantreg demo --keep DIR --json``, run once per session (the demo writes, loads and
    runs fourteen checkpoints and starts two ranks): ``(DIR, exit code, its JSON)``. The kept
    checkpoints are what the README's examples run against."""
    from cli_runner import run_cli

    folder = tmp_path_factory.mktemp("quantreg-demo") / "demo"
    out = run_cli("demo", "--keep", str(folder), "--json")
    data = json.loads(out.stdout, parse_constant=_not_json)
    return folder, out.returncode, data


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON (RFC 8259)")

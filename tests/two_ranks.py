"""Running heads on two gloo ranks from a test: a race-free rendezvous, and one spawn for a
whole table of cases (starting two ranks costs seconds; loading one more head does not)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tp_worker import load_jobs


def rendezvous(folder: Path) -> str:
    """An ``init_method`` for spawned ranks: a file store in a fresh folder under ``folder``.

    Nothing to collide with: no port is guessed, and each call gets its own folder, so two
    groups (in one test or in concurrent runs) never share a store file.
    """
    return f"file://{tempfile.mkdtemp(prefix='rendezvous-', dir=folder)}/store"


def run_two_ranks(
    folder: Path, jobs: dict[str, tuple[str, dict[str, Any]]]
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Load every job (``name -> (checkpoint, load_lm_head keywords)``) on two ranks in one
    spawn; returns each job's two saved ranks (``logits``, ``param.*``, ``kernel.*``)."""
    mp.spawn(load_jobs, args=(2, rendezvous(folder), jobs, str(folder)), nprocs=2, join=True)
    return {
        name: [load_file(str(folder / f"{name}.rank{rank}.safetensors")) for rank in range(2)]
        for name in jobs
    }

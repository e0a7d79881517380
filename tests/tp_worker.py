"""Worker for the tensor-parallel tests: runs in each spawned rank (gloo, one machine)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

# A collective that waits longer than this raises gloo's timeout error (never a quantreg
# error): how a test tells "promptly" from "waited", without timing anything itself.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def init_group(rank: int, world: int, init: str) -> None:
    """Join the default gloo group; ``init`` is an ``init_method`` URL, a ``file://`` store from
    ``two_ranks.rendezvous`` (no guessed port: nothing to collide with)."""
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )


def save_load(rank: int, ckpt: str, kwargs: dict[str, Any], file: Path) -> None:
    """Load a head on this rank (tp=None: the default group) and save its full logits for six
    seeded tokens with this rank's parameters and kernel tensors."""
    import quantreg

    head = quantreg.load_lm_head(ckpt, dtype=torch.float32, **kwargs)
    x = torch.randn(6, head.embedding_dim, generator=torch.Generator().manual_seed(0))
    logits = head.compute_logits(x)
    shards = {f"param.{n}": p for n, p in head.named_parameters()}
    shards |= {f"kernel.{n}": t for n, t in head.kernel.tensors().items()}
    save_file({"logits": logits.contiguous(),
               **{n: t.detach().clone().contiguous() for n, t in shards.items()}},
              str(file))  # fmt: skip


def load_jobs(
    rank: int, world: int, init: str, jobs: dict[str, tuple[str, dict[str, Any]]], out: str
) -> None:
    """Every job's head in one group: ``name -> (checkpoint, load_lm_head keywords)``, saved
    as ``{name}.rank{rank}.safetensors`` (one spawn for a whole table of cases)."""
    init_group(rank, world, init)
    try:
        for name, (ckpt, kwargs) in jobs.items():
            save_load(rank, ckpt, kwargs, Path(out) / f"{name}.rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def load_per_rank(rank: int, world: int, init: str, ckpts: list[str], out: str) -> None:
    """Each rank loads its own checkpoint path; record the outcome instead of raising.

    The group is destroyed whatever happens, so that gloo's threads are joined while the
    interpreter is alive (a group left to interpreter exit can abort the process).
    """
    import json
    import time

    import quantreg

    init_group(rank, world, init)
    try:
        start = time.monotonic()
        try:
            head = quantreg.load_lm_head(ckpts[rank], dtype=torch.float32)
            x = torch.randn(2, head.embedding_dim, generator=torch.Generator().manual_seed(0))
            target = head.to_target_vocab(head.compute_logits(x))
            outcome = {"ok": True, "finite": int(torch.isfinite(target).sum())}
        except Exception as exc:  # quantreg's errors, or gloo's timeout (a rank that waited)
            outcome = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
        outcome["seconds"] = time.monotonic() - start
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()

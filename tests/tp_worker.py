"""Worker for the tensor-parallel tests: runs in each spawned rank (gloo on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file


def load_and_compute(
    rank: int, world: int, port: int, ckpt: str, out: str, kwargs: dict[str, Any]
) -> None:
    """Load the head with the default group (tp=None) and save this rank's full logits."""
    import quantreg

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        head = quantreg.load_lm_head(ckpt, dtype=torch.float32, **kwargs)
        x = torch.randn(6, head.embedding_dim, generator=torch.Generator().manual_seed(0))
        logits = head.compute_logits(x)
        shards = {f"param.{n}": p for n, p in head.named_parameters()}
        shards |= {f"kernel.{n}": t for n, t in head.kernel.tensors().items()}
        save_file({"logits": logits.contiguous(),
                   **{n: t.detach().clone().contiguous() for n, t in shards.items()}},
                  str(Path(out) / f"rank{rank}.safetensors"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def load_per_rank(rank: int, world: int, port: int, ckpts: list[str], out: str) -> None:
    """Each rank loads its own checkpoint path; record the outcome instead of raising."""
    import json
    import time

    import quantreg

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    start = time.monotonic()
    try:
        head = quantreg.load_lm_head(ckpts[rank], dtype=torch.float32)
        x = torch.randn(2, head.embedding_dim, generator=torch.Generator().manual_seed(0))
        target = head.to_target_vocab(head.compute_logits(x))
        outcome = {"ok": True, "finite": int(torch.isfinite(target).sum())}
    except quantreg.QuantregError as exc:
        outcome = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    outcome["seconds"] = time.monotonic() - start
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()

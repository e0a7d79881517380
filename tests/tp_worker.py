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
        shards = {n: p.detach().clone().contiguous() for n, p in head.named_parameters()}
        save_file({"logits": logits.contiguous(), **{f"param.{n}": t for n, t in shards.items()}},
                  str(Path(out) / f"rank{rank}.safetensors"))  # fmt: skip
    finally:
        dist.destroy_process_group()

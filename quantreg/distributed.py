"""Tensor parallelism over ``torch.distributed``: which group, rank and size a head uses.

The library never initializes a process group; the CLI does when launched by torchrun.
``tp=None`` means the default group if one is initialized, else a single process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from quantreg.errors import ConfigError


@dataclass(frozen=True)
class TPGroup:
    """The process group a layer is sharded over (``group`` is None for one process)."""

    group: Any
    rank: int
    size: int

    @classmethod
    def single(cls) -> TPGroup:
        return cls(None, 0, 1)

    @classmethod
    def resolve(cls, tp: Any) -> TPGroup:
        """``None``: the default group if initialized, else one process; ``1``: one process;
        a ProcessGroup: shard over it.

        Raises:
            ConfigError: any other value.
        """
        if tp is None:
            if dist.is_available() and dist.is_initialized():
                return cls(dist.group.WORLD, dist.get_rank(), dist.get_world_size())
            return cls.single()
        if isinstance(tp, TPGroup):
            return tp
        if isinstance(tp, int) and not isinstance(tp, bool):
            if tp == 1:
                return cls.single()
            raise ConfigError(
                f"tp={tp}: an integer tp must be 1 (one process); to shard over several "
                "processes pass a torch.distributed ProcessGroup, or None for the default group"
            )
        if dist.is_available() and isinstance(tp, dist.ProcessGroup):
            return cls(tp, dist.get_rank(tp), dist.get_world_size(tp))
        raise ConfigError(f"tp must be None, 1 or a torch.distributed ProcessGroup; got {tp!r}")

    def all_gather_last_dim(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's equally-shaped ``local`` along the last dim, in rank order."""
        if self.size == 1:
            return local
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank reports ``ok`` (a collective: every rank must call it)."""
        if self.size == 1:
            return ok
        backend = dist.get_backend(self.group)
        device = "cuda" if backend == "nccl" else "cpu"
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.group)
        return int(flag.item()) == 0

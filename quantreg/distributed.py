"""Tensor parallelism over ``torch.distributed``: which group, rank and size a head uses.

The library never initializes a process group; the CLI does when launched by torchrun.
``tp=None`` means the default group if one is initialized, else a single process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from quantreg.errors import InputError


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
            InputError: any other value.
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
            raise InputError(
                f"tp={tp}: an integer tp must be 1 (one process); to shard over several "
                "processes pass a torch.distributed ProcessGroup, or None for the default group",
                field="tp",
            )
        if dist.is_available() and isinstance(tp, dist.ProcessGroup):
            return cls(tp, dist.get_rank(tp), dist.get_world_size(tp))
        raise InputError(
            f"tp must be None, 1 or a torch.distributed ProcessGroup; got {tp!r}", field="tp"
        )

    def all_gather_last_dim(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's equally-shaped ``local`` along the last dim, in rank order."""
        if self.size == 1:
            return local
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)

    def failed_ranks(self, failed: bool) -> list[int]:
        """The ranks that report ``failed`` (a collective: every rank must call it)."""
        if self.size == 1:
            return [0] if failed else []
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        flags = torch.zeros(self.size, dtype=torch.int32, device=device)
        flags[self.rank] = int(failed)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self.group)
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]

"""Which torch ops a call dispatches: the specification of a kernel's call path, where each op
costs tens of microseconds on the caches a decode step leaves (the weights have just streamed
through them)."""

from __future__ import annotations

from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATE = "aten.empty.memory_format"
SLICE = "aten.slice.Tensor"


class DispatchedOps(TorchDispatchMode):
    """The torch ops dispatched while active, by name, C++ callers' included (``ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def tiled_ops(tiles: int) -> list[str]:
    """The ops of a kernel call over ``tiles`` tiles of rows: the output's allocation, then a
    slice of the rows and of the output per tile when there is more than one."""
    return [ALLOCATE] + ([SLICE] * 2 * tiles if tiles > 1 else [])

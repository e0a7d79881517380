"""Which torch ops a call dispatches: the specification of a kernel's call path, where each op
costs tens of microseconds on the caches a decode step leaves (the weights have just streamed
through them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
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


def check_row_tiles(
    monkeypatch: pytest.MonkeyPatch,
    call: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n: int,
    tile_rows: int,
    tiles: int,
) -> None:
    """``call(x)`` with ``cpu_build.X_TILE_BYTES`` set to ``tile_rows`` float32 rows of ``x``
    gives the one-tile result bit for bit (``[M, n]`` in ``x``'s dtype) and dispatches
    :func:`tiled_ops` of ``tiles``."""
    from quantreg.kernels import cpu_build

    whole = call(x)
    monkeypatch.setattr(cpu_build, "X_TILE_BYTES", tile_rows * 4 * x.shape[1])
    with DispatchedOps() as seen:
        tiled = call(x)
    assert torch.equal(tiled, whole) and tiled.dtype == x.dtype and tiled.shape == (len(x), n)
    assert seen.ops == tiled_ops(tiles)

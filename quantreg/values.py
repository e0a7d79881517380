"""Finite values where the core reads them: a float head's weight and any head's bias after
loading, and -- for the command line, not the library's hot path -- the logits a head computed.

A NaN or inf in a weight or bias makes logits NaN or inf without any error, so a load refuses
it, naming the tensor. A value beyond the compute dtype's range (an F32 ``1e6`` loaded as
float16) is inf once cast, and refused the same way. Each check is one ``aminmax`` pass (NaN
propagates through it, inf is an extreme); only a failing tensor is scanned again, to count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from quantreg.errors import CheckpointError, InputError

if TYPE_CHECKING:
    import torch

HALF_DTYPES = ("torch.float16", "torch.bfloat16")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite, in one pass."""
    import torch

    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _first_bad(tensor: torch.Tensor) -> tuple[int, list[int]]:
    """How many values are non-finite, and the index of the first."""
    import torch

    bad = ~torch.isfinite(tensor)
    return int(bad.sum()), bad.nonzero()[0].tolist()


def check_finite(tensor: torch.Tensor, name: str, *, cast: bool = False) -> None:
    """Refuse a loaded float tensor holding NaN or inf, naming it (``name``: the checkpoint
    tensor, e.g. ``lm_head.bias``), in one pass. ``cast``: the tensor was cast to the compute
    dtype on loading (a bias, a float weight), so a value beyond a half dtype's range may be
    the cause; a scale kept in the checkpoint's dtype holds what the file holds.

    Raises:
        CheckpointError: a non-finite value; the message gives the count and the first index.
    """
    if all_finite(tensor):
        return
    count, first = _first_bad(tensor)
    dtype = str(tensor.dtype)
    hint = (
        f" (a value beyond {dtype.removeprefix('torch.')}'s range is inf once cast: load with "
        "dtype=float32 if the checkpoint's values are finite)"
        if cast and dtype in HALF_DTYPES
        else ""
    )
    raise CheckpointError(
        f"{name} holds {count} non-finite value(s) (NaN or inf) as "
        f"{dtype.removeprefix('torch.')}, the first at {first}; expected finite values{hint}",
        tensor=name,
    )


def check_logits(
    logits: torch.Tensor,
    x: torch.Tensor,
    head: torch.nn.Module,
    source: str | Path,
    hidden: str | Path | None = None,
) -> None:
    """For the command line: refuse non-finite logits rather than print garbage and exit 0
    (``head``: the ``ParallelLMHead`` that computed them).

    Raises:
        InputError: the hidden states themselves hold NaN or inf (``hidden`` is their file).
        CheckpointError: finite hidden states gave non-finite logits, naming the checkpoint,
            the method and the kernel.
    """
    if all_finite(logits):
        return
    if not all_finite(x):
        count, first = _first_bad(x)
        where = f"{hidden}: tensor 'x'" if hidden is not None else "the hidden states"
        raise InputError(
            f"{where} holds {count} non-finite value(s) (NaN or inf), the first at {first}; "
            "expected finite hidden states",
            field="hidden",
        )
    count, _ = _first_bad(logits)
    resolution, kernel = getattr(head, "resolution", None), getattr(head, "kernel", None)
    method = resolution.method if resolution is not None else None
    kernel_name = kernel.name if kernel is not None else "none"
    dtype = str(logits.dtype).removeprefix("torch.")
    raise CheckpointError(
        f"{source}: {getattr(head, 'prefix', 'the head')} ({method or 'unquantized'}, kernel "
        f"{kernel_name}) computed {count} "
        f"non-finite logit(s) (NaN or inf) of {logits.numel()} as {dtype} from finite hidden "
        f"states: its weights overflow {dtype} (try --dtype float32) or hold values no "
        "load-time check refuses",
        path=source,
    )

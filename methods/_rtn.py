"""Round-to-nearest quantization shared by the built-in writers (AWQ, GPTQ), and the
defaults their option listings read from a writer's signature."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from quantreg import InputError

# What act-order means for a round-to-nearest writer (GPTQ's desc_act, compressed-tensors'
# actorder "group"), and why llm-compressor's "weight" order is refused.
ACTORDER_NOTE = (
    "columns are grouped in decreasing-norm order (g_idx scattered); 'weight' and 'static' "
    "only reorder GPTQ's error-correction pass, which round-to-nearest does not run"
)


def writer_defaults(writer: Callable[..., Any]) -> dict[str, Any]:
    """The keyword defaults of a writer function: the defaults its ``writer_options`` list
    (read from the signature, so the listing cannot drift from what the writer does)."""
    return {
        name: param.default
        for name, param in inspect.signature(writer).parameters.items()
        if param.default is not param.empty
    }


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, G, group]`` (the last group zero-padded when K is not a multiple)."""
    n, k = weight.shape
    size = group_size if group_size > 0 else k
    pad = -k % size
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(n, -1, size)


def rtn_asymmetric(
    groups: torch.Tensor, bits: int, scale_dtype: torch.dtype, *, include_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with a zero point per group: unsigned codes in ``[0, 2**bits)``.

    ``groups`` is ``[N, G, size]`` float; returns codes ``[N, G, size]``, scales and zeros
    ``[N, G]``. The range is each group's min..max (AutoAWQ's rule), widened to include 0 with
    ``include_zero`` (GPTQ's rule). The scale is rounded to ``scale_dtype`` first, so the codes
    are exact for the stored scale.
    """
    qmax = (1 << bits) - 1
    g = groups.double()
    lo, hi = g.amin(-1), g.amax(-1)
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo).clamp(min=1e-5) / qmax).to(scale_dtype).double()
    zero = (-torch.round(lo / scale)).clamp(0, qmax)
    codes = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, qmax)
    return codes.to(torch.int32), scale.to(scale_dtype), zero.to(torch.int32)


def rtn_symmetric(
    groups: torch.Tensor, bits: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest around the fixed zero ``2**(bits-1)`` (GPTQ's symmetric rule)."""
    qmax = (1 << bits) - 1
    g = groups.double()
    scale = (2 * g.abs().amax(-1) / qmax).clamp(min=1e-5).to(scale_dtype).double()
    zero = torch.full_like(scale, 1 << (bits - 1))
    codes = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, qmax)
    return codes.to(torch.int32), scale.to(scale_dtype), zero.to(torch.int32)


def column_order(
    weight: torch.Tensor, actorder: str | None, perm: torch.Tensor | None, writer: str
) -> torch.Tensor:
    """The order in which columns are grouped: as stored, ``perm``, or (actorder ``group``
    without ``perm``) decreasing column norm.

    Raises:
        InputError: ``perm`` without actorder, or not a permutation (naming ``writer``).
    """
    k = weight.shape[1]
    if actorder is None:
        if perm is not None:
            raise InputError(f"{writer}: perm needs actorder='group'")
        return torch.arange(k)
    if perm is None:
        return torch.argsort(weight.double().norm(dim=0), descending=True, stable=True)
    perm = torch.as_tensor(perm, dtype=torch.int64)
    if perm.shape != (k,) or not torch.equal(perm.sort().values, torch.arange(k)):
        raise InputError(f"{writer}: perm must be a permutation of range({k})")
    return perm

"""Round-to-nearest quantization shared by the built-in writers (AWQ, GPTQ)."""

from __future__ import annotations

import torch


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

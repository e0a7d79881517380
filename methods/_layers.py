"""Helpers the built-in LinearMethods share: parameters, post-load checks, RTN quantization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from quantreg import CheckpointError, set_weight_attrs

# Input rows dequantized at once by the reference paths: bounded memory at any group size.
ROW_BLOCK = 128


def frozen_param(shape: tuple[int, ...], dtype: torch.dtype, **attrs: Any) -> torch.nn.Parameter:
    """A zero-filled parameter that is never trained, with its loading metadata."""
    param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    return set_weight_attrs(param, **attrs)  # type: ignore[return-value]


def restore_checkpoint_dtype(layer: torch.nn.Module, name: str) -> None:
    """Keep a loaded float parameter in the dtype the checkpoint stored it in.

    The loader casts float tensors to the compute dtype; scales go back to the checkpoint's
    dtype so that dequantization rounds exactly as the producer did (and memory stays small).
    """
    param = getattr(layer, name)
    stored = getattr(param, "checkpoint_dtype", None)
    if stored is None or stored == param.dtype:
        return
    attrs = {k: getattr(param, k) for k in ("output_dim", "input_dim", "packed_dim", "pack_factor")}
    new = torch.nn.Parameter(param.data.to(stored), requires_grad=False)
    set_weight_attrs(new, **attrs)
    new.checkpoint_dtype = stored  # type: ignore[attr-defined]
    setattr(layer, name, new)


def check_finite(layer: torch.nn.Module, name: str) -> None:
    """NaN or inf in a scale would silently poison every logit: refuse it, naming the tensor.

    Raises:
        CheckpointError: the tensor holds a non-finite value.
    """
    value = getattr(layer, name)
    if not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        prefix = getattr(layer, "prefix", "layer")
        raise CheckpointError(
            f"{prefix}.{name} holds {bad} non-finite value(s) (NaN or inf); expected finite scales",
            tensor=f"{prefix}.{name}",
        )


def row_blocks(rows: int, group_size: int) -> list[tuple[int, int, int]]:
    """``(start, stop, group)`` blocks of at most ``ROW_BLOCK`` input rows, each in one group."""
    size = group_size if group_size > 0 else rows
    step = min(size, ROW_BLOCK)
    blocks = []
    for group_start in range(0, rows, size):
        group_stop = min(group_start + size, rows)
        for start in range(group_start, group_stop, step):
            blocks.append((start, min(start + step, group_stop), group_start // size))
    return blocks


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


def rows_matmul(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    perm: torch.Tensor | None,
    matmul: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for any leading shape: ``matmul`` gets ``x`` as ``[rows, in]``
    with its features in ``perm`` order (None: as they are); the result is in ``x``'s dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if perm is not None:
        x2 = x2.index_select(-1, perm.to(x2.device))
    out = matmul(x2).to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*lead, out.shape[-1])


def reference_matmul(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: list[tuple[slice | torch.Tensor, int]],
    dequantize: Any,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` accumulated block by block in float32, never holding all of W.

    ``blocks`` are ``(input rows, group)``; ``dequantize(rows, group)`` returns those rows of
    ``W.T`` (``[rows, out]``), already rounded to the checkpoint's scale dtype.
    """

    def blockwise(x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(torch.float32)
        acc: torch.Tensor | None = None
        for rows, group in blocks:
            part = x2[:, rows] @ dequantize(rows, group).to(torch.float32)
            acc = part if acc is None else acc.add_(part)
        assert acc is not None
        return acc

    return rows_matmul(x, bias, None, blockwise)


def dequantize(
    codes: torch.Tensor, zeros: torch.Tensor | int, scales: torch.Tensor
) -> torch.Tensor:
    """``(codes - zeros) * scales``, exact in float32, then rounded once to the scale dtype --
    what AutoAWQ, GPTQModel and compressed-tensors compute in that dtype."""
    diff = (codes - zeros).to(torch.float32)
    return (diff * scales.to(torch.float32)).to(scales.dtype)


def group_order(
    g_idx: torch.Tensor, groups: int, name: str, scales: str = "its scales"
) -> tuple[torch.Tensor, list[int]]:
    """Rows sorted by group (stable) and the first row of every group, after checking that
    every entry of ``g_idx`` names one of ``groups`` groups.

    Raises:
        CheckpointError: an entry outside ``[0, groups)``, naming ``name`` and the index.
    """
    g = g_idx.to(torch.int64)
    bad = ((g < 0) | (g >= groups)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise CheckpointError(
            f"{name}[{i}] = {int(g[i])} is outside the {groups} groups of {scales}; "
            f"{bad.numel()} such entries",
            tensor=name,
        )
    bounds = [0, *torch.bincount(g, minlength=groups).cumsum(0).tolist()]
    return torch.argsort(g, stable=True), bounds


def group_blocks(order: torch.Tensor, bounds: list[int]) -> list[tuple[torch.Tensor, int]]:
    """``(rows, group)`` blocks of at most ``ROW_BLOCK`` rows of ``order``, each in one group."""
    return [
        (rows, group)
        for group in range(len(bounds) - 1)
        for rows in order[bounds[group] : bounds[group + 1]].split(ROW_BLOCK)
    ]

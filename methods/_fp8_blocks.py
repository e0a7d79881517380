"""float8 (e4m3) weights with 2-D block scales: compressed-tensors' strategy ``block``
(``block_structure [bn, bk]``) and HF / DeepSeek ``fp8`` (``weight_block_size``).

``W[o, i] = value[o, i] * scale[o // bn, i // bk]``, rounded to the scale dtype (what
compressed-tensors' ``dequantize`` and transformers' ``FP8Linear`` compute); the scale is
``[ceil(N / bn), ceil(K / bk)]``, a partial last block allowed along either dim. The scale is
small (one entry per ``bn * bk`` weights), so every rank loads all of it (no ``output_dim``)
and keeps the scale rows its vocab rows fall in: a block that straddles a shard boundary
serves both ranks. Columns become the layout's groups, so the reference kernel dequantizes
``ROW_BLOCK`` input rows at a time and never holds the float weight.
"""

from __future__ import annotations

from typing import Any

import torch

from quantreg import InputError, frozen_param, layer_geometry
from quantreg.kernels import Float8Layout
from quantreg.methods._checks import check_float8_codes, check_scales

FP8_MAX = 448.0  # largest float8_e4m3fn value
MAX_BLOCK = 1 << 20


def block_problem(value: Any) -> str | None:
    """Why ``value`` is not a block size ``[rows, cols]`` of two positive ints (None: it is)."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(type(v) is int and 1 <= v <= MAX_BLOCK for v in value)
    ):
        return f"expected [rows, cols]: two integers between 1 and {MAX_BLOCK}, got {value!r}"
    return None


def block_scale(
    layer: torch.nn.Module, block: tuple[int, int], k: int, dtype: torch.dtype
) -> torch.nn.Parameter:
    """The whole ``[ceil(N / bn), ceil(K / bk)]`` scale parameter (N: the checkpoint's rows),
    replicated on every rank, kept in the checkpoint's dtype."""
    (bn, bk), n = block, layer_geometry(layer).output_size
    return frozen_param((-(-n // bn), -(-k // bk)), dtype, keep_checkpoint_dtype=True)


def decode_blocks(
    layer: torch.nn.Module, block: tuple[int, int], weight: str, scale: str
) -> Float8Layout:
    """This rank's rows of float8 ``weight`` with their block scales, as a ``Float8Layout``
    whose groups are the column blocks.

    Raises:
        CheckpointError: non-finite or overflowing scales, float8 NaN codes (see ``_checks``).
    """
    geometry = layer_geometry(layer)
    (bn, bk), k = block, geometry.input_size
    stored = getattr(layer, scale).data
    first = torch.arange(geometry.output_size_per_partition) + geometry.output_start
    rows = (first // bn).clamp(max=stored.shape[0] - 1)  # rows past the vocab: padding
    scales = stored[rows].T.contiguous()  # [ceil(K / bk), rows of this rank]
    check_scales(layer, scale, scales, None, (-FP8_MAX, FP8_MAX))
    check_float8_codes(layer, weight)
    name = f"{geometry.prefix}.{scale}"
    g_idx = torch.arange(k) // bk
    return Float8Layout.build(getattr(layer, weight).data, scales, None, g_idx, (name, name))


def quantize_blocks(
    weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Round-to-nearest float8 ``weight`` ``[N, K]`` and its ``weight_scale``
    ``[ceil(N/bn), ceil(K/bk)]``: each block's absolute maximum maps to 448 (the scale rounded
    to ``scale_dtype`` first).

    Raises:
        InputError: a block size that is not two positive integers.
    """
    problem = block_problem(block)
    if problem is not None:
        raise InputError(f"block size: {problem}", field="block_size")
    (bn, bk), (n, k) = block, weight.shape
    w = weight.double()
    padded = torch.nn.functional.pad(w, (0, -k % bk, 0, -n % bn))
    blocks = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    peak = blocks.abs().amax((1, 3))
    scale = (peak / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
    full = scale.double().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    values = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": values, "weight_scale": scale}

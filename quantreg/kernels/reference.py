"""The exact reference kernel: ``x @ W.T`` accumulated block by block in float32.

Weights are dequantized ``ROW_BLOCK`` input rows at a time, exactly as the producers compute
them (``(q - z) * s`` in float32, rounded once to the scale dtype), so memory stays bounded at
any group size and the whole float weight is never held. It runs on any device, for any bits
and groups: the fallback every other kernel is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from quantreg.kernels.packing import unpack_codes

if TYPE_CHECKING:
    import torch

    from quantreg.kernels.layouts import Float8Layout, KPackedLayout

# Input rows dequantized at once: bounded memory at any group size.
ROW_BLOCK = 128
# float8: at most this many bytes of float32 temporaries per call besides the result (values,
# their product with the scales, its rounding, the float32 copy blockwise_matmul multiplies: up
# to 4 weight blocks alive; the partial sums), with room left for x in float32.
FLOAT8_TRANSIENT_BYTES = 28 * 2**20
FLOAT8_TEMPORARIES = 4
COLUMN_MULTIPLE = 256


def dequantize(
    codes: torch.Tensor, zeros: torch.Tensor | int, scales: torch.Tensor
) -> torch.Tensor:
    """``(codes - zeros) * scales``, exact in float32, then rounded once to the scale dtype --
    what AutoAWQ, GPTQModel and compressed-tensors compute in that dtype."""
    import torch

    diff = (codes - zeros).to(torch.float32)
    return (diff * scales.to(torch.float32)).to(scales.dtype)


def row_blocks(bounds: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
    """``(start, stop, group)``: at most ``ROW_BLOCK`` rows, each block inside one group."""
    for group in range(len(bounds) - 1):
        for start in range(bounds[group], bounds[group + 1], ROW_BLOCK):
            yield start, min(start + ROW_BLOCK, bounds[group + 1]), group


def blockwise_matmul(
    x: torch.Tensor,
    bounds: tuple[int, ...],
    dequantize_rows: Callable[[int, int, int], torch.Tensor],
) -> torch.Tensor:
    """``x [M, K] @ W.T`` in float32 where ``dequantize_rows(start, stop, group)`` gives rows
    ``start:stop`` of ``W.T`` (``[rows, N]``) rounded to the scale dtype."""
    import torch

    x = x.to(torch.float32)
    acc: torch.Tensor | None = None
    for start, stop, group in row_blocks(bounds):
        part = x[:, start:stop] @ dequantize_rows(start, stop, group).to(torch.float32)
        acc = part if acc is None else acc.add_(part)
    assert acc is not None  # K >= 1
    return acc


def kpacked_rows(layout: KPackedLayout, start: int, stop: int, group: int) -> torch.Tensor:
    """Rows ``start:stop`` (one group, sorted order) of ``W.T``, rounded to the scale dtype."""
    import torch

    pf = 32 // layout.bits
    first, last = start // pf, -(-stop // pf)
    codes = unpack_codes(layout.codes[first:last], layout.bits, dim=0)
    codes = codes[start - first * pf : stop - first * pf]
    zeros = layout.zeros[group : group + 1].to(torch.int32)
    return dequantize(codes, zeros, layout.scales[group : group + 1])


def reference_matmul(x: torch.Tensor, layout: KPackedLayout) -> torch.Tensor:
    """``x [M, K]`` (features already in the layout's row order) ``@ W.T``: float32 ``[M, N]``."""
    return blockwise_matmul(
        x, layout.bounds, lambda start, stop, group: kpacked_rows(layout, start, stop, group)
    )


def float8_matmul(x: torch.Tensor, layout: Float8Layout) -> torch.Tensor:
    """``x [M, K]`` (features in the layout's column order) ``@ W.T`` for float8 weights.

    Output columns are computed ``float8_columns(N)`` at a time, each over the same
    ``ROW_BLOCK``-row blocks, so that the float32 temporaries stay within
    ``FLOAT8_TRANSIENT_BYTES`` at any vocab size; every output element is summed exactly as
    with one column block.
    """
    import torch

    n = layout.n
    step = float8_columns(n, x.shape[0])
    if step >= n:
        return _float8_columns(x, layout, 0, n)
    out = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        out[:, c0:c1] = _float8_columns(x, layout, c0, c1)
    return out


def float8_columns(n: int, m: int) -> int:
    """Output columns per step: ``FLOAT8_TEMPORARIES`` float32 ``[ROW_BLOCK, columns]`` weight
    blocks and two ``[m, columns]`` partial sums fit in ``FLOAT8_TRANSIENT_BYTES``; a multiple
    of ``COLUMN_MULTIPLE``, so that torch's CPU matmul tiles each step's columns as it tiles
    them in one block (narrower, odd steps change the summation of some columns)."""
    per_column = 4 * (ROW_BLOCK * FLOAT8_TEMPORARIES + 2 * m)
    step = FLOAT8_TRANSIENT_BYTES // per_column // COLUMN_MULTIPLE * COLUMN_MULTIPLE
    return min(n, max(COLUMN_MULTIPLE, step))


def _float8_columns(x: torch.Tensor, layout: Float8Layout, c0: int, c1: int) -> torch.Tensor:
    """Columns ``c0:c1`` of ``x @ W.T`` (float32)."""
    import torch

    def rows(start: int, stop: int, group: int) -> torch.Tensor:
        values = layout.value_block(c0, c1, start, stop).to(torch.float32)
        if layout.zeros is not None:
            values = values - layout.zeros[group, c0:c1].to(torch.float32)[:, None]
        weights = dequantize(values, 0, layout.scale_block(group, group + 1, c0, c1).T).T
        return weights if layout.round_to is None else weights.to(layout.round_to)

    return blockwise_matmul(x, layout.bounds, rows)

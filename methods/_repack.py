"""The one repacked layout that AWQ and GPTQ heads share after loading, and its CPU paths.

Layout (buffers on the layer, vocab = ``N`` columns, hidden = ``K`` rows):

* ``wq``      int32 ``[ceil(K / pf), N]``: codes packed along K, ``pf = 32 // bits`` per word,
  code ``j`` of a word at bits ``j * bits``, rows in group order;
* ``wscales`` ``[G, N]`` in the checkpoint's scale dtype; ``wzeros`` uint8 ``[G, N]``, the true
  zero points (GPTQ v1's ``- 1`` undone);
* ``wperm``   int64 ``[K]`` or None: with act-order the rows are sorted by group at load time,
  and ``x`` is permuted the same way at run time (as Marlin does);
* ``wbounds`` the first row of every group (groups are contiguous after sorting);
* ``wtriton`` whether ``apply_repacked`` runs the Triton kernel (decided once, by device).

The Triton kernels (``_triton_kernels``) read this layout on CUDA; on a CPU the head runs
``apply_shared`` (block-wise exact dequantization). ``cpu_wna16`` converts further to its
CPU kernels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from quantreg import pack_codes, unpack_codes
from quantreg.methods._layers import ROW_BLOCK, dequantize, group_order, reference_matmul

# Output columns repacked per step: bounds the temporary codes to K x COLUMN_CHUNK.
COLUMN_CHUNK = 4096
TORCH_INT4_GROUPS = (32, 64, 128, 256)


def repack(
    layer: torch.nn.Module,
    *,
    bits: int,
    codes: Callable[[int, int], torch.Tensor],
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    drop: tuple[str, ...],
) -> None:
    """Build the shared layout on ``layer`` from the loaded tensors, then drop ``drop``.

    ``codes(c0, c1)`` returns the unsigned codes of output columns ``c0:c1`` as int32
    ``[K, c1 - c0]`` in checkpoint row order; ``zeros`` / ``scales`` are ``[G, N]``;
    ``g_idx`` the group of every row (None: rows ``i // group_size`` in order).
    """
    k, n = codes(0, 1).shape[0], scales.shape[1]
    groups = scales.shape[0]
    if g_idx is None:
        size = -(-k // groups)
        g_idx = torch.arange(k, device=scales.device) // size
    order, bounds = group_order(g_idx, groups, "g_idx")
    perm = None if bool((g_idx[1:] >= g_idx[:-1]).all()) else order
    pf = 32 // bits
    wq = torch.empty((-(-k // pf), n), dtype=torch.int32, device=scales.device)
    for c0 in range(0, n, COLUMN_CHUNK):
        c1 = min(c0 + COLUMN_CHUNK, n)
        block = codes(c0, c1)
        if perm is not None:
            block = block[perm]
        wq[:, c0:c1] = pack_codes(block, bits, dim=0)
    for name in drop:
        delattr(layer, name)
    layer.register_buffer("wq", wq, persistent=False)
    layer.register_buffer("wscales", scales.contiguous(), persistent=False)
    layer.register_buffer("wzeros", zeros.to(torch.uint8).contiguous(), persistent=False)
    layer.register_buffer("wperm", perm, persistent=False)
    layer.wbits, layer.wbounds = bits, bounds
    layer.wtriton = triton_on(wq.device)  # decided once, not on every call


def dequantize_shared(layer: torch.nn.Module, start: int, stop: int, group: int) -> torch.Tensor:
    """Rows ``start:stop`` (sorted order, one group) of ``W.T``, rounded to the scale dtype."""
    bits = layer.wbits
    pf = 32 // bits
    first, last = start // pf, -(-stop // pf)
    codes = unpack_codes(layer.wq[first:last], bits, dim=0)[start - first * pf : stop - first * pf]
    zeros = layer.wzeros[group : group + 1].to(torch.int32)
    return dequantize(codes, zeros, layer.wscales[group : group + 1])


def shared_blocks(layer: torch.nn.Module) -> list[tuple[slice, int]]:
    """``(rows, group)`` blocks of at most ``ROW_BLOCK`` sorted rows, each inside one group."""
    bounds = layer.wbounds
    return [
        (slice(start, min(start + ROW_BLOCK, bounds[g + 1])), g)
        for g in range(len(bounds) - 1)
        for start in range(bounds[g], bounds[g + 1], ROW_BLOCK)
    ]


def permute_input(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` with its features in the layout's (group-sorted) row order."""
    return x if layer.wperm is None else x.index_select(-1, layer.wperm.to(x.device))


class RepackedLinearMethod:
    """Mixin for a family's LinearMethod: repack into the shared layout after loading, then
    run it (``awq_marlin``, ``gptq_marlin``). The family class supplies ``repack(layer)``."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)  # type: ignore[misc]
        self.repack(layer)  # type: ignore[attr-defined]

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return apply_repacked(layer, x, bias)


def triton_on(device: torch.device) -> bool:
    """Whether the Triton kernel runs the shared layout on ``device`` (CUDA >= 8.0, triton)."""
    if device.type != "cuda":
        return False
    from quantreg.methods._triton_kernels import triton_ready

    return triton_ready(device)


def apply_repacked(
    layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton kernel where ``repack`` found it can run; the exact block-wise path elsewhere."""
    if layer.wtriton:
        from quantreg.methods._triton_kernels import apply_triton

        return apply_triton(layer, x, bias)
    return apply_shared(layer, x, bias)


def apply_shared(
    layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact block-wise path over the shared layout (any device, any bits and groups)."""
    return reference_matmul(
        permute_input(layer, x),
        bias,
        shared_blocks(layer),
        lambda rows, group: dequantize_shared(layer, rows.start, rows.stop, group),
    )


def regular_group_size(layer: torch.nn.Module) -> int | None:
    """The group size when every group but the last has the same number of rows, else None."""
    bounds = layer.wbounds
    sizes = {b - a for a, b in itertools.pairwise(bounds[:-1])} or {bounds[-1]}
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    return size if bounds[-1] - bounds[-2] <= size else None

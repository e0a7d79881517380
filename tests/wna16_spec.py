"""An independent AWQ / GPTQ decoder written from FORMATS.md, for tests only.

It shares no code with quantreg: bit fields are extracted word by word with plain shifts.
"""

from __future__ import annotations

import torch

AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # logical column j of a word sits in nibble REV[j]


def _field(words: torch.Tensor, index: int, bits: int) -> torch.Tensor:
    return ((words.to(torch.int64) & 0xFFFFFFFF) >> (index * bits)) & ((1 << bits) - 1)


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``W [out, in]`` of AWQ GEMM tensors, rounded to the scale dtype as AutoAWQ does."""
    k, words = qweight.shape
    q = torch.stack([_field(qweight, AWQ_REVERSE[j], 4) for j in range(8)], dim=-1).reshape(
        k, words * 8
    )
    z = torch.stack([_field(qzeros, AWQ_REVERSE[j], 4) for j in range(8)], dim=-1).reshape(
        qzeros.shape[0], words * 8
    )
    size = group_size if group_size > 0 else k
    g = torch.arange(k) // size
    w_t = (q - z[g]).double() * scales[g].double()
    return w_t.to(scales.dtype).T


def gptq_dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    v1: bool = True,
) -> torch.Tensor:
    """``W [out, in]`` of GPTQ tensors (v1: stored zero + 1), rounded to the scale dtype."""
    pf = 32 // bits
    rows, n = qweight.shape
    q = torch.stack([_field(qweight, j, bits) for j in range(pf)], dim=1).reshape(rows * pf, n)
    groups, zwords = qzeros.shape
    z = torch.stack([_field(qzeros, j, bits) for j in range(pf)], dim=-1).reshape(
        groups, zwords * pf
    )[:, :n]
    if v1:
        z = (z + 1) & ((1 << bits) - 1)
    g = g_idx.to(torch.int64)
    w_t = (q - z[g]).double() * scales[g].double()
    return w_t.to(scales.dtype).T

"""torch's own weight-only CPU ops and their layouts: ``_weight_int4pack_mm_for_cpu`` (int4,
groups of 32-256) and ``_weight_int8pack_mm`` (symmetric int8, one scale per output).

torch adds zero points as floats (``(q - 8) * s + (8 - z) * s``) instead of rounding each
weight to the scale dtype as the producers do, so these ops serve bf16 / fp16 heads only
(within 1e-2); float32 heads keep an exact kernel.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantreg.kernels.layouts import LayoutTensors
from quantreg.kernels.weights import IntWeights

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

INT4_GROUPS = (32, 64, 128, 256)
INT4_CHUNK = 1024  # output rows converted per step (a multiple of 64, torch's largest block)
INT4_OP = "_weight_int4pack_mm_for_cpu"
INT8_OP = "_weight_int8pack_mm"
FLIP_BYTES = -0x7F7F7F80  # 0x80808080 as an int32: flips every byte's top bit (q ^ 0x80 = q - 128)


def has_op(name: str) -> bool:
    """Whether this torch build has ``torch.ops.aten.<name>``."""
    import torch

    return hasattr(torch.ops.aten, name)


@dataclass(frozen=True, eq=False)
class TorchInt4Layout(LayoutTensors):
    """torch's int4 CPU format.

    Attributes:
        weight: the op's packed codes (``_convert_weight_to_int4pack_for_cpu``), ``[N, K/2]``.
        scales_zeros: ``[G, N, 2]`` in the activation dtype: ``s`` and ``(8 - z) * s``.
        group_size: 32, 64, 128 or 256.
        perm: int64 ``[K]`` row order applied to ``x`` (act-order), or None.
    """

    weight: torch.Tensor
    scales_zeros: torch.Tensor
    group_size: int
    perm: torch.Tensor | None

    @classmethod
    def fits(cls, weights: IntWeights) -> str | None:
        """Why ``weights`` cannot take this layout (None: it can)."""
        group = weights.group_size
        if weights.bits != 4:
            return f"takes 4-bit codes; these are {weights.bits}-bit"
        if group not in INT4_GROUPS or weights.k % group:
            sizes = "/".join(map(str, INT4_GROUPS))
            return f"takes equal groups of {sizes} rows dividing K; these are {group}"
        if weights.n % 64:
            return f"needs the output size to be a multiple of 64; it is {weights.n}"
        return None

    @classmethod
    def build(cls, weights: IntWeights, dtype: torch.dtype) -> TorchInt4Layout:
        """torch's packed codes, built directly in the op's layout when this torch's layout is
        one :func:`int4_block` recognizes (else by the op, a column chunk at a time), and the
        scales and float zero points."""
        import torch

        scales = weights.scales.to(torch.float32)
        zeros = (8 - weights.zeros.to(torch.float32)) * scales  # w = (q - 8) * s + (8 - z) * s
        group = weights.group_size
        assert group is not None  # checked by fits()
        return cls(
            weight=_int4_weight(weights),
            scales_zeros=torch.stack([scales, zeros], dim=-1).to(dtype).contiguous(),
            group_size=group,
            perm=weights.perm,
        )


@dataclass(frozen=True, eq=False)
class TorchInt8Layout(LayoutTensors):
    """torch's int8 CPU format: signed codes ``q - 128`` with one scale per output.

    Attributes:
        weight: int8 ``[N, K]``.
        scales: ``[N]`` in the activation dtype.
        perm: always None (one group has no act-order); kept for the common call path.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None = None

    @classmethod
    def fits(cls, weights: IntWeights) -> str | None:
        """Why ``weights`` cannot take this layout (None: it can)."""
        if weights.bits != 8:
            return f"takes 8-bit codes; these are {weights.bits}-bit"
        if weights.groups != 1:
            return f"takes one scale per output (no groups); these have {weights.groups} groups"
        # padding columns carry scale 0 and any zero point
        if not bool(((weights.zeros == 128) | (weights.scales == 0)).all()):
            return "takes symmetric codes (zero point 128); these are asymmetric"
        return None

    @classmethod
    def build(cls, weights: IntWeights, dtype: torch.dtype) -> TorchInt8Layout:
        """The checkpoint's k-packed words as they are (four codes a word, little-endian, are
        the codes' bytes: one transposing copy, then ``q - 128`` as ``q ^ 0x80`` in place);
        else the codes a column chunk at a time."""
        return cls(
            weight=_int8_weight(weights),
            scales=weights.scales[0].to(dtype).contiguous(),
        )


@functools.cache
def int4_block() -> int | None:
    """The outputs per block of ``_convert_weight_to_int4pack_for_cpu``'s layout in this
    process (it depends on the CPU capability torch dispatches to): 32 or 64 when the layout is
    ``byte[block][k][j] = code(j, k) | code(j + B/2, k) << 4`` for ``j < B/2``, as checked on a
    random probe; None for any other layout (then the op builds it)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), generator=gen, dtype=torch.int32)  # [N, K]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block in (32, 64):
        if torch.equal(_int4_blocks(codes.T, block).flatten(), packed.flatten()):
            return block
    logger.info("torch's int4 CPU layout is not a known one here; its op builds it")
    return None


def _int4_blocks(codes: torch.Tensor, block: int) -> torch.Tensor:
    """uint8 ``[c / block, K, block / 2]``: codes ``[K, c]`` (int32) in the op's layout."""
    import torch

    k, c = codes.shape
    x = codes.reshape(k, c // block, 2, block // 2)
    pairs = (x[:, :, 0] | (x[:, :, 1] << 4)).to(torch.uint8)  # [K, c / block, block / 2]
    return pairs.transpose(0, 1)


def _int4_weight(weights: IntWeights) -> torch.Tensor:
    """The op's packed codes, ``INT4_CHUNK`` outputs at a time."""
    import torch

    n, k = weights.n, weights.k
    block = int4_block()
    if block is None:
        chunks = []
        for n0 in range(0, n, INT4_CHUNK):
            codes = weights.sorted_codes(n0, min(n0 + INT4_CHUNK, n))
            chunks.append(
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.T.contiguous(), 1)
            )
        return torch.cat(chunks)
    out = torch.empty((n // block, k, block // 2), dtype=torch.uint8)
    for n0 in range(0, n, INT4_CHUNK):
        n1 = min(n0 + INT4_CHUNK, n)
        out[n0 // block : n1 // block] = _int4_blocks(weights.sorted_codes(n0, n1), block)
    return out.view(n, k // 2)


def _int8_weight(weights: IntWeights) -> torch.Tensor:
    """int8 ``[N, K]``: ``q - 128`` of every code, outputs on dim 0."""
    import torch

    k, n = weights.k, weights.n
    words = weights.k_packed
    if words is not None and weights.perm is None and sys.byteorder == "little":
        out = torch.empty((n, words.shape[0]), dtype=torch.int32, device=words.device)
        out.copy_(words.T)
        out.bitwise_xor_(FLIP_BYTES)
        weight = out.view(torch.int8)
        return weight if weight.shape[1] == k else weight[:, :k].contiguous()
    weight = torch.empty((n, k), dtype=torch.int8, device=weights.scales.device)
    for c0 in range(0, n, INT4_CHUNK):
        c1 = min(c0 + INT4_CHUNK, n)
        weight[c0:c1] = (weights.sorted_codes(c0, c1) - 128).to(torch.int8).T
    return weight


def int4_matmul(x: torch.Tensor, layout: TorchInt4Layout) -> torch.Tensor:
    """``x [M, K]`` (features in the layout's row order) ``@ W.T`` in the layout's dtype."""
    import torch

    sz = layout.scales_zeros
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(sz.dtype).contiguous(), layout.weight, layout.group_size, sz
    )


def int8_matmul(x: torch.Tensor, layout: TorchInt8Layout) -> torch.Tensor:
    """``x [M, K] @ W.T`` in the layout's dtype."""
    import torch

    scales = layout.scales
    return torch.ops.aten._weight_int8pack_mm(
        x.to(scales.dtype).contiguous(), layout.weight, scales
    )

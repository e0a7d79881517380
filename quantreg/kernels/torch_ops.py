"""torch's own weight-only CPU ops and their layouts: ``_weight_int4pack_mm_for_cpu`` (int4,
groups of 32-256) and ``_weight_int8pack_mm`` (symmetric int8, one scale per output).

torch adds zero points as floats (``(q - 8) * s + (8 - z) * s``) instead of rounding each
weight to the scale dtype as the producers do, so these ops serve bf16 / fp16 heads only
(within 1e-2); float32 heads keep an exact kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantreg.kernels.layouts import LayoutTensors
from quantreg.kernels.weights import IntWeights

if TYPE_CHECKING:
    import torch

INT4_GROUPS = (32, 64, 128, 256)
INT4_CHUNK = 1024  # output rows converted per step (torch's blocks are 64 rows)
INT4_OP = "_weight_int4pack_mm_for_cpu"
INT8_OP = "_weight_int8pack_mm"


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
        import torch

        chunks = []
        for n0 in range(0, weights.n, INT4_CHUNK):
            codes = weights.sorted_codes(n0, min(n0 + INT4_CHUNK, weights.n))
            chunks.append(
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.T.contiguous(), 1)
            )
        scales = weights.scales.to(torch.float32)
        zeros = (8 - weights.zeros.to(torch.float32)) * scales  # w = (q - 8) * s + (8 - z) * s
        group = weights.group_size
        assert group is not None  # checked by fits()
        return cls(
            weight=torch.cat(chunks),
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
        import torch

        codes = weights.sorted_codes(0, weights.n)  # [K, N]
        return cls(
            weight=(codes - 128).to(torch.int8).T.contiguous(),
            scales=weights.scales[0].to(dtype).contiguous(),
        )


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

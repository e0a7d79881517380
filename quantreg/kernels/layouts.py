"""The layouts that the reference and Triton kernels read: ``KPackedLayout`` and ``Float8Layout``.

The CPU kernel's layout lives beside it (``cpu.py``), torch's beside its ops (``torch_ops.py``).
Every layout is a frozen dataclass of tensors built once after loading; kernels are functions
of an activation and a layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from quantreg.kernels.packing import pack_codes
from quantreg.kernels.weights import IntWeights, group_order, regular_group_size

if TYPE_CHECKING:
    import torch

# e2m1 (NVFP4) magnitudes by 3-bit code; bit 3 of a code is the sign. A Float8Layout holds an
# NVFP4 head's values as float8: every one of them is one of these, exactly.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Output columns converted per step: bounds the temporary codes to K x COLUMN_CHUNK.
COLUMN_CHUNK = 4096
# tl.dot reads K in blocks of at least 16 rows; other group sizes take the per-row path.
TRITON_GROUP_MULTIPLE = 16


class LayoutTensors:
    """Mixin: the tensors a layout holds, by field name (for resident bytes and comparisons)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        import torch

        return {
            f.name: value
            for f in fields(self)  # type: ignore[arg-type]
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }


@dataclass(frozen=True, eq=False)
class KPackedLayout(LayoutTensors):
    """Integer codes packed along the input dim, rows in group order: what the exact reference
    kernel and the Triton kernel read (the layout every AWQ, GPTQ and compressed-tensors
    integer head can be put in).

    Attributes:
        codes: int32 ``[ceil(K / pf), N]``, ``pf = 32 // bits`` codes per word along K, code
            ``j`` of a word at bits ``j * bits``; rows in group order.
        scales: ``[G, N]`` in the checkpoint's scale dtype.
        zeros: uint8 ``[G, N]``, the true zero points (GPTQ v1's ``- 1`` undone).
        perm: int64 ``[K]``: with act-order the rows are sorted by group, and ``x`` is permuted
            the same way at run time; None otherwise.
        bounds: the first row of every group, then ``K`` (groups are contiguous).
        bits: 4 or 8.
        group_size: the regular group size, or None for unequal (act-order) groups.
        row_groups: int32 ``[K]``, the group of every (sorted) row, for kernels that read
            groups per row; None when ``group_size`` is a multiple of 16.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    bounds: tuple[int, ...]
    bits: int
    group_size: int | None
    row_groups: torch.Tensor | None

    @property
    def k(self) -> int:
        return self.bounds[-1]

    @property
    def n(self) -> int:
        return self.codes.shape[1]

    @classmethod
    def build(cls, weights: IntWeights) -> KPackedLayout:
        """Take the checkpoint's words when they already are this layout, else pack
        ``weights`` a column chunk at a time (rows in group order)."""
        import torch

        k, n, bits = weights.k, weights.n, weights.bits
        device = weights.scales.device
        if weights.k_packed is not None and weights.perm is None:
            codes = weights.k_packed.contiguous()  # the checkpoint's own words: no repacking
        else:
            codes = torch.empty((-(-k // (32 // bits)), n), dtype=torch.int32, device=device)
            for c0 in range(0, n, COLUMN_CHUNK):
                c1 = min(c0 + COLUMN_CHUNK, n)
                codes[:, c0:c1] = pack_codes(weights.sorted_codes(c0, c1), bits, dim=0)
        group = weights.group_size
        row_groups = None
        if group is None or group % TRITON_GROUP_MULTIPLE:
            bounds = torch.tensor(weights.bounds, device=device)
            rows = torch.arange(k, device=device)
            row_groups = torch.bucketize(rows, bounds[1:], right=True).to(torch.int32)
        return cls(
            codes=codes,
            scales=weights.scales.contiguous(),
            zeros=weights.zeros.to(torch.uint8).contiguous(),
            perm=weights.perm,
            bounds=weights.bounds,
            bits=bits,
            group_size=group,
            row_groups=row_groups,
        )


@dataclass(frozen=True, eq=False)
class Float8Layout(LayoutTensors):
    """float8 (e4m3) weights with group, channel or tensor scales; columns in group order.

    ``W[o, i] = (value[o, i] - zeros[g(i), o]) * scales[g(i), o]``, rounded to the scale dtype.
    NVFP4 heads keep their checkpoint's e2m1 codes, two a byte (every e2m1 number is exact in
    e4m3): the CPU float8 and Triton kernels read those codes as they are, and only a kernel
    that reads float8 values decodes them (:attr:`values`, :meth:`value_block`).

    Attributes:
        stored: the weights as held: float8_e4m3fn ``[N, K]`` (vocab on dim 0, as
            compressed-tensors stores it), or NVFP4's e2m1 codes packed two a byte, uint8
            ``[N, K / 2]`` (column ``2j`` in the low nibble of byte ``j``; bit 3 the sign,
            bits 0-2 index :data:`E2M1`); columns in group order.
        group_scales: ``[G, N]`` in the checkpoint's scale dtype: the scales, or (with
            ``scale_factor``) NVFP4's float8 group scales as stored (a transposed view of its
            ``[N, G]`` tensor), which :attr:`scales` makes float32 and applies the factor to.
        zeros: ``[G, N]`` zero points, or None (symmetric: fp8 checkpoints are).
        perm: int64 ``[K]`` or None, as in :class:`KPackedLayout`.
        bounds: the first column of every group, then ``K``.
        round_to: a dtype the dequantized weights are rounded to last (compressed-tensors'
            NVFP4 decompress ends in bfloat16 whatever its scale dtype), or None.
        scale_factor: NVFP4's global scale, or None (``group_scales`` are the scales).
    """

    stored: torch.Tensor
    group_scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    bounds: tuple[int, ...]
    round_to: torch.dtype | None = None
    scale_factor: ScaleFactor | None = None

    @property
    def k(self) -> int:
        return self.bounds[-1]

    @property
    def n(self) -> int:
        return self.stored.shape[0]

    @property
    def group_size(self) -> int | None:
        return regular_group_size(self.bounds)

    @property
    def groups(self) -> int:
        return self.group_scales.shape[0]

    @property
    def device(self) -> torch.device:
        return self.stored.device

    @property
    def scale_dtype(self) -> torch.dtype:
        """The dtype of :attr:`scales` (float32 when a factor makes them)."""
        import torch

        return self.group_scales.dtype if self.scale_factor is None else torch.float32

    @property
    def scales(self) -> torch.Tensor:
        """``[G, N]`` scales in :attr:`scale_dtype`: ``group_scales``, or (NVFP4) made from
        them and the factor (a new float32 tensor each time: kernels that read scales in
        blocks use :meth:`scale_block`)."""
        return self.scale_block(0, self.groups, 0, self.n)

    def scale_block(self, g0: int, g1: int, c0: int, c1: int) -> torch.Tensor:
        """Scales of groups ``g0:g1``, outputs ``c0:c1``."""
        block = self.group_scales[g0:g1, c0:c1]
        return block if self.scale_factor is None else self.scale_factor.apply(block)

    @property
    def e2m1(self) -> torch.Tensor | None:
        """The packed e2m1 codes uint8 ``[N, K / 2]`` when the layout holds them, else None."""
        import torch

        return self.stored if self.stored.dtype == torch.uint8 else None

    @property
    def values(self) -> torch.Tensor:
        """The float8_e4m3fn ``[N, K]`` values: ``stored``, or its e2m1 codes decoded (a new
        tensor each time: kernels that read values in blocks use :meth:`value_block`)."""
        return self.value_block(0, self.n, 0, self.k)

    def value_block(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """float8 values of rows ``r0:r1``, columns ``c0:c1`` (decoded when ``stored`` holds
        e2m1 codes)."""
        if self.e2m1 is None:
            return self.stored[r0:r1, c0:c1]
        first = c0 // 2
        values = e2m1_float8(self.stored[r0:r1, first : -(-c1 // 2)])
        return values[:, c0 - 2 * first : c1 - 2 * first]

    @classmethod
    def build(
        cls,
        values: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None = None,
        g_idx: torch.Tensor | None = None,
        names: tuple[str, str] = ("g_idx", "scales"),
        round_to: torch.dtype | None = None,
    ) -> Float8Layout:
        """``values`` ``[N, K]``, ``scales`` / ``zeros`` ``[G, N]``, ``g_idx`` the group of every
        column (None: ``ceil(K / G)`` columns per group, in order).

        Raises:
            CheckpointError: a ``g_idx`` entry outside the groups, naming ``names[0]``.
        """
        import torch

        k, groups = values.shape[1], scales.shape[0]
        if g_idx is None:
            g_idx = torch.arange(k, device=values.device) // -(-k // groups)
        order, bounds = group_order(g_idx, groups, names[0], names[1])
        monotone = bool((g_idx[1:] >= g_idx[:-1]).all()) if k > 1 else True
        perm = None if monotone else order
        return cls(
            stored=values if perm is None else values[:, perm].contiguous(),
            group_scales=scales.contiguous(),
            zeros=zeros,
            perm=perm,
            bounds=tuple(bounds),
            round_to=round_to,
        )

    @classmethod
    def from_e2m1(
        cls,
        packed: torch.Tensor,
        scales: torch.Tensor,
        round_to: torch.dtype | None = None,
        factor: ScaleFactor | None = None,
    ) -> Float8Layout:
        """NVFP4's packed e2m1 codes uint8 ``[N, K / 2]`` (see ``stored``) as they are, with
        ``[G, N]`` scales of ``K / G`` columns each (in order: no permutation, no zeros);
        with ``factor`` they are the float8 group scales, taken as they are too (a view)."""
        import torch

        k, groups = 2 * packed.shape[1], scales.shape[0]
        g_idx = torch.arange(k, device=packed.device) // -(-k // groups)
        bounds = group_order(g_idx, groups, "g_idx", "scales")[1]  # in order: never permuted
        if factor is None:
            scales = scales.contiguous()
        return cls(packed, scales, None, None, tuple(bounds), round_to, factor)


@dataclass(frozen=True)
class ScaleFactor:
    """NVFP4's one float32 global scale, applied to every float8 group scale: compressed-
    tensors divides by it (``divide``), ModelOpt multiplies by it."""

    value: float
    divide: bool = False

    def apply(self, scales: torch.Tensor) -> torch.Tensor:
        """``scales`` (any dtype, any strides) as a new float32 tensor, divided or multiplied
        by the factor in float32 -- the effective scales, as the producers compute them."""
        import torch

        wide = torch.empty(scales.shape, dtype=torch.float32, device=scales.device)
        wide.copy_(scales)
        return wide.div_(self.value) if self.divide else wide.mul_(self.value)

    def peak(self, codes: torch.Tensor, chunk: int = 1 << 14) -> float:
        """``max |effective scale|`` of float8_e4m3fn ``[G, N]`` group scale codes (NaN codes
        refused before): the effective scale of their largest magnitude, since rounding the
        product or quotient is monotone -- found on the bytes, ``chunk`` at a time, without
        decoding every code (what one float32 conversion of them all would cost)."""
        import torch

        top, step = 0, max(1, chunk // max(1, codes.shape[0]))
        for c in range(0, codes.shape[1], step):
            top = max(top, int((codes[:, c : c + step].view(torch.uint8) & 0x7F).max()))
        value = torch.tensor([top], dtype=torch.uint8).view(torch.float8_e4m3fn)
        return abs(float(self.apply(value)))


def column_blocks(
    values: torch.Tensor,
    width: int,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[G, N]`` values (scales, zero points) as ``[ceil(N / width), G, width]``, the blocks
    of outputs the CPU kernels read, the last block zero-padded: one copy, into ``out`` when
    given (a view will do), else into a new tensor of ``dtype`` (default: the values'),
    converted as copied."""
    import torch

    g, n = values.shape
    whole = n // width * width
    if out is None:
        out = torch.empty((-(-n // width), g, width), dtype=dtype or values.dtype)
    out[: whole // width].copy_(values[:, :whole].reshape(g, -1, width).permute(1, 0, 2))
    if whole < n:
        out[-1].zero_()[:, : n - whole] = values[:, whole:]
    return out


# The e4m3 byte of every e2m1 code (bit 3 the sign; -0 keeps it): what NVFP4 values are.
E2M1_BYTES = (0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C,
              0x80, 0xB0, 0xB8, 0xBC, 0xC0, 0xC4, 0xC8, 0xCC)  # fmt: skip
E2M1_ROWS = 256  # rows decoded per step: bounds the int64 indices to 256 x K / 2 of them


def e2m1_float8(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 codes uint8 ``[R, C]`` (low nibble first) as float8_e4m3fn ``[R, 2C]``."""
    import torch

    table = torch.tensor(E2M1_BYTES, dtype=torch.uint8, device=packed.device)
    out = torch.empty((packed.shape[0], 2 * packed.shape[1]), dtype=torch.uint8,
                      device=packed.device)  # fmt: skip
    for r in range(0, packed.shape[0], E2M1_ROWS):
        p = packed[r : r + E2M1_ROWS].long()
        pair = out[r : r + E2M1_ROWS].view(p.shape[0], -1, 2)
        pair[..., 0], pair[..., 1] = table[p & 15], table[p >> 4]
    return out.view(torch.float8_e4m3fn)


@functools.cache
def _e2m1_table(device: torch.device) -> torch.Tensor:
    """int16 ``[256]``: the e2m1 code of every float8 e4m3 byte that is an e2m1 number, -1 for
    the others (``-0.0`` keeps its sign bit, as compressed-tensors' codes may)."""
    import torch

    codes = torch.full((256,), -1, dtype=torch.int16)
    codes[list(E2M1_BYTES)] = torch.arange(len(E2M1_BYTES), dtype=torch.int16)
    return codes.to(device)


def e2m1_codes(raw: torch.Tensor) -> torch.Tensor | None:
    """float8 e4m3 bytes (uint8, any shape) as their e2m1 codes (uint8, sign in bit 3), or None
    when some value is not an e2m1 number -- what the float8 kernels pack NVFP4 heads with."""
    import torch

    codes = _e2m1_table(raw.device)[raw.long()]
    if bool((codes < 0).any()):
        return None
    return codes.to(torch.uint8)

"""Triton weight-only float8 (e4m3) and fp4 (e2m1) matmul over a :class:`Float8Layout` (the
``gpu`` extra): fp8 per-tensor, per-channel and block heads, and NVFP4 heads.

The layout is :class:`TritonFloat8Layout`, built once from the ``Float8Layout``: the float8
values as their bytes (``uint8 [N, K]``, vocab on dim 0), or -- when every value is an e2m1
number (NVFP4 heads) and K is even -- two 4-bit e2m1 codes a byte, compressed-tensors' own
packing (half the bytes to read; checked against ``pack_fp4_to_uint8`` in compressed-tensors
0.20's ``compressors/nvfp4/helpers.py``: its checkpoints' ``weight_packed`` comes back bit for
bit). Bytes become float32 by integer bit tricks, not by Triton's float8 types (``float8e4nv``
needs sm_89): one kernel runs on every CUDA card from sm_80 on, and on the interpreter.

Each program multiplies a ``BLOCK_M x BLOCK_N`` tile over one slice of K (split-K for small M;
the partial sums are added in float32 afterwards). A weight is computed as the reference
kernel computes it -- ``(value - zero) * scale`` in float32, rounded to the scale dtype, then to
``round_to`` -- and then cast to the activation dtype for ``tl.dot`` with float32 accumulation
(float32 activations: an IEEE float32 dot, no rounding at all). Rounding to bfloat16 is done on
the float32 bits (round to nearest even, as CUDA's conversion rounds), because the interpreter
truncates; the interpreter's ``tl.dot`` cannot multiply bfloat16 either, so there the bfloat16
operands (exact in float32) are multiplied as float32. Scales are read three ways: one group
per K block (the group size a multiple of ``BLOCK_K``; per-tensor and per-channel scales are one
group), several groups per K block (a power-of-two group size dividing ``BLOCK_K``: NVFP4's 16),
or a group per column through ``col_groups`` (irregular groups).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

import torch

from quantreg.kernels.layouts import Float8Layout, LayoutTensors, e2m1_codes
from quantreg.kernels.triton_launch import (
    Config,
    Launch,
    interpreting,
    m_bucket,
    remembered,
    shape_key,
    tuned_config,
    warps_for,
)

logger = logging.getLogger(__name__)

try:  # the gpu extra
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

# The K blocks a configuration may use; a group size decides which read its scales.
BLOCK_KS = (128, 64, 32, 16)
# The "group size" of one group covering every column: a multiple of every BLOCK_K.
WHOLE = 1 << 30
ROWS_PER_CHECK = 4096  # rows packed per step: bounds the temporaries to 4096 x K


class GroupRead(enum.Enum):
    """How a configuration reads scales (and zero points) for a ``BLOCK_K`` step."""

    WIDE = "one group per K block"
    NARROW = "several whole groups per K block"
    COLUMN = "a group per column (col_groups)"


@dataclass(frozen=True, eq=False)
class TritonFloat8Layout(LayoutTensors):
    """A ``Float8Layout`` as the Triton kernel reads it.

    Attributes:
        values: uint8: the float8 e4m3 bytes ``[N, K]`` (``value_bits`` 8), or e2m1 codes two a
            byte ``[N, K / 2]`` (``value_bits`` 4: column ``2j`` in the low nibble of byte
            ``j``, ``2j + 1`` in the high one; bit 3 the sign, bits 0-2 index ``layouts.E2M1``).
        value_bits: 8 or 4.
        scales: ``[G, N]`` in the checkpoint's scale dtype (float16, bfloat16 or float32).
        zeros: ``[G, N]`` float zero points, or None.
        perm: int64 ``[K]`` or None, as in :class:`Float8Layout` (``x`` is permuted before).
        bounds: the first column of every group, then ``K``.
        group_size: the regular group size (``WHOLE`` for one group), or None (irregular).
        col_groups: int32 ``[K]``, the group of every column, where no K block fits the
            groups (irregular groups, or a size neither a multiple of 16 nor a power of two);
            None otherwise.
        round_to: the dtype the weights are rounded to last, or None (see ``Float8Layout``).
    """

    values: torch.Tensor
    value_bits: int
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    bounds: tuple[int, ...]
    group_size: int | None
    col_groups: torch.Tensor | None
    round_to: torch.dtype | None

    @property
    def k(self) -> int:
        return self.bounds[-1]

    @property
    def n(self) -> int:
        return self.values.shape[0]

    @classmethod
    def build(cls, layout: Float8Layout) -> TritonFloat8Layout:
        """The float8 bytes (or their e2m1 codes, packed, when every value is one), and the
        group of every column where the kernel needs it."""
        groups, k = layout.groups, layout.k
        group = WHOLE if groups == 1 else layout.group_size
        col_groups = None
        if not block_ks(group):
            bounds = torch.tensor(layout.bounds, device=layout.stored.device)
            cols = torch.arange(k, device=bounds.device)
            col_groups = torch.bucketize(cols, bounds[1:], right=True).to(torch.int32)
        raw = layout.stored.contiguous().view(torch.uint8)
        # NVFP4 layouts hold their checkpoint's e2m1 codes, which are this layout's already
        packed = raw if layout.e2m1 is not None else pack_e2m1(raw)
        return cls(
            values=raw if packed is None else packed,
            value_bits=8 if packed is None else 4,
            scales=layout.scales,
            zeros=None if layout.zeros is None else layout.zeros.contiguous(),
            perm=layout.perm,
            bounds=layout.bounds,
            group_size=group,
            col_groups=col_groups,
            round_to=layout.round_to,
        )


def block_ks(group: int | None) -> list[int]:
    """The K blocks that read ``group``-sized groups whole (a multiple or a divisor of the
    block); empty when none does (then every column names its group)."""
    if group is None:
        return []
    return [b for b in BLOCK_KS if group % b == 0 or (b % group == 0 and group & (group - 1) == 0)]


def group_read(group: int | None, block_k: int) -> GroupRead:
    """How a ``block_k`` step reads groups of ``group`` columns."""
    if group is None or block_k not in block_ks(group):
        return GroupRead.COLUMN
    return GroupRead.WIDE if group % block_k == 0 else GroupRead.NARROW


def pack_e2m1(raw: torch.Tensor) -> torch.Tensor | None:
    """float8 bytes ``[N, K]`` as e2m1 codes two a byte ``[N, K / 2]``; None when K is odd or
    some value is not an e2m1 number (an fp8 head: found in its first rows)."""
    n, k = raw.shape
    if k % 2 or raw.numel() == 0:
        return None
    packed = torch.empty((n, k // 2), dtype=torch.uint8, device=raw.device)
    for r0 in range(0, n, ROWS_PER_CHECK):
        codes = e2m1_codes(raw[r0 : r0 + ROWS_PER_CHECK])
        if codes is None:
            return None
        packed[r0 : r0 + ROWS_PER_CHECK] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed


if triton is not None:

    @triton.jit
    def _round(w, dtype: tl.constexpr):
        """float32 ``w`` rounded to ``dtype`` (to nearest even), kept in float32."""
        if dtype == tl.bfloat16:  # on the bits: the interpreter's cast truncates
            bits = w.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            w = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        elif dtype == tl.float16:
            w = w.to(tl.float16).to(tl.float32)
        return w

    @triton.jit
    def _decode(v_ptr, offs_n, k0, N, K, stride_vn, VALUE_BITS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """float32 ``[BLOCK_N, BLOCK_K]``: the weights' values in columns ``k0 + arange``."""
        if VALUE_BITS == 8:  # float8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            u = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_k[None, :], mask=mask,
                        other=0).to(tl.uint32)  # fmt: skip
            mag = u & 0x7F
            normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)  # 2^(127 - 7)
            v = tl.where(mag < 8, mag.to(tl.float32) * 0.001953125, normal)  # subnormal: m/512
            sign = u & 0x80
        else:  # e2m1 codes two a byte: sign, 2 exponent bits (bias 1), 1 mantissa bit
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            mask = (offs_n[:, None] < N) & (offs_b[None, :] < K // 2)
            b = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_b[None, :], mask=mask,
                        other=0).to(tl.uint32)  # fmt: skip
            shifts = tl.arange(0, 2) * 4
            u = tl.reshape((b[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K))
            mag = u & 7
            normal = ((mag + 252) << 22).to(tl.float32, bitcast=True)  # 2^(e - 1) (1 + m / 2)
            v = tl.where(mag < 2, mag.to(tl.float32) * 0.5, normal)
            sign = u & 8
        return tl.where(sign != 0, -v, v)

    @triton.jit
    def _float8_kernel(
        x_ptr, v_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr,
        M, N, K, G, stride_xm, stride_vn, stride_sg, stride_sn, stride_zg, stride_zn, stride_om,
        group_size, k_per_split,
        VALUE_BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, COLUMN_GROUPS: tl.constexpr,
        GROUP_SPAN: tl.constexpr, ROUND_TO: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < k_stop), other=0.0)  # fmt: skip
            w = _decode(v_ptr, offs_n, k0, N, K, stride_vn, VALUE_BITS, BLOCK_N, BLOCK_K)
            if COLUMN_GROUPS:  # [BLOCK_N, BLOCK_K]: every column names its group
                g = tl.load(gidx_ptr + offs_k, mask=offs_k < K, other=0)
                mask = mask_n[:, None] & (offs_k[None, :] < K)
                s = tl.load(s_ptr + g[None, :] * stride_sg + offs_n[:, None] * stride_sn,
                            mask=mask, other=0.0).to(tl.float32)  # fmt: skip
                if HAS_ZEROS:
                    w -= tl.load(z_ptr + g[None, :] * stride_zg + offs_n[:, None] * stride_zn,
                                 mask=mask, other=0.0).to(tl.float32)  # fmt: skip
                w = w * s
            elif GROUP_SPAN == 1:  # [BLOCK_N, 1]: the block lies in one group
                g0 = k0 // group_size
                s = tl.load(s_ptr + g0 * stride_sg + offs_n * stride_sn, mask=mask_n,
                            other=0.0).to(tl.float32)[:, None]  # fmt: skip
                if HAS_ZEROS:
                    w -= tl.load(z_ptr + g0 * stride_zg + offs_n * stride_zn, mask=mask_n,
                                 other=0.0).to(tl.float32)[:, None]  # fmt: skip
                w = w * s
            else:  # [BLOCK_N, GROUP_SPAN, 1]: GROUP_SPAN whole groups per block
                g = k0 // group_size + tl.arange(0, GROUP_SPAN)
                mask = mask_n[:, None] & (g[None, :] < G)
                s = tl.load(s_ptr + g[None, :] * stride_sg + offs_n[:, None] * stride_sn,
                            mask=mask, other=0.0).to(tl.float32)  # fmt: skip
                w3 = tl.reshape(w, (BLOCK_N, GROUP_SPAN, BLOCK_K // GROUP_SPAN))
                if HAS_ZEROS:
                    w3 -= tl.load(z_ptr + g[None, :] * stride_zg + offs_n[:, None] * stride_zn,
                                  mask=mask, other=0.0).to(tl.float32)[:, :, None]  # fmt: skip
                w = tl.reshape(w3 * s[:, :, None], (BLOCK_N, BLOCK_K))
            # the producers' weights: rounded to the scale dtype, then to round_to
            w = _round(_round(w, s_ptr.dtype.element_ty), ROUND_TO)
            if DOT_FP32:  # float32 activations, or bfloat16 on the interpreter (exact in fp32)
                w = _round(w, a.dtype)
                acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:  # float16 rounds to nearest even everywhere; bfloat16 is exact after _round
                acc += tl.dot(a, tl.trans(_round(w, a.dtype).to(a.dtype)))
        out = out_ptr + pid_k * M * stride_om + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


def candidates(m: int, k: int, group: int | None) -> list[Config]:
    """The configurations worth timing for this shape (the first is the heuristic pick)."""
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    ks = block_ks(group)[:2] or [64]
    splits = (4, 8, 1) if m <= 16 else ((2, 1) if m <= 64 else (1,))
    configs = [
        Config(bm, bn, bk, split, warps_for(bn, bk), 3 if bm <= 32 else 4)
        for split in splits
        for bk in ks
        for bn in (64, 128)
        if k >= split * bk
    ]
    return configs or [Config(bm, 64, ks[-1], 1)]


def triton_float8_matmul(
    x: torch.Tensor, layout: TritonFloat8Layout, config: Config | None = None
) -> torch.Tensor:
    """``x [M, K]`` (features in the layout's column order) ``@ W.T``: float32 ``[M, N]``.
    ``config`` overrides the tuned choice."""
    if triton is None:
        raise RuntimeError("the Triton kernels need the gpu extra: pip install 'quantreg[gpu]'")
    x = x.contiguous()
    if x.shape[0] == 0:  # no rows: nothing to launch
        return torch.zeros((0, layout.n), dtype=torch.float32, device=x.device)
    return _launch(x, layout, config or _choose(x, layout))


def _launch(x: torch.Tensor, layout: TritonFloat8Layout, cfg: Config) -> torch.Tensor:
    return launch_spec(x, layout, cfg).run()


def launch_spec(x: torch.Tensor, layout: TritonFloat8Layout, cfg: Config) -> Launch:
    """The launch that multiplies ``x`` by ``layout`` with ``cfg`` (its output allocated)."""
    m, k = x.shape
    n, group = layout.n, layout.group_size
    read = group_read(group, cfg.block_k) if layout.col_groups is None else GroupRead.COLUMN
    span = 1 if read is not GroupRead.NARROW else cfg.block_k // group  # type: ignore[operator]
    k_per_split = -(-k // (cfg.split_k * cfg.block_k)) * cfg.block_k
    splits = -(-k // k_per_split)
    out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    scales = layout.scales
    zeros = layout.zeros if layout.zeros is not None else scales
    gidx = layout.col_groups
    if read is GroupRead.COLUMN and gidx is None:  # a config off the groups' grid (tests)
        gidx = _column_groups(layout.bounds, x.device)
    emulate = interpreting() and x.dtype == torch.bfloat16  # the interpreter's dot lacks bf16
    args = (x, layout.values, scales, zeros, gidx if gidx is not None else scales, out,
            m, n, k, scales.shape[0], x.stride(0), layout.values.stride(0),
            scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1), n,
            group or WHOLE, k_per_split)  # fmt: skip
    constexprs = {
        "VALUE_BITS": layout.value_bits, "HAS_ZEROS": layout.zeros is not None,
        "COLUMN_GROUPS": read is GroupRead.COLUMN, "GROUP_SPAN": span,
        "ROUND_TO": _tl_dtype(layout.round_to), "DOT_FP32": x.dtype == torch.float32 or emulate,
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
    }  # fmt: skip
    grid = (-(-m // cfg.block_m), -(-n // cfg.block_n), splits)
    return Launch(_float8_kernel, grid, args, constexprs, cfg, out)


def _column_groups(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    edges = torch.tensor(bounds[1:], device=device)
    return torch.bucketize(torch.arange(bounds[-1], device=device), edges, right=True).int()


def _tl_dtype(dtype: torch.dtype | None) -> Any:
    """Triton's name for a rounding dtype (None: float32, no rounding)."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def _choose(x: torch.Tensor, layout: TritonFloat8Layout) -> Config:
    """The tuned configuration (see ``triton_launch.tuned_config``)."""
    m, k = x.shape
    group = None if layout.col_groups is not None else layout.group_size
    fields = (layout.n, k, layout.group_size, layout.value_bits, layout.zeros is not None,
              layout.scales.dtype, layout.round_to, x.dtype)  # fmt: skip

    def choose() -> Config:
        names = ("n", "k", "group", "bits", "zeros", "scales", "round_to", "dtype")
        key = shape_key("float8", m, **dict(zip(names, fields, strict=True)))
        return tuned_config(x, candidates(m, k, group), key, lambda cfg: _launch(x, layout, cfg))

    return remembered(("float8", m_bucket(m), *fields, x.device), choose)

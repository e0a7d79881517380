"""fp4 (e2m1) codes as NVFP4 checkpoints store them, shared by compressed-tensors'
``nvfp4-pack-quantized`` (``_ct_nvfp4``) and ModelOpt's NVFP4 (``_modelopt_format``).

Two codes a byte along the input dim: element ``2j`` in the low nibble of byte ``j``, ``2j + 1``
in the high one; bit 3 of a nibble is the sign, bits 0-2 index ``0, 0.5, 1, 1.5, 2, 3, 4, 6``.
Checked against ModelOpt's ``NVFP4QTensor`` (``modelopt/torch/quantization/qtensor/
nvfp4_tensor.py``: ``quantize`` packs ``q[..., 1::2] << 4 | q[..., 0::2]``, ``_cast_fp4`` rounds
to nearest with ties to the even code) and compressed-tensors' ``pack_fp4_to_uint8``. Every
e2m1 value is exact in float8 e4m3, so decoded codes become a ``Float8Layout`` (one byte a
weight) whose groups of 16 columns carry float32 effective scales.
"""

from __future__ import annotations

import torch

from quantreg.kernels import CPUFloat8Layout, Float8Layout, ScaleFactor

GROUP = 16  # columns per float8 group scale in both producers' NVFP4
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between neighbouring values
FP8_MAX = 448.0  # largest float8_e4m3fn value


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K / 2]`` -> the e2m1 values ``float32 [N, K]`` (low nibble first)."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    table = torch.tensor(E2M1, dtype=torch.float32)
    return table[(codes & 7).long()] * (1 - 2 * (codes >> 3).float())


ROW_CHUNK = 1024  # rows decoded per step by unpack_float8: bounds its int64 temporaries (8 MiB)
BYTES = 0x0101010101010101  # one in every byte of an int64


def unpack_float8(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K / 2]`` -> the values of :func:`unpack` as ``float8_e4m3fn [N, K]`` (every
    e2m1 value is exact in e4m3): by the float8 CPU kernel's extension where it is built, else
    eight codes per int64 word at a time; never a float32 copy.

    A magnitude code ``c >= 2`` (exponent ``c >> 1``, mantissa ``c & 1``) is the e4m3 byte
    ``(c << 2) + 0x30`` (the exponent rebiased by 6); ``c = 1`` (0.5) is ``0x30``; 0 is 0."""
    fast = CPUFloat8Layout.e2m1_values(packed)  # the float8 kernel's one-pass decoding
    if fast is not None:
        return fast
    n, half = packed.shape
    if half % 4:
        return unpack(packed).to(torch.float8_e4m3fn)
    out = torch.empty((n, 2 * half), dtype=torch.uint8, device=packed.device)
    for r in range(0, n, ROW_CHUNK):
        x = packed[r : r + ROW_CHUNK].contiguous().view(torch.int32).to(torch.int64)
        x &= 0xFFFFFFFF
        # 8 nibbles -> 8 bytes, low nibble first: spread by 16, 8, then 4 bits
        for shift, mask in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 15 * BYTES)):
            x = (x | (x << shift)) & mask
        magnitude = x & (7 * BYTES)
        normal = magnitude >> 1
        normal = (normal | (normal >> 1)) & BYTES  # 1 where c >= 2
        half_ = magnitude & BYTES & ~normal  # 1 where c == 1
        x = ((x & (8 * BYTES)) << 4) | ((magnitude << 2) + normal * 0x30 + half_ * 0x2C)
        out[r : r + ROW_CHUNK].view(torch.int64).copy_(x)
    return out.view(torch.float8_e4m3fn)


def encode(scaled: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to the nearest e2m1 code (ties to the even code; beyond
    +-6 to +-6), packed two a byte: ``[N, K]`` -> ``uint8 [N, K / 2]``. The midpoints between
    neighbouring values split the magnitudes, as ModelOpt's ``_cast_fp4`` does."""
    magnitude = scaled.abs()
    bounds = torch.tensor(MIDPOINTS, dtype=magnitude.dtype)
    index = torch.searchsorted(bounds, magnitude.contiguous())  # a midpoint goes down ...
    odd_ties = bounds[1::2]  # ... which is the even code except at 0.75, 1.75 and 3.5
    index = index + torch.isin(magnitude, odd_ties).to(index.dtype)
    codes = index.to(torch.uint8) | (scaled < 0).to(torch.uint8) << 3
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def group_amax(weight: torch.Tensor) -> torch.Tensor:
    """``max |w|`` of every group of 16 columns of a float ``[N, K]`` weight (``K % 16 == 0``),
    in float32: ``[N, K / 16]``."""
    n, k = weight.shape
    return weight.to(torch.float32).abs().reshape(n, k // GROUP, GROUP).amax(-1)


def layout(
    packed: torch.Tensor, scales: torch.Tensor, factor: ScaleFactor, round_to: torch.dtype | None
) -> Float8Layout:
    """The checkpoint's packed codes and float8 group scales ``[N, K / 16]``, both as they are,
    with the global scale ``factor`` that makes the scales effective (float32, per group);
    ``round_to``: the dtype the producer's dequantization ends in (None: float32). Kernels
    that read float8 values or float32 scales make them themselves, from these."""
    return Float8Layout.from_e2m1(packed, scales.T, round_to=round_to, factor=factor)

"""fp4 (e2m1) codes as NVFP4 checkpoints store them, shared by compressed-tensors'
``nvfp4-pack-quantized`` (``_ct_nvfp4``) and ModelOpt's NVFP4 (``_modelopt_format``).

Two codes a byte along the input dim: element ``2j`` in the low nibble of byte ``j``, ``2j + 1``
in the high one; bit 3 of a nibble is the sign, bits 0-2 index ``0, 0.5, 1, 1.5, 2, 3, 4, 6``.
Checked against ModelOpt's ``NVFP4QTensor`` (``modelopt/torch/quantization/qtensor/
nvfp4_tensor.py``: ``quantize`` packs ``q[..., 1::2] << 4 | q[..., 0::2]``, ``_cast_fp4`` rounds
to nearest with ties to the even code) and compressed-tensors' ``pack_fp4_to_uint8``. Every
e2m1 value is exact in float8 e4m3, so the packed codes go into a ``Float8Layout`` as they are
(``Float8Layout.from_e2m1``), with the float8 scales of groups of 16 columns and the global
``ScaleFactor``; only kernels that read float8 values decode them.
"""

from __future__ import annotations

import torch

from quantreg.kernels import Float8Layout, ScaleFactor

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

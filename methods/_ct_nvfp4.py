"""compressed-tensors ``nvfp4-pack-quantized``: fp4 (e2m1) weights in groups of 16 with float8
scales and one float32 global scale.

Tensors (vocab on dim 0): ``weight_packed`` uint8 ``[N, K / 2]`` (element ``2j`` in the low
nibble of byte ``j``, ``2j + 1`` in the high one; bit 3 of a nibble is the sign, bits 0-2 index
``0, 0.5, 1, 1.5, 2, 3, 4, 6``), ``weight_scale`` float8_e4m3fn ``[N, K / 16]``,
``weight_global_scale`` float32 ``[1]``. The library's ``decompress`` divides:
``W = bfloat16(e2m1 * (float32(weight_scale) / weight_global_scale))`` -- the product in
float32, then rounded to bfloat16 whatever the model's dtype. Every e2m1 value is exact in
float8 e4m3, so the codes become a ``Float8Layout`` (one byte a weight) with the effective
float32 scales, rounded to bfloat16 last: the exact reference kernel runs it.
"""

from __future__ import annotations

import math

import torch

from quantreg import CheckpointError, ConfigError, frozen_param, layer_geometry
from quantreg.kernels import Float8Layout
from quantreg.methods._checks import check_finite, check_float8_codes

GROUP = 16
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def create_weights(layer: torch.nn.Module, k: int, n: int) -> None:
    """Register this rank's packed codes and group scales, and the replicated global scale.

    Raises:
        ConfigError: an input size that is not a multiple of the group size 16.
    """
    if k % GROUP:
        raise ConfigError(
            f"compressed-tensors: nvfp4-pack-quantized groups of {GROUP} do not divide the input "
            f"size {k} of {layer_geometry(layer).prefix}; expected a multiple of {GROUP}",
            field="config_groups.weights.group_size",
        )
    rows = {"output_dim": 0}
    packed = frozen_param(
        (n, k // 2), torch.uint8, input_dim=1, packed_dim=1, pack_factor=2, **rows
    )
    scale = frozen_param((n, k // GROUP), torch.float8_e4m3fn, **rows)
    layer.register_parameter("weight_packed", packed)
    layer.register_parameter("weight_scale", scale)
    layer.register_parameter("weight_global_scale", frozen_param((1,), torch.float32))


def decode(layer: torch.nn.Module) -> Float8Layout:
    """The codes as float8 values with effective scales ``weight_scale / weight_global_scale``.

    Raises:
        CheckpointError: a non-finite or zero global scale, non-finite or overflowing group
            scales, NaN float8 scale codes (naming the tensor).
    """
    geometry = layer_geometry(layer)
    prefix, k = geometry.prefix, geometry.input_size
    check_float8_codes(layer, "weight_scale")
    check_finite(layer, "weight_global_scale")
    global_scale = float(layer.weight_global_scale)
    if global_scale == 0 or not math.isfinite(global_scale):
        raise CheckpointError(
            f"{prefix}.weight_global_scale = {global_scale}; expected a finite non-zero "
            "float32 (compressed-tensors divides the group scales by it)",
            tensor=f"{prefix}.weight_global_scale",
        )
    effective = (layer.weight_scale.data.to(torch.float32) / global_scale).T.contiguous()
    peak = 6 * float(effective.abs().max()) if effective.numel() else 0.0
    if not peak <= torch.finfo(torch.bfloat16).max:  # NaN too
        raise CheckpointError(
            f"{prefix}.weight_scale / {prefix}.weight_global_scale ({global_scale:.6g}) makes "
            f"dequantized weights up to {peak:.6g}, beyond the largest finite bfloat16 (the "
            "dtype compressed-tensors' decompress ends in); expected scales whose weights are "
            "finite in it",
            tensor=f"{prefix}.weight_global_scale",
        )
    packed = layer.weight_packed.data
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    table = torch.tensor(E2M1, dtype=torch.float32)
    values = table[(codes & 7).long()] * (1 - 2 * (codes >> 3).float())
    name = f"{prefix}.weight_scale"
    return Float8Layout.build(
        values.to(torch.float8_e4m3fn), effective, None,
        torch.arange(k) // GROUP, (name, name), round_to=torch.bfloat16,
    )  # fmt: skip

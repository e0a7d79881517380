"""compressed-tensors ``nvfp4-pack-quantized``: fp4 (e2m1) weights in groups of 16 with float8
scales and one float32 global scale.

Tensors (vocab on dim 0): ``weight_packed`` uint8 ``[N, K / 2]`` (two e2m1 codes a byte, see
``_e2m1``), ``weight_scale`` float8_e4m3fn ``[N, K / 16]``,
``weight_global_scale`` float32 ``[1]``. The library's ``decompress`` divides:
``W = bfloat16(e2m1 * (float32(weight_scale) / weight_global_scale))`` -- the product in
float32, then rounded to bfloat16 whatever the model's dtype. The codes become a
``Float8Layout`` with the effective float32 scales, rounded to bfloat16 last: the exact
reference kernel runs it.

The writer follows llm-compressor's NVFP4 observers and compressed-tensors 0.20's
``calculate_qparams`` / ``generate_gparam``: ``weight_global_scale = 448 * 6 / max |W|``, group
scales ``global * max |group| / 6`` rounded to float8 (a zero one becomes 0.125, the library's
float8 eps), codes ``e2m1(W / (scale / global))``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quantreg import CheckpointError, ConfigError, InputError, frozen_param, layer_geometry
from quantreg.kernels import Float8Layout, ScaleFactor
from quantreg.methods import _e2m1 as e2m1
from quantreg.methods._checks import check_finite, check_float8_codes

GROUP = e2m1.GROUP
FORMAT = "nvfp4-pack-quantized"


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
    prefix = geometry.prefix
    check_float8_codes(layer, "weight_scale")
    check_finite(layer, "weight_global_scale")
    global_scale = float(layer.weight_global_scale)
    if global_scale == 0 or not math.isfinite(global_scale):
        raise CheckpointError(
            f"{prefix}.weight_global_scale = {global_scale}; expected a finite non-zero "
            "float32 (compressed-tensors divides the group scales by it)",
            tensor=f"{prefix}.weight_global_scale",
        )
    factor = ScaleFactor(global_scale, divide=True)
    peak = 6 * factor.peak(layer.weight_scale.data.T) if layer.weight_scale.numel() else 0.0
    if not peak <= torch.finfo(torch.bfloat16).max:  # NaN too
        raise CheckpointError(
            f"{prefix}.weight_scale / {prefix}.weight_global_scale ({global_scale:.6g}) makes "
            f"dequantized weights up to {peak:.6g}, beyond the largest finite bfloat16 (the "
            "dtype compressed-tensors' decompress ends in); expected scales whose weights are "
            "finite in it",
            tensor=f"{prefix}.weight_global_scale",
        )
    return e2m1.layout(layer.weight_packed.data, layer.weight_scale.data, factor, torch.bfloat16)


def quantize(
    weight: torch.Tensor, *, tensor_amax: float | None = None, **options: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Round-to-nearest ``nvfp4-pack-quantized`` tensors of a float ``[N, K]`` weight and the
    ``quantization_config`` compressed-tensors writes for its ``NVFP4A16`` preset. ``options``:
    the compressed-tensors writer's other options, each refused unless it is what NVFP4 is.
    ``tensor_amax``: the absolute maximum the global scale is made from, when ``weight`` is one
    piece of a head quantized in pieces (``quantreg bench``); None: the weight's own.

    Raises:
        InputError: an option NVFP4 does not take; ``K`` not a multiple of the group size 16.
    """
    fixed = {"bits": (None, 4), "strategy": (None, "tensor_group"), "group_size": (GROUP,),
             "sym": (True,), "actorder": (None,), "block_structure": (None,)}  # fmt: skip
    for name, value in options.items():
        if value not in fixed.get(name, ()):
            allowed = " or ".join(repr(v) for v in fixed.get(name, ()) if v is not None)
            raise InputError(
                f"compressed-tensors writer: {FORMAT} takes no {name} {value!r}"
                + (f" (expected {allowed})" if allowed else ""),
                field=name,
            )
    k = weight.shape[1]
    if k % GROUP:
        raise InputError(
            f"compressed-tensors writer: {FORMAT} needs an input size that is a multiple of "
            f"{GROUP} (its group size); got {k}",
            field="format",
        )
    w = weight.to(torch.float32)
    peak = w.abs().max() if tensor_amax is None else torch.tensor(float(tensor_amax))
    peak = peak.clamp(min=torch.finfo(torch.float32).tiny)
    global_scale = torch.nan_to_num(e2m1.FP8_MAX * e2m1.E2M1_MAX / peak, nan=1.0, posinf=1.0)
    scale = (global_scale * e2m1.group_amax(w) / e2m1.E2M1_MAX).clamp(max=e2m1.FP8_MAX)
    scale = scale.to(torch.float8_e4m3fn)
    scale = torch.where(scale.float() == 0, torch.full_like(scale, 0.125), scale)
    effective = scale.float() / global_scale
    packed = e2m1.encode(w / effective.repeat_interleave(GROUP, dim=1))
    tensors = {
        "weight_packed": packed, "weight_scale": scale,
        "weight_global_scale": global_scale.reshape(1),
    }  # fmt: skip
    return tensors, _config()


def _config() -> dict[str, Any]:
    weights = {
        "num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
        "group_size": GROUP, "dynamic": False, "scale_dtype": "torch.float8_e4m3fn",
    }  # fmt: skip
    group = {"targets": ["lm_head"], "format": FORMAT, "weights": weights,
             "input_activations": None, "output_activations": None}  # fmt: skip
    return {
        "quant_method": "compressed-tensors", "format": FORMAT,
        "quantization_status": "compressed", "config_groups": {"group_0": group}, "ignore": [],
    }  # fmt: skip

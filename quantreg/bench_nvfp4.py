"""An NVFP4 writer for ``quantreg bench``: compressed-tensors ``nvfp4-pack-quantized`` tensors
of a float weight (quantreg's compressed-tensors writer writes integer and fp8 formats only).

The conventions of compressed-tensors 0.20 (``quantization/utils/helpers.py``:
``generate_gparam``, ``calculate_qparams``): the float32 global scale is ``448 * 6 / amax`` of the
tensor; a 16-column group's scale is ``amax_group / 6 * global``, stored as float8 e4m3; each
weight becomes the e2m1 value nearest to ``w / (scale / global)``, element ``2j`` in the low
nibble of byte ``j`` and bit 3 the sign (what ``quantreg``'s compressed-tensors reader, and the
library's ``decompress``, read back).
"""

from __future__ import annotations

from typing import Any

import torch

GROUP = 16
FP8_MAX, FP4_MAX = 448.0, 6.0
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between 0, 0.5, 1, 1.5, 2, 3, 4, 6

CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "quantization_status": "compressed",
    "ignore": [],
    "config_groups": {
        "group_0": {
            "targets": ["lm_head"],
            "format": "nvfp4-pack-quantized",
            "input_activations": None,
            "weights": {
                "num_bits": 4,
                "type": "float",
                "strategy": "tensor_group",
                "group_size": GROUP,
                "symmetric": True,
                "dynamic": False,
                "scale_dtype": "torch.float8_e4m3fn",
            },
        }
    },
}


def quantize_nvfp4(
    weight: torch.Tensor, *, tensor_amax: float | None = None, **unused: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Round-to-nearest NVFP4 tensors of ``weight [N, K]`` (K a multiple of 16) and the
    ``quantization_config``. ``tensor_amax`` fixes the global scale (the bench quantizes a head
    a few thousand rows at a time, and every chunk must share it); ``unused`` options (the
    bench's ``scale_dtype``) are ignored: NVFP4 scales are float8.
    """
    n, k = weight.shape
    w = weight.float()
    amax = float(w.abs().max()) if tensor_amax is None else tensor_amax
    global_scale = torch.tensor([FP8_MAX * FP4_MAX / max(amax, 1e-12)], dtype=torch.float32)
    groups = w.reshape(n, k // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / FP4_MAX * global_scale).clamp(max=FP8_MAX)
    scale = scale.to(torch.float8_e4m3fn)
    effective = scale.float() / global_scale
    y = groups / effective.clamp(min=1e-30)[..., None]
    codes = torch.bucketize(y.abs(), torch.tensor(MIDPOINTS)).to(torch.uint8)
    codes = (codes | ((y < 0).to(torch.uint8) << 3)).reshape(n, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    tensors = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": global_scale}
    return tensors, CONFIG

"""NVIDIA ModelOpt's on-disk tensors (``export_hf_checkpoint``): created, decoded and written,
as functions of the ``quant_algo`` (the config and LinearMethod live in ``modelopt``).

Checked against nvidia-modelopt 0.47.0 (``modelopt/torch/export/unified_export_hf.py``
``_export_quantized_weight``, ``quant_utils.py`` ``to_quantized_weight`` /
``from_quantized_weight``, ``qtensor/nvfp4_tensor.py``) and vLLM's ``modelopt.py``
(``ModelOptFp8LinearMethod``, ``ModelOptFp8PcPtLinearMethod``, ``ModelOptNvFp4LinearMethod``,
``ModelOptNvFp4W4A16LinearMethod``). The vocab is on dim 0 of every tensor; scalars are 0-dim.

* ``FP8``: float8_e4m3fn ``weight [N, K]``, float32 ``weight_scale`` (per tensor, amax / 448),
  float32 ``input_scale`` (static activations). ``W = float(weight) * weight_scale``.
* ``FP8_PER_CHANNEL_PER_TOKEN``: the same ``weight``, float32 ``weight_scale [N]`` (per row),
  no ``input_scale`` (dynamic per-token activations).
* ``NVFP4``: uint8 ``weight [N, K / 2]`` (two e2m1 codes a byte, low nibble first: ``_e2m1``),
  float8_e4m3fn ``weight_scale [N, K / 16]``, float32 ``weight_scale_2`` (amax / (6 * 448)),
  float32 ``input_scale``. ``W = e2m1 * (float32(weight_scale) * weight_scale_2)`` in float32
  -- multiplied, unlike compressed-tensors' divided global scale. ``W4A16_NVFP4``: the same
  without ``input_scale``.

The head runs weight-only on the exact reference kernel: activations stay float, and an
``input_scale`` is read and checked (finite, positive) but not used.
"""

from __future__ import annotations

import torch

from quantreg import CheckpointError, ConfigError, InputError, frozen_param, layer_geometry
from quantreg.kernels import Float8Layout, ScaleFactor
from quantreg.methods import _e2m1 as e2m1
from quantreg.methods._checks import check_finite, check_float8_codes, check_scales

FP8, FP8_PCPT, NVFP4, W4A16_NVFP4 = "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "W4A16_NVFP4"
ALGOS = (FP8, FP8_PCPT, NVFP4, W4A16_NVFP4)
STATIC_INPUT = (FP8, NVFP4)  # the algos whose checkpoints hold an input_scale
GROUP = e2m1.GROUP
# What ModelOpt divides amax by for each per-tensor scale (named in messages).
DIVISORS = {"weight_scale": "448", "weight_scale_2": "6 * 448", "input_scale": "its range"}


def create_weights(layer: torch.nn.Module, algo: str, k: int, n: int) -> None:
    """Register this rank's tensors of ``algo``: ``k`` inputs, ``n`` vocab rows.

    Raises:
        ConfigError: an NVFP4 input size that is not a multiple of the group size 16.
    """
    rows = {"output_dim": 0}
    params: dict[str, torch.nn.Parameter] = {}
    if algo in (NVFP4, W4A16_NVFP4):
        if k % GROUP:
            raise ConfigError(
                f"modelopt: {algo} groups of {GROUP} do not divide the input size {k} of "
                f"{layer_geometry(layer).prefix}; expected a multiple of {GROUP} (vLLM's "
                "ModelOptNvFp4LinearMethod refuses it too; ModelOpt's quantizer zero-pads the "
                "last group, so its tensors would not be [N, K / 2])",
                field="group_size",
            )
        params["weight"] = frozen_param(
            (n, k // 2), torch.uint8, input_dim=1, packed_dim=1, pack_factor=2, **rows
        )
        params["weight_scale"] = frozen_param((n, k // GROUP), torch.float8_e4m3fn, **rows)
        params["weight_scale_2"] = frozen_param((), torch.float32)
    else:
        params["weight"] = frozen_param((n, k), torch.float8_e4m3fn, input_dim=1, **rows)
        shape, attrs = ((n,), rows) if algo == FP8_PCPT else ((), {})
        params["weight_scale"] = frozen_param(shape, torch.float32, **attrs)
    if algo in STATIC_INPUT:
        params["input_scale"] = frozen_param((), torch.float32)  # checked, unused: weight-only
    for name, param in params.items():
        layer.register_parameter(name, param)


def _positive(layer: torch.nn.Module, name: str) -> float:
    """A per-tensor float32 scale, refused unless finite and positive (ModelOpt asserts it)."""
    check_finite(layer, name)
    value = float(getattr(layer, name))
    if not value > 0:
        full = f"{layer_geometry(layer).prefix}.{name}"
        raise CheckpointError(
            f"{full} = {value}; expected a finite positive float32 (ModelOpt writes amax / "
            f"{DIVISORS[name]})",
            tensor=full,
        )
    return value


def decode(layer: torch.nn.Module, algo: str) -> Float8Layout:
    """The loaded tensors as a ``Float8Layout`` (NVFP4: e2m1 codes as float8 values with the
    float32 effective scales ``weight_scale * weight_scale_2``).

    Raises:
        CheckpointError: non-finite, zero or negative per-tensor scales, NaN float8 codes,
            scales whose weights overflow the compute dtype (naming the tensor).
    """
    if algo in STATIC_INPUT:
        _positive(layer, "input_scale")
    n = layer_geometry(layer).output_size_per_partition
    if algo in (NVFP4, W4A16_NVFP4):
        check_float8_codes(layer, "weight_scale")
        double = _positive(layer, "weight_scale_2")
        built = e2m1.layout(layer.weight.data, layer.weight_scale.data, ScaleFactor(double), None)
        # the effective [G, N] scales exist only while they are checked, before any layout
        check_scales(layer, "weight_scale_2", built.scales, None, (-e2m1.E2M1_MAX, e2m1.E2M1_MAX))
        return built
    check_float8_codes(layer, "weight")
    if algo == FP8_PCPT:
        scales = layer.weight_scale.data.reshape(1, n)
    else:
        scales = torch.full((1, n), _positive(layer, "weight_scale"), dtype=torch.float32)
    check_scales(layer, "weight_scale", scales, None, (-e2m1.FP8_MAX, e2m1.FP8_MAX))
    return Float8Layout.build(layer.weight.data, scales)


def quantize(weight: torch.Tensor, algo: str) -> dict[str, torch.Tensor]:
    """ModelOpt's round-to-nearest tensors of a float ``[N, K]`` weight for the weight-only
    algos ``FP8_PER_CHANNEL_PER_TOKEN`` (``amax / 448`` per row) and ``W4A16_NVFP4``
    (``weight_scale_2 = amax / (6 * 448)``, group scales ``group amax / (6 * weight_scale_2)``
    in float8, a zero one written as 1.0, as ``NVFP4QTensor.get_weights_scaling_factor``).

    Raises:
        InputError: an NVFP4 input size that is not a multiple of 16.
    """
    w = weight.to(torch.float32)
    k = w.shape[1]
    if algo == FP8_PCPT:
        scale = w.abs().amax(1) / e2m1.FP8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return {"weight": (w / scale[:, None]).to(torch.float8_e4m3fn), "weight_scale": scale}
    if k % GROUP:
        raise InputError(
            f"modelopt writer: nvfp4 needs an input size that is a multiple of {GROUP} (its "
            f"group size); got {k}",
            field="format",
        )
    amax = float(w.abs().max())
    double = torch.tensor(amax / (e2m1.E2M1_MAX * e2m1.FP8_MAX) if amax > 0 else 1.0)
    scale = e2m1.group_amax(w) / (e2m1.E2M1_MAX * double)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float8_e4m3fn)
    effective = scale.to(torch.float32) * double
    packed = e2m1.encode(w / effective.repeat_interleave(GROUP, dim=1))
    return {"weight": packed, "weight_scale": scale, "weight_scale_2": double.to(torch.float32)}

"""float8 (e4m3) weights with one float ``weight_scale`` per tensor or per output channel: the
serialized-fp8 checkpoints of vLLM's ``Fp8Config`` without ``weight_block_size`` (AutoFP8,
``neuralmagic/*-FP8``, ``RedHatAI/*-FP8``), and per-channel exports of the same tensors.

``W[o, i] = weight[o, i] * weight_scale`` (per-tensor) or ``* weight_scale[o]`` (per-channel),
in float32 -- AutoFP8's ``per_tensor_quantize`` stores ``amax / 448`` as ``weight_scale`` and
its ``fp8_gemm`` multiplies by it; vLLM's ``Fp8LinearMethod`` passes it to the GEMM as the
weight's scale. The stored shapes (checked against AutoFP8, vLLM's ``PerTensorScaleParameter``
and compressed-tensors): per-tensor ``[]`` (AutoFP8: "scales do not have a shape") or ``[1]``;
per-channel ``[N]`` or ``[N, 1]``. A per-tensor scale is replicated on every rank; a
per-channel one is sharded with the vocab rows (dim 0). A static ``activation_scheme`` also
stores a per-tensor ``input_scale``: quantreg checks it (finite, positive) and runs weight-only,
so it is never applied.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from quantreg import CheckpointError, frozen_param, layer_geometry
from quantreg.kernels import Float8Layout
from quantreg.methods._checks import check_finite, check_float8_codes, check_positive, check_scales

FP8_MAX = 448.0  # largest float8_e4m3fn value
WEIGHT_SCALE, INPUT_SCALE = "weight_scale", "input_scale"
PER_TENSOR = ((), (1,))


def scale_shape(shapes: Mapping[str, list[int]], name: str, prefix: str, n: int) -> tuple[int, ...]:
    """The stored shape of scale ``name`` (``[1]`` when the headers were not read), checked.

    Raises:
        CheckpointError: a shape that is neither per-tensor nor (``weight_scale``) per-channel
            over the ``n`` vocab rows, naming the tensor.
    """
    shape = tuple(shapes.get(name, (1,)))
    allowed = [*PER_TENSOR, *(((n,), (n, 1)) if name == WEIGHT_SCALE else ())]
    if shape not in allowed:
        what = "[] or [1] (per-tensor)"
        if name == WEIGHT_SCALE:
            what += f", or [{n}] or [{n}, 1] (per-channel: one per vocab row)"
        raise CheckpointError(
            f"{prefix}.{name}: found shape {list(shape)}; expected {what}",
            tensor=f"{prefix}.{name}",
        )
    return shape


def create_scales(layer: torch.nn.Module, shapes: Mapping[str, list[int]], *, static: bool) -> None:
    """Register ``weight_scale`` in its stored shape (per-channel: this rank's rows) and, for a
    static activation scheme, the replicated ``input_scale``; both keep the stored dtype.

    Raises:
        CheckpointError: a scale shape that is neither per-tensor nor per-channel.
    """
    geometry = layer_geometry(layer)
    prefix, n = geometry.prefix, geometry.output_size
    kept = {"keep_checkpoint_dtype": True}
    shape = scale_shape(shapes, WEIGHT_SCALE, prefix, n)
    if shape in PER_TENSOR:
        scale = frozen_param(shape, torch.float32, **kept)
    else:
        rows = (geometry.output_size_per_partition, *shape[1:])
        scale = frozen_param(rows, torch.float32, output_dim=0, **kept)
    layer.register_parameter(WEIGHT_SCALE, scale)
    if static:
        shape = scale_shape(shapes, INPUT_SCALE, prefix, n)
        layer.register_parameter(INPUT_SCALE, frozen_param(shape, torch.float32, **kept))


def decode_scales(layer: torch.nn.Module) -> Float8Layout:
    """This rank's float8 rows with their per-tensor or per-channel scale, as a one-group
    ``Float8Layout``, after checking the scales (and ``input_scale``, which is not applied).

    Raises:
        CheckpointError: a non-finite, zero, negative or overflowing scale, or float8 NaN
            codes, naming the tensor.
    """
    geometry = layer_geometry(layer)
    n = geometry.output_size_per_partition
    stored = layer.weight_scale.data
    per_tensor = tuple(stored.shape) in PER_TENSOR
    scales = stored.reshape(1, 1).expand(1, n) if per_tensor else stored.reshape(1, n)
    for name in (WEIGHT_SCALE, INPUT_SCALE):
        if hasattr(layer, name):
            check_finite(layer, name)
            check_positive(layer, name, getattr(layer, name).data.reshape(-1))
    check_scales(layer, WEIGHT_SCALE, scales, None, (-FP8_MAX, FP8_MAX))
    check_float8_codes(layer, "weight")
    name = f"{geometry.prefix}.{WEIGHT_SCALE}"
    return Float8Layout.build(layer.weight.data, scales, None, None, (name, name))


def quantize_rows(weight: torch.Tensor, *, per_channel: bool) -> dict[str, torch.Tensor]:
    """Round-to-nearest float8 ``weight`` ``[N, K]`` and its float32 ``weight_scale`` (``[]``
    per-tensor, as AutoFP8 stores it; ``[N, 1]`` per-channel): the absolute maximum maps to
    448, the scale rounded to float32 first."""
    w = weight.double()
    peak = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = (peak / FP8_MAX).clamp(min=1e-12).to(torch.float32)
    values = (w / scale.double()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": values, WEIGHT_SCALE: scale}

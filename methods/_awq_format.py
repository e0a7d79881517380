"""AWQ's on-disk tensors (AutoAWQ "GEMM" layout): created, decoded, and written (functions of
plain values: the config classes and LinearMethods live in ``awq``).

Tensors (vocab on dim 1): ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32
``[groups, out/8]`` packed along the output dim in AWQ's nibble order (nibble ``k`` of a word
holds column ``8c + AWQ_ORDER[k]``), ``scales`` ``[groups, out]``.
``W[o, i] = (q[i, o] - z[g, o]) * s[g, o]`` rounded to the scale dtype.
"""

from __future__ import annotations

import torch

from quantreg import ConfigError, IntWeights, frozen_param, layer_geometry, pack_codes, unpack_codes
from quantreg.methods._checks import check_scales, check_symmetric_zeros
from quantreg.methods._rtn import grouped, rtn_asymmetric, rtn_symmetric

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column 8c + AWQ_ORDER[k]
BITS = 4
PACK = 8  # 4-bit codes per int32 word
TENSORS = frozenset({"qweight", "qzeros", "scales"})


def create_weights(
    layer: torch.nn.Module, k: int, n: int, group_size: int, params_dtype: torch.dtype
) -> None:
    """Register this rank's AWQ tensors on ``layer``: ``k`` inputs, ``n`` outputs.

    Raises:
        ConfigError: sizes the layout cannot hold.
    """
    group = group_size if group_size > 0 else k
    if k % group:
        raise ConfigError(
            f"AWQ needs the input size ({k}) to be a multiple of group_size ({group_size})",
            field="group_size",
        )
    if n % PACK:
        raise ConfigError(f"AWQ packs 8 outputs per word; {n} output rows is not a multiple")
    packed = {"output_dim": 1, "packed_dim": 1, "pack_factor": PACK}
    params = {
        "qweight": frozen_param((k, n // PACK), torch.int32, input_dim=0, **packed),
        "qzeros": frozen_param((k // group, n // PACK), torch.int32, **packed),
        "scales": frozen_param(
            (k // group, n), params_dtype, output_dim=1, keep_checkpoint_dtype=True
        ),
    }
    for name, param in params.items():
        layer.register_parameter(name, param)


def decode(layer: torch.nn.Module, *, symmetric: bool = False) -> IntWeights:
    """The loaded AWQ tensors as codes in the checkpoint's row order (unpacked a column chunk
    at a time by the layout builders), after checking the values (see ``_checks``); with
    ``symmetric`` (``zero_point: false``) zero points other than 8 are used with a WARNING.

    Raises:
        CheckpointError: non-finite or overflowing scales.
    """
    qweight = layer.qweight
    zeros = unpack_codes(layer.qzeros, BITS, order=AWQ_ORDER).to(torch.uint8)  # a byte each
    check_scales(layer, "scales", layer.scales.data, zeros, (0, (1 << BITS) - 1))
    if symmetric:
        check_symmetric_zeros(layer, "qzeros", zeros, 1 << (BITS - 1), "zero_point: false")
    prefix = layer_geometry(layer).prefix
    return IntWeights.create(
        bits=BITS,
        k=qweight.shape[0],
        codes=lambda c0, c1: unpack_codes(
            qweight[:, c0 // PACK : c1 // PACK], BITS, order=AWQ_ORDER
        ),
        scales=layer.scales.data,
        zeros=zeros,
        names=(f"{prefix}.g_idx", f"{prefix}.scales"),
        n_packed=(qweight.data, AWQ_ORDER),
    )


def quantize(
    weight: torch.Tensor, *, group_size: int, sym: bool, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Round-to-nearest AWQ GEMM tensors (``qweight``, ``qzeros``, ``scales``) of a float
    ``[out, in]`` weight, with AutoAWQ's zero-point rule (``sym=True``: zero fixed at 8).

    Raises:
        ConfigError: an output size not a multiple of 8 or an input size not a multiple of
            the group size.
    """
    n, k = weight.shape
    group = group_size if group_size > 0 else k
    if n % PACK or k % group:
        raise ConfigError(
            f"AWQ needs out % 8 == 0 and in % group_size == 0; got out={n}, in={k}, "
            f"group_size={group_size}"
        )
    quantize = rtn_symmetric if sym else rtn_asymmetric
    codes, scales, zeros = quantize(grouped(weight, group), BITS, scale_dtype)
    return {
        "qweight": pack_codes(codes.reshape(n, k).T, BITS, dim=1, order=AWQ_ORDER),
        "qzeros": pack_codes(zeros.T, BITS, dim=1, order=AWQ_ORDER),
        "scales": scales.T.contiguous(),
    }

"""AWQ's on-disk tensors (AutoAWQ "GEMM" layout): created, decoded, and written.

Tensors (vocab on dim 1): ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32
``[groups, out/8]`` packed along the output dim in AWQ's nibble order (nibble ``k`` of a word
holds column ``8c + AWQ_ORDER[k]``), ``scales`` ``[groups, out]``.
``W[o, i] = (q[i, o] - z[g, o]) * s[g, o]`` rounded to the scale dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from quantreg import ConfigError, IntWeights, frozen_param, layer_geometry, pack_codes, unpack_codes
from quantreg.methods._checks import check_finite
from quantreg.methods._decoded import DecodedLinearMethod
from quantreg.methods._rtn import grouped, rtn_asymmetric, rtn_symmetric

if TYPE_CHECKING:
    from quantreg.methods.awq import AWQConfig

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column 8c + AWQ_ORDER[k]
BITS = 4
PACK = 8  # 4-bit codes per int32 word
TENSORS = frozenset({"qweight", "qzeros", "scales"})


class AWQLinearMethod(DecodedLinearMethod):
    """AWQ GEMM tensors, run by the exact reference kernel (dequantizes 128 input rows at a
    time, bit for bit as AutoAWQ)."""

    quant_config: AWQConfig  # set by QuantConfig.get_linear_method
    kernels = ("reference",)

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra: Any,
    ) -> None:
        cfg = self.quant_config
        k, n = input_size_per_partition, sum(output_partition_sizes)
        group = cfg.group_size if cfg.group_size > 0 else k
        if k % group:
            raise ConfigError(
                f"AWQ needs the input size ({k}) to be a multiple of group_size ({cfg.group_size})",
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

    def decode(self, layer: torch.nn.Module) -> IntWeights:
        """The AWQ codes in the checkpoint's row order (unpacked a column chunk at a time).

        Raises:
            CheckpointError: non-finite scales.
        """
        check_finite(layer, "scales")
        qweight = layer.qweight
        prefix = layer_geometry(layer).prefix
        return IntWeights.create(
            bits=BITS,
            k=qweight.shape[0],
            codes=lambda c0, c1: unpack_codes(
                qweight[:, c0 // PACK : c1 // PACK], BITS, order=AWQ_ORDER
            ),
            scales=layer.scales.data,
            zeros=unpack_codes(layer.qzeros, BITS, order=AWQ_ORDER),
            names=(f"{prefix}.g_idx", f"{prefix}.scales"),
        )


class AWQMarlinLinearMethod(AWQLinearMethod):
    """AWQ tensors run by the Triton kernel on CUDA >= 8.0, the exact kernel elsewhere."""

    kernels = ("triton", "reference")


def quantize_awq(
    config: AWQConfig, weight: torch.Tensor, *, sym: bool, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Round-to-nearest AWQ GEMM tensors (``qweight``, ``qzeros``, ``scales``) of a float
    ``[out, in]`` weight, with AutoAWQ's zero-point rule (``sym=True``: zero fixed at 8).

    Raises:
        ConfigError: an output size not a multiple of 8 or an input size not a multiple of
            the group size.
    """
    n, k = weight.shape
    group = config.group_size if config.group_size > 0 else k
    if n % PACK or k % group:
        raise ConfigError(
            f"AWQ needs out % 8 == 0 and in % group_size == 0; got out={n}, in={k}, "
            f"group_size={config.group_size}"
        )
    quantize = rtn_symmetric if sym else rtn_asymmetric
    codes, scales, zeros = quantize(grouped(weight, group), BITS, scale_dtype)
    return {
        "qweight": pack_codes(codes.reshape(n, k).T, BITS, dim=1, order=AWQ_ORDER),
        "qzeros": pack_codes(zeros.T, BITS, dim=1, order=AWQ_ORDER),
        "scales": scales.T.contiguous(),
    }

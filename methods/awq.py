"""AWQ (AutoAWQ "GEMM" layout): ``awq`` (reference path) and ``awq_marlin`` (repacked)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import AliasChoices, Field, field_validator

from quantreg import (
    AWQ_ORDER,
    ConfigError,
    LayerRule,
    LinearMethod,
    Platform,
    QuantConfig,
    pack_codes,
    unpack_codes,
)
from quantreg.methods._layers import (
    check_finite,
    dequantize,
    frozen_param,
    grouped,
    reference_matmul,
    restore_checkpoint_dtype,
    row_blocks,
    rtn_asymmetric,
    rtn_symmetric,
)
from quantreg.methods._repack import RepackedLinearMethod, repack
from quantreg.methods._wna16 import (
    GroupSize,
    head_and_skip_rule,
    marlin_group_reason,
    marlin_platform_reason,
)

SUPPORTED_BITS = (4,)
SUPPORTED_VERSIONS = ("gemm",)
BITS = 4
PACK = 8  # 4-bit codes per int32 word
TENSORS = frozenset({"qweight", "qzeros", "scales"})


class AWQLinearMethod(LinearMethod):
    """Reference AWQ path: dequantizes one block of input rows at a time, exactly.

    Tensors (vocab on dim 1): ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32
    ``[groups, out/8]`` packed along the output dim in AWQ's nibble order, ``scales``
    ``[groups, out]``. ``W[o, i] = (q[i, o] - z[g, o]) * s[g, o]`` rounded to the scale dtype.
    """

    quant_config: AWQConfig  # set by QuantConfig.get_linear_method

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
                f"AWQ needs the input size ({k}) to be a multiple of group_size ({cfg.group_size})"
            )
        if n % PACK:
            raise ConfigError(f"AWQ packs 8 outputs per word; {n} output rows is not a multiple")
        packed = {"output_dim": 1, "packed_dim": 1, "pack_factor": PACK}
        params = {
            "qweight": frozen_param((k, n // PACK), torch.int32, input_dim=0, **packed),
            "qzeros": frozen_param((k // group, n // PACK), torch.int32, **packed),
            "scales": frozen_param((k // group, n), params_dtype, output_dim=1),
        }
        for name, param in params.items():
            layer.register_parameter(name, param)
        layer.awq_group_size = group

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        restore_checkpoint_dtype(layer, "scales")
        check_finite(layer, "scales")

    def dequantize_rows(
        self, layer: torch.nn.Module, start: int, stop: int, group: int
    ) -> torch.Tensor:
        """``W.T`` rows ``start:stop`` (one group), rounded to the scale dtype: ``[rows, out]``."""
        codes = unpack_codes(layer.qweight[start:stop], BITS, order=AWQ_ORDER)
        zeros = unpack_codes(layer.qzeros[group : group + 1], BITS, order=AWQ_ORDER)
        return dequantize(codes, zeros, layer.scales[group : group + 1])

    def repack(self, layer: torch.nn.Module) -> None:
        """Convert the loaded tensors into the layout shared with GPTQ (see ``_repack``)."""
        repack(
            layer,
            bits=BITS,
            codes=lambda c0, c1: unpack_codes(
                layer.qweight[:, c0 // PACK : c1 // PACK], BITS, order=AWQ_ORDER
            ),
            zeros=unpack_codes(layer.qzeros, BITS, order=AWQ_ORDER),
            scales=layer.scales.data,
            g_idx=None,
            drop=("qweight", "qzeros", "scales"),
        )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        blocks = row_blocks(layer.input_size_per_partition, layer.awq_group_size)
        return reference_matmul(
            x,
            bias,
            [(slice(start, stop), group) for start, stop, group in blocks],
            lambda rows, group: self.dequantize_rows(layer, rows.start, rows.stop, group),
        )


class AWQConfig(QuantConfig):
    """``quantization_config`` of an AWQ checkpoint (AutoAWQ, GPTQModel's AWQ export).

    ``w_bit`` / ``q_group_size`` are accepted as the legacy ``quant_config.json`` spellings.
    ``zero_point: false`` is accepted: GPTQModel writes it for symmetric AWQ (``sym: true``)
    while still storing ``qzeros``.
    """

    linear_method = AWQLinearMethod
    supports_lm_head: ClassVar[bool] = True

    bits: int = Field(4, validation_alias=AliasChoices("bits", "w_bit"))
    group_size: GroupSize = Field(128, validation_alias=AliasChoices("group_size", "q_group_size"))
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: list[str] | None = None
    lm_head: bool = False

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in SUPPORTED_BITS:
            raise ValueError(
                "AWQ checkpoints are supported with 4-bit codes only (AutoAWQ's GEMM "
                "layout packs 4-bit); 3- and 8-bit AWQ are not supported"
            )
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if value.lower() not in SUPPORTED_VERSIONS:
            raise ValueError(
                "only the 'gemm' layout is supported (gemv, gemv_fast and marlin AWQ "
                "checkpoints pack differently)"
            )
        return value.lower()

    def layer_rule(self, prefix: str) -> LayerRule:
        """``lm_head`` flag (absent = false), then ``modules_to_not_convert`` (substring)."""
        decided, fired = head_and_skip_rule(
            prefix,
            lm_head=self.lm_head,
            lm_head_given="lm_head" in self.model_fields_set,
            modules=self.modules_to_not_convert,
        )
        if decided is not None:
            return decided
        return LayerRule(True, fired[0] if fired else "quant_method 'awq': every linear layer")

    def rule_from_tensors(self, prefix: str, names: frozenset[str]) -> LayerRule | None:
        """AutoAWQ configs carry no ``lm_head`` key: packed AWQ head tensors decide."""
        if names >= TENSORS and "g_idx" not in names:
            return LayerRule(True, f"tensors: {prefix}.qweight, qzeros and scales are AWQ-packed")
        return None

    @classmethod
    def quantize_weight(
        cls,
        weight: torch.Tensor,
        *,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        **unused: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Round-to-nearest AWQ GEMM tensors (``qweight``, ``qzeros``, ``scales``) of a float
        ``[out, in]`` weight, with AutoAWQ's zero-point rule (``sym=True``: zero fixed at 8).

        Raises:
            ConfigError: bits other than 4, an output size not a multiple of 8, an input size
                not a multiple of the group size, or an unsupported option.
        """
        _refuse(unused, "awq")
        config = cls.from_quant_config(
            {"bits": bits, "group_size": group_size, "zero_point": not sym}, method="awq"
        )
        n, k = weight.shape
        group = group_size if group_size > 0 else k
        if n % PACK or k % group:
            raise ConfigError(
                f"AWQ needs out % 8 == 0 and in % group_size == 0; got out={n}, in={k}, "
                f"group_size={group_size}"
            )
        quantize = rtn_symmetric if sym else rtn_asymmetric
        codes, scales, zeros = quantize(grouped(weight, group), BITS, scale_dtype)
        tensors = {
            "qweight": pack_codes(codes.reshape(n, k).T, BITS, dim=1, order=AWQ_ORDER),
            "qzeros": pack_codes(zeros.T, BITS, dim=1, order=AWQ_ORDER),
            "scales": scales.T.contiguous(),
        }
        qcfg = {
            "quant_method": "awq",
            "bits": config.bits,
            "group_size": config.group_size,
            "zero_point": config.zero_point,
            "version": "gemm",
            "lm_head": True,
        }
        return tensors, qcfg


class AWQMarlinLinearMethod(RepackedLinearMethod, AWQLinearMethod):
    """AWQ tensors repacked after loading into the layout shared with GPTQ; the Triton kernel
    reads it on CUDA, elsewhere the exact block-wise CPU path does."""


class AWQMarlinConfig(AWQConfig):
    """AWQ tensors repacked after loading into the shared marlin layout (fast GPU kernel)."""

    linear_method = AWQMarlinLinearMethod

    checkpoint_formats: ClassVar[tuple[str, ...]] = ("awq",)
    upgrade_priority: ClassVar[int] = 20

    def format_reason(self) -> str | None:
        return marlin_group_reason("awq_marlin", self.group_size)

    def platform_reason(self, platform: Platform) -> str | None:
        return marlin_platform_reason("awq_marlin", platform)


def _refuse(unused: dict[str, Any], method: str) -> None:
    if unused:
        raise ConfigError(f"{method} writer: unsupported option(s) {', '.join(sorted(unused))}")

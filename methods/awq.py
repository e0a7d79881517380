"""AWQ (AutoAWQ "GEMM" layout): ``awq`` (exact reference kernel) and ``awq_marlin`` (the
Triton kernel on CUDA). The tensors themselves: ``_awq_linear``.

The layout is named by AutoAWQ's ``version`` and by GPTQModel's ``format`` /
``checkpoint_format``; any of them may be alone, and those given must agree.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Self

import torch
from pydantic import AliasChoices, Field, field_validator

from quantreg import InputError, IntWeights, LayerRule, Platform, QuantConfig, WriterOption
from quantreg.methods import _awq_format as fmt
from quantreg.methods._decoded import DecodedLinearMethod
from quantreg.methods._rtn import writer_defaults
from quantreg.methods._wna16 import (
    GroupSize,
    check_layout_fields,
    head_and_skip_rule,
    marlin_group_reason,
    marlin_platform_reason,
)

SUPPORTED_BITS = (4,)
SUPPORTED_VERSIONS = ("gemm",)
# The fields that name the layout: GPTQModel writes format and checkpoint_format, AutoAWQ version.
LAYOUT_FIELDS = ("format", "checkpoint_format", "version")


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
        k, n = input_size_per_partition, sum(output_partition_sizes)
        fmt.create_weights(layer, k, n, self.quant_config.group_size, params_dtype)

    def decode(self, layer: torch.nn.Module) -> IntWeights:
        return fmt.decode(layer, symmetric=not self.quant_config.zero_point)


class AWQMarlinLinearMethod(AWQLinearMethod):
    """AWQ tensors run by the Triton kernel on CUDA >= 8.0, the exact kernel elsewhere."""

    kernels = ("triton", "reference")


class AWQConfig(QuantConfig):
    """``quantization_config`` of an AWQ checkpoint (AutoAWQ, GPTQModel's AWQ export).

    ``w_bit`` / ``q_group_size`` are accepted as the legacy ``quant_config.json`` spellings.
    ``zero_point: false`` is accepted: GPTQModel writes it for symmetric AWQ (``sym: true``)
    while still storing ``qzeros``.
    """

    linear_method = AWQLinearMethod
    supports_lm_head: ClassVar[bool] = True
    tensor_names: ClassVar[frozenset[str]] = fmt.TENSORS
    variant_fields: ClassVar[frozenset[str]] = frozenset(
        {"bits", "checkpoint_format", "format", "version", "w_bit"}
    )

    bits: int = Field(4, validation_alias=AliasChoices("bits", "w_bit"))
    group_size: GroupSize = Field(128, validation_alias=AliasChoices("group_size", "q_group_size"))
    zero_point: bool = True
    format: str | None = None
    checkpoint_format: str | None = None
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

    @classmethod
    def from_quant_config(
        cls, data: Mapping[str, Any], *, method: str, source: str | None = None
    ) -> Self:
        """Validate an AWQ ``quantization_config``; ``version``, ``format`` and
        ``checkpoint_format`` must agree when given (an absent ``version`` is not ``gemm``
        when ``format`` names another layout).

        Raises:
            ConfigError: the layout fields disagree, or a field has a bad value (a layout
                other than ``gemm`` included).
        """
        check_layout_fields(data, LAYOUT_FIELDS, method=method, source=source)
        return super().from_quant_config(data, method=method, source=source)

    @field_validator("version", "format", "checkpoint_format")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is None:
            return None
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
        if names >= fmt.TENSORS and "g_idx" not in names:
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
        version: str = "gemm",
        scale_dtype: torch.dtype = torch.float16,
        **unused: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Round-to-nearest AWQ GEMM tensors (``qweight``, ``qzeros``, ``scales``) of a float
        ``[out, in]`` weight, with AutoAWQ's zero-point rule (``sym=True``: zero fixed at 8).

        Raises:
            ConfigError: bits other than 4, a version other than ``gemm``, an output size not
                a multiple of 8, or an input size not a multiple of the group size.
            InputError: an unsupported option.
        """
        _refuse(unused, "awq")
        config = cls.from_quant_config(
            {"bits": bits, "group_size": group_size, "zero_point": not sym, "version": version},
            method="awq",
        )
        tensors = fmt.quantize(
            weight, group_size=config.group_size, sym=sym, scale_dtype=scale_dtype
        )
        qcfg = {
            "quant_method": "awq",
            "bits": config.bits,
            "group_size": config.group_size,
            "zero_point": config.zero_point,
            "version": config.version,
            "lm_head": True,
        }
        return tensors, qcfg

    @classmethod
    def writer_options(cls) -> tuple[WriterOption, ...]:
        """AutoAWQ's options: the GEMM layout, 4-bit codes, a zero point unless ``sym``."""
        default = writer_defaults(cls.quantize_weight)
        return (
            WriterOption("format", "version", default["version"], SUPPORTED_VERSIONS,
                         note="AutoAWQ's version: the GEMM layout"),
            WriterOption("bits", "bits", default["bits"], SUPPORTED_BITS),
            WriterOption("group_size", "group_size", default["group_size"],
                         note="-1 (one group) or a size that divides the hidden size"),
            WriterOption("sym", "sym", default["sym"],
                         note="--no-sym: a zero point per group (AutoAWQ's rule)"),
        )  # fmt: skip

    @classmethod
    def scope_config(
        cls, qcfg: Mapping[str, Any], *, quantized: str, kept_float: Collection[str]
    ) -> dict[str, Any]:
        """``modules_to_not_convert``: the last name of every float module (AutoAWQ, vLLM and
        transformers match its entries as substrings of a module's name, so they also find
        the modules an engine renames, e.g. an Eagle3 drafter's ``midlayer.*``), minus names
        that are part of ``quantized``'s own."""
        leaves = {module.rpartition(".")[2] for module in kept_float}
        skip = sorted(leaf for leaf in leaves if leaf and leaf not in quantized)
        return {**qcfg, "modules_to_not_convert": skip or None}


class AWQMarlinConfig(AWQConfig):
    """AWQ tensors run by the Triton kernel (CUDA >= 8.0, groups of -1/32/64/128)."""

    linear_method = AWQMarlinLinearMethod

    checkpoint_formats: ClassVar[tuple[str, ...]] = ("awq",)
    upgrade_priority: ClassVar[int] = 20

    def format_reason(self) -> str | None:
        return marlin_group_reason("awq_marlin", self.group_size)

    def platform_reason(self, platform: Platform) -> str | None:
        return marlin_platform_reason("awq_marlin", platform)


def _refuse(unused: dict[str, Any], method: str) -> None:
    if unused:
        raise InputError(
            f"{method} writer: unsupported option(s) {', '.join(sorted(unused))}",
            field=sorted(unused)[0],
        )

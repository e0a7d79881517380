"""AWQ (AutoAWQ "GEMM" layout): ``awq`` (reference path) and ``awq_marlin`` (repacked)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import AliasChoices, Field, field_validator

from quantreg import LayerRule, Platform, QuantConfig
from quantreg.methods._wna16 import (
    GroupSize,
    head_and_skip_rule,
    marlin_group_reason,
    marlin_platform_reason,
)

SUPPORTED_BITS = (4,)
SUPPORTED_VERSIONS = ("gemm",)


class AWQConfig(QuantConfig):
    """``quantization_config`` of an AWQ checkpoint (AutoAWQ, GPTQModel's AWQ export).

    ``w_bit`` / ``q_group_size`` are accepted as the legacy ``quant_config.json`` spellings.
    ``zero_point: false`` is accepted: GPTQModel writes it for symmetric AWQ (``sym: true``)
    while still storing ``qzeros``.
    """

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


class AWQMarlinConfig(AWQConfig):
    """AWQ tensors repacked after loading into the shared marlin layout (fast GPU kernel)."""

    checkpoint_formats: ClassVar[tuple[str, ...]] = ("awq",)
    upgrade_priority: ClassVar[int] = 20

    def format_reason(self) -> str | None:
        return marlin_group_reason("awq_marlin", self.group_size)

    def platform_reason(self, platform: Platform) -> str | None:
        return marlin_platform_reason("awq_marlin", platform)

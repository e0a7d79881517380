"""``cpu_wna16`` (alias ``cpu_awq``): AWQ and GPTQ int4/int8 heads on the CPU.

Loads the checkpoint exactly as ``awq`` / ``gptq`` do, then runs the fastest CPU kernel that
fits (see ``quantreg.kernels``): quantreg's CPU kernel when it builds (float32 activations on
its exact FMA path; bf16 / fp16 on AVX512-BF16 or AMX), else for bf16 / fp16 heads quantreg's
AVX2 kernel (``cpu-avx2-wna16``) or torch's weight-only ops where they fit, else the exact
reference kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

import torch

from quantreg import ConfigError, IntWeights, LayerRule, Platform, QuantConfig
from quantreg.methods._decoded import DecodedLinearMethod
from quantreg.methods.awq import AWQConfig
from quantreg.methods.gptq import GPTQConfig

_READERS: dict[str, type[QuantConfig]] = {"awq": AWQConfig, "gptq": GPTQConfig}
CPU_KERNELS = (
    "cpu-amx", "cpu-vnni-wna16", "cpu-avx512-bf16", "cpu-avx2-wna16", "cpu-vnni-a8", "cpu-avx2-a8",
    "torch-int4pack", "torch-int8pack", "cpu-avx512", "reference",
)  # fmt: skip


class CPUWNA16LinearMethod(DecodedLinearMethod):
    """The family's own tensors and decoding, then the fastest CPU kernel that fits."""

    quant_config: CPUWNA16Config  # set by QuantConfig.get_linear_method
    kernels = CPU_KERNELS

    def __init__(self, quant_config: CPUWNA16Config) -> None:
        super().__init__(quant_config)
        inner = quant_config.checkpoint
        self.family = inner.linear_method(inner)

    def create_weights(self, layer: torch.nn.Module, *args: Any, **extra: Any) -> None:
        self.family.create_weights(layer, *args, **extra)

    def decode(self, layer: torch.nn.Module) -> IntWeights:
        return self.family.decode(layer)  # type: ignore[attr-defined,no-any-return]


class CPUWNA16Config(QuantConfig):
    """Wraps the checkpoint's own AWQ or GPTQ config; the CPU kernels read both layouts."""

    linear_method = CPUWNA16LinearMethod
    supports_lm_head: ClassVar[bool] = True
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("awq", "gptq")
    upgrade_priority: ClassVar[int] = 10
    tensor_names: ClassVar[frozenset[str]] = AWQConfig.tensor_names | GPTQConfig.tensor_names

    source_format: Literal["awq", "gptq"]
    checkpoint: AWQConfig | GPTQConfig

    @classmethod
    def from_quant_config(
        cls, data: Mapping[str, Any], *, method: str, source: str | None = None
    ) -> Self:
        """Parse the checkpoint's AWQ or GPTQ config (by its ``quant_method``) and wrap it.

        Raises:
            ConfigError: the config is neither AWQ nor GPTQ, or is invalid as such.
        """
        fmt = str(data.get("quant_method", "")).strip().lower() if isinstance(data, Mapping) else ""
        reader = _READERS.get(fmt)
        if reader is None:
            where = f" in {source}" if source else ""
            raise ConfigError(
                f"{method} reads AWQ and GPTQ checkpoints; quant_method {fmt or None!r}{where} "
                "is neither",
                field="quant_method",
            )
        inner = reader.from_quant_config(data, method=fmt, source=source)
        return cls(source_format=fmt, checkpoint=inner)

    def layer_rule(self, prefix: str) -> LayerRule:
        return self.checkpoint.layer_rule(prefix)

    def rule_from_tensors(self, prefix: str, names: frozenset[str]) -> LayerRule | None:
        return self.checkpoint.rule_from_tensors(prefix, names)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Self:
        return self.model_copy(update={"checkpoint": self.checkpoint.with_overrides(overrides)})

    def platform_reason(self, platform: Platform) -> str | None:
        if platform.device != "cpu":
            return f"cpu_wna16 runs on the CPU; platform is {platform}"
        return None

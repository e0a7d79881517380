"""``cpu_wna16`` (alias ``cpu_awq``): AWQ and GPTQ int4/int8 heads on the CPU fast path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

from quantreg import ConfigError, LayerRule, Platform, QuantConfig
from quantreg.methods.awq import AWQConfig
from quantreg.methods.gptq import GPTQConfig

_READERS: dict[str, type[QuantConfig]] = {"awq": AWQConfig, "gptq": GPTQConfig}


class CPUWNA16Config(QuantConfig):
    """Wraps the checkpoint's own AWQ or GPTQ config; the CPU kernels read both layouts."""

    supports_lm_head: ClassVar[bool] = True
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("awq", "gptq")
    upgrade_priority: ClassVar[int] = 10

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
                "is neither"
            )
        inner = reader.from_quant_config(data, method=fmt, source=source)
        return cls(source_format=fmt, checkpoint=inner)

    def layer_rule(self, prefix: str) -> LayerRule:
        return self.checkpoint.layer_rule(prefix)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Self:
        return self.model_copy(update={"checkpoint": self.checkpoint.with_overrides(overrides)})

    def platform_reason(self, platform: Platform) -> str | None:
        if platform.device != "cpu":
            return f"cpu_wna16 runs on the CPU; platform is {platform}"
        return None

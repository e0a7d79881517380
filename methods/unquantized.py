"""``unquantized``: plain float weights (``Resolution.method`` is None for it)."""

from __future__ import annotations

from typing import ClassVar

from quantreg import LayerRule, QuantConfig, UnquantizedLinearMethod


class UnquantizedConfig(QuantConfig):
    """The method of a checkpoint with no quantization_config: every layer stays float."""

    linear_method = UnquantizedLinearMethod
    supports_lm_head: ClassVar[bool] = True

    def layer_rule(self, prefix: str) -> LayerRule:
        return LayerRule(False, "quant_method 'unquantized'")

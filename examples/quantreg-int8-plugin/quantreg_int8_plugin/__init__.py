"""Example quantreg plugin: weight-only int8, one float scale per output channel.

``W ≈ weight * weight_scale`` with ``weight`` int8 ``[N, K]`` and ``weight_scale`` ``[N, 1]``.
quantreg finds :class:`Int8ChannelConfig` through the ``quantreg.methods`` entry point
``example_int8`` in this package's ``pyproject.toml``; nothing here imports quantreg internals.
"""

from __future__ import annotations

from typing import Any

import torch

import quantreg


class Int8ChannelLinearMethod(quantreg.LinearMethod):
    """Stores int8 weights with a per-output-channel scale; dequantizes on the fly."""

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
        """Register ``weight`` (int8 ``[N, K]``) and ``weight_scale`` (``[N, 1]``) on ``layer``."""
        n = sum(output_partition_sizes)
        weight = torch.nn.Parameter(
            torch.empty(n, input_size_per_partition, dtype=torch.int8), requires_grad=False
        )
        weight.output_dim, weight.input_dim = 0, 1
        scale = torch.nn.Parameter(torch.empty(n, 1, dtype=params_dtype), requires_grad=False)
        scale.output_dim = 0
        layer.register_parameter("weight", weight)
        layer.register_parameter("weight_scale", scale)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ (weight * weight_scale).T (+ bias)``, computed in ``x``'s dtype."""
        w = layer.weight.to(x.dtype) * layer.weight_scale.to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)


class Int8ChannelConfig(quantreg.QuantConfig):
    """``quantization_config`` of an int8 per-channel checkpoint (``example_int8``)."""

    linear_method = Int8ChannelLinearMethod
    supports_lm_head = True

    bits: int = 8

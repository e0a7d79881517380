"""Example quantreg plugin: weight-only int8, one float scale per output channel.

``W = weight * weight_scale`` with ``weight`` int8 ``[N, K]`` and ``weight_scale`` ``[N, 1]``
(the tensors compressed-tensors writes for a symmetric int8 per-channel layer). quantreg finds
:class:`Int8ChannelConfig` through the ``quantreg.methods`` entry point ``example_int8`` in this
package's ``pyproject.toml``. It uses only names from ``quantreg.__all__`` -- and so gets what
the built-in methods get: scales kept in the checkpoint's dtype (exactly as the producer
rounded them), and quantreg's kernels, chosen once and recorded on the layer.
"""

from __future__ import annotations

from typing import Any

import torch

import quantreg


class Int8ChannelLinearMethod(quantreg.LinearMethod):
    """Loads int8 weights with a per-output-channel scale; runs the kernel quantreg selects."""

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
        """Register ``weight`` (int8 ``[N, K]``) and ``weight_scale`` (``[N, 1]``, kept in the
        checkpoint's dtype) on ``layer``; the vocab (output) rows are dim 0 of both."""
        n, k = sum(output_partition_sizes), input_size_per_partition
        weight = quantreg.frozen_param((n, k), torch.int8, output_dim=0, input_dim=1)
        scale = quantreg.frozen_param(
            (n, 1), params_dtype, output_dim=0, keep_checkpoint_dtype=True
        )
        layer.register_parameter("weight", weight)
        layer.register_parameter("weight_scale", scale)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Describe the weight as unsigned codes ``q + 128`` with zero point 128, let quantreg
        select and build the kernel (``layer.kernel``), and drop the loaded tensors."""
        weight, scale = layer.weight.data, layer.weight_scale.data
        weights = quantreg.IntWeights.create(
            bits=8,
            k=weight.shape[1],
            codes=lambda c0, c1: (weight[c0:c1].to(torch.int32) + 128).T,
            scales=scale.T,
            zeros=torch.full((1, weight.shape[0]), 128, dtype=torch.int32),
        )
        quantreg.select_kernel(weights, layer)
        del layer.weight, layer.weight_scale

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ (weight * weight_scale).T (+ bias)`` by the kernel chosen after loading."""
        return layer.kernel(x, bias)


class Int8ChannelConfig(quantreg.QuantConfig):
    """``quantization_config`` of an int8 per-channel checkpoint (``example_int8``)."""

    linear_method = Int8ChannelLinearMethod
    supports_lm_head = True
    tensor_names = frozenset({"weight_scale"})

    bits: int = 8

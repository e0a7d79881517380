"""The unquantized LinearMethod: a plain float ``weight [out, in]`` run by ``F.linear``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantreg.contract import LinearMethod
from quantreg.parameters import frozen_param, layer_geometry

if TYPE_CHECKING:  # torch is imported when a layer is built, not with quantreg
    import torch

DENSE_KERNEL = "dense"


class UnquantizedLinearMethod(LinearMethod):
    """Plain float ``weight [out, in]`` (+ bias): ``F.linear`` in the activation dtype."""

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
        weight = frozen_param(
            (sum(output_partition_sizes), input_size_per_partition),
            params_dtype,
            output_dim=0,
            input_dim=1,
        )
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Refuse a weight holding NaN or inf (every logit of its row would be), then record
        the kernel: ``F.linear`` on the float weight.

        Raises:
            CheckpointError: a non-finite weight, naming it.
        """
        from quantreg.kernels.selection import Kernel
        from quantreg.values import check_finite

        check_finite(layer.weight, f"{layer_geometry(layer).prefix}.weight", cast=True)

        layer.kernel = Kernel.record(
            DENSE_KERNEL, f"F.linear on the float weight ({layer.weight.dtype})"
        )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        import torch.nn.functional as F

        weight = layer.weight
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, weight, bias)

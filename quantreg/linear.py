"""Parameters with loading metadata, and the unquantized LinearMethod.

Every parameter a LinearMethod registers says how the loader shards it:
``output_dim`` (the dim holding the layer's output rows, i.e. the vocab of an lm_head; absent
= replicated on every rank), ``input_dim``, and for bit-packed tensors ``packed_dim`` and
``pack_factor`` (codes per stored element). AWQ and GPTQ keep the vocab on dim 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantreg.base import LinearMethod
from quantreg.errors import MethodDefinitionError

if TYPE_CHECKING:  # torch is imported when a layer is built, not with quantreg
    import torch

WEIGHT_ATTRS = ("output_dim", "input_dim", "packed_dim", "pack_factor")


def set_weight_attrs(
    param: torch.Tensor,
    *,
    output_dim: int | None = None,
    input_dim: int | None = None,
    packed_dim: int | None = None,
    pack_factor: int = 1,
) -> torch.Tensor:
    """Attach loading metadata to ``param`` (and return it).

    Raises:
        MethodDefinitionError: a dim outside the tensor, or a packed dim without a factor > 1.
    """
    dims = {"output_dim": output_dim, "input_dim": input_dim, "packed_dim": packed_dim}
    for name, dim in dims.items():
        if dim is not None and not 0 <= dim < param.dim():
            raise MethodDefinitionError(
                f"{name}={dim} is not a dim of a {param.dim()}-d parameter {tuple(param.shape)}"
            )
    if not isinstance(pack_factor, int) or pack_factor < 1:
        raise MethodDefinitionError(f"pack_factor must be a positive integer, got {pack_factor!r}")
    if (packed_dim is None) != (pack_factor == 1):
        raise MethodDefinitionError(
            f"packed_dim={packed_dim} and pack_factor={pack_factor} must be given together"
        )
    param.output_dim = output_dim  # type: ignore[attr-defined]
    param.input_dim = input_dim  # type: ignore[attr-defined]
    param.packed_dim = packed_dim  # type: ignore[attr-defined]
    param.pack_factor = pack_factor  # type: ignore[attr-defined]
    return param


def weight_attrs(param: torch.Tensor) -> dict[str, Any]:
    """The loading metadata of ``param`` (defaults for anything not set)."""
    return {
        "output_dim": getattr(param, "output_dim", None),
        "input_dim": getattr(param, "input_dim", None),
        "packed_dim": getattr(param, "packed_dim", None),
        "pack_factor": getattr(param, "pack_factor", 1),
    }


def new_param(
    shape: tuple[int, ...] | list[int],
    dtype: torch.dtype,
    **attrs: Any,
) -> torch.nn.Parameter:
    """A zero-filled, frozen parameter of ``shape`` with loading metadata ``attrs``."""
    import torch

    param = torch.nn.Parameter(torch.zeros(tuple(shape), dtype=dtype), requires_grad=False)
    set_weight_attrs(param, **attrs)
    return param


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
        weight = new_param(
            (sum(output_partition_sizes), input_size_per_partition),
            params_dtype,
            output_dim=0,
            input_dim=1,
        )
        layer.register_parameter("weight", weight)

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

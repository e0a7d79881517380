"""What a kernel is chosen for (:class:`Target`): the weights, the activation dtype, the
device, the platform, a kernel asked for by name and quantized activations asked for. The
catalogue's decline functions read it (:mod:`quantreg.kernels.catalog`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from quantreg.kernels.layouts import Float8Layout
from quantreg.kernels.weights import IntWeights
from quantreg.platform import Platform

if TYPE_CHECKING:
    import torch

Weights: TypeAlias = IntWeights | Float8Layout
HALF = ("float16", "bfloat16")


@dataclass(frozen=True)
class Target:
    """What a kernel is chosen for: the weights, the activation dtype and the device."""

    weights: Weights
    dtype: torch.dtype
    device: torch.device
    platform: Platform
    requested: str | None
    activation_dtype: str | None = None  # "int8": quantized activations asked for

    @property
    def half(self) -> bool:
        return str(self.dtype).removeprefix("torch.") in HALF

"""The base of the built-in LinearMethods: decode the loaded tensors, select a kernel, run it.

A family's LinearMethod says how its checkpoint tensors are created (``create_weights``) and
what they mean (``decode`` -> ``quantreg.IntWeights`` or a ``quantreg.kernels.Float8Layout``);
this base selects the kernel once after loading (``kernels``: the kernels the method may run,
None for every kernel), records it as ``layer.kernel``, drops the checkpoint tensors the
kernel's layout replaced, and calls the kernel. A plugin can do exactly the same with the
public names used here.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch

from quantreg import LinearMethod, select_kernel


class DecodedLinearMethod(LinearMethod):
    """Decode after loading, then run the kernel selected for the decoded weights."""

    kernels: ClassVar[tuple[str, ...] | None] = None

    @abstractmethod
    def decode(self, layer: torch.nn.Module) -> Any:
        """The loaded tensors as ``IntWeights`` (or a ``Float8Layout``), after checking them.

        Raises:
            CheckpointError: a tensor that cannot be what the format says (naming it).
        """

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Decode, select and build the kernel, then drop the checkpoint tensors it replaced
        (every parameter but ``bias``)."""
        select_kernel(self.decode(layer), layer, allowed=self.kernels)
        for name, _ in list(layer.named_parameters(recurse=False)):
            if name != "bias":
                delattr(layer, name)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return layer.kernel(x, bias)

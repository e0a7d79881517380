"""Checks the built-in methods run on loaded tensors before building a kernel."""

from __future__ import annotations

import torch

from quantreg import CheckpointError, layer_geometry


def check_finite(layer: torch.nn.Module, name: str) -> None:
    """NaN or inf in a scale would silently poison every logit: refuse it, naming the tensor.

    Raises:
        CheckpointError: the tensor holds a non-finite value.
    """
    value = getattr(layer, name)
    if not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        prefix = layer_geometry(layer).prefix
        raise CheckpointError(
            f"{prefix}.{name} holds {bad} non-finite value(s) (NaN or inf); expected finite scales",
            tensor=f"{prefix}.{name}",
        )

"""``inspect_checkpoint``: what a checkpoint holds and which method its head resolves to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quantreg.checkpoint import tensor_infos
from quantreg.decision import is_quantized_tensor, resolve
from quantreg.errors import CheckpointError
from quantreg.platform import Platform
from quantreg.registry import Registry, default_registry


def inspect_checkpoint(
    path: str | os.PathLike[str],
    *,
    platform: Platform | str | None = None,
    prefix: str = "lm_head",
    registry: Registry | None = None,
) -> dict[str, Any]:
    """A JSON-safe summary: ``{config, method, rule, tied_to, tensors: [{name, dtype, shape,
    bytes, quantized, file}]}`` (every tensor of the checkpoint, from the headers only).

    Raises:
        ConfigError, CheckpointError: as :func:`quantreg.resolve`.
    """
    root = Path(path)
    registry = registry or default_registry()
    resolution = resolve(root, platform=platform, prefix=prefix, registry=registry)
    view = resolution.view
    infos = tensor_infos(view.root if view is not None and view.root else root)
    names = frozenset().union(*(cls.tensor_names for cls in registry.loaded().values()))
    if infos is None:
        raise CheckpointError(f"{root} has no safetensors weights", path=root)
    tensors = [
        {
            "name": info.name,
            "dtype": info.dtype,
            "shape": list(info.shape),
            "bytes": info.nbytes,
            "quantized": is_quantized_tensor(info, info.name.rpartition(".")[0], names),
            "file": info.file.name,
        }
        for info in sorted(infos.values(), key=lambda i: i.name)
    ]
    return {
        "config": dict(view.config),
        "method": resolution.method,
        "rule": resolution.rule,
        "tied_to": resolution.tied_to,
        "tensors": tensors,
    }

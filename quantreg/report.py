"""``inspect_checkpoint``: what a checkpoint holds and which method its head resolves to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quantreg.checkpoint import tensor_infos
from quantreg.errors import CheckpointError
from quantreg.platform import Platform
from quantreg.resolution import is_quantized_tensor, read_checkpoint, resolve


def inspect_checkpoint(
    path: str | os.PathLike[str],
    *,
    platform: Platform | str | None = None,
    prefix: str = "lm_head",
) -> dict[str, Any]:
    """A JSON-safe summary: ``{config, method, rule, tensors: [{name, dtype, shape, bytes,
    quantized, file}]}`` (every tensor of the checkpoint, from the headers only).

    Raises:
        ConfigError, CheckpointError: as :func:`quantreg.resolve`.
    """
    root = Path(path)
    resolution = resolve(root, platform=platform, prefix=prefix)
    view = read_checkpoint(root, prefix)
    infos = tensor_infos(view.root or root)
    if infos is None:
        raise CheckpointError(f"{root} has no safetensors weights", path=root)
    tensors = [
        {
            "name": info.name,
            "dtype": info.dtype,
            "shape": list(info.shape),
            "bytes": info.nbytes,
            "quantized": is_quantized_tensor(info, info.name.rpartition(".")[0]),
            "file": info.file.name,
        }
        for info in sorted(infos.values(), key=lambda i: i.name)
    ]
    return {
        "config": dict(view.config),
        "method": resolution.method,
        "rule": resolution.rule,
        "tensors": tensors,
    }

"""Reading a head's tensors into its parameters: one ``safe_open`` per shard, only this rank's
slice of each tensor, handed to the method's per-parameter hook in the checkpoint's own dtype.

Every header was checked before (see ``loading``); a read that still fails -- a file changed
or corrupted since -- is an error naming the tensor being read and its file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantreg.checkpoint import TensorInfo
from quantreg.errors import CheckpointError, QuantregError
from quantreg.files import regular_stat
from quantreg.lm_head import ParallelLMHead
from quantreg.progress import LoadProgress


def _slice_bytes(head: ParallelLMHead, param: torch.nn.Parameter, info: TensorInfo) -> int:
    region = head.checkpoint_region(param)
    if region is None or not info.shape:
        return info.nbytes
    dim, start, stop = region
    return info.nbytes // max(info.shape[dim], 1) * (stop - start)


def read_into(
    head: ParallelLMHead, plan: list[tuple[torch.nn.Parameter, TensorInfo]], device: torch.device
) -> None:
    """Read each parameter's slice, one ``safe_open`` per shard, with a progress report."""
    progress = LoadProgress(
        sum(_slice_bytes(head, p, i) for p, i in plan),
        f"loading {head.prefix}",
        enabled=head.tp_rank == 0,
    )
    try:
        _read(head, plan, device, progress)
    finally:
        progress.close()


def _read(
    head: ParallelLMHead,
    plan: list[tuple[torch.nn.Parameter, TensorInfo]],
    device: torch.device,
    progress: LoadProgress,
) -> None:
    """Each shard opened once; a failure names the tensor being read and its file."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[torch.nn.Parameter, TensorInfo]]] = {}
    for param, info in plan:
        by_file.setdefault(info.file, []).append((param, info))
    for file, items in by_file.items():
        first = items[0][1].name
        regular_stat(file, what=f"tensor {first!r}: file")  # safe_open blocks on a FIFO
        try:
            opened = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors' own errors: a file changed since its header
            raise CheckpointError(
                f"cannot open {file} to read tensor {first!r}: {exc}", path=file, tensor=first
            ) from exc
        with opened as handle:
            for param, info in items:
                data = _read_one(handle, head, param, info)
                _load_one(head, param, info, data.to(device=device))
                progress.update(data.numel() * data.element_size())


def _read_one(
    handle: Any, head: ParallelLMHead, param: torch.nn.Parameter, info: TensorInfo
) -> torch.Tensor:
    """This rank's slice of one tensor.

    Raises:
        CheckpointError: safetensors could not read it (a truncated or corrupt file); names
            the tensor and the file.
    """
    try:
        return _slice(handle, head, param, info)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read tensor {info.name!r} from {info.file}: {exc}",
            path=info.file,
            tensor=info.name,
        ) from exc


def _load_one(
    head: ParallelLMHead, param: torch.nn.Parameter, info: TensorInfo, data: torch.Tensor
) -> None:
    """The method's per-parameter hook; an error that is not already a quantreg error names
    the tensor and its file."""
    try:
        head.load_weight(param, data)
    except QuantregError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot load tensor {info.name!r} from {info.file}: {type(exc).__name__}: {exc}",
            path=info.file,
            tensor=info.name,
        ) from exc


def _slice(handle: Any, head: ParallelLMHead, param: torch.nn.Parameter, info: TensorInfo) -> Any:
    """This rank's region of tensor ``info`` from an open safetensors file."""
    region = head.checkpoint_region(param)
    if not info.shape:  # a 0-d tensor (AutoFP8's, ModelOpt's per-tensor scales): no slicing
        return handle.get_tensor(info.name)
    piece = handle.get_slice(info.name)
    if region is None:
        return piece[:]
    dim, start, stop = region
    index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(info.shape)))
    return piece[index]

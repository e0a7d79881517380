"""Parameters with loading metadata, the layer geometry methods may read, and the default
per-parameter load.

Every parameter a LinearMethod registers says how the loader shards and stores it:
``output_dim`` (the dim holding the layer's output rows, i.e. the vocab of an lm_head; absent
= replicated on every rank), ``input_dim``, for bit-packed tensors ``packed_dim`` and
``pack_factor`` (codes per stored element), and ``keep_checkpoint_dtype`` (a float tensor such
as a scale keeps the dtype the checkpoint stores it in instead of taking the compute dtype, so
dequantization rounds exactly as the producer did). AWQ and GPTQ keep the vocab on dim 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantreg.errors import CheckpointError, MethodDefinitionError

if TYPE_CHECKING:  # torch is imported when a layer is built, not with quantreg
    import torch

WEIGHT_ATTRS = ("output_dim", "input_dim", "packed_dim", "pack_factor", "keep_checkpoint_dtype")


def set_weight_attrs(
    param: torch.Tensor,
    *,
    output_dim: int | None = None,
    input_dim: int | None = None,
    packed_dim: int | None = None,
    pack_factor: int = 1,
    keep_checkpoint_dtype: bool = False,
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
    if keep_checkpoint_dtype and not param.is_floating_point():
        raise MethodDefinitionError(
            f"keep_checkpoint_dtype is for float parameters; this one is {param.dtype}"
        )
    param.output_dim = output_dim  # type: ignore[attr-defined]
    param.input_dim = input_dim  # type: ignore[attr-defined]
    param.packed_dim = packed_dim  # type: ignore[attr-defined]
    param.pack_factor = pack_factor  # type: ignore[attr-defined]
    param.keep_checkpoint_dtype = keep_checkpoint_dtype  # type: ignore[attr-defined]
    return param


def weight_attrs(param: torch.Tensor) -> dict[str, Any]:
    """The loading metadata of ``param`` (defaults for anything not set)."""
    return {
        "output_dim": getattr(param, "output_dim", None),
        "input_dim": getattr(param, "input_dim", None),
        "packed_dim": getattr(param, "packed_dim", None),
        "pack_factor": getattr(param, "pack_factor", 1),
        "keep_checkpoint_dtype": getattr(param, "keep_checkpoint_dtype", False),
    }


def frozen_param(
    shape: tuple[int, ...] | list[int], dtype: torch.dtype, **attrs: Any
) -> torch.nn.Parameter:
    """A zero-filled parameter that is never trained, with loading metadata ``attrs`` (the
    keywords of :func:`set_weight_attrs`)."""
    import torch

    param = torch.nn.Parameter(torch.zeros(tuple(shape), dtype=dtype), requires_grad=False)
    set_weight_attrs(param, **attrs)
    return param


@dataclass(frozen=True)
class LayerGeometry:
    """What a LinearMethod may read about the layer it serves, and where this rank's slice of
    each parameter lies in the checkpoint.

    Attributes:
        prefix: the layer's name in the checkpoint (``lm_head``).
        input_size: K, the input features (the hidden size of a head).
        output_size: the output rows the checkpoint holds (the unpadded vocab of a head).
        output_size_per_partition: this rank's rows, padding included.
        output_start: the first checkpoint row of this rank.
        params_dtype: the activation and compute dtype.
        tp_rank, tp_size: this rank and the number of ranks.
    """

    prefix: str
    input_size: int
    output_size: int
    output_size_per_partition: int
    output_start: int
    params_dtype: torch.dtype
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def output_stop(self) -> int:
        """One past the last checkpoint row of this rank (rows past the vocab are padding)."""
        return max(
            self.output_start,
            min(self.output_start + self.output_size_per_partition, self.output_size),
        )

    def checkpoint_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """The full (all ranks, unpadded) shape the checkpoint must hold for ``param``."""
        attrs = weight_attrs(param)
        shape = list(param.shape)
        dim = attrs["output_dim"]
        if dim is not None:
            rows = self.output_size
            shape[dim] = (
                math.ceil(rows / attrs["pack_factor"]) if attrs["packed_dim"] == dim else rows
            )
        return tuple(shape)

    def checkpoint_region(self, param: torch.Tensor) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` of this rank's slice in the checkpoint; None = all of it."""
        attrs = weight_attrs(param)
        dim = attrs["output_dim"]
        if dim is None:
            return None
        start, stop = self.output_start, self.output_stop
        if attrs["packed_dim"] == dim:
            pf = attrs["pack_factor"]
            start, stop = start // pf, math.ceil(stop / pf)
        return dim, start, stop


def layer_geometry(layer: Any) -> LayerGeometry:
    """The geometry of ``layer``: its ``geometry`` attribute (``ParallelLMHead`` has one), else
    derived from vLLM-style attributes (``prefix``, ``input_size_per_partition``,
    ``output_size_per_partition``, ``params_dtype``, ``org_vocab_size`` / ``output_size``,
    ``shard_indices``), so methods run inside engines unchanged.

    Raises:
        MethodDefinitionError: the layer has neither.
    """
    geometry = getattr(layer, "geometry", None)
    if isinstance(geometry, LayerGeometry):
        return geometry
    try:
        per_partition = int(layer.output_size_per_partition)
        rank = int(getattr(layer, "tp_rank", 0))
        shards = getattr(layer, "shard_indices", None)
        start = getattr(shards, "org_vocab_start_index", rank * per_partition)
        rows = getattr(layer, "org_vocab_size", None) or getattr(layer, "output_size", None)
        return LayerGeometry(
            prefix=str(getattr(layer, "prefix", "layer")),
            input_size=int(layer.input_size_per_partition),
            output_size=int(rows),
            output_size_per_partition=per_partition,
            output_start=int(start),
            params_dtype=layer.params_dtype,
            tp_rank=rank,
            tp_size=int(getattr(layer, "tp_size", 1)),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise MethodDefinitionError(
            f"{type(layer).__name__} carries no LayerGeometry and no vLLM-style geometry "
            f"attributes ({exc})"
        ) from exc


def copy_weight(param: torch.Tensor, loaded: torch.Tensor, geometry: LayerGeometry) -> None:
    """Copy this rank's ``loaded`` slice (in the checkpoint's dtype) into ``param``: cast to the
    parameter's dtype, or adopt the checkpoint's float dtype for ``keep_checkpoint_dtype``
    parameters; the rows past the slice (vocab padding) stay zero.

    Raises:
        CheckpointError: the slice does not fit the parameter.
    """
    import torch

    attrs = weight_attrs(param)
    dtype = param.dtype
    if attrs["keep_checkpoint_dtype"] and loaded.is_floating_point():
        dtype = loaded.dtype
    if dtype != param.dtype:
        param.data = torch.zeros(param.shape, dtype=dtype, device=param.device)
    region = geometry.checkpoint_region(param)
    target = param.data
    if region is not None:
        dim, start, stop = region
        target = target.narrow(dim, 0, stop - start)
    if tuple(loaded.shape) != tuple(target.shape):
        raise CheckpointError(
            f"cannot load a {tuple(loaded.shape)} slice into a {tuple(target.shape)} region "
            f"of {geometry.prefix} parameter {tuple(param.shape)}",
        )
    param.data.zero_()
    target.copy_(loaded.to(device=param.device, dtype=dtype))

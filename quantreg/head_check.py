"""The header check: every parameter of a head against its safetensors header -- name, shape
and dtype -- with every problem reported at once, before any tensor is read or allocated."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from quantreg.checkpoint import FLOAT_DTYPES, TensorInfo
from quantreg.errors import CheckpointError
from quantreg.head_config import _FLOATS, TORCH_DTYPES
from quantreg.parameters import weight_attrs
from quantreg.patterns import listed

if TYPE_CHECKING:
    import torch

    from quantreg.lm_head import ParallelLMHead
    from quantreg.resolution import Resolution

logger = logging.getLogger(__name__)

# Float dtypes a parameter that keeps the checkpoint's dtype (a scale) may hold: the kernels
# compute in 16- and 32-bit floats, so an F64 scale is refused here, not on the first forward.
KEPT_FLOAT_DTYPES = ("F16", "BF16", "F32")


def check_tensors(
    head: ParallelLMHead,
    tensors: Mapping[str, TensorInfo],
    resolution: Resolution,
    *,
    strict: bool,
) -> list[tuple[str, TensorInfo]]:
    """Match every parameter of ``head`` (which may live on the ``meta`` device) to its
    checkpoint tensor; returns ``(parameter name, tensor)`` pairs in parameter order.

    Raises:
        CheckpointError: missing, misshapen, mistyped or (``strict``) unconsumed tensors; the
            message lists every problem and names the tensors and files.
    """
    prefix = head.prefix
    problems: list[str] = []
    plan = []
    for name, param in head.named_parameters(recurse=False):
        full = f"{prefix}.{name}"
        info = tensors.get(full)
        expected = head.checkpoint_shape(param)
        want = f"{_dtype_name(param.dtype)} {list(expected)}"
        if info is None:
            problems.append(f"missing {full}: expected {want}")
            continue
        found = f"{info.dtype} {list(info.shape)} in {info.file.name}"
        if info.name != full:
            found += f" (tied: {info.name})"
        kept = weight_attrs(param)["keep_checkpoint_dtype"]
        if info.shape != expected:
            problems.append(f"{full}: expected shape {want}, found {found}")
        elif kept and info.dtype not in KEPT_FLOAT_DTYPES:
            problems.append(
                f"{full}: expected dtype F16, BF16 or F32 {list(expected)} (it keeps the "
                f"checkpoint's dtype, and the kernels take 16- and 32-bit floats), found {found}"
            )
        elif not _dtype_ok(param.dtype, info.dtype):
            problems.append(f"{full}: expected dtype {want}, found {found}")
        else:
            plan.append((name, info))
    _report(head, tensors, resolution, problems, strict=strict)
    return plan


def _report(
    head: ParallelLMHead,
    tensors: Mapping[str, TensorInfo],
    resolution: Resolution,
    problems: list[str],
    *,
    strict: bool,
) -> None:
    """Raise on ``problems`` (adding the unconsumed tensors), else on unconsumed tensors
    (``strict``) or log them."""
    prefix = head.prefix
    consumed = {f"{prefix}.{n}" for n, _ in head.named_parameters(recurse=False)}
    unconsumed = sorted(set(tensors) - consumed)
    why = f"'{prefix}' resolved as {resolution.method or 'unquantized'} ({resolution.rule})"
    if problems:
        if unconsumed:
            problems.append(f"present but not expected: {listed(unconsumed)}")
        files = sorted({str(t.file) for t in tensors.values()})
        raise CheckpointError(
            f"{resolution.source}: the {prefix} tensors do not match {why}:\n  - "
            + "\n  - ".join(problems)
            + f"\n(files: {listed(files)})",
            path=files[0] if len(files) == 1 else resolution.source,
            tensor=next(iter(unconsumed), None),
        )
    if unconsumed:
        message = f"{resolution.source}: no parameter consumes {listed(unconsumed)}; {why}"
        if strict:
            raise CheckpointError(message, path=resolution.source, tensor=unconsumed[0])
        logger.warning("%s (strict=False: ignored)", message)


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in TORCH_DTYPES.items() if v == dtype), str(dtype))


def _dtype_ok(param_dtype: torch.dtype, stored: str) -> bool:
    """Float parameters take any float tensor (cast exactly or rounded once); others match."""
    if param_dtype in _FLOATS:
        return stored in FLOAT_DTYPES
    return TORCH_DTYPES.get(stored) == param_dtype

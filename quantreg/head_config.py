"""What the checkpoint's config says about the head itself: its size and compute dtype.

``head_geometry`` reads ``draft_vocab_size`` (Eagle3) or ``vocab_size`` and ``hidden_size``
(also inside ``text_config`` / ``transformer_layer_config``), else a float weight's shape;
``default_dtype`` the config's ``dtype`` / ``torch_dtype``, else the head's float tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from quantreg.checkpoint import FLOAT_DTYPES, TensorInfo
from quantreg.errors import CheckpointError, ConfigError, InputError
from quantreg.lm_head import MAX_HIDDEN, MAX_VOCAB

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def parse_dtype(value: torch.dtype | str) -> torch.dtype:
    """A compute dtype from a torch dtype or a name (``float32``, ``bf16``, ``torch.float16``).

    Raises:
        InputError: not one of float32, float16, bfloat16.
    """
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            raise InputError(
                f"unsupported dtype {value!r}: expected float32, float16 or bfloat16",
                field="dtype",
            )
        dtype = DTYPE_NAMES[key]
    else:
        raise InputError(f"dtype must be a torch.dtype or a string, got {value!r}", field="dtype")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(
            f"unsupported dtype {dtype}: expected float32, float16 or bfloat16", field="dtype"
        )
    return dtype


def _nested(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]``, else the same key in ``text_config`` / ``transformer_layer_config``."""
    if config.get(key) is not None:
        return config[key]
    for section in ("text_config", "transformer_layer_config"):
        sub = config.get(section)
        if isinstance(sub, Mapping) and sub.get(key) is not None:
            return sub[key]
    return None


def head_geometry(
    config: Mapping[str, Any], tensors: Mapping[str, TensorInfo], prefix: str, where: str
) -> tuple[int, int]:
    """``(vocab rows, hidden size)`` of the head: ``draft_vocab_size`` (Eagle3) or
    ``vocab_size``, and ``hidden_size`` -- from config.json, else from a float weight.

    Raises:
        ConfigError: a size that is not a positive integer, or one beyond what any model has
            (``MAX_VOCAB`` rows, ``MAX_HIDDEN`` features): refused before anything is built.
        CheckpointError: neither the config nor the tensors tell a size.
    """
    float_weight = tensors.get(f"{prefix}.weight")
    if float_weight is not None and (
        float_weight.dtype not in FLOAT_DTYPES or len(float_weight.shape) != 2
    ):
        float_weight = None
    sizes = []
    for keys, axis, bound in (
        (("draft_vocab_size", "vocab_size"), 0, MAX_VOCAB),
        (("hidden_size",), 1, MAX_HIDDEN),
    ):
        value, field = None, None
        for key in keys:
            value = _nested(config, key)
            if value is not None:
                field = key
                break
        if value is None and float_weight is not None:
            value, field = float_weight.shape[axis], f"shape of {float_weight.name}"
        if value is None:
            raise CheckpointError(
                f"{where}: cannot tell the {prefix} size: config.json has no "
                f"{' / '.join(keys)} and there is no float {prefix}.weight to infer it from",
                path=where,
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(
                f"{where}: field '{field}' = {value!r}: expected a positive integer",
                path=where,
                field=field,
            )
        if value > bound:
            raise ConfigError(
                f"{where}: field '{field}' = {value}: expected at most {bound} (no model's "
                f"{prefix} is that large)",
                path=where,
                field=field,
            )
        sizes.append(value)
    return sizes[0], sizes[1]


def default_dtype(
    config: Mapping[str, Any], tensors: Mapping[str, TensorInfo], prefix: str
) -> torch.dtype:
    """The config's ``dtype`` / ``torch_dtype``, else the head's float dtype, else float32."""
    for key in ("dtype", "torch_dtype"):
        value = _nested(config, key)
        if isinstance(value, str) and value.strip().lower().removeprefix("torch.") in DTYPE_NAMES:
            return parse_dtype(value)
    for name in (f"{prefix}.weight", f"{prefix}.scales", f"{prefix}.weight_scale"):
        info = tensors.get(name)
        if info is not None and info.dtype in ("F16", "BF16", "F32"):
            return TORCH_DTYPES[info.dtype]
    return torch.float32

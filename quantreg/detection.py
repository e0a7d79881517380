"""Detecting a checkpoint's quantization config: which method it names, and its raw dict.

Looked up in this order: ``config.json`` keys ``quantization_config``, ``compression_config``,
``text_config.quantization_config`` and ``transformer_layer_config.quantization_config``;
then ModelOpt's ``hf_quant_config.json`` and the legacy ``quantize_config.json`` (AutoGPTQ) and
``quant_config.json`` (AutoAWQ) beside it. What a label really means (GPTQModel's
``gptq``-labelled AWQ exports, say) is for the methods to say (``QuantConfig.relabel``), not for
detection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantreg.checkpoint import CONFIG_NAME, checked_file
from quantreg.errors import ConfigError
from quantreg.files import read_json

logger = logging.getLogger(__name__)

# Where config.json may hold the quantization config, in the order they are tried.
LOOKUP_ORDER = (
    ("quantization_config",),
    ("compression_config",),
    ("text_config", "quantization_config"),
    ("transformer_layer_config", "quantization_config"),
)
# Legacy side files and the method their (often unlabelled) contents belong to.
LEGACY_FILES = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"))
# ModelOpt's side file: {"producer": {...}, "quantization": {"quant_algo", "exclude_modules"}}.
MODELOPT_FILE = "hf_quant_config.json"


@dataclass(frozen=True)
class DetectedQuantConfig:
    """A checkpoint's quantization config as found: method name, dict, and where it was."""

    quant_method: str
    data: Mapping[str, Any]
    where: str  # e.g. "/ckpt/config.json (quantization_config)"
    path: Path | None = None  # the file it came from
    note: str | None = None


def load_model_config(path: Path) -> tuple[dict[str, Any], Path | None]:
    """Read ``config.json`` from a checkpoint folder or a file path.

    Returns the dict and its path; a folder without config.json gives ``({}, None)``.

    Raises:
        ConfigError: the file is not a regular file (a FIFO, a directory, a symlink loop, ...),
            is unreadable, not JSON within quantreg's bounds, or not a JSON object.
    """
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if not os.path.lexists(config_path):
            return {}, None
        checked_file(path, CONFIG_NAME, what="config")
    else:
        config_path = path
    data = read_json(config_path, what="config file")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {config_path} must hold a JSON object", path=config_path)
    return data, config_path


def detect_quant_config(
    config: Mapping[str, Any],
    *,
    config_path: Path | None = None,
    root: Path | None = None,
    label: str = "config.json",
) -> DetectedQuantConfig | None:
    """The checkpoint's quantization config, or None when it declares no quantization.

    ``label`` names the config in messages when it did not come from a file.

    Raises:
        ConfigError: a quantization config that is not an object or names no method.
    """
    where_file = str(config_path) if config_path else label
    for keys in LOOKUP_ORDER:
        value: Any = config
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is None:
            continue
        where = f"{where_file} ({'.'.join(keys)})"
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where} must be a JSON object, got {type(value).__name__}",
                path=config_path,
                field=".".join(keys),
            )
        if keys == ("compression_config",) and "quant_method" not in value:
            # compressed-tensors before 0.4 nested its quantization config one level down.
            nested = value.get("quantization_config")
            if isinstance(nested, Mapping):
                value = {"quant_method": "compressed-tensors", **nested}
        return _labelled(value, where=where, default=None, path=config_path)
    if root is not None:
        modelopt = _modelopt_side_file(root)
        if modelopt is not None:
            return modelopt
        for name, method in LEGACY_FILES:
            legacy = root / name
            if os.path.lexists(legacy):
                checked_file(root, name, what="legacy quantization config")
                data = read_json(legacy, what="legacy quantization config")
                if not isinstance(data, Mapping):
                    raise ConfigError(f"{legacy} must hold a JSON object", path=legacy)
                return _labelled(data, where=str(legacy), default=method, path=legacy)
    return None


def _modelopt_side_file(root: Path) -> DetectedQuantConfig | None:
    """ModelOpt's ``hf_quant_config.json``, as vLLM reads it: its ``quantization`` section,
    named ``modelopt_fp4`` for an FP4 ``quant_algo`` and ``modelopt`` otherwise."""
    path = root / MODELOPT_FILE
    if not os.path.lexists(path):
        return None
    checked_file(root, MODELOPT_FILE, what="ModelOpt quantization config")
    data = read_json(path, what="ModelOpt quantization config")
    section = data.get("quantization") if isinstance(data, Mapping) else None
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"{path}: field 'quantization' must be a JSON object (ModelOpt's quant_algo and "
            "exclude_modules)",
            path=path,
            field="quantization",
        )
    algo = str(section.get("quant_algo") or "")
    method = "modelopt_fp4" if "FP4" in algo.upper() else "modelopt"
    merged = {**section, "producer": data.get("producer"), "quant_method": method}
    return DetectedQuantConfig(method, merged, f"{path} (quantization)", path)


def _labelled(
    data: Mapping[str, Any], *, where: str, default: str | None, path: Path | None
) -> DetectedQuantConfig:
    method = data.get("quant_method", default)
    if method is None:
        raise ConfigError(
            f"{where} has no 'quant_method' key: cannot tell which quantization method wrote "
            "it (expected e.g. 'awq', 'gptq' or 'compressed-tensors')",
            path=path,
            field="quant_method",
        )
    if not isinstance(method, str) or not method.strip():
        raise ConfigError(
            f"{where}: field 'quant_method' = {method!r}: expected a method name",
            path=path,
            field="quant_method",
        )
    return DetectedQuantConfig(method, {**data, "quant_method": method}, where, path)


def flatten_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """One flat dict of a config: a nested ``transformer_layer_config`` (speculators) or
    ``text_config`` (multimodal), overlaid by the top-level keys, as vLLM flattens it."""
    flat: dict[str, Any] = {}
    for section in ("text_config", "transformer_layer_config"):
        nested = config.get(section)
        if isinstance(nested, Mapping):
            flat.update(nested)
    flat.update({k: v for k, v in config.items() if v is not None or k not in flat})
    return flat

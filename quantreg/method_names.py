"""Method names and registry entries: spelling, aliases, the built-ins by import string, and
what a listing reports (``MethodInfo``)."""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from typing import Any

from quantreg.contract import QuantConfig
from quantreg.errors import UnknownMethodError

ENTRY_POINT_GROUP = "quantreg.methods"

BUILTIN = "built-in"

# The explicit alias table, applied to every name before lookup (no general -/_ folding).
NAME_ALIASES: dict[str, str] = {
    "compressed_tensors": "compressed-tensors",
    "cpu_awq": "cpu_wna16",
    "modelopt_fp4": "modelopt",  # vLLM's name for ModelOpt NVFP4; one config reads both
    "intel/auto-round": "auto-round",
}

# Built-in name -> "module:Class", imported on first lookup. Classes live in quantreg.methods.
BUILTIN_METHODS: dict[str, str] = {
    "auto-round": "quantreg.methods.autoround:AutoRoundConfig",
    "awq": "quantreg.methods.awq:AWQConfig",
    "awq_marlin": "quantreg.methods.awq:AWQMarlinConfig",
    "compressed-tensors": "quantreg.methods.compressed_tensors:CompressedTensorsConfig",
    "cpu_wna16": "quantreg.methods.cpu_wna16:CPUWNA16Config",
    "fp8": "quantreg.methods.fp8:Fp8Config",
    "gptq": "quantreg.methods.gptq:GPTQConfig",
    "gptq_marlin": "quantreg.methods.gptq:GPTQMarlinConfig",
    "modelopt": "quantreg.methods.modelopt:ModelOptConfig",
    "unquantized": "quantreg.methods.unquantized:UnquantizedConfig",
}

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


def normalize_name(name: str) -> str:
    """Canonical spelling of a method name: stripped, lower-case, known aliases applied.

    There is deliberately no general ``-``/``_`` folding: ``awq-marlin`` is not ``awq_marlin``.
    """
    if not isinstance(name, str):
        raise UnknownMethodError(f"a quantization method name must be a string, got {name!r}")
    key = name.strip().lower()
    return NAME_ALIASES.get(key, key)


@dataclass(frozen=True)
class MethodInfo:
    """One registry entry as ``list_quant_methods`` reports it."""

    name: str
    aliases: tuple[str, ...]
    source: str
    loaded: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{name, aliases, source, loaded, error}``."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "source": self.source,
            "loaded": self.loaded,
            "error": self.error,
        }


@dataclass
class Entry:
    """One registry entry: a loaded class, a target still to import, or the error it raised."""

    name: str
    aliases: tuple[str, ...]
    source: str
    target: str | None = None  # "module:Class" still to import
    cls: type[QuantConfig] | None = None
    error: str | None = None
    entry_point: importlib.metadata.EntryPoint | None = None


def describe_class(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def names_class(target: str, cls: type) -> bool:
    """Whether ``module:Class`` denotes ``cls``, also when a package re-exports it."""
    module, _, attr = (part.strip() for part in target.partition(":"))
    return cls.__qualname__ == attr and (
        cls.__module__ == module or cls.__module__.startswith(module + ".")
    )

"""quantreg: a pluggable quantization-method registry for serving quantized LLM lm_heads.

The public API is exactly ``__all__``; everything else is internal.
"""

from quantreg._version import __version__
from quantreg.base import LayerRule, LinearMethod, QuantConfig, is_lm_head
from quantreg.errors import (
    CheckpointError,
    ConfigError,
    DuplicateMethodError,
    MethodDefinitionError,
    PluginError,
    QuantregError,
    UnknownMethodError,
)
from quantreg.platform import Platform
from quantreg.registry import (
    MethodInfo,
    get_quant_config_cls,
    list_quant_methods,
    register_quant_method,
)
from quantreg.resolution import Candidate, Resolution, resolve

__all__ = [
    "Candidate",
    "CheckpointError",
    "ConfigError",
    "DuplicateMethodError",
    "LayerRule",
    "LinearMethod",
    "MethodDefinitionError",
    "MethodInfo",
    "Platform",
    "PluginError",
    "QuantConfig",
    "QuantregError",
    "Resolution",
    "UnknownMethodError",
    "__version__",
    "get_quant_config_cls",
    "is_lm_head",
    "list_quant_methods",
    "register_quant_method",
    "resolve",
]

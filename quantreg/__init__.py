"""quantreg: a pluggable quantization-method registry for serving quantized LLM lm_heads.

The public API is exactly ``__all__``; everything else is internal.
"""

from quantreg._version import __version__
from quantreg.base import LayerRule
from quantreg.base import LinearMethod
from quantreg.base import QuantConfig
from quantreg.base import is_lm_head
from quantreg.errors import CheckpointError
from quantreg.errors import ConfigError
from quantreg.errors import DuplicateMethodError
from quantreg.errors import MethodDefinitionError
from quantreg.errors import PluginError
from quantreg.errors import QuantregError
from quantreg.errors import UnknownMethodError
from quantreg.platform import Platform
from quantreg.registry import MethodInfo
from quantreg.registry import get_quant_config_cls
from quantreg.registry import list_quant_methods
from quantreg.registry import register_quant_method
from quantreg.resolution import Candidate
from quantreg.resolution import Resolution
from quantreg.resolution import resolve

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

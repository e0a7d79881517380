"""quantreg: a pluggable quantization-method registry for serving quantized LLM lm_heads.

The public API is exactly the names listed below (plus the documented subpackage
``quantreg.kernels``); everything else is internal. A method plugin needs nothing else: the
contract (``QuantConfig``, ``LinearMethod``, ``Relabel``), the parameter helpers
(``frozen_param``, ``set_weight_attrs``, ``layer_geometry``), and the kernels
(``IntWeights`` -> ``select_kernel`` -> ``Kernel``). The names that import torch
(``ParallelLMHead``, ``load_lm_head``, the writers) load on first access.
"""

# isort: skip_file
import typing

from quantreg._version import __version__
from quantreg.compare import Comparison
from quantreg.compare import compare_heads
from quantreg.compare import compare_logits
from quantreg.contract import LayerRule
from quantreg.contract import LinearMethod
from quantreg.contract import QuantConfig
from quantreg.contract import Relabel
from quantreg.contract import WriterOption
from quantreg.contract import is_lm_head
from quantreg.contract import select_kernel
from quantreg.values import check_finite
from quantreg.decision import resolve
from quantreg.dense import UnquantizedLinearMethod
from quantreg.drafter import DrafterConfig
from quantreg.drafter import has_own_lm_head
from quantreg.drafter import share_lm_head
from quantreg.errors import CheckpointError
from quantreg.errors import ConfigError
from quantreg.errors import DistributedError
from quantreg.errors import DuplicateMethodError
from quantreg.errors import InputError
from quantreg.errors import MethodDefinitionError
from quantreg.errors import PluginError
from quantreg.errors import QuantregError
from quantreg.errors import UnknownMethodError
from quantreg.kernels.packing import pack_codes
from quantreg.kernels.packing import unpack_codes
from quantreg.kernels.selection import Kernel
from quantreg.kernels.weights import IntWeights
from quantreg.parameters import LayerGeometry
from quantreg.parameters import frozen_param
from quantreg.parameters import layer_geometry
from quantreg.parameters import set_weight_attrs
from quantreg.patterns import checked_regex
from quantreg.patterns import dynamic_pattern
from quantreg.patterns import regex_list_problem
from quantreg.patterns import regex_problem
from quantreg.platform import Platform
from quantreg.registry import MethodInfo
from quantreg.registry import Registry
from quantreg.registry import get_quant_config_cls
from quantreg.registry import list_quant_methods
from quantreg.registry import register_quant_method
from quantreg.report import inspect_checkpoint
from quantreg.resolution import Candidate
from quantreg.resolution import Resolution

if typing.TYPE_CHECKING:
    from quantreg.lm_head import ParallelLMHead
    from quantreg.loading import check_lm_head
    from quantreg.loading import load_lm_head
    from quantreg.writers import quantize
    from quantreg.writers import quantize_checkpoint
    from quantreg.writers import write_checkpoint
    from quantreg.writers import writer_params

# Names whose modules import torch: loaded on first access so that `import quantreg`,
# the registry and resolution stay light.
_LAZY = {
    "ParallelLMHead": "quantreg.lm_head",
    "check_lm_head": "quantreg.loading",
    "load_lm_head": "quantreg.loading",
    "quantize": "quantreg.writers",
    "quantize_checkpoint": "quantreg.writers",
    "write_checkpoint": "quantreg.writers",
    "writer_params": "quantreg.writers",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Candidate",
    "CheckpointError",
    "Comparison",
    "ConfigError",
    "DistributedError",
    "DrafterConfig",
    "DuplicateMethodError",
    "InputError",
    "IntWeights",
    "Kernel",
    "LayerGeometry",
    "LayerRule",
    "LinearMethod",
    "MethodDefinitionError",
    "MethodInfo",
    "ParallelLMHead",
    "Platform",
    "PluginError",
    "QuantConfig",
    "QuantregError",
    "Registry",
    "Relabel",
    "Resolution",
    "UnknownMethodError",
    "UnquantizedLinearMethod",
    "WriterOption",
    "__version__",
    "check_finite",
    "check_lm_head",
    "checked_regex",
    "compare_heads",
    "compare_logits",
    "dynamic_pattern",
    "frozen_param",
    "get_quant_config_cls",
    "has_own_lm_head",
    "inspect_checkpoint",
    "is_lm_head",
    "layer_geometry",
    "list_quant_methods",
    "load_lm_head",
    "pack_codes",
    "quantize",
    "quantize_checkpoint",
    "regex_list_problem",
    "regex_problem",
    "register_quant_method",
    "resolve",
    "select_kernel",
    "set_weight_attrs",
    "share_lm_head",
    "unpack_codes",
    "write_checkpoint",
    "writer_params",
]

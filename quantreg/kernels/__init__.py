"""quantreg's kernels: typed weight layouts and the functions that multiply by them.

Nothing here takes a layer. A method decodes its checkpoint tensors into :class:`IntWeights`
(or a :class:`Float8Layout`); :func:`select` picks one named kernel for the activation dtype and
the device -- recording why every other kernel declined -- and builds that kernel's layout
straight from the weights; the layer then calls the returned :class:`Kernel`.

Layouts (frozen dataclasses of tensors): :class:`KPackedLayout` (reference and Triton),
:class:`CPUBlockedLayout` (quantreg's CPU kernel), :class:`CPUFloat8Layout` (its AVX2 float8
kernel), :class:`TorchInt4Layout` /
:class:`TorchInt8Layout` (torch's weight-only ops), :class:`Float8Layout`.

Importing this package is light: each module (and torch, Triton, the C++ extension) loads on
first use of one of its names.
"""

from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:
    from quantreg.kernels.cpu import CPUBlockedLayout, CPUPath
    from quantreg.kernels.cpu_float8 import CPUFloat8Layout
    from quantreg.kernels.layouts import Float8Layout, KPackedLayout, ScaleFactor
    from quantreg.kernels.packing import pack_codes, unpack_codes
    from quantreg.kernels.reference import dequantize
    from quantreg.kernels.selection import (
        ACTIVATION_DTYPES,
        Kernel,
        KernelChoice,
        check_activation_dtype,
        check_kernel_activations,
        choose,
        kernel_names,
        select,
    )
    from quantreg.kernels.torch_ops import TorchInt4Layout, TorchInt8Layout
    from quantreg.kernels.triton_wna16 import wna16_matmul
    from quantreg.kernels.weights import IntWeights

_NAMES = {
    "ACTIVATION_DTYPES": "selection",
    "CPUBlockedLayout": "cpu",
    "CPUFloat8Layout": "cpu_float8",
    "CPUPath": "cpu",
    "Float8Layout": "layouts",
    "IntWeights": "weights",
    "KPackedLayout": "layouts",
    "Kernel": "selection",
    "KernelChoice": "selection",
    "ScaleFactor": "layouts",
    "TorchInt4Layout": "torch_ops",
    "TorchInt8Layout": "torch_ops",
    "check_activation_dtype": "selection",
    "check_kernel_activations": "selection",
    "choose": "selection",
    "dequantize": "reference",
    "kernel_names": "selection",
    "pack_codes": "packing",
    "select": "selection",
    "unpack_codes": "packing",
    "wna16_matmul": "triton_wna16",
}


def __getattr__(name: str) -> object:
    if name in _NAMES:
        value = getattr(importlib.import_module(f"quantreg.kernels.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantreg.kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})


__all__ = [
    "ACTIVATION_DTYPES",
    "CPUBlockedLayout",
    "CPUFloat8Layout",
    "CPUPath",
    "Float8Layout",
    "IntWeights",
    "KPackedLayout",
    "Kernel",
    "KernelChoice",
    "ScaleFactor",
    "TorchInt4Layout",
    "TorchInt8Layout",
    "check_activation_dtype",
    "check_kernel_activations",
    "choose",
    "dequantize",
    "kernel_names",
    "pack_codes",
    "select",
    "unpack_codes",
    "wna16_matmul",
]

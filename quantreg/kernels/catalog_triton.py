"""The Triton kernels' rows of the catalogue (``triton``, ``triton-float8``): why each may
decline a layer, how its layout is built and how it runs. Triton is imported only when one of
them is built or run (or asked whether the interpreter is on)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantreg.kernels.layouts import Float8Layout
from quantreg.kernels.target import Target, Weights
from quantreg.kernels.weights import IntWeights

if TYPE_CHECKING:
    import torch


def decline_triton(t: Target) -> str | None:
    if not isinstance(t.weights, IntWeights):
        return "runs integer (int4 / int8) weights only"
    return triton_device(t, "triton")


def triton_device(t: Target, name: str) -> str | None:
    """Why Triton kernel ``name`` cannot run on ``t``'s device: CUDA >= 8.0 with triton, or
    a CPU through the interpreter when the kernel is requested by name (tests, bench smoke)."""
    import importlib.util

    if t.device.type == "cpu":
        if t.requested != name:
            return "runs on CUDA (on a CPU only through TRITON_INTERPRET=1, when requested)"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'quantreg[gpu]')"
        from quantreg.kernels.triton_wna16 import interpreting

        return None if interpreting() else "on a CPU it needs TRITON_INTERPRET=1"
    if t.device.type != "cuda":
        return f"runs on CUDA; the layer is on {t.device}"
    if not t.platform.has_cuda((8, 0)):
        return f"needs CUDA compute capability >= 8.0; the device is {t.platform}"
    if not t.platform.triton:
        return "triton is not installed (pip install 'quantreg[gpu]')"
    return None


def decline_triton_float8(t: Target) -> str | None:
    import torch

    if not isinstance(t.weights, Float8Layout):
        return "runs float8 / fp4 (Float8Layout) weights only"
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32 activations, not {t.dtype}"
    for what, dtype in (("scales", t.weights.scale_dtype), ("round_to", t.weights.round_to)):
        if dtype not in (None, torch.float16, torch.bfloat16, torch.float32):
            return f"rounds to float16, bfloat16 or float32; the {what} are {dtype}"
    return triton_device(t, "triton-float8")


def run_triton(x: torch.Tensor, layout: Any) -> torch.Tensor:
    from quantreg.kernels.triton_wna16 import triton_matmul

    return triton_matmul(x, layout)


def build_triton_float8(weights: Weights, dtype: torch.dtype) -> Any:
    from quantreg.kernels.triton_float8 import TritonFloat8Layout

    assert isinstance(weights, Float8Layout)
    return TritonFloat8Layout.build(weights)


def run_triton_float8(x: torch.Tensor, layout: Any) -> torch.Tensor:
    from quantreg.kernels.triton_float8 import triton_float8_matmul

    return triton_float8_matmul(x, layout)

"""The catalogue of kernels: for each, why it may decline a layer, how to build its layout from
the weights, and how to run it. :mod:`quantreg.kernels.selection` tries them in this order.

Kernel modules are imported on first use, so that listing the kernels imports no compiler,
no Triton and no C++ extension.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantreg.kernels import catalog_triton as triton
from quantreg.kernels.layouts import Float8Layout, KPackedLayout
from quantreg.kernels.target import HALF, Target, Weights
from quantreg.kernels.weights import IntWeights
from quantreg.platform import probe_cpu_isa

if TYPE_CHECKING:
    import torch

__all__ = ["HALF", "KERNELS", "KernelDef", "Target", "Weights", "cpu_path"]


@dataclass(frozen=True)
class KernelDef:
    """One kernel: its name, what it computes, why it may decline, how to build and run it,
    and the activations it multiplies (None: float, as they come -- weight-only; ``int8``:
    quantized per row first, only when asked for)."""

    name: str
    summary: str
    decline: Callable[[Target], str | None]
    build: Callable[[Weights, torch.dtype], Any]
    run: Callable[[torch.Tensor, Any], torch.Tensor]
    activation_dtype: str | None = None

    def declines(self, target: Target) -> str | None:
        """Why this kernel cannot run ``target`` (None: it can): the activations asked for
        first, then its own conditions."""
        return self.other_activations(target) or self.decline(target)

    def other_activations(self, target: Target) -> str | None:
        """Why this kernel does not multiply the activations ``target`` asks for (None: it
        does)."""
        if self.activation_dtype == target.activation_dtype:
            return None
        if target.activation_dtype is None:
            return (
                f"multiplies {self.activation_dtype} activations (quantized per row); "
                f"opt in with activation_dtype='{self.activation_dtype}'"
            )
        return (
            f"keeps the activations in float (weight-only); "
            f"activation_dtype='{target.activation_dtype}' was asked for"
        )


def _on_cpu(t: Target) -> str | None:
    if t.device.type != "cpu":
        return f"runs on the CPU; the layer is on {t.device}"
    if not isinstance(t.weights, IntWeights):
        return "runs integer (int4 / int8) weights only"
    return None


def _quantreg_cpu(t: Target, isa: tuple[str, ...], env: tuple[str, ...] = ()) -> str | None:
    from quantreg.kernels import cpu

    why = _on_cpu(t)
    if why is not None:
        return why
    assert isinstance(t.weights, IntWeights)
    why = cpu.CPUBlockedLayout.fits(t.weights)
    if why is not None:
        return why
    flags = t.platform.cpu_isa if t.platform.cpu_isa is not None else probe_cpu_isa()
    missing = [f for f in (*cpu.BASE_FLAGS, *isa) if f not in flags]
    if missing:
        return f"this CPU lacks {'/'.join(missing)}"
    for var in ("QUANTREG_NO_CPU_KERNELS", *env):
        if os.environ.get(var):
            return f"{var} is set"
    return cpu.unavailable_reason()  # builds the extension once, if it is not built yet


def _cpu_half(t: Target, isa: tuple[str, ...], env: tuple[str, ...]) -> str | None:
    if not t.half:
        return "takes bf16 / fp16 activations; float32 heads take the exact FMA path (cpu-avx512)"
    return _quantreg_cpu(t, isa, env)


def _decline_amx(t: Target) -> str | None:
    from quantreg.kernels import cpu

    why = _cpu_half(t, (*cpu.BF16_FLAGS, *cpu.AMX_FLAGS), ("QUANTREG_NO_BF16", "QUANTREG_NO_AMX"))
    if why is None and not cpu.amx_ready():
        return "the OS refused this process the AMX tile state"
    return why


def _decline_bf16(t: Target) -> str | None:
    from quantreg.kernels import cpu

    return _cpu_half(t, cpu.BF16_FLAGS, ("QUANTREG_NO_BF16",))


def _decline_fma(t: Target) -> str | None:
    return _quantreg_cpu(t, ())


def _int_unit(t: Target, module: str) -> str | None:
    """Why a build of the int unit -- ``cpu_avx2`` (``cpu-avx2-wna16``, ``cpu-avx2-a8``) or
    ``cpu_vnni`` (``cpu-vnni-wna16``, ``cpu-vnni-a8``): one source, one layout -- cannot run
    ``t``'s integer weights on this CPU."""
    from quantreg.kernels import cpu_avx2

    assert isinstance(t.weights, IntWeights)
    unit = importlib.import_module(f"quantreg.kernels.{module}")
    return _unit_declines(t, unit, cpu_avx2.AVX2IntLayout.fits(t.weights))


def _decline_int(module: str) -> Callable[[Target], str | None]:
    """The weight-only kernel of the int unit's build ``module``: bf16 / fp16 heads only."""

    def decline(t: Target) -> str | None:
        why = _on_cpu(t)
        if why is not None:
            return why
        if not t.half:
            return (
                "takes bf16 / fp16 activations (it does not round the weights to the scale "
                "dtype); float32 heads get the producers' exact weights"
            )
        return _int_unit(t, module)

    return decline


def _decline_a8(module: str) -> Callable[[Target], str | None]:
    """The int8-activation kernel of the int unit's build ``module``: any activation dtype."""
    return lambda t: _on_cpu(t) or _int_unit(t, module)


def _unit_declines(t: Target, module: Any, unfit: str | None) -> str | None:
    """Why a kernel of its own unit (``cpu_avx2``, ``cpu_vnni``, ``cpu_float8``,
    ``cpu_float8_avx512``) cannot run the weights its layout takes (``unfit``: why the layout
    cannot take them, or None)."""
    if unfit is not None:
        return unfit
    flags = t.platform.cpu_isa if t.platform.cpu_isa is not None else probe_cpu_isa()
    why = module.not_here(flags)
    if why is not None:
        return why
    return module.unavailable_reason()  # builds the extension once, if it is not built yet


def _build_avx2_int(weights: Weights, dtype: torch.dtype) -> Any:
    from quantreg.kernels.cpu_avx2 import AVX2IntLayout

    assert isinstance(weights, IntWeights)
    return AVX2IntLayout.build(weights)


def _torch_op(t: Target, op: str, fits: Callable[[IntWeights], str | None]) -> str | None:
    from quantreg.kernels import torch_ops

    why = _on_cpu(t)
    if why is not None:
        return why
    if not t.half:
        return (
            "serves bf16 / fp16 heads only: torch adds zero points as floats, and float32 "
            "heads get the producers' exact weights"
        )
    if not torch_ops.has_op(op):
        return f"this torch has no torch.ops.aten.{op}"
    assert isinstance(t.weights, IntWeights)
    return fits(t.weights)


def _decline_int4(t: Target) -> str | None:
    from quantreg.kernels import torch_ops

    return _torch_op(t, torch_ops.INT4_OP, torch_ops.TorchInt4Layout.fits)


def _decline_int8(t: Target) -> str | None:
    from quantreg.kernels import torch_ops

    return _torch_op(t, torch_ops.INT8_OP, torch_ops.TorchInt8Layout.fits)


def _decline_float8(module: str) -> Callable[[Target], str | None]:
    """The float8 kernel of the build ``module``: ``cpu_float8`` (``cpu-avx2-float8``) or
    ``cpu_float8_avx512`` (``cpu-avx512-float8``), one layout."""

    def decline(t: Target) -> str | None:
        from quantreg.kernels import cpu_float8

        if t.device.type != "cpu":
            return f"runs on the CPU; the layer is on {t.device}"
        if not isinstance(t.weights, Float8Layout):
            return "runs float8 (fp8 / nvfp4) weights only"
        if not t.half:
            return "takes bf16 / fp16 activations; float32 heads take the exact reference kernel"
        unit = importlib.import_module(f"quantreg.kernels.{module}")
        return _unit_declines(t, unit, cpu_float8.CPUFloat8Layout.fits(t.weights))

    return decline


def _build_float8(weights: Weights, dtype: torch.dtype) -> Any:
    from quantreg.kernels.cpu_float8 import CPUFloat8Layout

    assert isinstance(weights, Float8Layout)
    return CPUFloat8Layout.build(weights)


def _build_cpu(weights: Weights, dtype: torch.dtype) -> Any:
    from quantreg.kernels.cpu import CPUBlockedLayout

    assert isinstance(weights, IntWeights)
    return CPUBlockedLayout.build(weights)


def _build_kpacked(weights: Weights, dtype: torch.dtype) -> Any:
    if isinstance(weights, Float8Layout):
        return weights
    return KPackedLayout.build(weights)


def cpu_path(kernel: str, dtype: torch.dtype, rows: int) -> Any:
    """The CPU kernel's path for one call of the named ``cpu-*`` kernel: float32 activations
    (and every call of ``cpu-avx512``) take the exact FMA path; bf16 / fp16 take ``vdpbf16ps``
    for one row and, for ``cpu-amx``, AMX for two rows or more."""
    import torch

    from quantreg.kernels.cpu import CPUPath

    if dtype == torch.float32 or kernel == "cpu-avx512":
        return CPUPath.FMA
    return CPUPath.AMX if kernel == "cpu-amx" and rows > 1 else CPUPath.BF16_DOT


def _run_cpu(kernel: str) -> Callable[[torch.Tensor, Any], Any]:
    def run(x: torch.Tensor, layout: Any) -> torch.Tensor:
        from quantreg.kernels.cpu import cpu_matmul

        return cpu_matmul(x, layout, cpu_path(kernel, x.dtype, x.shape[0]))

    return run


def _run_reference(x: torch.Tensor, layout: Any) -> torch.Tensor:
    from quantreg.kernels.reference import float8_matmul, reference_matmul

    if isinstance(layout, Float8Layout):
        return float8_matmul(x, layout)
    return reference_matmul(x, layout)


def _build_torch(kind: str) -> Callable[[Weights, torch.dtype], Any]:
    def make(weights: Weights, dtype: torch.dtype) -> Any:
        from quantreg.kernels import torch_ops

        assert isinstance(weights, IntWeights)
        cls = torch_ops.TorchInt4Layout if kind == "int4" else torch_ops.TorchInt8Layout
        return cls.build(weights, dtype)

    return make


def _deferred(module: str, name: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``quantreg.kernels.<module>.<name>(x, layout)``: the module imported by the first call
    (see the module doc), the function kept for the calls after it. An import statement in a
    run function costs about 15 µs a call on the caches a decode step leaves (the weights have
    just streamed through them): half a percent of an int4 head's call at M = 1."""
    found: Callable[[torch.Tensor, Any], torch.Tensor] | None = None

    def run(x: torch.Tensor, layout: Any) -> torch.Tensor:
        nonlocal found
        if found is None:
            found = getattr(importlib.import_module(f"quantreg.kernels.{module}"), name)
        return found(x, layout)

    return run


KERNELS: dict[str, KernelDef] = {
    k.name: k
    for k in (
        KernelDef(
            "cpu-amx",
            "quantreg's CPU kernel: AMX tdpbf16ps for 2 or more rows, AVX512-BF16 vdpbf16ps "
            "for one; bf16 activations, float32 accumulation",
            _decline_amx, _build_cpu, _run_cpu("cpu-amx"),
        ),
        KernelDef(
            "cpu-vnni-wna16",
            "quantreg's int4 / int8 CPU kernel for AVX512-VNNI: cpu-avx2-wna16's layout and "
            "sums, its integer multiply-adds as vpdpwssd on 512-bit registers",
            _decline_int("cpu_vnni"), _build_avx2_int, _deferred("cpu_vnni", "vnni_int_matmul"),
        ),
        KernelDef(
            "cpu-avx512-bf16",
            "quantreg's CPU kernel: AVX512-BF16 vdpbf16ps; bf16 activations, float32 "
            "accumulation",
            _decline_bf16, _build_cpu, _run_cpu("cpu-avx512-bf16"),
        ),
        KernelDef(
            "cpu-avx2-wna16",
            "quantreg's int4 / int8 CPU kernel for AVX2 + FMA: bf16 / fp16 rows in int16 "
            "fixed point (integer multiply-adds; a row whose int16 rounding would exceed "
            "its own at its RMS takes the float32 FMA path), zero points and scales once per "
            "group",
            _decline_int("cpu_avx2"), _build_avx2_int, _deferred("cpu_avx2", "avx2_int_matmul"),
        ),
        KernelDef(
            "cpu-vnni-a8",
            "quantreg's int4 / int8 CPU kernel for AVX512-VNNI with int8 activations (opt-in, "
            "as cpu-avx2-a8): vpdpbusd on the unsigned codes",
            _decline_a8("cpu_vnni"), _build_avx2_int, _deferred("cpu_vnni", "vnni_a8_matmul"),
            "int8",
        ),
        KernelDef(
            "cpu-avx2-a8",
            "quantreg's int4 / int8 CPU kernel for AVX2 with int8 activations (opt-in: "
            "quantized per row, dynamic and symmetric, then integer multiply-adds); "
            "bf16 / fp16 / float32 activations in and out",
            _decline_a8("cpu_avx2"), _build_avx2_int, _deferred("cpu_avx2", "avx2_a8_matmul"),
            "int8",
        ),
        KernelDef(
            "torch-int4pack", "torch's _weight_int4pack_mm_for_cpu (zero points as floats)",
            _decline_int4, _build_torch("int4"), _deferred("torch_ops", "int4_matmul"),
        ),
        KernelDef(
            "torch-int8pack", "torch's _weight_int8pack_mm",
            _decline_int8, _build_torch("int8"), _deferred("torch_ops", "int8_matmul"),
        ),
        KernelDef(
            "cpu-avx512",
            "quantreg's CPU kernel: float32 FMA on the producers' weights (each rounded to "
            "the scale dtype)",
            _decline_fma, _build_cpu, _run_cpu("cpu-avx512"),
        ),
        KernelDef(
            "cpu-avx512-float8",
            "quantreg's float8 CPU kernel for AVX512-BF16: cpu-avx2-float8's layout, the codes "
            "looked up as bf16 and multiplied by vdpbf16ps (exact products, float32 sums, "
            "scales once per group); bf16 / fp16 activations",
            _decline_float8("cpu_float8_avx512"), _build_float8,
            _deferred("cpu_float8_avx512", "avx512_float8_matmul"),
        ),
        KernelDef(
            "cpu-avx2-float8",
            "quantreg's float8 CPU kernel: AVX2 FMA on fp8 (1 byte) or e2m1 (4 bits) codes "
            "decoded in registers, scales in float32; bf16 / fp16 activations, float32 "
            "accumulation",
            _decline_float8("cpu_float8"), _build_float8,
            _deferred("cpu_float8", "float8_cpu_matmul"),
        ),
        KernelDef(
            "triton", "quantreg's Triton kernel over the k-packed layout, float32 accumulation",
            triton.decline_triton, _build_kpacked, triton.run_triton,
        ),
        KernelDef(
            "triton-float8",
            "quantreg's Triton kernel over float8 / packed e2m1 bytes (fp8 tensor, channel and "
            "block scales, NVFP4 groups), float32 accumulation",
            triton.decline_triton_float8, triton.build_triton_float8, triton.run_triton_float8,
        ),
        KernelDef(
            "reference",
            "exact block-wise dequantization (128 input rows at a time), float32 accumulation",
            lambda t: None, _build_kpacked, _run_reference,
        ),
    )
}  # fmt: skip

"""quantreg's int4 / int8 CPU kernel for AVX512-VNNI: the AVX2 int kernel's source
(``wna16_avx2_kernel.cpp``) built again with ``QR_VNNI``, kernels ``cpu-vnni-wna16`` (bf16 /
fp16 rows in int16 fixed point, ``vpdpwssd``) and ``cpu-vnni-a8`` (int8 activations, opt-in,
``vpdpbusd``).

The same layout (:class:`~quantreg.kernels.cpu_avx2.AVX2IntLayout`), the same entry points and
the same sums as the AVX2 build: only the integer inner loop differs. A unit of 16 outputs is one
512-bit register, one instruction multiplies and adds where AVX2 takes two, and a pass takes 8
rows of x instead of 4. Outlier rows take the same float32 FMA path. Why a second build and not
functions with target attributes in the first: a unit's flags apply to all of it (see
:mod:`quantreg.kernels.cpu_build`), and the AVX2 build must run on CPUs without AVX-512.

Built and cached like the other CPU kernels (kernel ``wna16_vnni``), declined with a reason
where it cannot run (no AVX-512 F/BW/VL/VNNI, ``QUANTREG_NO_CPU_KERNELS``, no compiler).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from quantreg.kernels import cpu_build
from quantreg.kernels.cpu_avx2 import AVX2IntLayout, int16_row_limit, run_int_mm
from quantreg.platform import probe_cpu_isa

if TYPE_CHECKING:
    import torch

    from quantreg.kernels.cpu import Warmup

logger = logging.getLogger(__name__)

# what the build is compiled for, as /proc/cpuinfo names the flags
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")

_lock = threading.Lock()
_state: dict[str, Any] = {}


def not_here(flags: frozenset[str] | None = None) -> str | None:
    """Why this process must not build or run the kernel (None: it may)."""
    missing = [f for f in FLAGS if f not in (probe_cpu_isa() if flags is None else flags)]
    if missing:
        return f"this CPU lacks {'/'.join(missing)}"
    if os.environ.get("QUANTREG_NO_CPU_KERNELS"):
        return "QUANTREG_NO_CPU_KERNELS is set"
    return None


def extension() -> Any | None:
    """The compiled extension (built once per process, cached on disk), or None."""
    return cpu_build.build_once(
        _state, _lock, "wna16_vnni", not_here, "AVX512-VNNI int4 / int8 kernel",
        "quantreg's AVX512-VNNI int4 / int8 CPU kernel unavailable (%s); kernel selection "
        "declines it", logger,
    )  # fmt: skip


def unavailable_reason() -> str | None:
    """Why :func:`extension` is None (None when the kernel is built)."""
    extension()
    return _state["reason"]


def warmup() -> Warmup:
    """Build (or load) the kernel now, so that no int4 / int8 head load waits for the
    compiler."""
    from quantreg.kernels.cpu import warm

    return warm(not_here, "wna16_vnni", extension, unavailable_reason)


def vnni_int_matmul(x: torch.Tensor, layout: AVX2IntLayout) -> torch.Tensor:
    """:func:`~quantreg.kernels.cpu_avx2.avx2_int_matmul` on this build (``cpu-vnni-wna16``):
    bf16 / fp16 rows within ``int16_row_limit`` in int16 fixed point, the others on the float32
    FMA path; the result in ``x``'s dtype, the AVX2 build's to the bit.

    Raises:
        RuntimeError: the kernel is unavailable (selection declines it first).
    """
    limit = int16_row_limit(x.dtype)
    return run_int_mm(_module(), x, layout, 16 if limit else 0, limit)


def vnni_a8_matmul(x: torch.Tensor, layout: AVX2IntLayout) -> torch.Tensor:
    """:func:`~quantreg.kernels.cpu_avx2.avx2_a8_matmul` on this build (``cpu-vnni-a8``): ``x``
    quantized to int8 per row first (opt-in), multiplied by the unsigned codes with
    ``vpdpbusd``.

    Raises:
        RuntimeError: the kernel is unavailable (selection declines it first).
    """
    return run_int_mm(_module(), x, layout, 8, 0.0)


def _module() -> Any:
    module = extension()
    if module is None:
        raise RuntimeError(
            f"quantreg's AVX512-VNNI int kernel is unavailable: {unavailable_reason()}"
        )
    return module

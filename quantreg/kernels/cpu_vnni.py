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
from typing import TYPE_CHECKING

from quantreg.kernels.cpu_avx2 import AVX2IntLayout, int16_row_limit, run_int_mm
from quantreg.kernels.cpu_unit import KernelUnit
from quantreg.platform import probe_cpu_isa

if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

# what the build is compiled for, as /proc/cpuinfo names the flags
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")

# the extension: UNIT.not_here(flags), .extension(), .unavailable_reason(), .warmup()
UNIT = KernelUnit(
    "wna16_vnni", FLAGS, "AVX512-VNNI int4 / int8 kernel",
    "quantreg's AVX512-VNNI int4 / int8 CPU kernel unavailable (%s); kernel selection "
    "declines it", logger, lambda: probe_cpu_isa(),  # looked up when called: tests replace it
)  # fmt: skip
not_here, extension = UNIT.not_here, UNIT.extension
unavailable_reason, warmup = UNIT.unavailable_reason, UNIT.warmup


def vnni_int_matmul(x: torch.Tensor, layout: AVX2IntLayout) -> torch.Tensor:
    """:func:`~quantreg.kernels.cpu_avx2.avx2_int_matmul` on this build (``cpu-vnni-wna16``):
    bf16 / fp16 rows within ``int16_row_limit`` in int16 fixed point, the others on the float32
    FMA path; the result in ``x``'s dtype, the AVX2 build's to the bit.

    Raises:
        RuntimeError: the kernel is unavailable (selection declines it first).
    """
    limit = int16_row_limit(x.dtype)
    return run_int_mm(UNIT.loaded(), x, layout, 16 if limit else 0, limit)


def vnni_a8_matmul(x: torch.Tensor, layout: AVX2IntLayout) -> torch.Tensor:
    """:func:`~quantreg.kernels.cpu_avx2.avx2_a8_matmul` on this build (``cpu-vnni-a8``): ``x``
    quantized to int8 per row first (opt-in), multiplied by the unsigned codes with
    ``vpdpbusd``.

    Raises:
        RuntimeError: the kernel is unavailable (selection declines it first).
    """
    return run_int_mm(UNIT.loaded(), x, layout, 8, 0.0)

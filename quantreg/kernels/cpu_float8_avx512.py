"""quantreg's float8 / fp4 weight-only CPU kernel for AVX512-BF16 (``float8_avx512_kernel.cpp``,
kernel ``cpu-avx512-float8``).

It reads the AVX2 float8 kernel's layout (:class:`~quantreg.kernels.cpu_float8.CPUFloat8Layout`:
fp8 codes a byte a weight, NVFP4's e2m1 codes four bits, group scales per 16 outputs) and
multiplies with ``vdpbf16ps``: 32 multiply-adds an instruction on bf16 pairs, where the AVX2
kernel's float32 FMA takes 16 (8 on 256-bit registers, two a cycle on AVX2 machines). An fp8 or
e2m1 value is a bf16 exactly, so each code is looked up as its bf16 (VBMI byte permutes: no
table in memory). Up to 4 rows (bf16 parts, below) multiply each 64 bytes of codes as they are
decoded; more rows share the weights decoded once per 256 rows and 32 outputs into an L1
buffer. Both paths sum a row's products in the same order, so a row's logits are the same bits
whichever rows share its call (batch-invariant; the AVX2 kernel's are not, in float32).

Precision: every product of a weight and an activation is exact and summed in float32 per
group, then scaled -- as the AVX2 kernel, which scales first, it does not round the weights to
the scale dtype (see :mod:`~quantreg.kernels.cpu_float8`), so it serves bf16 / fp16 heads
(selection declines float32 ones). Activations go in as bf16 parts whose sum is the value
exactly: one for bf16, two for fp16 (10-bit mantissas), three for float32 -- each part multiplies
as a row of its own. ``vdpbf16ps`` treats bf16 denormals (below 2^-126) as zero, and a float32
value within half a bf16 step of the float32 maximum rounds to infinity in its first part.

Built and cached like the other CPU kernels (kernel ``float8_avx512``), declined with a reason
where it cannot run (no AVX-512 F/BW/VL/VBMI/BF16, ``QUANTREG_NO_CPU_KERNELS``, no compiler).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from quantreg.kernels.cpu_float8 import CPUFloat8Layout, run_float8_mm
from quantreg.kernels.cpu_unit import KernelUnit
from quantreg.platform import probe_cpu_isa

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# what the build is compiled for, as /proc/cpuinfo names the flags
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bf16")

# the extension: UNIT.not_here(flags), .extension(), .unavailable_reason(), .warmup()
UNIT = KernelUnit(
    "float8_avx512", FLAGS, "AVX512-BF16 float8 kernel",
    "quantreg's AVX512-BF16 float8 CPU kernel unavailable (%s); kernel selection declines it",
    logger, lambda: probe_cpu_isa(),  # looked up when called: tests replace it
)  # fmt: skip
not_here, extension = UNIT.not_here, UNIT.extension
unavailable_reason, warmup = UNIT.unavailable_reason, UNIT.warmup


def avx512_float8_matmul(x: torch.Tensor, layout: CPUFloat8Layout) -> torch.Tensor:
    """``x [M, K]`` (features in the layout's column order) ``@ W.T`` in ``x``'s dtype (bf16,
    fp16 or float32), at most ``cpu_build.X_TILE_BYTES`` of ``x`` (as float32) a kernel call.

    Raises:
        RuntimeError: the kernel is unavailable (selection declines it first).
    """
    return run_float8_mm(UNIT.loaded().float8_512_mm, x, layout)

"""quantreg's float8 / fp4 weight-only CPU kernel (``float8_kernel.cpp``, AVX2 + FMA + F16C).

It runs every :class:`~quantreg.kernels.layouts.Float8Layout` head with bf16 / fp16
activations on CPUs without AVX512-BF16 (those with it run the same layout on
:mod:`~quantreg.kernels.cpu_float8_avx512`), without ever holding the float weight: built and cached
like the int kernel (:mod:`quantreg.kernels.cpu_build`, kernel ``float8``), declined with a
reason where it cannot run (no AVX2/FMA/F16C, ``QUANTREG_NO_CPU_KERNELS``, no compiler).

Layout (:class:`CPUFloat8Layout`), built once after loading, 16 outputs per block, K-major:

* fp8: one byte a weight, the e4m3 code itself (byte ``16k + o`` of a block: output ``o``,
  row ``k``), decoded through fp16 by bit shifts (see the C++ source);
* fp4: when every value is one of +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} -- the e2m1 grid, as
  compressed-tensors' and ModelOpt's NVFP4 heads hold them -- and K and the group size are
  multiples of 4: four bits a weight, 32 bytes a step of four rows (byte ``b`` of a step: the
  codes at :data:`FP4_STEP_INDEX` ``[b]`` of its first two rows in the low nibble, of its last
  two in the high one), found by a check at build time, lossless;
* scales: float32 ``[N/16, G, 16]`` (the checkpoint's scales, exact in float32; fp8 ones
  times 2^8, the factor the fp16 decoding leaves out). NVFP4 scales are e4m3 codes divided by
  one global scale; when every scale is such a code times one float32 (to 2^-20, checked at
  build), fp4 heads keep the codes, a byte each, and the multiplier: a quarter of the bytes
  float32 scales take, whose reading would otherwise cost a third of an NVFP4 call.

Precision: weights are the float8 values times the float32 scale, summed in float32. The
reference rounds every dequantized weight to the scale dtype (compressed-tensors' NVFP4: to
bfloat16) before multiplying; this kernel does not (at most 2^-9 relative per weight in bf16),
which is why it serves bf16 / fp16 activations only: float32 heads keep the exact kernel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantreg.kernels import cpu_build
from quantreg.kernels.cpu_unit import KernelUnit
from quantreg.kernels.layouts import Float8Layout, LayoutTensors, column_blocks, e2m1_codes
from quantreg.platform import probe_cpu_isa

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NB = 16  # outputs per block: two AVX2 registers of float32
FLAGS = cpu_build.FLOAT8_FLAGS  # avx2, fma, f16c
ROW_CHUNK = 256  # vocab rows converted per step at build time
FP8_SHIFT = 256.0  # the fp16 decoding yields value * 2^-8
FP4_STEP = 4  # rows of a block in one 32-byte fp4 step
# Byte b of an fp4 step holds, in each nibble, code FP4_STEP_INDEX[b] of two rows x 16 outputs
# (row-major). The decoding's byte unpacks work within 128-bit lanes and leave two bfloat16
# words in each 32-bit lane, even then odd: byte b lands in lane b // 16, word b % 8 of the
# unpack of bytes 0-7 (b % 16 < 8, the first row) or 8-15 (the second row), and even words
# make outputs 0-7, odd ones 8-15, four from each lane.
FP4_STEP_INDEX = tuple(
    (b % 16) // 8 * 16 + (b % 2) * 8 + 4 * (b // 16) + (b % 8) // 2 for b in range(32)
)
# Scales made and checked per step: few enough that each step's small ops stay under torch's
# parallel grain (32768) and run on the calling thread (a thread team woken per op costs more
# than the op, whole seconds a load on a busy machine), and bound the temporaries to 64 KiB.
SCALE_CHUNK = 1 << 14
SCALE_TOLERANCE = 2.0**-20  # relative: e4m3 scale codes times the multiplier vs the scales
# e4m3 mantissas for the largest scale (1.75: the 448 NVFP4 producers scale to), tried in turn
SCALE_MANTISSAS = (1.75, 1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.875)

# the extension: UNIT.not_here(flags), .extension(), .unavailable_reason(), .warmup()
UNIT = KernelUnit(
    "float8", FLAGS, "float8 kernel",
    "quantreg's float8 CPU kernel unavailable (%s); kernel selection declines it", logger,
    lambda: probe_cpu_isa(),  # looked up when called: tests replace it
)  # fmt: skip
not_here, extension = UNIT.not_here, UNIT.extension
unavailable_reason, warmup = UNIT.unavailable_reason, UNIT.warmup


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.pad(t, (0, 0, 0, -t.shape[0] % NB))


def _pack(values: torch.Tensor, try_fp4: bool) -> tuple[torch.Tensor, bool]:
    """The codes of float8 ``values [N, K]`` in the kernel's layout, and whether they are fp4:
    in one pass by the extension (fp4 first when ``try_fp4``, fp8 when a value is off the e2m1
    grid), else ``ROW_CHUNK`` rows at a time in torch."""
    import torch

    module = extension()
    if module is None:
        return _pack_torch(values, try_fp4)
    raw = values.view(torch.uint8).contiguous()
    blocks = -(-values.shape[0] // NB)
    for fp4, width in ((True, NB // 2), (False, NB))[0 if try_fp4 else 1 :]:
        codes = torch.empty((blocks, values.shape[1] * width), dtype=torch.uint8)
        if module.float8_pack(raw, codes, fp4):
            return codes, fp4
    raise AssertionError("float8_pack refused fp8 codes")  # unreachable: fp8 always packs


def _pack_torch(values: torch.Tensor, try_fp4: bool) -> tuple[torch.Tensor, bool]:
    """:func:`_pack` without the extension (the same bytes)."""
    import torch

    n = values.shape[0]
    chunks = [_pad_rows(values[r : r + ROW_CHUNK]) for r in range(0, n, ROW_CHUNK)]
    blocks: list[torch.Tensor] = []
    for chunk in chunks if try_fp4 else ():
        block = _block_codes(chunk, fp4=True)
        if block is None:
            break
        blocks.append(block)
    fp4 = len(blocks) == len(chunks)
    if not fp4:
        blocks = [_block_codes(c, fp4=False) for c in chunks]  # type: ignore[misc]
    return torch.cat(blocks), fp4


def _block_codes(values: torch.Tensor, fp4: bool) -> torch.Tensor | None:
    """Rows ``[r, K]`` of float8 values (r a multiple of 16) as blocks ``[r/16, bytes]``;
    None when ``fp4`` and a value is off the e2m1 grid."""
    import torch

    r, k = values.shape
    if not fp4:
        c = values.view(torch.uint8).reshape(r // NB, NB, k).transpose(1, 2)
        return c.reshape(r // NB, k * NB)
    codes = e2m1_codes(values.view(torch.uint8))
    if codes is None:
        return None
    c = codes.reshape(r // NB, NB, k).transpose(1, 2).reshape(r // NB, k // FP4_STEP, 2, 32)
    c = c[..., list(FP4_STEP_INDEX)]
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(r // NB, k * NB // 2)


def scale_codes(scales: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """``scales`` ``[G, N]`` as e4m3 codes (uint8, same shape) and one multiplier such that
    code value x multiplier is every scale within :data:`SCALE_TOLERANCE`, or None when there
    is none.

    NVFP4 producers store e4m3 group scales and one global scale, and divide; loaders hand
    the kernels the quotient. Its largest scale is an e4m3 value times the multiplier: this
    tries the eight e4m3 mantissas for it (first 1.75, the 448 the producers scale to), each
    on a sample before the whole tensor.
    """
    import torch

    return _scale_codes(
        tuple(scales.shape), lambda g0, g1, c0, c1: scales[g0:g1, c0:c1].to(torch.float32)
    )


def _scale_codes(
    shape: tuple[int, ...],
    block: Callable[[int, int, int, int], torch.Tensor],
    out: torch.Tensor | None = None,
    peak: float | None = None,
) -> tuple[torch.Tensor, float] | None:
    """:func:`scale_codes` of the float32 ``[G, N]`` scales whose groups ``g0:g1`` and
    outputs ``c0:c1`` ``block(g0, g1, c0, c1)`` makes: never all at once (``SCALE_CHUNK``
    values a step). With ``out`` (uint8 ``[ceil(N/16), G, 16]``) the codes are written there,
    blocked; ``peak``: their largest magnitude when the caller knows it (None: found first)."""
    import torch

    g, n = shape
    step = max(NB, SCALE_CHUNK // max(1, g) // NB * NB)
    if not (g and n):
        return None
    for c0 in range(0, n if peak is None else 0, step):
        low, high = torch.aminmax(block(0, g, c0, c0 + step))
        top = max(-float(low), float(high))
        if not math.isfinite(top):
            return None
        peak = max(peak or 0.0, top)
    if not peak or not math.isfinite(peak):
        return None
    sample = block(0, -(-4096 // n), 0, min(n, 4096)).flatten()[:4096]  # the first 4096
    for mantissa in SCALE_MANTISSAS:
        top = mantissa * (256 if mantissa <= 1.75 else 128)  # <= 448, e4m3's largest
        mult = float(torch.tensor(peak / top, dtype=torch.float32))
        if _fitting_codes(sample, mult) is None:
            continue
        codes = torch.empty((g, n), dtype=torch.uint8) if out is None else out
        for c0 in range(0, n, step):
            chunk = _fitting_codes(block(0, g, c0, c0 + step), mult)
            if chunk is None:
                break
            if out is None:
                codes[:, c0 : c0 + step] = chunk.view(torch.uint8)
            else:
                column_blocks(chunk.view(torch.uint8), NB, out[c0 // NB : -(-(c0 + step) // NB)])
        else:
            return codes, mult
    return None


def _fitting_codes(scales: torch.Tensor, mult: float) -> torch.Tensor | None:
    """``scales / mult`` as e4m3 when that gives back every scale (float32 arithmetic: its
    rounding, 2^-24, is far inside the tolerance)."""
    import torch

    codes = (scales / mult).to(torch.float8_e4m3fn)
    error = codes.to(torch.float32).mul_(mult).sub_(scales).abs_()  # in place: no more copies
    fits = bool((error <= scales.abs().mul_(SCALE_TOLERANCE)).all())
    return codes if fits else None


@dataclass(frozen=True, eq=False)
class CPUFloat8Layout(LayoutTensors):
    """The float8 kernel's layout (see the module doc).

    Attributes:
        codes: uint8 ``[ceil(N/16), K * 16]`` (fp8) or ``[ceil(N/16), K * 8]`` (fp4).
        scales: float32 ``[ceil(N/16), G, 16]`` (fp8: times 2^8), or (fp4) e4m3 codes as
            uint8, same shape.
        perm: int64 ``[K]`` column order applied to ``x``, or None (as in ``Float8Layout``).
        n, k: the weight's shape; group_size: columns per group (one group: K).
        fp4: the codes are e2m1 nibbles.
        scale_mult: what multiplies every sum (scale codes: their multiplier times 2^8; else 1).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None
    n: int
    k: int
    group_size: int
    fp4: bool
    scale_mult: float = 1.0

    @classmethod
    def fits(cls, weights: Float8Layout) -> str | None:
        """Why ``weights`` cannot take this layout (None: it can)."""
        if weights.zeros is not None:
            return "takes symmetric float8 weights; these have zero points"
        if weights.group_size is None:
            return "needs groups of equal size; these groups differ"
        return None

    @classmethod
    def build(cls, weights: Float8Layout) -> CPUFloat8Layout:
        """From NVFP4's packed e2m1 codes in one pass when the layout holds them, else from
        the float8 values: four bits a weight when every value is on the e2m1 grid (and K and
        the group size are multiples of 4), else one byte; fp4 scales as e4m3 codes and a
        multiplier when they are such."""
        group = weights.group_size
        assert group is not None  # checked by fits()
        try_fp4 = weights.k % FP4_STEP == group % FP4_STEP == 0
        packed = weights.e2m1
        if packed is not None and try_fp4 and extension() is not None:
            codes, fp4 = _pack_e2m1(packed), True  # NVFP4: its codes, never float8 values
        else:
            codes, fp4 = _pack(weights.values, try_fp4)
        scales, mult = _kernel_scales(weights, fp4)
        n = weights.n
        return cls(
            codes=codes,
            scales=scales,
            perm=weights.perm,
            n=n,
            k=weights.k,
            group_size=group,
            fp4=fp4,
            scale_mult=mult,
        )


def _pack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """The fp4 codes of NVFP4's packed e2m1 codes ``[N, K / 2]`` in the kernel's layout, in
    one pass by the extension: the bytes :func:`_pack` gives for their float8 values."""
    import torch

    codes = torch.empty((-(-packed.shape[0] // NB), packed.shape[1] * NB), dtype=torch.uint8)
    extension().e2m1_pack(packed.contiguous(), codes)
    return codes


def _kernel_scales(weights: Float8Layout, fp4: bool) -> tuple[torch.Tensor, float]:
    """The scales as the kernel reads them (``[ceil(N/16), G, 16]``), and the multiplier of
    every sum (fp4: made from the layout's scales a block of groups at a time)."""
    import torch

    if not fp4:
        return column_blocks(weights.scales.to(torch.float32) * FP8_SHIFT, NB), 1.0
    n, g = weights.n, weights.groups
    out = torch.empty((-(-n // NB), g, NB), dtype=torch.uint8)
    factor, codes = weights.scale_factor, weights.group_scales
    peak = factor.peak(codes) if factor and codes.dtype == torch.float8_e4m3fn else None
    coded = _scale_codes(
        (g, n), lambda *box: weights.scale_block(*box).to(torch.float32), out, peak
    )
    if coded is None:
        logger.debug("fp4 scales are not e4m3 codes times one float32: kept as float32")
        return column_blocks(weights.scales.to(torch.float32), NB), 1.0
    return coded[0], coded[1] * FP8_SHIFT


def float8_cpu_matmul(x: torch.Tensor, layout: CPUFloat8Layout) -> torch.Tensor:
    """``x [M, K]`` (features in the layout's column order) ``@ W.T`` in ``x``'s dtype (bf16,
    fp16 or float32), converting at most ``cpu_build.X_TILE_BYTES`` of ``x`` to float32 at a
    time.

    Raises:
        RuntimeError: the kernel is unavailable (selection declines it first).
    """
    return run_float8_mm(UNIT.loaded().float8_mm, x, layout)


def run_float8_mm(mm: Callable[..., torch.Tensor], x: torch.Tensor,
                  layout: CPUFloat8Layout) -> torch.Tensor:  # fmt: skip
    """``mm`` -- either float8 build's tiling entry point (``float8_mm``, ``float8_512_mm``: one
    signature) -- on ``x`` and the layout, at most ``cpu_build.X_TILE_BYTES`` of ``x`` a kernel
    call."""
    return mm(
        x, layout.n, layout.codes, layout.scales, layout.group_size, layout.fp4,
        layout.scale_mult, cpu_build.X_TILE_BYTES,
    )  # fmt: skip

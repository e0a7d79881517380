"""quantreg's int4 / int8 weight-only CPU kernel for CPUs without AVX-512
(``wna16_avx2_kernel.cpp``: AVX2 + FMA + F16C), kernel ``cpu-avx2-wna16``.

Built and cached like the other CPU kernels (:mod:`quantreg.kernels.cpu_build`, kernel
``wna16_avx2``), declined with a reason where it cannot run (no AVX2/FMA/F16C,
``QUANTREG_NO_CPU_KERNELS``, no compiler).

Layout (:class:`AVX2IntLayout`), built once after loading straight from the checkpoint's codes:
16 outputs per block; each output's codes packed along K into int32 words of ``P = 32 / bits``
codes (code ``j`` at bits ``j * bits``: GPTQ's ``qweight`` order, which is taken as it is when
the checkpoint has it), K zero-padded to a multiple of ``P``, the words of a block interleaved
so that one 32-byte load holds 8 outputs' words. Scales ``s`` ``[N/16, G, 16]`` in the
checkpoint's dtype (float32, bf16 or fp16) and zero points ``z`` ``[N/16, G, 16]`` in uint8
(float32 when one is not an integer in 0..255); the kernel takes ``s * z`` in float32 per group.
Three bytes per output and group, not the eight of float32 ``s`` and ``s * z``: int4 g128
reads 7 % fewer bytes a call (g32: 21 %).

Precision: ``s * (sum x q) - s z * (sum x)`` per group in float32 -- the weights are not rounded
to the scale dtype as the producers round them, so the kernel serves bf16 / fp16 activations
(within 1e-2 of the exact kernel, like torch's ops); float32 heads keep the exact kernels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantreg.kernels import cpu_build
from quantreg.kernels.cpu_unit import KernelUnit
from quantreg.kernels.layouts import LayoutTensors, column_blocks
from quantreg.kernels.packing import pack_codes, pack_factor, transpose_nibbles
from quantreg.kernels.weights import IntWeights
from quantreg.platform import probe_cpu_isa

if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

NB = 16  # outputs per block: two AVX2 registers of float32
FLAGS = cpu_build.FLOAT8_FLAGS  # avx2, fma, f16c: what its build is compiled for
CODE_CHUNK = 1024  # output columns converted per step (a multiple of 16)
# Elements per step of the N-packed conversion: under torch's parallel grain (32768), so that its
# many small ops run on the calling thread; waking a thread team for each costs more than the op,
# and on a busy machine far more (whole seconds a load).
SERIAL_ELEMENTS = 32767

# int16_row_limit's table, by dtype name: every kernel call asks, and an `import torch` in it
# cost about 10 µs a call on the caches a decode step leaves
_INT16_LIMITS = {"torch.bfloat16": 256.0, "torch.float16": 32.0}


# the extension: UNIT.not_here(flags), .extension(), .unavailable_reason(), .warmup()
UNIT = KernelUnit(
    "wna16_avx2", FLAGS, "AVX2 int4 / int8 kernel",
    "quantreg's AVX2 int4 / int8 CPU kernel unavailable (%s); kernel selection declines it",
    logger, lambda: probe_cpu_isa(),  # looked up when called: tests replace it
)  # fmt: skip
not_here, extension = UNIT.not_here, UNIT.extension
unavailable_reason, warmup = UNIT.unavailable_reason, UNIT.warmup


def interleave(words: torch.Tensor, out: torch.Tensor) -> None:
    """Words ``[units, n]`` into ``out [ceil(n/16), units, 16]`` (the last block zero-padded),
    in one pass: contiguous words (GPTQ's ``qweight``) are copied as int64 pairs (half the
    elements of an int32 copy); transposed ones (compressed-tensors' ``weight_packed [n,
    units]``, seen as ``[units, n]``) are read in place, never copied contiguous first."""
    import torch

    units, n = words.shape
    whole = n // NB
    if words.is_contiguous() and n % 2 == 0:
        src = words[:, : whole * NB].view(torch.int64).reshape(units, whole, NB // 2)
        out[:whole].view(torch.int64).copy_(src.permute(1, 0, 2))
    elif words.is_contiguous():
        out[:whole].copy_(words[:, : whole * NB].reshape(units, whole, NB).permute(1, 0, 2))
    else:
        out[:whole].copy_(words.T[: whole * NB].reshape(whole, NB, units).transpose(1, 2))
    if whole * NB < n:
        out[whole].zero_()[:, : n - whole * NB] = words[:, whole * NB :]


@dataclass(frozen=True, eq=False)
class AVX2IntLayout(LayoutTensors):
    """The AVX2 int kernel's layout (see the module doc).

    Attributes:
        codes: int32 ``[ceil(N/16), ceil(K/P), 16]``.
        scales: ``[ceil(N/16), G, 16]``, ``s`` per group and output, in the checkpoint's
            scale dtype (float32, bf16 or fp16: exact).
        zeros: ``[ceil(N/16), G, 16]``, ``z`` per group and output: uint8 when every zero
            point is an integer in 0..255, else float32.
        perm: int64 ``[K]`` row order applied to ``x`` (act-order), or None.
        n, k: the weight's shape; bits: 4 or 8.
        group_size: rows per group (one group: K padded to a multiple of P).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    n: int
    k: int
    bits: int
    group_size: int

    @classmethod
    def fits(cls, weights: IntWeights) -> str | None:
        """Why ``weights`` cannot take this layout (None: it can)."""
        group = weights.group_size
        p = pack_factor(weights.bits)
        if group is None:
            return "needs groups of equal size; these act-order groups differ"
        if weights.groups > 1 and group % p:
            return (
                f"needs a group size that is a multiple of {p} for {weights.bits}-bit codes "
                f"(or one group); it is {group}"
            )
        return None

    @classmethod
    def build(cls, weights: IntWeights) -> AVX2IntLayout:
        """Straight from the checkpoint: its K-packed words as they are when it has them, its
        N-packed int4 words (AWQ) transposed in place, else its codes packed ``CODE_CHUNK``
        columns at a time; every step vectorized."""
        import torch

        n, k, bits = weights.n, weights.k, weights.bits
        p = pack_factor(bits)
        units = -(-k // p)
        blocks = -(-n // NB)
        codes = torch.empty((blocks, units, NB), dtype=torch.int32)
        packed = weights.k_packed
        if packed is not None and weights.perm is None and tuple(packed.shape) == (units, n):
            interleave(packed.to(torch.int32), codes)
        elif weights.n_packed is not None and weights.perm is None:
            _from_n_packed(weights.n_packed, weights.n_order or tuple(range(8)), codes)
        else:
            for c0 in range(0, n, CODE_CHUNK):
                c1 = min(c0 + CODE_CHUNK, n)
                words = pack_codes(weights.sorted_codes(c0, c1), bits, dim=0)
                interleave(words, codes[c0 // NB : -(-c1 // NB)])
        group = weights.group_size if weights.groups > 1 else units * p
        assert group is not None  # checked by fits()
        return cls(
            codes=codes,
            scales=_block_scales(weights.scales),
            zeros=_block_zeros(weights.zeros),
            perm=weights.perm,
            n=n,
            k=k,
            bits=bits,
            group_size=group,
        )


def int16_row_limit(dtype: torch.dtype) -> float:
    """How far a row's largest magnitude may exceed its RMS for the int16 path (0: never).

    A row in int16 fixed point (step ``max|x| / 32767``) is rounded by at most
    ``max|x| / 65534``; that is no more than the activation dtype's own rounding of an element
    of the row's RMS (half an ulp: ``rms * 2^-8`` in bf16, ``rms * 2^-11`` in fp16) exactly when
    ``max|x| <= 256 * rms`` (bf16) or ``32 * rms`` (fp16). float32 rows keep the float path.
    """
    return _INT16_LIMITS.get(str(dtype), 0.0)


def _from_n_packed(words: torch.Tensor, order: tuple[int, ...], out: torch.Tensor) -> None:
    """int4 codes packed along N (int32 ``[K, N / 8]``, see ``IntWeights.n_packed``) into
    ``out [ceil(N/16), ceil(K/8), 16]``, a few words of K at a time (``SERIAL_ELEMENTS``):
    rows and words zero-padded in a small buffer, its nibbles transposed in place, placed by
    one copy. The buffers are reused: fresh ones each step would stay in this process's heap."""
    import torch

    blocks, units, _ = out.shape
    inverse = torch.tensor([order.index(slot) for slot in range(8)])  # slot of each output
    dst = out.view(blocks, units, 2, 8)
    step = max(1, min(units, SERIAL_ELEMENTS // (8 * 2 * blocks)))
    buffer = torch.zeros((step, 8, 2 * blocks), dtype=torch.int32)
    slots, scratch = torch.empty_like(buffer), torch.empty((step, 4, 2 * blocks), dtype=torch.int32)
    for u0 in range(0, units, step):
        u1 = min(u0 + step, units)
        rows = words[8 * u0 : 8 * u1]
        chunk = buffer[: u1 - u0]
        if rows.shape != chunk.view(-1, 2 * blocks).shape:  # padding: K or N / 8 is short
            chunk.zero_()
        chunk.view(-1, 2 * blocks)[: rows.shape[0], : rows.shape[1]] = rows
        transpose_nibbles(chunk, scratch)
        torch.index_select(chunk, 1, inverse, out=slots[: u1 - u0])  # [u, output, word]
        view = slots[: u1 - u0].view(u1 - u0, 8, blocks, 2)
        dst[:, u0:u1].copy_(view.permute(2, 0, 3, 1))


def _block_scales(scales: torch.Tensor) -> torch.Tensor:
    """``[G, N]`` scales as ``[ceil(N/16), G, 16]`` blocks, in their own dtype when the kernel
    reads it (float32, bf16, fp16), else float32."""
    import torch

    keep = scales.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return column_blocks(scales, NB, dtype=scales.dtype if keep else torch.float32)


def _block_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """``[G, N]`` zero points as ``[ceil(N/16), G, 16]`` blocks: uint8 when every one is an
    integer in 0..255 (checked in one pass over them), else float32 (what the kernel computes
    with)."""
    import torch

    integral = not zeros.is_floating_point() or torch.equal(zeros, zeros.round())
    small = zeros.numel() == 0 or (integral and zeros.min() >= 0 and zeros.max() <= 255)
    return column_blocks(zeros, NB, dtype=torch.uint8 if small else torch.float32)


def avx2_int_matmul(x: torch.Tensor, layout: AVX2IntLayout) -> torch.Tensor:
    """``x [M, K]`` (features in the layout's row order) ``@ W.T`` in ``x``'s dtype (bf16,
    fp16 or float32), converting at most ``cpu_build.X_TILE_BYTES`` of ``x`` to float32 at a
    time. bf16 / fp16 rows within :func:`int16_row_limit` are multiplied in int16 fixed point
    (per row: ``round(x * 32767 / max|x|)``, integer multiply-adds, exact sums); other rows
    (outliers, non-finite values, float32) take the float32 FMA path.

    Raises:
        RuntimeError: the kernel is unavailable (selection declines it first).
    """
    limit = int16_row_limit(x.dtype)
    return _gemm(x, layout, 16 if limit else 0, limit)


def avx2_a8_matmul(x: torch.Tensor, layout: AVX2IntLayout) -> torch.Tensor:
    """``x [M, K] @ W.T`` with ``x`` quantized to int8 per row first (dynamic, symmetric:
    ``round(x * 127 / max|x|)``, see :func:`quantize_rows`), multiplied in integers by the
    layout's codes (kernel ``cpu-avx2-a8``); the result in ``x``'s dtype. A row holding a
    non-finite value gives a row of NaN.

    Raises:
        RuntimeError: the kernel is unavailable (selection declines it first).
    """
    return _gemm(x, layout, 8, 0.0)


def _gemm(x: torch.Tensor, layout: AVX2IntLayout, act: int, limit: float) -> torch.Tensor:
    return run_int_mm(UNIT.loaded(), x, layout, act, limit)


def run_int_mm(
    module: Any, x: torch.Tensor, layout: AVX2IntLayout, act: int, limit: float
) -> torch.Tensor:
    """A build's one call (``avx2_int_mm`` of this kernel or of :mod:`.cpu_vnni`: the output
    allocated and ``x``'s rows tiled in C++): float32 FMA (``act`` 0) or ``act``-bit integer
    activations (rows beyond ``limit`` x their RMS on the float path; 0: none)."""
    return module.avx2_int_mm(
        x, layout.n, layout.codes, layout.scales, layout.zeros, layout.bits, layout.group_size,
        act, limit, cpu_build.X_TILE_BYTES,
    )  # fmt: skip


def quantize_rows(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """What the integer-activation paths do to activations, in torch: ``(q [M, K], scale
    float32 [M, 1])`` with ``Q = 2^(bits-1) - 1`` (127: ``cpu-avx2-a8``; 32767: the int16
    path of ``cpu-avx2-wna16``), ``q = round(x * (Q / max|x|))`` (half to even, in float32;
    int8 or int16) and ``scale = max|x| / Q``, so that ``q * scale`` approximates ``x``. A zero
    row gives zeros; a row with a non-finite value gives zeros and a NaN scale."""
    import torch

    qmax = float(2 ** (bits - 1) - 1)
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    finite = torch.isfinite(xf).all(dim=-1, keepdim=True)
    usable = finite & (amax > 0)
    # a tensor over a tensor: torch divides a Python number by a tensor as a reciprocal times
    # it, which is not the correctly rounded Q / max|x| the kernels compute (a product of
    # 28.499998 became 28.500002 and rounded to 29)
    inv = torch.where(usable, torch.full_like(amax, qmax) / torch.where(usable, amax, 1.0), 0.0)
    q = torch.round(torch.where(finite, xf, 0.0) * inv).clamp(-qmax, qmax)
    scale = torch.where(finite, amax / qmax, torch.nan)
    return q.to(torch.int8 if bits == 8 else torch.int16), scale

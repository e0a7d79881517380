"""quantreg's float8 / fp4 weight-only CPU kernel (``float8_kernel.cpp``, AVX2 + FMA + F16C).

It runs every :class:`~quantreg.kernels.layouts.Float8Layout` head with bf16 / fp16
activations on CPUs without AVX-512, without ever holding the float weight: built and cached
like the int kernel (:mod:`quantreg.kernels.cpu_build`, kernel ``float8``), declined with a
reason where it cannot run (no AVX2/FMA/F16C, ``QUANTREG_NO_CPU_KERNELS``, no compiler).

Layout (:class:`CPUFloat8Layout`), built once after loading, 16 outputs per block, K-major:

* fp8: one byte a weight, the e4m3 code itself (byte ``16k + o`` of a block: output ``o``,
  row ``k``), decoded through fp16 by bit shifts (see the C++ source);
* fp4: when every value is one of +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} -- the e2m1 grid, as
  compressed-tensors' and ModelOpt's NVFP4 heads hold them -- four bits a weight (byte
  ``8k + j``: positions ``2j`` and ``2j + 1``, outputs in ``FP4_ORDER``), found by a check
  at build time, lossless;
* scales: float32 ``[N/16, G, 16]`` (the checkpoint's scales, exact in float32; fp8 ones
  times 2^8, the factor the fp16 decoding leaves out).

Precision: weights are the float8 values times the float32 scale, summed in float32. The
reference rounds every dequantized weight to the scale dtype (compressed-tensors' NVFP4: to
bfloat16) before multiplying; this kernel does not (at most 2^-9 relative per weight in bf16),
which is why it serves bf16 / fp16 activations only: float32 heads keep the exact kernel.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantreg.kernels import cpu_build
from quantreg.kernels.layouts import Float8Layout, LayoutTensors, e2m1_codes
from quantreg.platform import probe_cpu_isa

if TYPE_CHECKING:
    import torch

    from quantreg.kernels.cpu import Warmup

logger = logging.getLogger(__name__)

NB = 16  # outputs per block: two AVX2 registers of float32
FLAGS = cpu_build.FLOAT8_FLAGS  # avx2, fma, f16c
ROW_CHUNK = 256  # vocab rows converted per step at build time
X_TILE_BYTES = 8 * 2**20  # float32 activations converted per call: rows of x per kernel call
FP8_SHIFT = 256.0  # the fp16 decoding yields value * 2^-8
# fp4 position p of a row holds output FP4_ORDER[p]: the decoding's in-lane unpacks put positions
# 0-3 and 8-11 in the first register, 4-7 and 12-15 in the second.
FP4_ORDER = (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)

_lock = threading.Lock()
_state: dict[str, Any] = {}


def not_here(flags: frozenset[str] | None = None) -> str | None:
    """Why this process must not build or run the kernel (None: it may)."""
    if os.environ.get("QUANTREG_NO_CPU_KERNELS"):
        return "QUANTREG_NO_CPU_KERNELS is set"
    missing = [f for f in FLAGS if f not in (probe_cpu_isa() if flags is None else flags)]
    if missing:
        return f"this CPU lacks {'/'.join(missing)}"
    return None


def extension() -> Any | None:
    """The compiled extension (built once per process, cached on disk), or None."""
    return cpu_build.build_once(
        _state, _lock, "float8", not_here, "float8 kernel",
        "quantreg's float8 CPU kernel unavailable (%s); kernel selection declines it", logger,
    )  # fmt: skip


def warmup() -> Warmup:
    """Build (or load) the float8 kernel now, so that no fp8 / NVFP4 head load waits for the
    compiler."""
    from quantreg.kernels.cpu import warm

    return warm(not_here, "float8", extension, unavailable_reason)


def unavailable_reason() -> str | None:
    """Why :func:`extension` is None (None when the kernel is built)."""
    extension()
    return _state["reason"]


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.pad(t, (0, 0, 0, -t.shape[0] % NB))


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
    c = codes.reshape(r // NB, NB, k).transpose(1, 2)[..., list(FP4_ORDER)]  # [blocks, K, 16]
    return (c[..., 0::2] | (c[..., 1::2] << 4)).reshape(r // NB, k * NB // 2)


@dataclass(frozen=True, eq=False)
class CPUFloat8Layout(LayoutTensors):
    """The float8 kernel's layout (see the module doc).

    Attributes:
        codes: uint8 ``[ceil(N/16), K * 16]`` (fp8) or ``[ceil(N/16), K * 8]`` (fp4).
        scales: float32 ``[ceil(N/16), G, 16]`` (fp8: times 2^8).
        perm: int64 ``[K]`` column order applied to ``x``, or None (as in ``Float8Layout``).
        n, k: the weight's shape; group_size: columns per group (one group: K).
        fp4: the codes are e2m1 nibbles.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None
    n: int
    k: int
    group_size: int
    fp4: bool

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
        """From the float8 values, ``ROW_CHUNK`` vocab rows at a time: four bits a weight when
        every value is on the e2m1 grid, else one byte."""
        import torch

        values = weights.values
        chunks = [_pad_rows(values[r : r + ROW_CHUNK]) for r in range(0, weights.n, ROW_CHUNK)]
        blocks: list[torch.Tensor] = []
        for chunk in chunks:
            block = _block_codes(chunk, fp4=True)
            if block is None:
                break
            blocks.append(block)
        fp4 = len(blocks) == len(chunks)
        if not fp4:
            blocks = [_block_codes(c, fp4=False) for c in chunks]  # type: ignore[misc]
        scales = weights.scales.to(torch.float32) * (1.0 if fp4 else FP8_SHIFT)
        g, n = scales.shape
        scales = torch.nn.functional.pad(scales, (0, -n % NB))
        group = weights.group_size
        assert group is not None  # checked by fits()
        return cls(
            codes=torch.cat(blocks),
            scales=scales.reshape(g, -1, NB).permute(1, 0, 2).contiguous(),
            perm=weights.perm,
            n=n,
            k=weights.k,
            group_size=group,
            fp4=fp4,
        )


def float8_cpu_matmul(x: torch.Tensor, layout: CPUFloat8Layout) -> torch.Tensor:
    """``x [M, K]`` (features in the layout's column order) ``@ W.T`` in ``x``'s dtype (bf16,
    fp16 or float32), converting at most ``X_TILE_BYTES`` of ``x`` to float32 at a time.

    Raises:
        RuntimeError: the kernel is unavailable (selection declines it first).
    """
    import torch

    module = extension()
    if module is None:
        raise RuntimeError(f"quantreg's float8 CPU kernel is unavailable: {unavailable_reason()}")
    m = x.shape[0]
    out = torch.empty((m, layout.n), dtype=x.dtype)
    rows = max(1, X_TILE_BYTES // (4 * max(layout.k, 1)))
    for r0 in range(0, m, rows):
        xf = x[r0 : r0 + rows].to(torch.float32).contiguous()
        module.float8_gemm(xf, out[r0 : r0 + rows], layout.codes, layout.scales,
                           layout.group_size, layout.fp4)  # fmt: skip
    return out

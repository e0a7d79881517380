"""quantreg's weight-only int4 / int8 CPU kernel (``wna16_kernel.cpp``), compiled just in time.

``load_inline`` builds a small C++ extension on first use (announced, see
:mod:`quantreg.kernels.cpu_build`), cached under ``~/.cache/quantreg/kernels/<hash of source,
flags, torch, Python, sys.prefix and compiler>`` (nothing is built at install time, where an
isolated build would pull a CUDA torch; ``quantreg warmup`` builds it ahead of time). Without
AVX-512 (F/BW/VL/VBMI + F16C), a compiler or ninja, :func:`extension` returns None and
:func:`unavailable_reason` says why; kernel selection then declines the CPU kernels.

Layout (:class:`CPUBlockedLayout`), built once after loading: K padded to a multiple of 32 with
zero codes, 16 outputs per block, 32-byte units. Byte ``2o + j`` of an int4 unit ``t`` holds
output ``o``'s rows ``4t + j`` (low nibble) and ``4t + 2 + j`` (high nibble): the bf16 pair
rows AVX512-BF16 and AMX multiply; byte ``16j + o`` of an int8 unit ``p`` holds row
``2p + j``. Scales (in the checkpoint's dtype) and uint8 zero points are ``[N/16, G, 16]``.

Paths (:class:`CPUPath`):

* ``FMA``: float32 activations, AVX-512 FMA, every weight ``(q - z) * s`` rounded to the
  scale dtype -- the producers' weights, bit for bit;
* ``BF16_DOT``: bf16 activations (fp16 is converted), AVX512-BF16 ``vdpbf16ps``;
* ``AMX``: bf16 activations, AMX ``tdpbf16ps``;

the bf16 paths accumulate in float32 and apply each group's scale and zero point once.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantreg.kernels import cpu_build
from quantreg.kernels.cpu_build import BASE_FLAGS
from quantreg.kernels.layouts import LayoutTensors
from quantreg.kernels.weights import IntWeights
from quantreg.platform import probe_cpu_isa

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NB = 16  # outputs per block: one AVX-512 register of float32
KU = 32  # K is padded to a multiple of 32: one AMX tile row of bf16
CODE_CHUNK = 1024  # output columns converted per step (a multiple of 16)
BF16_FLAGS = ("avx512_bf16",)
AMX_FLAGS = ("amx_tile", "amx_bf16")

_lock = threading.Lock()
_state: dict[str, Any] = {}


class CPUPath(enum.IntEnum):
    """The kernel's code paths (the values are what the C++ entry point takes)."""

    FMA = 0
    BF16_DOT = 1
    AMX = 2


class ScaleRounding(enum.IntEnum):
    """What the FMA path rounds every weight to: the checkpoint's scale dtype."""

    FP16 = 1
    BF16 = 2
    NONE = 3  # float32 scales: nothing to round


def cpu_supports_avx512() -> bool:
    """Whether this CPU has the AVX-512 subsets the kernel is compiled for (probed)."""
    return set(BASE_FLAGS) <= probe_cpu_isa()


def _not_here() -> str | None:
    """Why this process must not build or run the kernel (None: it may)."""
    if os.environ.get("QUANTREG_NO_CPU_KERNELS"):
        return "QUANTREG_NO_CPU_KERNELS is set"
    if not cpu_supports_avx512():
        return "this CPU lacks AVX-512 (" + "/".join(BASE_FLAGS) + ")"
    return None


def extension() -> Any | None:
    """The compiled extension (built once per process, cached on disk), or None."""
    return cpu_build.build_once(
        _state, _lock, "wna16", _not_here, "kernel",
        "quantreg CPU kernels unavailable (%s); kernel selection declines them", logger,
    )  # fmt: skip


def unavailable_reason() -> str | None:
    """Why :func:`extension` is None (None when the kernel is built)."""
    extension()
    return _state["reason"]


@dataclass(frozen=True)
class Warmup:
    """What ``quantreg warmup`` did.

    Attributes:
        ready: the kernel is built and loaded in this process.
        needed: this machine can run the kernel (False: nothing to build, ``reason`` says why).
        reason: why the kernel is unavailable (None when ready).
        cache: this environment's build folder (None when there is nothing to build).
        cached: the build was already there (nothing was compiled).
        seconds: how long building or loading took.
    """

    ready: bool
    needed: bool
    reason: str | None
    cache: Path | None
    cached: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "cache": None if self.cache is None else str(self.cache)}

    def summary(self, what: str = "quantreg's CPU kernel", instead: str = "cpu-avx2-wna16, "
                "torch's ops or the reference kernel") -> str:  # fmt: skip
        """One line for ``quantreg warmup`` about kernel ``what`` (``instead``: what heads run
        where it cannot)."""
        if self.ready:
            how = "already built" if self.cached else f"built in {self.seconds:.0f} s"
            return f"{what} is ready ({how}), cached in {self.cache}"
        if not self.needed:
            return f"nothing to build for {what}: {self.reason}; heads run {instead}"
        return f"{what} could not be built in {self.cache}: {self.reason}"


def warmup() -> Warmup:
    """Build (or load) the CPU kernel now, so that no head load waits for the compiler."""
    return warm(_not_here, "wna16", extension, unavailable_reason)


def warm(
    not_here: Callable[[], str | None],
    kernel: str,
    build: Callable[[], Any],
    reason: Callable[[], str | None],
) -> Warmup:
    """Build (or load) one kernel (``build``) unless ``not_here`` says why not: what
    ``quantreg warmup`` did for it."""
    start = time.perf_counter()
    why_not = not_here()
    if why_not is not None:  # said here, not also as extension()'s warning
        return Warmup(ready=False, needed=False, reason=why_not, cache=None, cached=False,
                      seconds=time.perf_counter() - start)  # fmt: skip
    key = cpu_build.build_key(kernel)
    cached = cpu_build.is_built(key)
    module = build()
    return Warmup(
        ready=module is not None, needed=True, reason=reason(),
        cache=cpu_build.build_dir(key), cached=cached, seconds=time.perf_counter() - start,
    )  # fmt: skip


def amx_ready() -> bool:
    """Whether the OS grants this process the AMX tile state (asked once; needs the kernel)."""
    with _lock:
        if "amx" in _state:
            return _state["amx"]
    module = extension()
    ready = module is not None and bool(module.amx_ready())
    with _lock:
        _state["amx"] = ready
    return ready


def to_blocked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[K, N]`` (N a multiple of 16) -> the kernel's layout ``[N/16, bytes]``."""
    import torch

    k, n = codes.shape
    kp = -(-k // KU) * KU
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, kp - k))
    if bits == 8:  # (p, j, b, o) -> (b, p, j, o)
        return c.reshape(kp // 2, 2, n // NB, NB).permute(2, 0, 1, 3).reshape(n // NB, -1)
    c = c.reshape(kp // 4, 2, 2, n // NB, NB).permute(3, 0, 4, 2, 1)  # (b, t, o, j, h)
    return (c[..., 0] | (c[..., 1] << 4)).reshape(n // NB, -1)


def from_blocked(blocked: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The inverse of :func:`to_blocked`: unsigned codes ``[K, N]`` (int32)."""
    import torch

    n = blocked.shape[0] * NB
    kp = -(-k // KU) * KU
    if bits == 8:
        c = blocked.reshape(n // NB, kp // 2, 2, NB).permute(1, 2, 0, 3).reshape(kp, n)
    else:
        b = blocked.reshape(n // NB, kp // 4, NB, 2)  # (b, t, o, j)
        c = torch.stack([b & 0xF, b >> 4], dim=-1)  # (b, t, o, j, h)
        c = c.permute(1, 4, 3, 0, 2).reshape(kp, n)  # (t, h, j, b, o)
    return c[:k].to(torch.int32)


def block_columns(t: torch.Tensor) -> torch.Tensor:
    """Per-column ``[G, N]`` (scales, zeros) -> ``[N/16, G, 16]``."""
    g, n = t.shape
    return t.reshape(g, n // NB, NB).permute(1, 0, 2).contiguous()


@dataclass(frozen=True, eq=False)
class CPUBlockedLayout(LayoutTensors):
    """The CPU kernel's layout (see the module doc).

    Attributes:
        codes: uint8 ``[N/16, bytes per block]``, K padded to a multiple of 32.
        scales: ``[N/16, G, 16]`` in the checkpoint's scale dtype.
        zeros: uint8 ``[N/16, G, 16]``.
        perm: int64 ``[K]`` row order applied to ``x`` (act-order), or None.
        bits: 4 or 8; group_size: rows per group (one group: K).
        rounding: what the FMA path rounds each weight to.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group_size: int
    rounding: ScaleRounding

    @classmethod
    def fits(cls, weights: IntWeights) -> str | None:
        """Why ``weights`` cannot take this layout (None: it can)."""
        group = weights.group_size
        if weights.n % NB:
            return f"needs the output size to be a multiple of {NB}; it is {weights.n}"
        if group is None:
            return "needs groups of equal size; these act-order groups differ"
        if weights.groups > 1 and group % KU:
            return f"needs a group size that is a multiple of {KU} (or one group); it is {group}"
        return None

    @classmethod
    def build(cls, weights: IntWeights) -> CPUBlockedLayout:
        """Straight from the checkpoint's codes, ``CODE_CHUNK`` columns at a time."""
        import torch

        n = weights.n
        blocks = [
            to_blocked(weights.sorted_codes(c0, min(c0 + CODE_CHUNK, n)), weights.bits)
            for c0 in range(0, n, CODE_CHUNK)
        ]
        rounding = {torch.float16: ScaleRounding.FP16, torch.bfloat16: ScaleRounding.BF16}
        group = weights.group_size
        assert group is not None  # checked by fits()
        return cls(
            codes=torch.cat(blocks),
            scales=block_columns(weights.scales),
            zeros=block_columns(weights.zeros.to(torch.uint8)),
            perm=weights.perm,
            bits=weights.bits,
            group_size=group,
            rounding=rounding.get(weights.scales.dtype, ScaleRounding.NONE),
        )


def cpu_matmul(x: torch.Tensor, layout: CPUBlockedLayout, path: CPUPath) -> torch.Tensor:
    """``x [M, K]`` (features in the layout's row order) ``@ W.T`` on ``path``: float32."""
    import torch

    module = extension()
    if module is None:
        raise RuntimeError(f"quantreg's CPU kernel is unavailable: {unavailable_reason()}")
    xk = x.to(torch.float32 if path is CPUPath.FMA else torch.bfloat16).contiguous()
    return module.wna16_gemm(
        xk, layout.codes, layout.scales, layout.zeros, layout.bits, layout.group_size,
        int(layout.rounding), int(path),
    )  # fmt: skip

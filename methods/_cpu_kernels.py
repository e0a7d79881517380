"""quantreg's weight-only int4 / int8 CPU matmul (``wna16_kernel.cpp``), compiled just in time.

``load_inline`` builds a small C++ extension on first use, cached under
``~/.cache/quantreg/kernels/<hash of source, flags and torch version>`` (nothing is built at
install time, where an isolated build would pull a CUDA torch). Without AVX-512
(F/BW/VL/VBMI + F16C), a compiler or ninja, ``kernels()`` returns None once with the reason
logged, and callers keep torch's ops.

Layout (``to_blocked``), repacked once after loading: K padded to a multiple of 32 with zero
codes, 16 outputs per block, 32-byte units. Byte ``2o + j`` of an int4 unit ``t`` holds output
``o``'s rows ``4t + j`` (low nibble) and ``4t + 2 + j`` (high nibble): the bf16 pair rows
AVX512-BF16 and AMX multiply; byte ``16j + o`` of an int8 unit ``p`` holds row ``2p + j``.
Scales (in the checkpoint's dtype) and uint8 zero points are blocked as ``[N/16, G, 16]``.

Paths, chosen per call (``apply_kernel``):

* float32 activations: float32 FMA, every weight ``(q - z) * s`` rounded to the scale dtype --
  the producers' weights, bit for bit;
* bf16 / fp16 activations (fp16 is converted to bf16): ``vdpbf16ps`` for up to
  ``DOT_MAX_ROWS`` rows, AMX ``tdpbf16ps`` above, both with float32 accumulation and the scale
  and zero point applied once per group; without AVX512-BF16 the float32 path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from quantreg.methods._layers import rows_matmul

logger = logging.getLogger(__name__)

NB = 16  # outputs per block: one AVX-512 register of float32
KU = 32  # K is padded to a multiple of 32: one AMX tile row of bf16
DOT_MAX_ROWS = 1  # bf16 activations: vdpbf16ps for one row (decode), AMX above (measured)
_SOURCE = Path(__file__).with_name("wna16_kernel.cpp")
_BASE_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512vbmi", "f16c")

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_supports_avx512() -> bool:
    """Whether this CPU has the AVX-512 subsets the kernel is compiled for (probed)."""
    return set(_BASE_FLAGS) <= _cpu_flags()


def kernels() -> Any | None:
    """The compiled extension, or None (the reason is logged once)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        module, reason = None, None
        if os.environ.get("QUANTREG_NO_CPU_KERNELS"):
            reason = "QUANTREG_NO_CPU_KERNELS is set"
        elif not cpu_supports_avx512():
            reason = "this CPU lacks AVX-512 (" + "/".join(_BASE_FLAGS) + ")"
        else:
            try:
                from torch.utils.cpp_extension import load_inline

                source = _SOURCE.read_text()
                flags = ["-O3", "-fopenmp", *(f"-m{f}" for f in _BASE_FLAGS)]
                # one build folder per source, flags and torch: processes with different
                # versions of quantreg never rebuild each other's extension in place
                key = hashlib.sha256(
                    "\0".join([source, *flags, torch.__version__]).encode()
                ).hexdigest()[:16]
                default = Path.home() / ".cache" / "quantreg" / "kernels"
                build = Path(os.environ.get("QUANTREG_KERNEL_CACHE", default)) / key
                build.mkdir(parents=True, exist_ok=True)
                module = load_inline(
                    name=f"quantreg_wna16_{key}",
                    cpp_sources=source,
                    functions=["wna16_gemm", "amx_ready"],
                    extra_cflags=flags,
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(build),
                    verbose=False,
                )
            except Exception as exc:  # no compiler, no ninja, ...
                reason = f"building the C++ kernel failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            logger.warning("quantreg CPU kernels unavailable (%s); using torch's ops", reason)
        _state["module"] = module
        return module


def bf16_paths() -> tuple[bool, bool]:
    """(vdpbf16ps, AMX) available to this process; probed once, the reason logged if not."""
    with _lock:
        if "bf16" in _state:
            return _state["bf16"]
    module, flags = kernels(), _cpu_flags()
    dot = module is not None and "avx512_bf16" in flags and not os.environ.get("QUANTREG_NO_BF16")
    amx = dot and {"amx_tile", "amx_bf16"} <= flags and not os.environ.get("QUANTREG_NO_AMX")
    if amx and not module.amx_ready():
        logger.warning("quantreg: the kernel cannot use AMX (the OS refused the tile state)")
        amx = False
    if module is not None and not dot:
        logger.info("quantreg: no AVX512-BF16; half-precision activations use the float32 path")
    with _lock:
        _state["bf16"] = (dot, amx)
    return dot, amx


def to_blocked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[K, N]`` (N a multiple of 16) -> the kernel's layout ``[N/16, bytes]``."""
    k, n = codes.shape
    kp = -(-k // KU) * KU
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, kp - k))
    if bits == 8:  # (p, j, b, o) -> (b, p, j, o)
        return c.reshape(kp // 2, 2, n // NB, NB).permute(2, 0, 1, 3).reshape(n // NB, -1)
    c = c.reshape(kp // 4, 2, 2, n // NB, NB).permute(3, 0, 4, 2, 1)  # (b, t, o, j, h)
    return (c[..., 0] | (c[..., 1] << 4)).reshape(n // NB, -1)


def block_columns(t: torch.Tensor) -> torch.Tensor:
    """Per-column ``[G, N]`` (scales, zeros) -> ``[N/16, G, 16]``."""
    g, n = t.shape
    return t.reshape(g, n // NB, NB).permute(1, 0, 2).contiguous()


EXACT_MODES = {torch.float16: 1, torch.bfloat16: 2}  # else 3: float32 scales, no rounding
CODE_CHUNK = 1024  # output columns converted per step (a multiple of 16)


def attach(
    layer: torch.nn.Module,
    *,
    bits: int,
    k: int,
    n: int,
    codes: Any,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    group: int | None,
) -> bool:
    """Give ``layer`` the kernel's layout, if the kernel and the geometry allow.

    ``codes(c0, c1)``: unsigned codes ``[K, c1 - c0]`` in group-sorted row order;
    ``scales`` (the checkpoint's dtype) and ``zeros`` (unsigned) are ``[G, N]``;
    ``perm`` the row order applied to ``x`` at run time (None: identity).
    """
    if group is None or bits not in (4, 8) or n % NB:
        return False
    if scales.shape[0] > 1 and group % KU:
        return False
    if kernels() is None:
        return False
    chunks = range(0, n, CODE_CHUNK)
    blocks = [to_blocked(codes(c0, min(c0 + CODE_CHUNK, n)), bits) for c0 in chunks]
    layer.register_buffer("kblocked", torch.cat(blocks), persistent=False)
    layer.register_buffer("kscales", block_columns(scales), persistent=False)
    layer.register_buffer("kzeros", block_columns(zeros.to(torch.uint8)), persistent=False)
    layer.register_buffer("kperm", perm, persistent=False)
    layer.kbits, layer.kgroup = bits, group
    layer.kexact = EXACT_MODES.get(scales.dtype, 3)
    return True


def kernel_path(dtype: torch.dtype, rows: int) -> int:
    """0: float32 FMA (float32 activations, or no AVX512-BF16); 1: vdpbf16ps; 2: AMX."""
    dot, amx = bf16_paths()
    if dtype == torch.float32 or not dot:
        return 0
    return 2 if amx and rows > DOT_MAX_ROWS else 1


def apply_kernel(
    layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with the kernel's layout, the path chosen by dtype and rows."""

    def matmul(x2: torch.Tensor) -> torch.Tensor:
        path = kernel_path(x.dtype, x2.shape[0])
        xk = x2.to(torch.float32 if path == 0 else torch.bfloat16).contiguous()
        return kernels().wna16_gemm(
            xk, layer.kblocked, layer.kscales, layer.kzeros, layer.kbits, layer.kgroup,
            layer.kexact, path,
        )  # fmt: skip

    return rows_matmul(x, bias, layer.kperm, matmul)

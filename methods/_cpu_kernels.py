"""AVX-512 weight-only int4 / int8 matmul for the CPU, compiled just in time.

``load_inline`` builds a small C++ extension on first use (cached under
``~/.cache/quantreg/kernels``; nothing is built at install time, where an isolated build
would pull a CUDA torch). Without AVX-512, a compiler or ninja, ``kernels()`` returns None
once with the reason logged, and callers keep torch's ops.

Blocked layout (``to_blocked``): 16 outputs per block, for every input row the 16 codes of
the block stored contiguously -- int4 as ``uint8 [N/16, K/2, 16]`` (low nibble row ``2k``,
high nibble row ``2k+1``), int8 as ``uint8 [N/16, K, 16]``. Scales ``[G, N]`` stay in the
checkpoint's dtype (float32, float16 or bfloat16), zero points are uint8 ``[G, N]``. Two
modes, chosen by the caller:

* exact (``mode`` 1 = round to fp16, 2 = round to bf16, 3 = float32 scales, no rounding):
  every weight is dequantized, ``(q - z) * s`` rounded to the checkpoint's scale dtype, then
  accumulated in float32 -- the producers' weights, for float32 activations;
* fast (``mode`` 0): ``s * (sum x*q - z * sum x)`` per group, float32 accumulation.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

NB = 16  # outputs per block: one AVX-512 register of float32
_SOURCE = Path(__file__).with_name("wna16_kernel.cpp")

_lock = threading.Lock()
_state: dict[str, Any] = {}


def cpu_supports_avx512() -> bool:
    """Whether this CPU has the AVX-512 subsets the kernel is compiled for (probed)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512vl", "f16c"))


def kernels() -> Any | None:
    """The compiled extension, or None (the reason is logged once)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        module, reason = None, None
        if os.environ.get("QUANTREG_NO_CPU_KERNELS"):
            reason = "QUANTREG_NO_CPU_KERNELS is set"
        elif not cpu_supports_avx512():
            reason = "this CPU lacks AVX-512 (avx512f/bw/vl + f16c)"
        else:
            try:
                from torch.utils.cpp_extension import load_inline

                default = Path.home() / ".cache" / "quantreg" / "kernels"
                build = Path(os.environ.get("QUANTREG_KERNEL_CACHE", default))
                build.mkdir(parents=True, exist_ok=True)
                module = load_inline(
                    name="quantreg_wna16_v1",
                    cpp_sources=_SOURCE.read_text(),
                    functions=["wna16_gemm"],
                    extra_cflags=[
                        "-O3",
                        "-fopenmp",
                        "-mavx512f",
                        "-mavx512bw",
                        "-mavx512vl",
                        "-mf16c",
                    ],
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


def to_blocked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[K, N]`` (N a multiple of 16; K even for int4) -> the blocked layout."""
    k, n = codes.shape
    c = codes.to(torch.uint8).reshape(k, n // NB, NB).permute(1, 0, 2)  # [N/16, K, 16]
    if bits == 8:
        return c.contiguous()
    return (c[:, 0::2, :] | (c[:, 1::2, :] << 4)).contiguous()  # [N/16, K/2, 16]


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
    """Give ``layer`` the kernel's blocked layout, if the kernel and the geometry allow.

    ``codes(c0, c1)``: unsigned codes ``[K, c1 - c0]`` in group-sorted row order;
    ``scales`` (the checkpoint's dtype) and ``zeros`` (unsigned) are ``[G, N]``;
    ``perm`` the row order applied to ``x`` at run time (None: identity).
    """
    if group is None or bits not in (4, 8) or n % NB or (bits == 4 and (k % 2 or group % 2)):
        return False
    if kernels() is None:
        return False
    chunks = range(0, n, CODE_CHUNK)
    blocks = [to_blocked(codes(c0, min(c0 + CODE_CHUNK, n)), bits) for c0 in chunks]
    layer.register_buffer("kblocked", torch.cat(blocks), persistent=False)
    layer.register_buffer("kscales", scales.contiguous(), persistent=False)
    layer.register_buffer("kzeros", zeros.to(torch.uint8).contiguous(), persistent=False)
    layer.register_buffer("kperm", perm, persistent=False)
    layer.kbits, layer.kgroup = bits, group
    layer.kexact = EXACT_MODES.get(scales.dtype, 3)
    return True


def apply_kernel(
    layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with the blocked layout: exact mode for float32 activations."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if layer.kperm is not None:
        x2 = x2.index_select(-1, layer.kperm)
    mode = layer.kexact if x.dtype == torch.float32 else 0
    out = kernels().wna16_gemm(
        x2.to(torch.float32).contiguous(), layer.kblocked, layer.kscales, layer.kzeros,
        layer.kbits, layer.kgroup, mode,
    ).to(x.dtype)  # fmt: skip
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*lead, out.shape[-1])

"""Compile a Triton launch for a named CUDA architecture on a machine without a GPU.

What a first GPU run would otherwise find -- a kernel that does not compile for that
architecture, a configuration needing more shared memory than a block may have there, a dot
that does not reach the tensor cores -- is found here, on a CPU, by Triton's own compiler and
the ``ptxas`` its wheel ships, for ``GPUTarget("cuda", arch, 32)``. The launch is specialized as
Triton's JIT specializes a call: an integer equal to 1 becomes a constant, and a pointer or an
integer divisible by 16 is marked so (torch's allocations are 16-byte aligned).

Used by ``tests/test_triton_aot.py`` and ``bench/gpu.py --aot`` (every configuration the tuner
may try for the bench's shapes).
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from quantreg.kernels.triton_launch import Launch

logger = logging.getLogger(__name__)

# Shared memory a block may opt in to, in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# A100 (8.0), the 8.6 / 8.9 cards, H100 / H200 (9.0).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class Compiled:
    """What the compiler made of one launch for ``arch``.

    Attributes:
        arch: the compute capability, as ``90`` for 9.0.
        shared: bytes of shared memory one block needs.
        mma: the tensor-core instruction its dot became: ``"wgmma"`` (Hopper's warp-group
            MMA), ``"mma"`` (Ampere's), or None (no tensor cores: FMA).
        kernel: the kernel's name.
        registers: registers per thread, as ``ptxas -v`` reports them (None if not run).
        spilled: bytes spilled to local memory per thread (stores), likewise.
    """

    arch: int
    shared: int
    mma: str | None
    kernel: str
    registers: int | None = None
    spilled: int | None = None

    @property
    def fits(self) -> bool:
        """Whether a block's shared memory is within what the architecture allows."""
        return self.shared <= SHARED_LIMIT.get(self.arch, min(SHARED_LIMIT.values()))


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile ``launch`` for compute capability ``arch`` (e.g. 90) without running it.

    Raises:
        RuntimeError: triton is not installed, this Triton has no CUDA backend, or the kernels
            were imported under ``TRITON_INTERPRET=1`` (then they are interpreted functions).
        Exception: whatever Triton's compiler raises for a kernel it cannot compile.
    """
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction, mangle_type
    except ImportError as exc:
        raise RuntimeError(f"compiling ahead of time needs triton's CUDA backend: {exc}") from None
    fn = launch.kernel
    if not isinstance(fn, JITFunction):
        name = getattr(getattr(fn, "fn", fn), "__name__", repr(fn))
        raise RuntimeError(
            f"{name} is not a compiled Triton function: the kernels were imported under "
            "TRITON_INTERPRET=1; compile ahead of time in a process without it"
        )
    names = fn.arg_names
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = dict(launch.constexprs)
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    for index, (name, value) in enumerate(zip(names, launch.args, strict=False)):
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            constexprs[name] = 1  # the JIT's specialization of a 1
        elif isinstance(value, torch.Tensor) or (isinstance(value, int) and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
        signature[name] = "constexpr" if name in constexprs else mangle_type(value)
    for name in launch.constexprs:
        signature[name] = "constexpr"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": launch.config.num_warps, "num_stages": launch.config.num_stages}
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ttgir = kernel.asm["ttgir"]
    mma = "wgmma" if "warp_group_dot" in ttgir else ("mma" if "nvidia_mma" in ttgir else None)
    registers, spilled = _ptxas_usage(kernel.asm["ptx"], arch)
    return Compiled(arch=arch, shared=int(kernel.metadata.shared), mma=mma, kernel=fn.__name__,
                    registers=registers, spilled=spilled)  # fmt: skip


def _ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """Registers per thread and bytes spilled, from Triton's ``ptxas -v`` on ``ptx`` (None,
    None where this Triton does not say where its ptxas is)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path  # the ptxas Triton itself compiles with for this arch
    except (ImportError, AttributeError, TypeError):
        return None, None
    name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"  # Triton builds Hopper for sm_90a
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={name}", str(source), "-o",
                              str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True,
                             check=True)  # fmt: skip
    used = re.search(r"Used (\d+) registers", run.stderr + run.stdout)
    spill = re.search(r"(\d+) bytes spill stores", run.stderr + run.stdout)
    return (int(used.group(1)) if used else None), (int(spill.group(1)) if spill else None)

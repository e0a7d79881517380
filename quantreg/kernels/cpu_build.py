"""Building quantreg's CPU kernels: where a build is cached, and saying so while it runs.

Four C++ sources, five extensions (:class:`KernelSource`): ``wna16_kernel.cpp`` (int4 / int8,
AVX-512), ``wna16_avx2_kernel.cpp`` (int4 / int8, AVX2 + FMA + F16C; built a second time for
AVX512-VNNI as ``wna16_vnni``), ``float8_kernel.cpp`` (float8 / fp4, AVX2 + FMA + F16C) and
``float8_avx512_kernel.cpp`` (float8 / fp4, AVX512-BF16 and VBMI; kernel ``float8_avx512``).
They are built apart because a unit's flags apply to all of it: with ``-mavx512f`` the compiler
may emit AVX-512 in any function, which an AVX2-only CPU cannot run. The first use of one
compiles it with ``torch.utils.cpp_extension.load_inline`` (30-60 s), once per
:class:`BuildKey`: one folder per kernel, source, flags, torch, Python and environment
(``sys.prefix``) and compiler, so two venvs -- or two compilers -- never rebuild each other's
kernel in place (ninja's command line holds a venv's include paths). A build that is not cached
yet is announced by a WARNING line before it starts and a "still building" line every
:data:`TICK_S` seconds: a 60-second silence on a first load looks like a hang. ``quantreg
warmup`` builds every kernel ahead of time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quantreg.progress import announce_wait

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("wna16_kernel.cpp")
BASE_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512vbmi", "f16c")
CFLAGS = ("-O3", "-fopenmp", *(f"-m{f}" for f in BASE_FLAGS))
LDFLAGS = ("-fopenmp",)
FUNCTIONS = ("wna16_gemm", "amx_ready")
FLOAT8_SOURCE = Path(__file__).with_name("float8_kernel.cpp")
FLOAT8_FLAGS = ("avx2", "fma", "f16c")
FLOAT8_CFLAGS = ("-O3", "-fopenmp", *(f"-m{f}" for f in FLOAT8_FLAGS))
FLOAT8_FUNCTIONS = ("float8_gemm", "float8_mm", "float8_pack", "e2m1_pack")
FLOAT8_COMMON = Path(__file__).with_name("float8_common.h")  # after cpu_common.h, both builds
# the float8 kernel for AVX512-BF16 (vdpbf16ps; VBMI's byte permutes decode): the same layout
FLOAT8_512_SOURCE = Path(__file__).with_name("float8_avx512_kernel.cpp")
FLOAT8_512_FLAGS = (*FLOAT8_FLAGS, "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512bf16")
FLOAT8_512_CFLAGS = ("-O3", "-fopenmp", *(f"-m{f}" for f in FLOAT8_512_FLAGS))
FLOAT8_512_FUNCTIONS = ("float8_512_gemm", "float8_512_mm")
AVX2_SOURCE = Path(__file__).with_name("wna16_avx2_kernel.cpp")
AVX2_COMMON = Path(__file__).with_name("cpu_common.h")  # before both AVX2 sources, one unit
AVX2_FUNCTIONS = ("wna16_avx2_gemm", "wxa_avx2_gemm", "avx2_int_mm")
# the AVX2 int kernel's source built again for AVX512-VNNI (QR_VNNI: its integer paths in
# 512-bit registers, vpdpwssd / vpdpbusd), the same layout and entry points
VNNI_FLAGS = (*FLOAT8_FLAGS, "avx512f", "avx512bw", "avx512vl", "avx512vnni")
VNNI_CFLAGS = ("-O3", "-fopenmp", *(f"-m{f}" for f in VNNI_FLAGS), "-DQR_VNNI")
TICK_S = 10.0  # seconds between "still building" lines
FOLDER_LOCK = "quantreg.lock"  # what a process holds while it builds or loads a folder's kernel
TORCH_BATON = "lock"  # the file torch's load_inline keeps in the folder while it builds or loads
X_TILE_BYTES = 8 * 2**20  # float32 activations an AVX2 kernel converts at a time (C++ tiles x)


@dataclass(frozen=True)
class KernelSource:
    """One C++ kernel to build: its name, source file, flags and the functions it binds.

    Attributes:
        name: ``wna16``, ``wna16_avx2``, ``wna16_vnni``, ``float8`` or ``float8_avx512`` (the
            extension module is ``quantreg_<name>_<digest>``).
        path: the C++ source.
        cflags, ldflags: compiler and linker flags.
        functions: the functions bound to Python.
        title: what the log lines call it.
        prelude: files compiled before ``path`` in the same unit (code the kernels share).
    """

    name: str
    path: Path
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    functions: tuple[str, ...]
    title: str
    prelude: tuple[Path, ...] = ()

    def texts(self) -> list[str]:
        """The unit's text, file by file: the prelude, then the source."""
        return [p.read_text() for p in (*self.prelude, self.path)]


def kernel_source(name: str = "wna16") -> KernelSource:
    """The source named ``name``, from this module's constants as they are now (tests patch
    them)."""
    if name == "float8":
        return KernelSource("float8", FLOAT8_SOURCE, FLOAT8_CFLAGS, LDFLAGS, FLOAT8_FUNCTIONS,
                            "quantreg's AVX2 float8 kernel",
                            (AVX2_COMMON, FLOAT8_COMMON))  # fmt: skip
    if name == "float8_avx512":
        return KernelSource("float8_avx512", FLOAT8_512_SOURCE, FLOAT8_512_CFLAGS, LDFLAGS,
                            FLOAT8_512_FUNCTIONS, "quantreg's AVX512-BF16 float8 kernel",
                            (AVX2_COMMON, FLOAT8_COMMON))  # fmt: skip
    if name == "wna16_avx2":  # the float8 kernel's flags: AVX2, FMA, F16C
        return KernelSource("wna16_avx2", AVX2_SOURCE, FLOAT8_CFLAGS, LDFLAGS, AVX2_FUNCTIONS,
                            "quantreg's AVX2 int4 / int8 kernel", (AVX2_COMMON,))  # fmt: skip
    if name == "wna16_vnni":
        title = "quantreg's AVX512-VNNI int4 / int8 kernel"
        return KernelSource("wna16_vnni", AVX2_SOURCE, VNNI_CFLAGS, LDFLAGS, AVX2_FUNCTIONS,
                            title, (AVX2_COMMON,))  # fmt: skip
    return KernelSource("wna16", SOURCE, CFLAGS, LDFLAGS, FUNCTIONS, "quantreg's CPU kernel")


@dataclass(frozen=True)
class BuildKey:
    """Everything that makes one build of a kernel differ from another.

    Attributes:
        kernel: which :class:`KernelSource` (``wna16``, ``wna16_avx2``, ``wna16_vnni``,
            ``float8``, ``float8_avx512``).
        source: sha256 of the C++ source (its prelude first).
        flags: compiler and linker flags, and the functions bound.
        torch: ``torch.__version__`` (its headers and ABI).
        python: ``sys.version`` (the extension links against this interpreter).
        prefix: ``sys.prefix``: the venv, whose include paths ninja's build file holds.
        compiler: ``$CXX`` (torch's default ``c++``), where it resolves, and the first line of
            its ``--version``.
    """

    kernel: str
    source: str
    flags: tuple[str, ...]
    torch: str
    python: str
    prefix: str
    compiler: str

    @property
    def digest(self) -> str:
        """16 hex digits of a hash over every field: the build folder's name."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def module_name(self) -> str:
        return f"quantreg_{self.kernel}_{self.digest}"


def compiler_identity() -> str:
    """``$CXX`` (default ``c++``, as torch uses), its resolved path and its version line."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return f"{cxx} (not found)"
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        out = f"--version failed: {exc}"
    first = out.splitlines()[0] if out.strip() else "unknown version"
    return f"{cxx} -> {os.path.realpath(path)}: {first}"


def build_key(kernel: str = "wna16") -> BuildKey:
    """The key of a build of ``kernel`` in this process's environment (runs ``$CXX --version``
    once)."""
    import torch

    spec = kernel_source(kernel)
    return BuildKey(
        kernel=spec.name,
        source=hashlib.sha256("\n".join(spec.texts()).encode()).hexdigest(),
        flags=(*spec.cflags, *spec.ldflags, *spec.functions),
        torch=torch.__version__,
        python=sys.version,
        prefix=sys.prefix,
        compiler=compiler_identity(),
    )


def flags_reason(needed: tuple[str, ...], have: frozenset[str]) -> str | None:
    """Why a kernel compiled for the CPU flags ``needed`` must not be built or run in this
    process, given the flags it ``have`` (as ``/proc/cpuinfo`` names them): a missing flag, then
    ``QUANTREG_NO_CPU_KERNELS``; None: it may."""
    missing = [f for f in needed if f not in have]
    if missing:
        return f"this CPU lacks {'/'.join(missing)}"
    if os.environ.get("QUANTREG_NO_CPU_KERNELS"):
        return "QUANTREG_NO_CPU_KERNELS is set"
    return None


def cache_root() -> Path:
    """``$QUANTREG_KERNEL_CACHE``, else ``~/.cache/quantreg/kernels``."""
    default = Path.home() / ".cache" / "quantreg" / "kernels"
    return Path(os.environ.get("QUANTREG_KERNEL_CACHE", default))


def build_dir(key: BuildKey) -> Path:
    """The folder one build lives in."""
    return cache_root() / key.digest


def is_built(key: BuildKey) -> bool:
    """Whether the compiled library of ``key`` is already in its folder."""
    return (build_dir(key) / f"{key.module_name}.so").is_file()


def compile_extension(key: BuildKey, folder: Path) -> Any:
    """``load_inline``: compile (or, when ninja finds it up to date, just import) the kernel."""
    from torch.utils.cpp_extension import load_inline

    spec = kernel_source(key.kernel)
    return load_inline(
        name=key.module_name,
        cpp_sources=spec.texts(),
        functions=list(spec.functions),
        extra_cflags=list(spec.cflags),
        extra_ldflags=list(spec.ldflags),
        build_directory=str(folder),
        verbose=False,
    )


def build(kernel: str = "wna16") -> Any:
    """The compiled extension of ``kernel``, built first if this environment has no cached
    build -- then announced (WARNING) with the cache folder, and ticking while it compiles.

    Raises:
        Exception: whatever the compiler or ninja raise (the caller records it as the reason
            the kernel is unavailable).
    """
    key = build_key(kernel)
    title = kernel_source(kernel).title
    folder = build_dir(key)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder, title):
        if is_built(key):
            return compile_extension(key, folder)
        with announce_wait(
            f"building {title} once (~30-60 s), cached in {folder}",
            tick=f"still building {title}",
            done=f"{title} built",
            every=TICK_S,
            logger=logger,
        ):
            return compile_extension(key, folder)


@contextmanager
def folder_lock(folder: Path, title: str) -> Iterator[None]:
    """Hold ``folder``'s :data:`FOLDER_LOCK` (``flock``: the OS lets go of it when its process
    dies, however it dies), waiting -- and saying so -- while another process builds there.

    Every quantreg process builds or loads a folder under it, so a :data:`TORCH_BATON` found
    while holding it was left by a build that was interrupted (a killed process never removes
    it): it is removed, with a WARNING. torch's ``load_inline`` would wait for it forever,
    cached build or not, and every later first use of the kernel would hang.
    """
    import fcntl

    with open(folder / FOLDER_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting = "waiting for another process building or loading %s in %s"
            logger.warning(waiting, title, folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            baton = folder / TORCH_BATON
            if baton.exists():
                baton.unlink(missing_ok=True)
                logger.warning(
                    "removed %s, left by an interrupted build of %s (torch would wait for it "
                    "forever)", baton, title,
                )  # fmt: skip
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(
    state: dict[str, Any],
    lock: threading.Lock,
    kernel: str,
    not_here: Callable[[], str | None],
    failed: str,
    unavailable: str,
    log: logging.Logger,
) -> Any | None:
    """The extension of ``kernel`` for this process, or None: built (or loaded from the cache)
    on the first call unless ``not_here`` says why not, and kept in ``state`` (``module``, and
    the ``reason`` it is unavailable), so that no later call builds or warns again. ``failed``
    names the kernel in a failed build's reason; ``unavailable`` is the WARNING (``%s``: the
    reason) logged once on ``log``."""
    if "module" in state:  # decided once: every later call (each kernel call) takes no lock
        return state["module"]
    with lock:
        if "module" in state:
            return state["module"]
        module, reason = None, not_here()
        if reason is None:
            try:
                module = build(kernel)
            except Exception as exc:  # no compiler, no ninja, ...
                reason = f"building the C++ {failed} failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            log.warning(unavailable, reason)
        state["reason"], state["module"] = reason, module  # "module" last: it says decided
        return module

"""One C++ kernel extension as its module offers it (:class:`KernelUnit`): the four things every
kernel module of quantreg's says and does about its extension -- why it cannot run here, the
built extension (once a process), why it is missing, and ``quantreg warmup``'s build -- kept in
one place rather than written out again in each module (``cpu_avx2``, ``cpu_vnni``,
``cpu_float8``, ``cpu_float8_avx512``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantreg.kernels import cpu_build
from quantreg.kernels.cpu import Warmup, warm

__all__ = ["KernelUnit"]


@dataclass
class KernelUnit:
    """One C++ kernel extension as its module offers it (``cpu_avx2.UNIT``, ``cpu_vnni.UNIT``, ...):
    why it cannot run here, the built extension (once a process), why it is missing, a warmup.

    Attributes:
        kernel: the :class:`~quantreg.kernels.cpu_build.KernelSource` name it builds.
        flags: the CPU flags it is compiled for, as ``/proc/cpuinfo`` names them.
        title: what the build's log lines and a failed build's reason call it.
        unavailable: the WARNING logged once when it is unavailable (``%s``: the reason).
        log: the module's logger.
        probe: this CPU's flags (the module's ``probe_cpu_isa``, looked up when called).
        state: ``module`` and ``reason`` once decided (see ``cpu_build.build_once``).
    """

    kernel: str
    flags: tuple[str, ...]
    title: str
    unavailable: str
    log: logging.Logger
    probe: Callable[[], frozenset[str]]
    state: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def not_here(self, flags: frozenset[str] | None = None) -> str | None:
        """Why this process must not build or run it (None: it may): ``flags`` are the CPU's
        (default: probed)."""
        return cpu_build.flags_reason(self.flags, self.probe() if flags is None else flags)

    def extension(self) -> Any | None:
        """The compiled extension (built once per process, cached on disk), or None."""
        return cpu_build.build_once(self.state, self.lock, self.kernel, self.not_here, self.title,
                          self.unavailable, self.log)  # fmt: skip

    def loaded(self) -> Any:
        """The extension, for a call of its kernel.

        Raises:
            RuntimeError: it is unavailable, saying why (selection declines its kernels first).
        """
        module = self.extension()
        if module is None:
            raise RuntimeError(f"quantreg's {self.title} is unavailable: {self.state['reason']}")
        return module

    def unavailable_reason(self) -> str | None:
        """Why :meth:`extension` is None (None when it is built)."""
        self.extension()
        return self.state["reason"]

    def warmup(self) -> Warmup:
        """Build (or load) it now, so that no head load waits for the compiler."""
        return warm(self.not_here, self.kernel, self.extension, self.unavailable_reason)

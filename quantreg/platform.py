"""What this process can run: device type, CUDA capability, Triton, torch's CPU ops, CPU ISA.

``Platform`` only describes; methods decide from it. ``Platform.detect`` probes the real
machine; ``Platform.parse`` builds one from a string so that every decision can be tested
on a CPU (``"cpu"``, ``"cuda:9.0"``, ``"cuda:9.0-notriton"``, ``"cuda:7.5"``).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from quantreg.errors import InputError

# CPU flags (as /proc/cpuinfo spells them) that decide which CPU kernels can run.
CPU_ISA_FLAGS = (
    "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "f16c", "avx512_bf16", "amx_tile", "amx_bf16",
    "avx2", "fma", "avx512_vnni",
)  # fmt: skip
_CUDA_RE = re.compile(r"^cuda:(\d+)\.(\d+)(-notriton)?$")

PLATFORM_SYNTAX = "'cpu', 'cuda:MAJOR.MINOR' (e.g. 'cuda:9.0') or 'cuda:MAJOR.MINOR-notriton'"


@dataclass(frozen=True)
class Platform:
    """A device kind plus the capabilities that decide which kernels can run."""

    device: Literal["cpu", "cuda"]
    capability: tuple[int, int] | None = None
    triton: bool = False
    cpu_weight_only_ops: bool = True
    # The CPU's ISA flags that kernels care about (avx512f, avx512_bf16, amx_bf16, ...);
    # None: not probed (a parsed platform), and kernel selection probes this machine.
    cpu_isa: frozenset[str] | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Build a platform from ``'cpu'``, ``'cuda:9.0'`` or ``'cuda:9.0-notriton'``.

        Raises:
            InputError: anything else, e.g. a torch device string such as ``'cuda:0'``.
        """
        if not isinstance(text, str):
            raise InputError(
                f"a platform must be a string or Platform, got {text!r}", field="platform"
            )
        spec = text.strip().lower()
        if spec == "cpu":
            return cls("cpu")
        match = _CUDA_RE.match(spec)
        if match:
            major, minor, notriton = match.groups()
            return cls("cuda", (int(major), int(minor)), triton=notriton is None)
        hint = ""
        if re.match(r"^(cuda(:\d+)?|gpu)$", spec):
            hint = (
                f" '{text}' looks like a torch device; a platform names a compute capability "
                f"(e.g. 'cuda:9.0'), or use Platform.detect('{text}') to probe that device."
            )
        raise InputError(
            f"invalid platform {text!r}: expected {PLATFORM_SYNTAX}.{hint}", field="platform"
        )

    @classmethod
    def detect(cls, device: Any = None) -> Platform:
        """Probe the platform that a torch ``device`` (default: cuda if available) runs on.

        Raises:
            InputError: the device is neither cpu nor cuda, or cuda is not available.
        """
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"invalid device {device!r}: {exc}") from exc
        if dev.type == "cpu":
            return cls(
                "cpu", cpu_weight_only_ops=_has_cpu_weight_only_ops(), cpu_isa=probe_cpu_isa()
            )
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise InputError(f"device {device!r} requested but CUDA is not available")
            capability = torch.cuda.get_device_capability(dev)
            return cls("cuda", tuple(capability), triton=_triton_available())
        raise InputError(f"unsupported device {device!r}: quantreg runs on cpu or cuda")

    @classmethod
    def coerce(cls, value: Platform | str | None) -> Platform:
        """Accept a Platform, a platform string, or None (detect the default device)."""
        if value is None:
            return cls.detect()
        if isinstance(value, Platform):
            return value
        return cls.parse(value)

    def has_cuda(self, minimum: tuple[int, int]) -> bool:
        """Whether this is CUDA with at least the given compute capability."""
        return self.device == "cuda" and self.capability is not None and self.capability >= minimum

    def __str__(self) -> str:
        if self.device == "cpu":
            return "cpu"
        assert self.capability is not None
        text = f"cuda:{self.capability[0]}.{self.capability[1]}"
        return text if self.triton else f"{text}-notriton"


def _triton_available() -> bool:
    # find_spec, not import: importing triton is slow and must not happen at resolve time.
    return importlib.util.find_spec("triton") is not None


def _has_cpu_weight_only_ops() -> bool:
    import torch

    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_weight_int8pack_mm"
    )


def probe_cpu_isa() -> frozenset[str]:
    """The flags of ``CPU_ISA_FLAGS`` this CPU has (from ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split()) & frozenset(CPU_ISA_FLAGS)
    return frozenset()

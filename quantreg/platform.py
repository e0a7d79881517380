"""What this process can run: device type, CUDA capability, Triton, torch's CPU ops.

``Platform`` only describes; methods decide from it. ``Platform.detect`` probes the real
machine; ``Platform.parse`` builds one from a string so that every decision can be tested
on a CPU (``"cpu"``, ``"cuda:9.0"``, ``"cuda:9.0-notriton"``, ``"cuda:7.5"``).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any, Literal

from quantreg.errors import ConfigError

_CUDA_RE = re.compile(r"^cuda:(\d+)\.(\d+)(-notriton)?$")

PLATFORM_SYNTAX = "'cpu', 'cuda:MAJOR.MINOR' (e.g. 'cuda:9.0') or 'cuda:MAJOR.MINOR-notriton'"


@dataclass(frozen=True)
class Platform:
    """A device kind plus the capabilities that decide which kernels can run."""

    device: Literal["cpu", "cuda"]
    capability: tuple[int, int] | None = None
    triton: bool = False
    cpu_weight_only_ops: bool = True

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Build a platform from ``'cpu'``, ``'cuda:9.0'`` or ``'cuda:9.0-notriton'``.

        Raises:
            ConfigError: anything else, e.g. a torch device string such as ``'cuda:0'``.
        """
        if not isinstance(text, str):
            raise ConfigError(f"a platform must be a string or Platform, got {text!r}")
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
        raise ConfigError(f"invalid platform {text!r}: expected {PLATFORM_SYNTAX}.{hint}")

    @classmethod
    def detect(cls, device: Any = None) -> Platform:
        """Probe the platform that a torch ``device`` (default: cuda if available) runs on.

        Raises:
            ConfigError: the device is neither cpu nor cuda, or cuda is not available.
        """
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"invalid device {device!r}: {exc}") from exc
        if dev.type == "cpu":
            return cls("cpu", cpu_weight_only_ops=_has_cpu_weight_only_ops())
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"device {device!r} requested but CUDA is not available")
            capability = torch.cuda.get_device_capability(dev)
            return cls("cuda", tuple(capability), triton=_triton_available())
        raise ConfigError(f"unsupported device {device!r}: quantreg runs on cpu or cuda")

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

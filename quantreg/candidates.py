"""The methods probed for a layer: *readers* of the checkpoint's format and their *probes*.

A reader is a loaded method that reads the format, with the config as it parsed it; a probe
tries one reader for the layer (its effective config, why it cannot compute it, why the
platform lacks its kernel). The requested reader, or the highest-priority accepting one, wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantreg.checkpoint import FLOAT_DTYPES, TensorInfo
from quantreg.contract import LayerRule, QuantConfig, is_lm_head
from quantreg.errors import ConfigError, PluginError
from quantreg.platform import Platform
from quantreg.registry import Registry, normalize_name
from quantreg.resolution import Candidate


@dataclass(frozen=True)
class Reader:
    """A method that reads the checkpoint's format, with the config as it parsed it."""

    name: str
    cls: type[QuantConfig]
    config: QuantConfig

    @property
    def priority(self) -> int:
        return self.cls.upgrade_priority


@dataclass(frozen=True)
class Probe:
    """One reader tried for the layer: its effective per-layer config, why it cannot compute
    that config (``unable``), and why the platform lacks its kernel (``off_platform``)."""

    reader: Reader
    effective: QuantConfig | None
    unable: str | None = None
    off_platform: str | None = None

    @property
    def accepted(self) -> bool:
        return self.effective is not None and self.unable is None and self.off_platform is None

    @property
    def why_not(self) -> str:
        return self.unable or self.off_platform or ""


def find_readers(
    registry: Registry, fmt: str, where: str, data: Mapping[str, Any], path: Path | None = None
) -> tuple[list[Reader], list[Candidate]]:
    """Every loaded method that reads ``fmt``, its parsed config, sorted by priority.

    Built-ins are imported; plugins take part once imported. A broken plugin, or a plugin
    whose parser fails, becomes a declined candidate. The format's own parser failing is the
    checkpoint's fault and raises (with ``path``, the config file).
    """
    declined: list[Candidate] = []
    classes: dict[str, type[QuantConfig]] = {}
    for name in [*registry.builtin_names(), fmt]:
        try:
            classes[name] = registry.get(name)
        except PluginError as exc:
            declined.append(Candidate(name, False, str(exc)))
    classes.update(registry.loaded())
    declined += [
        Candidate(n, False, err) for n, err in registry.broken().items()
        if n not in classes and all(c.name != n for c in declined)
    ]  # fmt: skip
    readers = []
    for name, cls in classes.items():
        formats = {normalize_name(f) for f in cls.checkpoint_formats}
        if name != fmt and fmt not in formats:
            continue
        try:
            config = cls.from_quant_config(data, method=name, source=where)
        except ConfigError as exc:
            if name == fmt:
                exc.path = exc.path or path
                raise
            declined.append(
                Candidate(name, False, "cannot parse this config", cls.upgrade_priority)
            )
            continue
        except Exception as exc:
            declined.append(Candidate(name, False, f"failed: {type(exc).__name__}: {exc}"))
            continue
        readers.append(Reader(name, cls, config))
    readers.sort(key=lambda r: (-r.priority, r.name))
    return readers, declined


def probe(
    reader: Reader,
    rule: LayerRule,
    prefix: str,
    platform: Platform,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Probe:
    """Try one reader for the layer (``shapes``: its stored tensors' shapes, by name after the
    prefix); a plugin's failing hook declines it, never raises."""
    try:
        effective = reader.config.for_layer(rule, shapes)
        if is_lm_head(prefix) and not reader.cls.supports_lm_head:
            unable: str | None = (
                "cannot run a quantized lm_head (supports_lm_head is false for "
                f"{reader.cls.__name__})"
            )
        else:
            unable = effective.format_reason()
        return Probe(reader, effective, unable, effective.platform_reason(platform))
    except Exception as exc:  # a plugin's hook must not break resolution
        return Probe(reader, None, f"failed: {type(exc).__name__}: {exc}")


def pick_requested(
    probes: list[Probe], req: str, prefix: str, source: str, notes: list[str]
) -> tuple[Probe, list[Candidate]]:
    """The requested reader, which must be able to compute the layer (off-platform is noted).

    Raises:
        ConfigError: the requested method cannot compute the layer's config.
    """
    chosen = next(p for p in probes if p.reader.name == req)
    if chosen.effective is None or chosen.unable is not None:
        raise ConfigError(
            f"requested method '{req}' cannot run '{prefix}' of {source}: {chosen.unable}"
        )
    why = "requested"
    if chosen.off_platform is not None:
        why += f"; {chosen.off_platform}, so it runs its CPU path"
        notes.append(f"{req} runs its CPU path: {chosen.off_platform}")
    candidates = [Candidate(chosen.reader.name, True, why, chosen.reader.priority)]
    candidates += [
        Candidate(p.reader.name, False, "not requested", p.reader.priority)
        for p in probes
        if p is not chosen
    ]
    return chosen, candidates


def pick_best(
    probes: list[Probe],
    declined: list[Candidate],
    *,
    fmt: str,
    rule_text: str,
    prefix: str,
    source: str,
    platform: Platform,
) -> tuple[Probe, list[Candidate]]:
    """The highest-priority accepting reader, and every candidate with its reason.

    Raises:
        ConfigError: no reader accepts; the message lists every reason.
    """
    winner = next((p for p in probes if p.accepted), None)
    if winner is None:
        lines = "".join(f"\n  - {p.reader.name}: {p.why_not}" for p in probes)
        lines += "".join(f"\n  - {c.name}: {c.reason}" for c in declined)
        raise ConfigError(
            f"no method can run the quantized '{prefix}' of {source} "
            f"(quant_method '{fmt}', {rule_text}) on platform {platform}:{lines}"
        )
    candidates = []
    for p in probes:
        if p is winner:
            why = f"highest-priority method that reads '{fmt}' and runs on {platform}"
            candidates.append(Candidate(p.reader.name, True, why, p.reader.priority))
        elif not p.accepted:
            candidates.append(Candidate(p.reader.name, False, p.why_not, p.reader.priority))
        else:
            why = f"viable, but '{winner.reader.name}' has a higher priority"
            candidates.append(Candidate(p.reader.name, False, why, p.reader.priority))
    return winner, candidates


def tensor_names(registry: Registry) -> frozenset[str]:
    """The tensor names the loaded methods declare for their formats."""
    return frozenset().union(*(cls.tensor_names for cls in registry.loaded().values()))


def is_quantized_tensor(info: TensorInfo, prefix: str, names: frozenset[str]) -> bool:
    """Whether a tensor of layer ``prefix`` belongs to a quantized layout: a name some method
    declares (``qweight``, ``weight_scale``, ...) or any tensor that is not float."""
    return info.name[len(prefix) + 1 :] in names or info.dtype not in FLOAT_DTYPES

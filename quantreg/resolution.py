"""Deciding which method a layer gets, and why: ``resolve(...) -> Resolution``.

Pure: it reads ``config.json`` and safetensors headers (names, dtypes, shapes), never tensor
data, and takes the platform as a value, so every decision is testable on a CPU.

Upgrade rules live with the methods: every method that reads the checkpoint's format is a
candidate; it may decline for the layer's config (``format_reason``) or for the platform
(``platform_reason``); the accepted candidate with the highest ``upgrade_priority`` wins.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from quantreg.base import LayerRule, QuantConfig, is_lm_head
from quantreg.checkpoint import (
    FLOAT_DTYPES,
    SIDE_TENSORS,
    TensorInfo,
    tensor_infos,
    tensor_names,
)
from quantreg.config import (
    LEGACY_FILES,
    DetectedQuantConfig,
    detect_quant_config,
    load_model_config,
)
from quantreg.errors import CheckpointError, ConfigError, PluginError, UnknownMethodError
from quantreg.platform import Platform
from quantreg.registry import Registry, default_registry, normalize_name

logger = logging.getLogger(__name__)

UNQUANTIZED = "unquantized"
# Tensor names (after the layer prefix) that only a quantized layer has.
QUANTIZED_TENSOR_NAMES = frozenset({
    "qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale",
    "weight_zero_point", "weight_shape", "weight_g_idx",
})  # fmt: skip

TensorState = Literal["quantized", "unquantized", "absent"]


@dataclass(frozen=True)
class Candidate:
    """One method probed for the layer: whether it was chosen, and why (not)."""

    name: str
    accepted: bool
    reason: str
    priority: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accepted": self.accepted,
            "reason": self.reason,
            "priority": self.priority,
        }


@dataclass(frozen=True)
class Resolution:
    """Which method a layer of a checkpoint uses on a platform, with the reasons.

    ``method`` is the canonical method name, or None whenever the layer stays unquantized;
    ``rule`` starts with the config key that decided and lists other rules that fired;
    ``tensors`` is what the safetensors headers show for the layer (None: no weights read).
    """

    method: str | None
    quantized: bool
    rule: str
    candidates: tuple[Candidate, ...]
    config: QuantConfig | None
    prefix: str
    platform: Platform
    source: str
    format: str | None = None
    requested: str | None = None
    tensors: TensorState | None = None
    tensor_infos: tuple[TensorInfo, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tensors_agree(self) -> bool | None:
        """Whether the checkpoint's tensors match the decision (None: unknown or absent)."""
        if self.tensors in (None, "absent"):
            return None
        return (self.tensors == "quantized") == self.quantized

    def explain(self) -> str:
        """A multi-line, human-readable account of the decision."""
        fmt = f"quant_method '{self.format}'" if self.format else "no quantization_config"
        lines = [
            f"{self.prefix} of {self.source} ({fmt}, platform {self.platform})",
            f"  method: {self.method or 'unquantized'}"
            + (" (quantized)" if self.quantized else " (the layer stays unquantized)"),
            f"  rule: {self.rule}",
        ]
        if self.requested:
            lines.append(f"  requested: {self.requested}")
        lines.append("  candidates:")
        for c in self.candidates:
            prio = f" [priority {c.priority}]" if c.priority is not None else ""
            lines.append(f"    {'+' if c.accepted else '-'} {c.name}{prio}: {c.reason}")
        if self.tensors is not None:
            shown = ", ".join(
                f"{t.name} {t.dtype} {list(t.shape)}" for t in self.tensor_infos[:6]
            ) + (", ..." if len(self.tensor_infos) > 6 else "")
            lines.append(f"  tensors: {self.tensors}" + (f" ({shown})" if shown else ""))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form with keys method, quantized, rule, candidates, config and more."""
        return {
            "method": self.method,
            "quantized": self.quantized,
            "rule": self.rule,
            "candidates": [c.to_dict() for c in self.candidates],
            "config": self.config.model_dump(mode="json") if self.config is not None else None,
            "format": self.format,
            "prefix": self.prefix,
            "platform": str(self.platform),
            "source": self.source,
            "requested": self.requested,
            "tensors": None
            if self.tensors is None
            else {
                "state": self.tensors,
                "names": [t.name for t in self.tensor_infos],
            },
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class CheckpointView:
    """What resolution knows of a checkpoint: config, quantization config, layer headers."""

    source: str
    root: Path | None
    config: Mapping[str, Any]
    quant: DetectedQuantConfig | None
    tensors: Mapping[str, TensorInfo] | None  # under the prefix; None: no weights
    side: Mapping[str, TensorInfo] = field(default_factory=dict)  # d2t, embeddings
    modules: frozenset[str] = frozenset()  # every module name of the checkpoint
    config_file: Path | None = None


_cache: dict[tuple[str, str], tuple[tuple[Any, ...], CheckpointView]] = {}
_cache_lock = threading.Lock()
_CACHE_SIZE = 64


def read_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, Any], prefix: str
) -> CheckpointView:
    """The checkpoint view of a folder, a config.json path or a dict (cached by path + mtime).

    Raises:
        CheckpointError: the path does not exist, or its index / headers are bad.
        ConfigError: config.json is missing, unreadable or not JSON.
    """
    if isinstance(source, Mapping):
        if "quant_method" in source:
            label = "<quantization_config dict>"
            quant = detect_quant_config({"quantization_config": source}, label=label)
            if quant is not None:
                quant = DetectedQuantConfig(quant.quant_method, quant.data, label)
            return CheckpointView(label, None, {}, quant, None)
        quant = detect_quant_config(source, label="<config dict>")
        return CheckpointView("<config dict>", None, source, quant, None)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"resolve() takes a checkpoint folder, a config.json path or a dict; got {source!r}"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist", path=path)
    root = path if path.is_dir() else path.parent
    key = (str(path.resolve()), prefix)
    stamp = _stamp(root)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    config, config_path = load_model_config(path)
    quant = detect_quant_config(config, config_path=config_path, root=root)
    if config_path is None and quant is None:
        raise ConfigError(
            f"{path} has no config.json (nor {' / '.join(n for n, _ in LEGACY_FILES)}); "
            "expected a Hugging Face checkpoint folder"
        )
    infos = tensor_infos(root, prefix=prefix, names=SIDE_TENSORS)
    if infos is None:
        view = CheckpointView(str(path), root, config, quant, None, config_file=config_path)
    else:
        side = {n: infos.pop(n) for n in SIDE_TENSORS if n in infos and not _under(n, prefix)}
        modules = frozenset(name.rpartition(".")[0] for name in tensor_names(root))
        view = CheckpointView(str(path), root, config, quant, infos, side, modules, config_path)
    with _cache_lock:
        if len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = (stamp, view)
    return view


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _stamp(root: Path) -> tuple[Any, ...]:
    """Name, size and mtime of every JSON and safetensors file: changes when any is rewritten."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return ()
    stamp = []
    for entry in entries:
        if entry.name.endswith((".json", ".safetensors")):
            try:
                st = entry.stat()
            except OSError:
                continue
            stamp.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def clear_cache() -> None:
    """Forget every cached checkpoint view."""
    with _cache_lock:
        _cache.clear()


def resolve(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    platform: Platform | str | None = None,
    requested: str | None = None,
    prefix: str = "lm_head",
) -> Resolution:
    """Decide which quantization method the layer ``prefix`` of a checkpoint uses, and why.

    ``source`` is a checkpoint folder, a config.json path, or a dict (with ``quant_method``:
    a quantization_config; else a whole config.json). ``platform`` defaults to the detected
    one. ``requested`` forces a method, which must be able to read the checkpoint's format.

    Raises:
        ConfigError: a bad config; a requested method that cannot read the format; or a
            quantized layer that no method can run on this platform.
        UnknownMethodError: ``requested`` names no registered method.
        CheckpointError: bad checkpoint files (index, headers, links).
    """
    plat = Platform.coerce(platform)
    view = read_checkpoint(source, prefix)
    registry = default_registry()
    resolution = _decide(view, plat, requested, prefix, registry)
    logger.info(
        "%s of %s on %s -> %s (%s)",
        prefix,
        resolution.source,
        plat,
        resolution.method or "unquantized",
        resolution.rule,
    )
    return resolution


def _decide(
    view: CheckpointView, platform: Platform, requested: str | None, prefix: str, registry: Registry
) -> Resolution:
    req = registry.canonical_name(requested) if requested is not None else None
    if req is not None:
        registry.get(req)  # a requested plugin that fails to load is an error, named as such
    state, infos = _tensor_state(view.tensors, prefix)
    common: dict[str, Any] = dict(
        prefix=prefix, platform=platform, source=view.source, requested=req,
        tensors=state, tensor_infos=infos,
    )  # fmt: skip

    if view.quant is None:
        if req not in (None, UNQUANTIZED):
            raise ConfigError(
                f"requested method '{req}' cannot read {view.source}: the checkpoint has no "
                "quantization_config (it is unquantized)"
            )
        rule = LayerRule(False, "no quantization_config")
        chosen = Candidate(UNQUANTIZED, True, "the checkpoint declares no quantization")
        return Resolution(
            None, False, rule.rule, (chosen,), None,
            notes=tuple(_tensor_notes(rule, state, infos, prefix)), **common,
        )  # fmt: skip

    where = view.quant.where
    fmt = _format_name(view.quant, registry)
    readers, declined = _readers(registry, fmt, where, view.quant.data)
    if not readers:
        raise ConfigError(
            f"no installed method reads quant_method '{fmt}' ({where}):"
            + "".join(f"\n  - {c.name}: {c.reason}" for c in declined)
        )
    decider = next((cfg for name, _, cfg in readers if name == fmt), readers[0][2])
    rule = decider.layer_rule(prefix)
    overridden = None
    if not rule.quantized and state == "quantized":
        # The tensors are the truth: a packed head is never loaded as a float one.
        suffixes = frozenset(t.name[len(prefix) + 1 :] for t in infos)
        by_tensors = decider.rule_from_tensors(prefix, suffixes)
        if by_tensors is not None:
            overridden, rule = (
                rule,
                replace(by_tensors, also=(*by_tensors.also, rule.rule, *rule.also)),
            )
    rule_text = rule.rule + ("; also: " + "; ".join(rule.also) if rule.also else "")
    common["format"] = fmt
    reader_names = sorted(name for name, _, _ in readers)
    if (
        req is not None
        and req not in reader_names
        and not (req == UNQUANTIZED and not rule.quantized)
    ):
        raise ConfigError(
            f"requested method '{req}' cannot read {view.source}: its quantization config "
            f"({where}) is quant_method '{fmt}', which only {', '.join(reader_names)} can read"
        )
    notes = _tensor_notes(rule, state, infos, prefix)
    if view.modules:
        for entry in decider.unmatched_entries(view.modules):
            logger.warning("%s: %s", where, entry)
            notes.append(entry)
    if overridden is not None:
        notes.append(
            f"the config keeps '{prefix}' unquantized ({overridden.rule}), but its tensors are "
            f"packed in the {fmt} layout: they are loaded quantized, as the tensors say"
        )
    if view.quant.note:
        notes.insert(0, view.quant.note)

    if not rule.quantized:
        chosen = Candidate(UNQUANTIZED, True, f"the config keeps '{prefix}' unquantized")
        return Resolution(
            None, False, rule_text, (chosen, *declined), None, notes=tuple(notes), **common
        )

    probes = []
    for name, cls, cfg in readers:
        try:
            effective = cfg.for_layer(rule)
            unable = _format_reason(cls, effective, prefix)
            on_platform = effective.platform_reason(platform)
        except Exception as exc:  # a plugin's hook must not break resolution
            probes.append((name, cls, None, f"failed: {type(exc).__name__}: {exc}", None))
            continue
        probes.append((name, cls, effective, unable, on_platform))

    if req is not None:
        name, cls, effective, unable, on_platform = next(p for p in probes if p[0] == req)
        if effective is None or unable is not None:
            raise ConfigError(
                f"requested method '{req}' cannot run '{prefix}' of {view.source}: {unable}"
            )
        why = "requested"
        if on_platform is not None:
            why += f"; {on_platform}, so it runs its CPU path"
            notes.append(f"{req} runs its CPU path: {on_platform}")
        candidates = [Candidate(req, True, why, cls.upgrade_priority)]
        candidates += [
            Candidate(p[0], False, "not requested", p[1].upgrade_priority)
            for p in probes
            if p[0] != req
        ]
    else:
        winner = next((p for p in probes if p[3] is None and p[4] is None), None)
        if winner is None:
            lines = "".join(f"\n  - {p[0]}: {p[3] or p[4]}" for p in probes)
            lines += "".join(f"\n  - {c.name}: {c.reason}" for c in declined)
            raise ConfigError(
                f"no method can run the quantized '{prefix}' of {view.source} "
                f"(quant_method '{fmt}', {rule_text}) on platform {platform}:{lines}"
            )
        name, cls, effective = winner[0], winner[1], winner[2]
        candidates = []
        for p in probes:
            prio = p[1].upgrade_priority
            if p is winner:
                why = f"highest-priority method that reads '{fmt}' and runs on {platform}"
                candidates.append(Candidate(p[0], True, why, prio))
            elif p[3] or p[4]:
                candidates.append(Candidate(p[0], False, p[3] or p[4], prio))
            else:
                candidates.append(
                    Candidate(p[0], False, f"viable, but '{name}' has a higher priority", prio)
                )
    assert effective is not None
    notes.extend(effective.notes())
    return Resolution(
        name, True, rule_text, (*candidates, *declined), effective, notes=tuple(notes), **common
    )


def _format_name(quant: DetectedQuantConfig, registry: Registry) -> str:
    try:
        return registry.canonical_name(quant.quant_method)
    except UnknownMethodError as exc:
        raise ConfigError(f"{quant.where}: field 'quant_method': {exc}") from exc


def _readers(
    registry: Registry, fmt: str, where: str, data: Mapping[str, Any]
) -> tuple[list[tuple[str, type[QuantConfig], QuantConfig]], list[Candidate]]:
    """Every loaded method that reads ``fmt``, its parsed config, sorted by priority.

    Built-ins are imported; plugins take part once imported. A broken plugin, or a plugin
    whose parser fails, becomes a declined candidate. The format's own parser failing is the
    checkpoint's fault and raises.
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
            cfg = cls.from_quant_config(data, method=name, source=where)
        except ConfigError:
            if name == fmt:
                raise
            declined.append(
                Candidate(name, False, "cannot parse this config", cls.upgrade_priority)
            )
            continue
        except Exception as exc:
            declined.append(Candidate(name, False, f"failed: {type(exc).__name__}: {exc}"))
            continue
        readers.append((name, cls, cfg))
    readers.sort(key=lambda r: (-r[1].upgrade_priority, r[0]))
    return readers, declined


def _format_reason(cls: type[QuantConfig], effective: QuantConfig, prefix: str) -> str | None:
    if is_lm_head(prefix) and not cls.supports_lm_head:
        return f"cannot run a quantized lm_head (supports_lm_head is false for {cls.__name__})"
    return effective.format_reason()


def is_quantized_tensor(info: TensorInfo, prefix: str) -> bool:
    """Whether a tensor of layer ``prefix`` belongs to a quantized layout (packed codes,
    scales, zero points, or an integer / fp8 ``weight``)."""
    suffix = info.name[len(prefix) + 1 :]
    return suffix in QUANTIZED_TENSOR_NAMES or (
        suffix == "weight" and info.dtype not in FLOAT_DTYPES
    )


def _tensor_state(
    tensors: Mapping[str, TensorInfo] | None, prefix: str
) -> tuple[TensorState | None, tuple[TensorInfo, ...]]:
    if tensors is None:
        return None, ()
    infos = tuple(sorted(tensors.values(), key=lambda t: t.name))
    if not infos:
        return "absent", ()
    if any(is_quantized_tensor(t, prefix) for t in infos):
        return "quantized", infos
    return "unquantized", infos


def _tensor_notes(
    rule: LayerRule, state: TensorState | None, infos: tuple[TensorInfo, ...], prefix: str
) -> list[str]:
    names = ", ".join(f"{t.name} ({t.dtype})" for t in infos[:4])
    if state == "quantized" and not rule.quantized:
        return [
            f"the config keeps '{prefix}' unquantized ({rule.rule}) but the checkpoint's "
            f"tensors are quantized: {names}"
        ]
    if state == "unquantized" and rule.quantized:
        return [
            f"the config quantizes '{prefix}' ({rule.rule}) but the checkpoint holds float "
            f"tensors: {names}"
        ]
    if state == "absent":
        return [f"the checkpoint has no '{prefix}.*' tensors (a tied or shared head)"]
    return []

"""The decision behind ``resolve``: which method a layer gets, as small steps over typed records.

1. the checkpoint's format (its ``quant_method``, relabelled by the method that owns the name);
2. the *readers*: every loaded method that reads the format, with the config parsed by it;
3. the layer rule of the format's own reader -- overridden by the tensors when the config keeps
   a layer float over tensors packed in the format's layout -- or a tied embedding;
4. a *probe* of every reader for the layer (its effective config; why it cannot compute it;
   why the platform lacks its kernel);
5. the requested reader, or the highest-priority one that accepts
   (:mod:`quantreg.candidates` holds steps 2, 4 and 5).

Upgrade rules live with the methods (``format_reason``, ``platform_reason``,
``upgrade_priority``); nothing here knows a format by name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from quantreg.candidates import (
    Reader,
    find_readers,
    is_quantized_tensor,
    pick_best,
    pick_requested,
    probe,
    tensor_names,
)
from quantreg.checkpoint import EMBEDDING_NAMES, TensorInfo
from quantreg.contract import LayerRule, Relabel, is_lm_head
from quantreg.detection import flatten_config
from quantreg.errors import ConfigError, PluginError, UnknownMethodError
from quantreg.patterns import check_prefix
from quantreg.platform import Platform
from quantreg.registry import Registry, default_registry
from quantreg.resolution import UNQUANTIZED, Candidate, Resolution, TensorState
from quantreg.unsupported import (
    config_rule,
    is_variant_error,
    known_method,
    not_supported,
    other_layers_reason,
)
from quantreg.view import CheckpointView, read_checkpoint

logger = logging.getLogger(__name__)
Format = tuple[str, Mapping[str, Any], Relabel | None]
Decided = tuple[LayerRule, LayerRule | None]


@dataclass(frozen=True)
class Facts:
    """What the decision starts from: the view, the layer, the platform, the request."""

    view: CheckpointView
    prefix: str
    platform: Platform
    requested: str | None
    registry: Registry
    state: TensorState | None = None
    infos: tuple[TensorInfo, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def shown_tensors(self) -> str:
        """The layer's first tensors with their dtypes, for messages."""
        return ", ".join(f"{t.name} ({t.dtype})" for t in self.infos[:4])

    def resolution(self, **values: Any) -> Resolution:
        """A Resolution of these facts (``values`` fill the decision's own fields)."""
        return Resolution(
            prefix=self.prefix, platform=self.platform, source=self.view.source,
            requested=self.requested, tensors=self.state, tensor_infos=self.infos,
            view=self.view, **{"notes": tuple(self.notes), **values},
        )  # fmt: skip


def resolve(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    platform: Platform | str | None = None,
    requested: str | None = None,
    prefix: str = "lm_head",
    registry: Registry | None = None,
) -> Resolution:
    """Decide which quantization method the layer ``prefix`` of a checkpoint uses, and why.

    ``source`` is a checkpoint folder, a config.json path, or a dict (with ``quant_method``:
    a quantization_config; else a whole config.json). ``platform`` defaults to the detected
    one. ``requested`` forces a method, which must be able to read the checkpoint's format.
    ``registry`` defaults to the process-wide one. Pure: reads config.json and safetensors
    headers (cached by path and mtime), never tensor data.

    Raises:
        ConfigError: a bad config; a requested method that cannot read the format; or a
            quantized layer that no method can run on this platform.
        InputError: a bad ``source``, ``platform`` or ``prefix`` (a name over 256 characters)
            argument.
        UnknownMethodError: ``requested`` names no registered method.
        CheckpointError: bad checkpoint files (index, headers, links).
    """
    check_prefix(prefix)
    plat = Platform.coerce(platform)
    view = read_checkpoint(source, prefix)
    resolution = decide(view, plat, requested, prefix, registry or default_registry())
    logger.info(
        "%s of %s on %s -> %s (%s)",
        prefix, resolution.source, plat, resolution.method or "unquantized", resolution.rule,
    )  # fmt: skip
    return resolution


def decide(
    view: CheckpointView, platform: Platform, requested: str | None, prefix: str, registry: Registry
) -> Resolution:
    """The Resolution of layer ``prefix`` (see the module doc for the steps).

    Raises:
        ConfigError: a bad config, a requested method that cannot read or run the layer, or
            a quantized layer no method can run on ``platform``.
        UnknownMethodError, PluginError: a bad ``requested`` name or a broken requested plugin.
    """
    req = registry.canonical_name(requested) if requested is not None else None
    if req is not None:
        registry.get(req)  # a requested plugin that fails to load is an error, named as such
    facts = Facts(view, prefix, platform, req, registry)
    if view.quant is None:
        return _tied_or_kept(facts, _no_quantization(facts))
    known = known_method(view.quant.quant_method, registry)
    if known is not None:
        return _tied_or_kept(facts, _unsupported(facts, known, view.quant.data))
    fmt, data, relabel = _format(view, registry)
    relabel_note = f"{view.quant.where}: {relabel.note}" if relabel is not None else None
    try:
        readers, declined = _readers(view, registry, fmt, data)
    except ConfigError as exc:
        if not is_variant_error(exc, registry.get(fmt)):
            raise
        facts.notes.extend([relabel_note] if relabel_note else [])
        return _tied_or_kept(facts, _unsupported(facts, fmt, data, exc))
    facts = _with_tensors(facts, names=tensor_names(registry))
    decider = next((r for r in readers if r.name == fmt), readers[0])
    rule, overridden = _layer_rule(decider, facts, relabel)
    _check_request(facts, fmt, readers, rule)
    facts.notes.extend(_rule_notes(facts, rule, decider, overridden, fmt, relabel_note))
    rule_text = rule.rule + ("; also: " + "; ".join(rule.also) if rule.also else "")
    if not rule.quantized:
        kept = Candidate(UNQUANTIZED, True, f"the config keeps '{prefix}' unquantized")
        resolution = facts.resolution(
            method=None, quantized=False, rule=rule_text, candidates=(kept, *declined),
            config=None, format=fmt,
        )  # fmt: skip
        return _tied_or_kept(facts, resolution)
    own = [t for t in facts.infos if t.name.startswith(f"{prefix}.")]  # not a tied embedding
    shapes = {t.name[len(prefix) + 1 :]: tuple(t.shape) for t in own}
    probes = [probe(reader, rule, prefix, platform, shapes) for reader in readers]
    if req is not None:
        chosen, candidates = pick_requested(probes, req, prefix, view.source, facts.notes)
    else:
        chosen, candidates = pick_best(
            probes, declined, fmt=fmt, rule_text=rule_text, prefix=prefix,
            source=view.source, platform=platform,
        )  # fmt: skip
    assert chosen.effective is not None
    facts.notes.extend(chosen.effective.notes())
    resolution = facts.resolution(
        method=chosen.reader.name, quantized=True, rule=rule_text,
        candidates=(*candidates, *declined), config=chosen.effective, format=fmt,
    )  # fmt: skip
    return _tied_or_kept(facts, resolution)


def _rule_notes(
    facts: Facts,
    rule: LayerRule,
    decider: Reader,
    overridden: LayerRule | None,
    fmt: str,
    relabel_note: str | None,
) -> list[str]:
    """The relabel note, what the tensors show, unmatched config entries, and the override."""
    notes = [relabel_note] if relabel_note else []
    other = (
        None
        if rule.quantized
        else other_layers_reason(decider.config, facts.prefix, facts.view.modules)
    )
    if other is not None:
        notes.append(
            f"'{facts.prefix}' stays float; the checkpoint's other {fmt} layers are not all "
            f"supported by quantreg ('{other[0]}': {other[1]})"
        )
    notes += _tensor_notes(rule, facts)
    notes += _unmatched(decider, facts.view)
    if overridden is not None:
        notes.append(
            f"the config keeps '{facts.prefix}' unquantized ({overridden.rule}), but its tensors "
            f"are packed in the {fmt} layout: they are loaded quantized, as the tensors say"
        )
    return notes


def _no_quantization(facts: Facts) -> Resolution:
    if facts.requested not in (None, UNQUANTIZED):
        raise ConfigError(
            f"requested method '{facts.requested}' cannot read {facts.view.source}: the "
            "checkpoint has no quantization_config"
        )
    facts = _with_tensors(facts, names=tensor_names(facts.registry))
    rule = LayerRule(False, "no quantization_config")
    facts.notes.extend(_tensor_notes(rule, facts))
    chosen = Candidate(UNQUANTIZED, True, "the checkpoint has no quantization_config")
    return facts.resolution(
        method=None, quantized=False, rule=rule.rule, candidates=(chosen,), config=None
    )


def _readers(
    view: CheckpointView, registry: Registry, fmt: str, data: Mapping[str, Any]
) -> tuple[list[Reader], list[Candidate]]:
    """The readers of ``fmt`` and the declined candidates.

    Raises:
        ConfigError: the format's own parser refuses the config, or no method reads it.
    """
    assert view.quant is not None
    readers, declined = find_readers(registry, fmt, view.quant.where, data, view.quant.path)
    if not readers:
        raise ConfigError(
            f"no installed method reads quant_method '{fmt}' ({view.quant.where}):"
            + "".join(f"\n  - {c.name}: {c.reason}" for c in declined),
            path=view.quant.path,
            field="quant_method",
        )
    return readers, declined


def _unsupported(
    facts: Facts, fmt: str, data: Mapping[str, Any], error: ConfigError | None = None
) -> Resolution:
    """A layer under a config quantreg cannot run (``error``; None: a method it knows but does
    not implement): float when the config keeps it float or its tensors are float -- the
    tensors, when read, win over the config.

    Raises:
        ConfigError: ``error``, naming the layer, when the layer is quantized.
    """
    quant = facts.view.quant
    where = quant.path if quant is not None else None
    if error is None:
        error = ConfigError(not_supported(fmt, facts.registry), path=where, field="quant_method")
    facts = _with_tensors(facts, names=tensor_names(facts.registry))
    rule = config_rule(
        data, facts.prefix, fmt, registered=fmt in facts.registry.names(),
        source=quant.where if quant is not None else None, path=where,
    )  # fmt: skip
    names = facts.shown_tensors
    if facts.state == "unquantized" and rule.quantized:
        rule = LayerRule(False, f"tensors: {names} are float", also=(rule.rule,))
    if rule.quantized or facts.state == "quantized":
        shown = f"its tensors are quantized: {names}" if facts.state == "quantized" else rule.rule
        error.args = (f"{error}; '{facts.prefix}' of {facts.view.source} is quantized ({shown})",)
        raise error
    if facts.requested not in (None, UNQUANTIZED, fmt):
        raise ConfigError(
            f"requested method '{facts.requested}' cannot read {facts.view.source}: {error}"
        )
    facts.notes.append(
        f"'{facts.prefix}' stays float; the checkpoint's {fmt} layers are not supported by "
        f"quantreg: {error}"
    )
    facts.notes.extend(_tensor_notes(rule, facts))
    kept = Candidate(UNQUANTIZED, True, f"the config keeps '{facts.prefix}' unquantized")
    return facts.resolution(
        method=None, quantized=False, rule="; also: ".join((rule.rule, *rule.also)),
        candidates=(kept,), config=None, format=fmt,
    )  # fmt: skip


def _format(view: CheckpointView, registry: Registry) -> Format:
    """The canonical format name and config dict, after the owning method's ``relabel``
    (returned too: its note, its layer rule)."""
    assert view.quant is not None
    try:
        fmt = registry.canonical_name(view.quant.quant_method)
    except UnknownMethodError as exc:
        raise ConfigError(
            f"{view.quant.where}: field 'quant_method': {exc}",
            path=view.quant.path,
            field="quant_method",
        ) from exc
    data = view.quant.data
    try:
        relabel = registry.get(fmt).relabel(data)
    except PluginError:
        relabel = None  # reported as a declined candidate by _readers
    if relabel is None:
        return fmt, data, None
    return registry.canonical_name(relabel.quant_method), relabel.data, relabel


def _with_tensors(facts: Facts, *, names: frozenset[str]) -> Facts:
    tensors = facts.view.tensors
    if tensors is None:
        return facts
    infos = tuple(sorted(tensors.values(), key=lambda t: t.name))
    if not infos:
        return replace(facts, state="absent", infos=())
    quantized = any(is_quantized_tensor(t, facts.prefix, names) for t in infos)
    return replace(facts, state="quantized" if quantized else "unquantized", infos=infos)


def _layer_rule(decider: Reader, facts: Facts, relabel: Relabel | None) -> Decided:
    """The format's rule for the layer (the relabelling method's, if it gives one), and the
    rule it overrode when the tensors decided."""
    suffixes = frozenset(t.name[len(facts.prefix) + 1 :] for t in facts.infos)
    if relabel is not None and relabel.layer_rule is not None:
        rule = relabel.layer_rule(facts.prefix, suffixes)
    else:
        rule = decider.config.layer_rule(facts.prefix)
    if rule.class_target and rule.quantized and is_lm_head(facts.prefix):
        return _class_target(rule, facts), None
    if rule.quantized or facts.state != "quantized":
        return rule, None
    # The tensors are the truth: a packed head is never loaded as a float one.
    by_tensors = decider.config.rule_from_tensors(facts.prefix, suffixes)
    if by_tensors is None:
        return rule, None
    return replace(by_tensors, also=(*by_tensors.also, rule.rule, *rule.also)), rule


def _class_target(rule: LayerRule, facts: Facts) -> LayerRule:
    """A head matched only by a class target (compressed-tensors' ``Linear``) is quantized
    when its tensors are packed, float when they are float: vLLM and SGLang never quantize a
    head through a class target, and many such checkpoints keep a float ``lm_head.weight``."""
    if facts.state == "quantized":
        why = "tensors: packed, so the class target quantizes the head"
        return replace(rule, also=(*rule.also, why))
    if facts.state != "unquantized":
        return rule
    names = facts.shown_tensors
    facts.notes.append(
        f"'{facts.prefix}' matches only a class target ({rule.rule}), but its tensors are "
        f"float ({names}): loaded unquantized, as vLLM and SGLang load it (they never quantize "
        "a head through a class target)"
    )
    return LayerRule(
        False, f"tensors: {names} are float over the class target", also=(rule.rule, *rule.also)
    )


def _check_request(facts: Facts, fmt: str, readers: list[Reader], rule: LayerRule) -> None:
    names = sorted(r.name for r in readers)
    req = facts.requested
    if req is None or req in names or (req == UNQUANTIZED and not rule.quantized):
        return
    assert facts.view.quant is not None
    raise ConfigError(
        f"requested method '{req}' cannot read {facts.view.source}: its quantization config "
        f"({facts.view.quant.where}) is quant_method '{fmt}', which only {', '.join(names)} "
        "can read"
    )


def _unmatched(decider: Reader, view: CheckpointView) -> list[str]:
    """Config entries naming modules the checkpoint lacks (each logged as a WARNING)."""
    if not view.modules or view.quant is None:
        return []
    entries = decider.config.unmatched_entries(view.modules)
    for entry in entries:
        logger.warning("%s: %s", view.quant.where, entry)
    return entries


def _tensor_notes(rule: LayerRule, facts: Facts) -> list[str]:
    names = facts.shown_tensors
    if facts.state == "quantized" and not rule.quantized:
        return [
            f"the config keeps '{facts.prefix}' unquantized ({rule.rule}) but the checkpoint's "
            f"tensors are quantized: {names}"
        ]
    if facts.state == "unquantized" and rule.quantized:
        return [
            f"the config quantizes '{facts.prefix}' ({rule.rule}) but the checkpoint holds "
            f"float tensors: {names}"
        ]
    if facts.state == "absent":
        return [f"the checkpoint has no '{facts.prefix}.*' tensors (a tied or shared head)"]
    return []


def _tied_or_kept(facts: Facts, resolution: Resolution) -> Resolution:
    """A head with no tensors of its own, tied to a float embedding, loads from that
    embedding unquantized: decided here, so the loader only follows ``tied_to``."""
    if resolution.tensors != "absent":
        return resolution
    tied = flatten_config(facts.view.config).get("tie_word_embeddings")
    embedding = next((facts.view.side[n] for n in EMBEDDING_NAMES if n in facts.view.side), None)
    if tied is not True or embedding is None:
        return resolution
    notes = list(resolution.notes)
    if resolution.quantized:
        notes.append(
            f"the config quantizes '{facts.prefix}' ({resolution.rule}) but the checkpoint "
            f"ties it to the float {embedding.name}: loaded unquantized from the embedding"
        )
    return replace(
        resolution,
        method=None,
        quantized=False,
        config=None,
        rule=f"tie_word_embeddings: true → {embedding.name}; also: {resolution.rule}",
        notes=tuple(notes),
        tied_to=embedding.name,
    )

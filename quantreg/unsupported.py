"""Configs quantreg cannot run, and the layers they still keep float.

Two cases: a quantization method quantreg knows by name but does not implement (``quark``,
``mxfp4``, ``bitsandbytes``, ...: the names vLLM and transformers use), and a variant of one of its
own methods that it refuses (3-bit GPTQ, AWQ GEMV, AutoGPTQ marlin). Either way the config
still says which layers stay float, in the keys its producers write; :func:`config_rule` reads
them without the method's own parser. Only a layer that is quantized raises. Their regexes
(``re:`` entries, ``dynamic`` keys) are checked first, as every method's are
(:mod:`quantreg.patterns`).
"""

from __future__ import annotations

import fnmatch
import heapq
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from quantreg.contract import LayerRule, QuantConfig, is_lm_head
from quantreg.errors import ConfigError, UnknownMethodError
from quantreg.patterns import checked_regex, dynamic_pattern, regex_list_problem, regex_problem
from quantreg.registry import Registry, normalize_name

# Quantization methods of vLLM and transformers that quantreg does not implement (a plugin
# registered under one of these names is used like any method).
KNOWN_METHODS = frozenset({
    "aqlm", "auto-round", "autoround", "intel/auto-round", "awq_triton", "bitblas", "bitnet",
    "bitsandbytes", "deepspeedfp", "eetq", "experts_int8", "fbgemm_fp8", "fp_quant",
    "gguf", "gptq_bitblas", "gptq_marlin_24", "higgs", "hqq", "inc", "ipex", "marlin",
    "modelopt", "modelopt_fp4", "modelopt_mixed", "moe_wna16", "mxfp4", "neuron_quant",
    "petit_nvfp4", "ptpc_fp8", "qqq", "quanto", "quark", "rtn", "spqr", "torchao", "tpu_int8",
    "vptq", "w8a8_fp8", "w8a8_int8",
})  # fmt: skip
# Methods whose files quantize the output layer unless the config says otherwise (GGUF's
# ``output.weight``); every other one leaves an lm_head float unless its config names it --
# vLLM's fp8 / modelopt / quark / mxfp4 / bitsandbytes methods quantize LinearBase layers only,
# and transformers adds the output embedding to ``modules_to_not_convert``.
HEAD_QUANTIZING = frozenset({"gguf"})
# Lists of modules kept float, by the producers that write them: transformers
# (modules_to_not_convert; gpt-oss mxfp4 with wildcards), ModelOpt (exclude_modules),
# vLLM fp8 (ignored_layers), compressed-tensors style (ignore), Quark (exclude),
# bitsandbytes (llm_int8_skip_modules), HQQ (skip_modules), AQLM (linear_weights_not_to_quantize).
EXCLUSION_KEYS = (
    "modules_to_not_convert", "exclude_modules", "ignored_layers", "ignore", "exclude",
    "exclude_layers", "llm_int8_skip_modules", "skip_modules", "linear_weights_not_to_quantize",
)  # fmt: skip
# Lists of what *is* quantized: a layer outside them stays float (auto-round's blocks, VPTQ's
# per-layer configs, ModelOpt MIXED_PRECISION's quantized_layers).
INCLUSION_KEYS = (
    "block_name_to_quantize", "to_quant_block_names", "config_for_layers", "quantized_layers",
)  # fmt: skip
# Flags that quantize an lm_head (GPTQ / AWQ ``lm_head``, auto-round ``quant_lm_head``,
# torchao ``include_input_output_embeddings``).
HEAD_FLAGS = ("lm_head", "quant_lm_head", "include_input_output_embeddings")


def known_method(name: str, registry: Registry) -> str | None:
    """``name`` normalized when it is a known method that no registry entry provides."""
    try:
        registry.canonical_name(name)
        return None
    except UnknownMethodError:
        key = normalize_name(name)
        spellings = (key, key.replace("_", "-"), key.replace("-", "_"))
        return key if any(k in KNOWN_METHODS for k in spellings) else None


def not_supported(name: str, registry: Registry) -> str:
    """The message head for a known method quantreg does not implement."""
    supported = ", ".join(n for n in registry.names() if n != "unquantized")
    return (
        f"quantization method '{name}' is known but not supported by quantreg "
        f"(supported: {supported}; a plugin can register it)"
    )


def is_variant_error(exc: ConfigError, cls: type[QuantConfig]) -> bool:
    """Whether a parse error only refuses values of the method's ``variant_fields``."""
    cause = exc.__cause__
    if not isinstance(cause, ValidationError) or not cls.variant_fields:
        return False
    errors = cause.errors(include_url=False)
    return bool(errors) and all(
        e["type"] == "value_error" and len(e["loc"]) == 1 and e["loc"][0] in cls.variant_fields
        for e in errors
    )


def matches(entry: object, prefix: str) -> bool:
    """Whether a module-list entry names ``prefix`` or a module above it: an exact or dotted
    sub-name (``self_attn``, ``mlp.gate``), a wildcard (``model.layers.*.self_attn``), a
    ``re:`` regex, or a parameter name (``lm_head.weight``)."""
    if not isinstance(entry, str) or not entry:
        return False
    if entry.startswith("re:"):
        return checked_regex(entry[3:]).match(prefix) is not None
    name = entry.removesuffix(".weight")
    if any(c in name for c in "*?["):
        return fnmatch.fnmatchcase(prefix, name) or fnmatch.fnmatchcase(prefix, name + ".*")
    return f".{name}." in f".{prefix}."


def _listed(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    if isinstance(value, Mapping):
        return list(value)
    return list(value) if isinstance(value, list) else []


def _listed_rule(data: Mapping[str, Any], prefix: str) -> LayerRule | None:
    """Exclusion lists first, then auto-round's per-layer ``extra_config`` (bits 16: float),
    then inclusion lists (a layer they list is quantized, one they leave out is float)."""
    for key in EXCLUSION_KEYS:
        entry = next((e for e in _listed(data.get(key)) if matches(e, prefix)), None)
        if entry is not None:
            return LayerRule(False, f"{key} '{entry}'")
    extra = data.get("extra_config")
    for entry, layer in extra.items() if isinstance(extra, Mapping) else ():
        bits = layer.get("bits") if isinstance(layer, Mapping) else None
        if matches(entry, prefix) and isinstance(bits, int):
            return LayerRule(bits < 16, f"extra_config '{entry}': bits={bits}")
    for key in INCLUSION_KEYS:
        entries = _listed(data.get(key))
        entry = next((e for e in entries if matches(e, prefix)), None)
        if entry is not None:
            return LayerRule(True, f"{key} '{entry}'")
        if entries:
            return LayerRule(False, f"{key}: no entry covers '{prefix}'")
    return None


def _dynamic(data: Mapping[str, Any], prefix: str) -> LayerRule | None:
    """GPTQModel's ``dynamic``: the first key that ``re.match``-es decides."""
    dynamic = data.get("dynamic")
    for key in dynamic if isinstance(dynamic, Mapping) else ():
        if checked_regex(dynamic_pattern(key)).match(prefix):
            return LayerRule(not key.startswith("-:"), f"dynamic '{key}'")
    return None


def check_regexes(
    data: Mapping[str, Any], source: str | None = None, path: Path | None = None
) -> None:
    """Refuse a config whose regexes -- ``re:`` entries of its module lists and
    ``extra_config``, GPTQModel ``dynamic`` keys -- cannot be matched in bounded time.

    Raises:
        ConfigError: names the config (``source``), the field, the entry and the problem.
    """
    where = f"{source}: " if source else ""
    found = list(_regex_entries(data))
    problem = regex_list_problem([pattern for _, _, pattern in found])
    if problem is not None:  # too many, or too much work together: before each is analysed
        raise ConfigError(f"{where}{problem}", path=path)
    for key, entry, pattern in found:
        problem = regex_problem(pattern)
        if problem is not None:
            what = "rule" if key == "dynamic" else "entry"
            raise ConfigError(
                f"{where}field '{key}': {what} {entry!r} {problem}", path=path, field=key
            )


def _regex_entries(data: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(key, entry, pattern)`` of every regex that :func:`config_rule` would match."""
    for key in (*EXCLUSION_KEYS, "extra_config", *INCLUSION_KEYS):
        for entry in _listed(data.get(key)):
            if isinstance(entry, str) and entry.startswith("re:"):
                yield key, entry, entry[3:]
    dynamic = data.get("dynamic")
    for key in dynamic if isinstance(dynamic, Mapping) else ():
        if isinstance(key, str):
            yield "dynamic", key, dynamic_pattern(key)


def config_rule(
    data: Mapping[str, Any],
    prefix: str,
    method: str,
    *,
    registered: bool = False,
    source: str | None = None,
    path: Path | None = None,
) -> LayerRule:
    """What a config's own keys say about layer ``prefix``, read without the method's parser:
    a head flag set false, then exclusion lists, auto-round ``extra_config``, inclusion lists,
    GPTQModel ``dynamic``, then for a head its flags (absent: float, except for
    :data:`HEAD_QUANTIZING` methods). ``registered``: the
    method is quantreg's own (its absent ``lm_head`` flag means false).

    Raises:
        ConfigError: a regex of the config cannot be matched in bounded time
            (:func:`check_regexes`; ``source`` names the config in the message, ``path``
            is the error's file).
    """
    check_regexes(data, source, path)
    head = is_lm_head(prefix)
    flag = next((k for k in HEAD_FLAGS if isinstance(data.get(k), bool)), None) if head else None
    if flag is not None and data[flag] is False:
        return LayerRule(False, f"{flag}: false")
    decided = _listed_rule(data, prefix) or _dynamic(data, prefix)
    if decided is not None:
        return decided
    if flag is not None:
        return LayerRule(True, f"{flag}: true")
    if not head:
        return LayerRule(True, f"quant_method '{method}': every linear layer")
    if method in HEAD_QUANTIZING:
        return LayerRule(True, f"quant_method '{method}': its files quantize the output layer")
    if registered:
        return LayerRule(False, "lm_head: false (absent)")
    return LayerRule(
        False,
        f"quant_method '{method}': no {' / '.join(HEAD_FLAGS)} key, and its engines never "
        "quantize an lm_head the config does not name",
    )


# Body layers probed when the checkpoint lists no modules (a dict source): Llama / MoE names.
PROBE_NAMES = (
    "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
    "model.layers.0.mlp.experts.0.down_proj", "model.layers.0.self_attn.o_proj",
)  # fmt: skip
_PROBE_LIMIT = 64
# Probing stops after this long: each probe is bounded (a config's regexes are checked), but a
# config with thousands of entries makes each one slow.
_PROBE_SECONDS = 0.2


def other_layers_reason(
    config: QuantConfig, prefix: str, modules: Collection[str]
) -> tuple[str, str] | None:
    """A layer other than ``prefix`` that ``config`` quantizes in a way its method cannot run,
    and why (``format_reason`` of its effective config); None when every probed layer can
    run. Probes the checkpoint's modules (the first 64 by name, for at most 0.2 s), else
    :data:`PROBE_NAMES`."""
    names = heapq.nsmallest(_PROBE_LIMIT, modules) or list(PROBE_NAMES)
    deadline = time.monotonic() + _PROBE_SECONDS
    for name in names:
        if time.monotonic() > deadline:
            break
        if name == prefix or is_lm_head(name):
            continue
        try:  # a plugin's hook must not break resolution
            rule = config.layer_rule(name)
            reason = config.for_layer(rule).format_reason() if rule.quantized else None
        except Exception:
            continue
        if reason is not None:
            return name, reason
    return None

"""Regexes and names from a checkpoint cannot make resolution hang.

Compressed-tensors ``re:`` targets and ignore entries, GPTQModel ``dynamic`` keys and the
exclusion lists of configs quantreg does not run are regexes written by whoever wrote the
checkpoint, and the module names they are matched against come from its tensor names. Each
hostile pattern is refused before any match -- a ConfigError naming the file, the field and
the pattern, through the API and the CLI, within a time bound -- while the patterns producers
write still resolve exactly as ``re.match`` says. Long names and huge lists are refused or
handled within a time bound too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_runner import run_cli_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bad_inputs import base, digest, edit_config, rewrite_header, shard

from quantreg import (
    CheckpointError,
    ConfigError,
    InputError,
    QuantregError,
    inspect_checkpoint,
    load_lm_head,
    regex_list_problem,
    regex_problem,
    resolve,
)
from quantreg.methods.compressed_tensors import CompressedTensorsConfig

# Long enough for a classic catastrophic backtracking to take hours; as long as names may be.
HOSTILE_NAMES = [
    "a" * 256, "a" * 255 + "!", "1" * 256, "ab" * 128, "a." * 128,
    "a" * 128 + "b" + "a" * 127, ("layers" * 50 + "mlp")[:256], ("model.layers.1." * 20)[:256],
]  # fmt: skip
SECONDS = 2.0  # for one whole case: files read, config parsed, error raised

# -- the patterns producers write are accepted --------------------------------------------

ACCEPTED = [
    # compressed-tensors / llm-compressor ignore lists and targets
    r".*lm_head", r".*lm_head.*", r"model.layers.\d+.mlp.gate$", r".*self_attn.*", r".*self_attn",
    r".*gate$", r"visual.*", r"model.visual.*", r".*mlp.gate$", r".*mlp[.]gate$",
    r".*embed_tokens$", r".*shared_expert_gate$", r".*shared_expert_gate.*",
    r".*linear_attn.conv1d$", r".*block_sparse_moe.gate", r".*router", r".*router$",
    r".*mlp.router.*", r"mtp.*", r".*kv_a_proj_with_mqa$", r".*q_a_proj$", r".*down_proj$",
    r".*input_layernorm$", r".*layers.*mlp.*_proj$", r".*shared_experts.*proj.*",
    r".*self_attn.(q|k|v|o)_proj.*", r".*self_attn\.(q|k|v|o|r)_proj$", r".*layers.[0-3].*proj.*",
    r".*layers.9[0-2].*proj.*", r".*visual\.merger.*linear_fc2$", r".*language_model.*q_proj$",
    r".*layers.\d+.*attn.\w+", r"^model\.layers\.0\.q_proj$",
    r"model\.language_model\.layers\.\d+\.mlp\..*(gate|up|down)_proj$",
    r"^language_model[.]model[.]layers[.][0-9]+[.]mlp[.]experts[.][0-9]+[.](gate|up|down)_proj$",
    r"model\.language_model\.layers\.(3|7|11|15|19|23|27|31|35|39|43|45)\.self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|o_proj)$",
    # GPTQModel dynamic keys (without their +: / -: sign)
    r".*\.mlp\..*", r".*\.(?:gate|up)_proj.*", r"model\.layers\.(?:[0-9]|1[0-5])\..*",
    r".*\.(?:1[6-9]|2[0-9]|3[01])\..*", r".*\.moe\..*", r"^model\.layers\.0\.mlp\.up_proj$",
    r".*\.19\..*gate.*", r".*down.*", r".*\.mlp\.experts$", r".*layers\.2.*", r"lm_head",
    # quantreg's own writer (GPTQConfig.scope_config); and the plainest ones
    r"^(?!lm_head$)", r"^(?!model\.layers\.0\.mlp\.down_proj$)", r".*", r"(?i).*LM_HEAD",
]  # fmt: skip
NAMES = [
    "lm_head", "model.layers.0.mlp.gate", "model.layers.17.self_attn.q_proj",
    "model.language_model.layers.3.mlp.experts.5.down_proj", "visual.merger.linear_fc2",
]  # fmt: skip


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_the_patterns_producers_write_are_accepted_and_match_hostile_names_fast(pattern):
    assert regex_problem(pattern) is None
    start = time.perf_counter()
    with watchdog():
        for name in HOSTILE_NAMES:
            re.match(pattern, name)
    assert time.perf_counter() - start < 0.5


def ct_config(*, targets: list[str], ignore: list[str] | None = None) -> dict:
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    groups = {"group_0": {"targets": targets, "weights": weights}}
    return {"quant_method": "compressed-tensors", "config_groups": groups, "ignore": ignore or []}


def gptq_config(dynamic: dict) -> dict:
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "lm_head": True,
        "dynamic": dynamic,
    }


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_accepted_patterns_resolve_as_re_match_says(pattern):
    """A compressed-tensors target quantizes exactly the names it ``re.match``-es; a GPTQModel
    ``-:`` rule keeps exactly those float."""
    for name in NAMES:
        matched = re.match(pattern, name) is not None
        targeted = resolve(ct_config(targets=[f"re:{pattern}"]), platform="cpu", prefix=name)
        assert targeted.quantized == matched, (name, targeted.rule)
        excluded = resolve(gptq_config({f"-:{pattern}": {}}), platform="cpu", prefix=name)
        assert excluded.quantized == (not matched), (name, excluded.rule)


# -- hostile patterns are refused before any match ----------------------------------------

NESTED = r"repeats without bound a part that can match the same text in more than one way"
TOO_MUCH = r"could take about [0-9.e+]+ steps to match a 256-character module name"
REFUSED = [
    ("nested-plus", r"(a+)+$", NESTED),
    ("overlapping-alternatives", r"(a|a)*b", NESTED),
    ("nested-star", r"(.*)*x", NESTED),
    ("word-and-space", r"(\w+\s?)+$", NESTED),
    ("email-classic", r"^(([a-z])+.)+[A-Z]([a-z])+$", NESTED),
    ("adjacent-in-group", r"(x+x+)+y", NESTED),
    ("prefix-alternatives", r"(a|aa)+$", NESTED),
    ("many-alternatives", r"(l|lm|lm_|m)*(_+)+x$", NESTED),
    ("four-stars", r".*.*.*.*x", TOO_MUCH),
    ("stars-between-letters", r".*a.*a.*a.*b", TOO_MUCH),
    ("adjacent-letters", r"a*a*a*a*a*b", TOO_MUCH),
    ("bounded-repeat-of-star", r"(.*a){30}$", TOO_MUCH),
    ("optional-thirty", r"(a?){30}a{30}", TOO_MUCH),
    ("lazy-repeat", r"(.*?,){20}P", TOO_MUCH),
    ("in-a-lookahead", r"(?=.*a.*a.*a.*b)", TOO_MUCH),
    ("backreference", r"(a*)\1b", r"uses a backreference or a group conditional"),
    ("conditional", r"(a)?(?(1)b|c)", r"uses a backreference or a group conditional"),
    ("too-long", "a" * 1001, r"is 1001 characters long; at most 1000 are allowed"),
    ("nested-too-deeply", "(" * 500 + ")" * 500, r"nests groups too deeply"),
    ("invalid", "lm_head(", r"is not a valid regular expression: missing \)"),
    ("not-a-string", 42, r"is not a string \(got int\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("pattern", "reason"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_hostile_patterns_are_refused_before_any_match(pattern, reason):  # fmt: skip
    start = time.perf_counter()
    assert re.search(reason, regex_problem(pattern) or "")
    assert time.perf_counter() - start < 0.5


def test_a_config_holds_at_most_4096_regexes_and_bounded_work_in_total():
    assert re.search(r"holds 4097 regexes; at most 4096", regex_list_problem(["x"] * 4097))
    heavy = r".*layers.*mlp.*_proj$"  # accepted alone; twenty together are too much
    assert regex_list_problem([heavy] * 5) is None
    assert re.search(r"its 20 regexes together could take about", regex_list_problem([heavy] * 20))


# -- the catalogue: each place a checkpoint puts a regex, or a name -----------------------


def quant(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return edit_config(lambda c: change(c["quantization_config"]))


def replace_quant(qcfg: dict) -> Callable[[Path], None]:
    return edit_config(lambda c: c.update(quantization_config=qcfg))


def add_tensor(name: str) -> Callable[[Path], None]:
    empty = {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}
    return rewrite_header(lambda h: h.update({name: empty}))


def targets(*entries: str) -> Callable[[Path], None]:
    return quant(lambda q: q["config_groups"]["group_0"].update(targets=["lm_head", *entries]))


def ignore(*entries: str) -> Callable[[Path], None]:
    return quant(lambda q: q.update(ignore=list(entries)))


def dynamic(*keys: str) -> Callable[[Path], None]:
    return quant(lambda q: q.update(dynamic={k: {} for k in keys}))


CT, GPTQ = "compressed-tensors", "gptq"
WHERE = r"in .*config\.json \(quantization_config\)"
CT_FIELD = rf"invalid compressed-tensors quantization_config {WHERE}: field"
GPTQ_DYNAMIC = rf"invalid gptq quantization_config {WHERE}: field 'dynamic' = .*"
UNSUPPORTED = r"config\.json \(quantization_config\): field"
SPARSE = {"format": "sparse-bitmask", "targets": ["lm_head"], "ignore": ["re:(x+x+)+y"]}
CATALOGUE = [
    # compressed-tensors targets and ignore (and the sparsity config's)
    ("ct-targets-nested", CT, targets(r"re:(a+)+$"), ConfigError, CT_FIELD + r" 'config_groups\.group_0\.targets' = .*'re:\(a\+\)\+\$' " + NESTED),
    ("ct-targets-polynomial", CT, targets(r"re:.*a.*a.*a.*b"), ConfigError, CT_FIELD + r" 'config_groups\.group_0\.targets' = .*'re:\.\*a\.\*a\.\*a\.\*b' " + TOO_MUCH),
    ("ct-targets-backreference", CT, targets(r"re:(a*)\1b"), ConfigError, CT_FIELD + r" 'config_groups\.group_0\.targets' = .*uses a backreference"),
    ("ct-ignore-alternatives", CT, ignore(r"re:(a|a)*$"), ConfigError, CT_FIELD + r" 'ignore' = .*'re:\(a\|a\)\*\$' " + NESTED),
    ("ct-ignore-bounded-nesting", CT, ignore("lm_x", r"re:(.*a){30}$"), ConfigError, CT_FIELD + r" 'ignore' = .*'re:\(\.\*a\)\{30\}\$' " + TOO_MUCH),
    ("ct-ignore-too-long", CT, ignore("re:" + "a" * 1001), ConfigError, CT_FIELD + r" 'ignore' = .*is 1001 characters long; at most 1000"),
    ("ct-ignore-nested-too-deeply", CT, ignore("re:" + "(" * 500 + ")" * 500), ConfigError, CT_FIELD + r" 'ignore' = .*nests groups too deeply"),
    ("ct-sparsity-ignore", CT, quant(lambda q: q.update(sparsity_config=SPARSE)), ConfigError, CT_FIELD + r" 'sparsity_config\.ignore' = .*'re:\(x\+x\+\)\+y' " + NESTED),
    ("ct-too-many-regexes", CT, ignore(*(f"re:x{i}" for i in range(4097))), ConfigError, rf"compressed-tensors quantization_config {WHERE}: fields 'ignore' and 'config_groups' targets: it holds 4097 regexes; at most 4096"),
    ("ct-too-much-work-together", CT, ignore(*[r"re:.*layers.*mlp.*_proj$"] * 20), ConfigError, r"fields 'ignore' and 'config_groups' targets: its 20 regexes together could take about"),
    # GPTQModel dynamic keys
    ("gptq-dynamic-nested", GPTQ, dynamic(r"+:(a+)+$"), ConfigError, GPTQ_DYNAMIC + r"rule '\+:\(a\+\)\+\$' " + NESTED),
    ("gptq-dynamic-alternatives", GPTQ, dynamic(r"-:(l|lm|lm_|m)*(_+)+x$"), ConfigError, GPTQ_DYNAMIC + r"rule '-:\(l\|lm\|lm_\|m\)\*\(_\+\)\+x\$' " + NESTED),
    ("gptq-dynamic-polynomial", GPTQ, dynamic(r"-:.*.*.*.*x"), ConfigError, GPTQ_DYNAMIC + r"rule '-:\.\*\.\*\.\*\.\*x' " + TOO_MUCH),
    ("gptq-dynamic-unsigned", GPTQ, dynamic(r"(.*)*x"), ConfigError, GPTQ_DYNAMIC + r"rule '\(\.\*\)\*x' " + NESTED),
    ("gptq-dynamic-conditional", GPTQ, dynamic(r"-:(a)?(?(1)b|c)"), ConfigError, GPTQ_DYNAMIC + r"rule '-:\(a\)\?\(\?\(1\)b\|c\)' uses a backreference or a group conditional"),
    ("gptq-dynamic-too-many", GPTQ, dynamic(*(f"-:x{i}" for i in range(5000))), ConfigError, GPTQ_DYNAMIC + r"it holds 5000 regexes; at most 4096"),
    # the exclusion and inclusion lists of configs quantreg does not run
    ("ptpc_fp8-ignored-layers", GPTQ, replace_quant({"quant_method": "ptpc_fp8", "ignored_layers": [r"re:(a+)+$"]}), ConfigError, UNSUPPORTED + r" 'ignored_layers': entry 're:\(a\+\)\+\$' " + NESTED),
    ("modelopt-exclude-modules-wildcard", GPTQ, replace_quant({"quant_method": "modelopt", "quant_algo": "NVFP4", "exclude_modules": ["lm_head", "a*" * 600]}), ConfigError, rf"invalid modelopt quantization_config {WHERE}: field 'exclude_modules' = .*wildcard '(a\*){{30}}\.\.\.' translates to a regex that is 4802 characters long; at most 1000"),
    ("modelopt-ignore-too-many-wildcards", GPTQ, replace_quant({"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["x*"] * 5000}), ConfigError, rf"invalid modelopt quantization_config {WHERE}: field 'ignore' = .*it holds 5000 regexes; at most 4096"),
    ("mxfp4-modules-to-not-convert", GPTQ, replace_quant({"quant_method": "mxfp4", "modules_to_not_convert": [r"re:.*a.*a.*a.*b"]}), ConfigError, UNSUPPORTED + r" 'modules_to_not_convert': entry 're:\.\*a\.\*a\.\*a\.\*b' " + TOO_MUCH),
    ("quark-exclude-as-a-string", GPTQ, replace_quant({"quant_method": "quark", "exclude": r"lm_head, re:(a|aa)+$"}), ConfigError, UNSUPPORTED + r" 'exclude': entry 're:\(a\|aa\)\+\$' " + NESTED),
    ("auto-round-extra-config", GPTQ, replace_quant({"quant_method": "auto-round", "extra_config": {r"re:(a|a)*": {"bits": 16}}}), ConfigError, UNSUPPORTED + r" 'extra_config': entry 're:\(a\|a\)\*' " + NESTED),
    ("inc-block-names", GPTQ, replace_quant({"quant_method": "inc", "block_name_to_quantize": [r"re:(x+x+)+y"]}), ConfigError, UNSUPPORTED + r" 'block_name_to_quantize': entry 're:\(x\+x\+\)\+y' " + NESTED),
    # AutoRound's extra_config keys (re.search-ed by its loader when not a layer name)
    ("auto-round-extra-config-polynomial", GPTQ, replace_quant({"quant_method": "auto-round", "bits": 4, "group_size": 32, "extra_config": {r".*a.*a.*a.*b": {"bits": 16}}}), ConfigError, r"invalid auto-round quantization_config " + WHERE + r": field 'extra_config': entry '\.\*a\.\*a\.\*a\.\*b' " + TOO_MUCH),
    ("auto-round-extra-config-too-many", GPTQ, replace_quant({"quant_method": "auto-round", "bits": 4, "group_size": 32, "extra_config": {f".*x{i}$": {"bits": 16} for i in range(4097)}}), ConfigError, r"invalid auto-round quantization_config " + WHERE + r": field 'extra_config': it holds 4097 regexes; at most 4096"),
    ("ptpc_fp8-dynamic-keys", GPTQ, replace_quant({"quant_method": "ptpc_fp8", "dynamic": {r"-:([a-z]+_?)+$": {}}}), ConfigError, UNSUPPORTED + r" 'dynamic': rule '-:\(\[a-z\]\+_\?\)\+\$' " + NESTED),
    ("ptpc_fp8-too-many-regexes", GPTQ, replace_quant({"quant_method": "ptpc_fp8", "ignored_layers": [f"re:x{i}" for i in range(5000)]}), ConfigError, r"config\.json \(quantization_config\): it holds 5000 regexes; at most 4096"),
    ("gptq-3-bit-modules-to-not-convert", GPTQ, quant(lambda q: q.update(bits=3, modules_to_not_convert=[r"re:(a+)+$"])), ConfigError, UNSUPPORTED + r" 'modules_to_not_convert': entry 're:\(a\+\)\+\$' " + NESTED),
    # names
    ("quant-method-a-megabyte", GPTQ, quant(lambda q: q.update(quant_method="x" * 1_000_000)), ConfigError, r"field 'quant_method': unknown quantization method 'x{60}'\.\.\.; registered: auto-round, awq, "),
    ("header-name-100k", GPTQ, add_tensor("a" * 100_000), CheckpointError, r"model\.safetensors: header tensor name 'a{60}'\.\.\. is 100000 characters long; names of at most 256 characters are read"),
    ("header-name-257", GPTQ, add_tensor("lm_head." + "b" * 249), CheckpointError, r"model\.safetensors: header tensor name 'lm_head\.b+'\.\.\. is 257 characters long"),
    ("index-name-300", GPTQ, lambda p: shard(p, names={"x" * 300: "model-00001-of-00001.safetensors"}), CheckpointError, r"model\.safetensors\.index\.json: weight_map tensor name 'x{60}'\.\.\. is 300 characters long"),
]  # fmt: skip
IDS = [case[0] for case in CATALOGUE]


@pytest.fixture
def hostile(request, tmp_path) -> tuple[Path, type, str]:
    _, method, damage, error, message = request.param
    folder = base(tmp_path / "ckpt", method)
    damage(folder)
    return folder, error, message


@pytest.mark.parametrize("hostile", CATALOGUE, ids=IDS, indirect=True)
def test_each_hostile_input_is_refused_quickly_and_changes_nothing(hostile):
    folder, error, message = hostile
    before = digest(folder)
    for call in (resolve, inspect_checkpoint, load_lm_head):
        start = time.perf_counter()
        with pytest.raises(error, match=message) as info:
            call(folder, platform="cpu")
        assert time.perf_counter() - start < SECONDS, call.__name__
        assert isinstance(info.value, QuantregError)
    assert digest(folder) == before


def test_the_catalogue_covers_every_place():
    assert len(set(IDS)) == len(IDS) >= 25
    assert {i.split("-")[0] for i in IDS} >= {"ct", "gptq", "ptpc_fp8", "modelopt", "header", "index"}  # fmt: skip


def test_a_prefix_longer_than_a_name_is_an_input_error(tmp_path):
    folder = base(tmp_path / "ckpt")
    with pytest.raises(InputError, match=r"prefix must be a module name of at most 256 characters; got 'a{60}'\.\.\. \(257 characters\)") as info:  # fmt: skip
        resolve(folder, platform="cpu", prefix="a" * 257)
    assert info.value.field == "prefix"
    assert resolve(folder, platform="cpu", prefix="a" * 256).prefix == "a" * 256


def test_a_256_character_tensor_name_is_read(tmp_path):
    folder = base(tmp_path / "ckpt")
    add_tensor("x" * 256)(folder)
    assert resolve(folder, platform="cpu").method is not None


@pytest.mark.parametrize(
    ("limit", "value", "message"),
    [
        ("MAX_INDEX_ENTRIES", 10, r"index\.json: 'weight_map' lists 1[0-9] tensors; quantreg reads at most 10$"),
        ("MAX_JSON_BYTES", 100, r"index\.json is [0-9,]+ bytes; quantreg reads at most 100$"),
    ],
    ids=["tensors", "bytes"],
)  # fmt: skip
def test_an_index_is_bounded(tmp_path, monkeypatch, limit, value, message):
    """The limits are 1,000,000 tensors and 100 MB (the largest published indexes hold about
    200,000 tensors in 20 MB); lowered here so that the test writes a small file."""
    import quantreg.checkpoint

    folder = base(tmp_path / "ckpt")
    shard(folder, names={f"model.layers.{i}.mlp.down_proj.weight": "model-00001-of-00001.safetensors" for i in range(8)})  # fmt: skip
    monkeypatch.setattr(quantreg.checkpoint, limit, value)
    with pytest.raises(CheckpointError, match=message):
        resolve(folder, platform="cpu")


def test_a_large_index_resolves_within_a_time_bound(tmp_path):
    """100,000 module names (a large MoE model) and ignore regexes that match none of them:
    the index is read once, the search for unmatched entries stops after 0.2 s."""
    folder = base(tmp_path / "ckpt", CT)
    never = [rf"re:.*\.experts\.{i}\.never$" for i in range(20)]
    ignore(*never)(folder)
    names = {f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.down_proj.weight": "model-00001-of-00001.safetensors" for i in range(100_000)}  # fmt: skip
    shard(folder, names=names)
    start = time.perf_counter()
    resolution = resolve(folder, platform="cpu")
    assert time.perf_counter() - start < 4.0
    assert resolution.quantized
    assert any("matches no module" in n or "were not checked" in n for n in resolution.notes)


def test_the_search_for_unmatched_entries_stops_after_a_time_bound():
    never = [rf"re:.*\.experts\.{i}x$" for i in range(15)]
    config = CompressedTensorsConfig.from_quant_config(
        ct_config(targets=["lm_head"], ignore=never), method=CT
    )
    modules = frozenset(f"model.layers.{i}.mlp.experts.{i}.down_proj" for i in range(300_000))
    start = time.perf_counter()
    found = config.unmatched_entries(modules)
    assert time.perf_counter() - start < 1.5
    assert re.search(
        r"[0-9]+ ignore / targets entries were not checked against the checkpoint's 300000 "
        r"modules \(the check stops after 0\.2 s\)",
        found[-1],
    )


# -- the CLI: each case in one subprocess, with a timeout ----------------------------------


def test_the_cli_refuses_each_case_quickly_without_a_traceback(tmp_path):
    commands, expected = [], []
    for name, method, damage, _, message in CATALOGUE:
        folder = base(tmp_path / name, method)
        damage(folder)
        for command in ("resolve", "inspect"):
            commands.append([command, str(folder), "--platform", "cpu"])
            expected.append((f"{command} {name}", message))
    long_prefix = str(base(tmp_path / "long-prefix"))
    commands.append(["resolve", long_prefix, "--platform", "cpu", "--prefix", "a" * 300])
    expected.append(("resolve --prefix", r"prefix must be a module name of at most 256"))
    preload = ("quantreg.methods.compressed_tensors", "quantreg.methods.gptq")
    results = run_cli_batch(commands, timeout=300, preload=preload)
    for (name, message), result in zip(expected, results, strict=True):
        assert result["code"] == 1, name
        assert result["stderr"].startswith("quantreg: error: "), (name, result["stderr"])
        assert "Traceback" not in result["stderr"], name
        assert re.search(message, result["stderr"]), (name, result["stderr"])
        assert result["seconds"] < SECONDS, name


# -- random regexes: refused, or matched within a time bound -------------------------------


@contextlib.contextmanager
def watchdog(seconds: float = 60) -> Iterator[None]:
    """A match cannot be interrupted, so a regression of the analysis would hang the suite
    here: end the process instead (printing where every thread was) after ``seconds``."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


PIECES = [
    "a", ".", "*", "+", "?", "(", ")", "|", "{2,}", r"\d", "b", "(?:", "$", "1", "{1,3}",
    ".*", "a*", "(a+)+", "(a|a)*", "(.*)*",
]  # fmt: skip
PATTERNS = st.lists(st.sampled_from(PIECES), min_size=1, max_size=14).map("".join)


@settings(max_examples=300, deadline=None)
@given(pattern=PATTERNS)
def test_random_regexes_are_refused_or_match_hostile_names_fast(pattern):
    if regex_problem(pattern) is not None:
        return
    regex = re.compile(pattern)
    for name in HOSTILE_NAMES:
        start = time.perf_counter()
        with watchdog():
            regex.match(name)
        assert time.perf_counter() - start < 0.5, (pattern, name)


@settings(max_examples=120, deadline=None)
@given(
    pattern=PATTERNS,
    place=st.sampled_from(["ct-targets", "ct-ignore", "gptq-dynamic"]),
    name=st.sampled_from(HOSTILE_NAMES),
)
def test_random_regexes_in_configs_give_a_quantreg_error_or_a_resolution_within_a_second(
    pattern, place, name
):
    qcfg = {
        "ct-targets": lambda: ct_config(targets=[f"re:{pattern}"]),
        "ct-ignore": lambda: ct_config(targets=["Linear"], ignore=[f"re:{pattern}"]),
        "gptq-dynamic": lambda: gptq_config({f"+:{pattern}": {"bits": 8}}),
    }[place]()
    start = time.perf_counter()
    with watchdog(), contextlib.suppress(QuantregError):
        resolve(qcfg, platform="cpu", prefix=name)
    assert time.perf_counter() - start < 1.0

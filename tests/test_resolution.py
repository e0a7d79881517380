"""resolve(): which method a layer gets on a platform, and why -- the decision matrix."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
from ckpt import (
    awq_head,
    ct_packed_head,
    float_head,
    gptq_head,
    llama_config,
    write_checkpoint,
)
from cli_runner import run_cli

import quantreg
from quantreg import (
    CheckpointError,
    ConfigError,
    InputError,
    LayerRule,
    LinearMethod,
    Platform,
    QuantConfig,
    UnknownMethodError,
    register_quant_method,
    resolve,
)

PLATFORMS = ["cpu", "cuda:9.0", "cuda:7.5", "cuda:9.0-notriton"]

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True,
        "checkpoint_format": "gptq"}  # fmt: skip
W8A16 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
W4G32 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}


def ct(targets: list[str], ignore: list[str], weights: dict[str, Any] = W8A16) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": targets, "weights": weights}},
        "ignore": ignore,
    }


# family id -> (quantization_config, lm_head tensors, method chosen per platform, deciding rule)
FAMILIES: dict[str, tuple[dict[str, Any] | None, dict[str, Any], list[str | None], str]] = {
    "awq-head": ({**AWQ, "lm_head": True}, awq_head(),
                 ["cpu_wna16", "awq_marlin", "awq", "awq"], "lm_head: true"),
    "awq-no-head-flag": (AWQ, float_head(), [None] * 4, "lm_head: false (absent)"),
    "awq-skipped": ({**AWQ, "lm_head": True, "modules_to_not_convert": ["lm_head"]}, float_head(),
                    [None] * 4, "modules_to_not_convert 'lm_head'"),
    "awq-group256": ({**AWQ, "lm_head": True, "group_size": 256}, awq_head(k=256, group=256),
                     ["cpu_wna16", "awq", "awq", "awq"], "lm_head: true"),
    "gptq-head": ({**GPTQ, "lm_head": True}, gptq_head(),
                  ["cpu_wna16", "gptq_marlin", "gptq", "gptq"], "lm_head: true"),
    "gptq-8bit": ({**GPTQ, "lm_head": True, "bits": 8}, gptq_head(bits=8),
                  ["cpu_wna16", "gptq_marlin", "gptq", "gptq"], "lm_head: true"),
    "gptq-asym": ({**GPTQ, "lm_head": True, "sym": False}, gptq_head(),
                  ["cpu_wna16", "gptq", "gptq", "gptq"], "lm_head: true"),
    "gptq-no-head-flag": (GPTQ, float_head(), [None] * 4, "lm_head: false (absent)"),
    "gptq-dynamic-w8g64": ({**GPTQ, "group_size": 128, "lm_head": True,
                            "dynamic": {"+:lm_head": {"bits": 8, "group_size": 64}, "-:.*fc.*": {}}},
                           gptq_head(bits=8, group=64),
                           ["cpu_wna16", "gptq_marlin", "gptq", "gptq"],
                           "dynamic '+:lm_head' → bits=8, group_size=64"),
    "gptq-dynamic-exclude": ({**GPTQ, "lm_head": True, "dynamic": {"-:lm_head": {}}}, float_head(),
                             [None] * 4, "dynamic '-:lm_head'"),
    "ct-regex-target": (ct(["re:.*lm_head"], []), ct_packed_head(),
                        ["compressed-tensors"] * 4, "targets 're:.*lm_head' (group_0)"),
    "ct-linear-target": (ct(["Linear"], [], W4G32), ct_packed_head(bits=4),
                         ["compressed-tensors"] * 4, "targets 'Linear' (group_0)"),
    "ct-ignored": (ct(["Linear"], ["lm_head"]), float_head(), [None] * 4, "ignore 'lm_head'"),
    "ct-not-targeted": (ct(["re:.*fc"], []), float_head(), [None] * 4,
                        "targets: no config group targets 'lm_head'"),
    "unquantized": (None, float_head(), [None] * 4, "no quantization_config"),
}  # fmt: skip
SAME_FAMILY = {
    "awq": "awq",
    "gptq": "gptq",
    "ct": "compressed-tensors",
    "unquantized": "unquantized",
}
INCOMPATIBLE = {"awq": "gptq_marlin", "gptq": "awq", "ct": "cpu_wna16", "unquantized": "awq"}


def family_of(family_id: str) -> str:
    return family_id.split("-")[0]


def matrix() -> list[Any]:
    rows = []
    for fid, (_, _, methods, rule) in FAMILIES.items():
        for platform, method in zip(PLATFORMS, methods, strict=True):
            rows.append(
                pytest.param(fid, platform, None, method, rule, id=f"{fid}-{platform}-auto")
            )
            same = SAME_FAMILY[family_of(fid)]
            same_method = None if method is None else same
            rows.append(
                pytest.param(fid, platform, same, same_method, rule, id=f"{fid}-{platform}-same")
            )
            rows.append(pytest.param(fid, platform, INCOMPATIBLE[family_of(fid)], ConfigError, "cannot read",
                                     id=f"{fid}-{platform}-incompatible"))  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        fid: write_checkpoint(root / fid, config=llama_config(qcfg), tensors=tensors)
        for fid, (qcfg, tensors, _, _) in FAMILIES.items()
    }


@pytest.mark.parametrize(("family", "platform", "requested", "expected", "rule"), matrix())
def test_resolution_matrix(checkpoints, family, platform, requested, expected, rule):
    if expected is ConfigError:
        with pytest.raises(ConfigError, match=rf"requested method '{requested}' cannot read"):
            resolve(checkpoints[family], platform=platform, requested=requested)
        return
    res = resolve(checkpoints[family], platform=platform, requested=requested)
    assert res.method == expected
    assert res.quantized is (expected is not None)
    assert res.rule.startswith(rule)
    assert res.tensors_agree in (True, None)
    accepted = [c.name for c in res.candidates if c.accepted]
    assert accepted == [expected or "unquantized"]


def test_dynamic_override_is_the_effective_config(checkpoints):
    res = resolve(checkpoints["gptq-dynamic-w8g64"], platform="cuda:9.0")
    assert (res.config.bits, res.config.group_size) == (8, 64)
    assert res.rule == "dynamic '+:lm_head' → bits=8, group_size=64; also: lm_head: true"


def test_cpu_wna16_wraps_the_effective_config(checkpoints):
    res = resolve(checkpoints["gptq-dynamic-w8g64"], platform="cpu")
    assert res.config.source_format == "gptq" and res.config.checkpoint.bits == 8


def test_ct_effective_config_keeps_only_the_matching_group():
    qcfg = ct(["re:.*fc"], [])
    qcfg["config_groups"]["head"] = {"targets": ["lm_head"], "weights": W4G32}
    qcfg["config_groups"]["all"] = {"targets": ["Linear"], "weights": W8A16}
    res = resolve(qcfg, platform="cpu")
    assert res.rule == "targets 'lm_head' (head); also: targets 'Linear' (all)"
    assert list(res.config.config_groups) == ["head"] and res.config.format == "pack-quantized"


@pytest.mark.parametrize(
    ("family", "platform", "requested", "why"),
    [
        ("awq-head", "cpu", "awq_marlin", "awq_marlin needs CUDA >= 8.0 with triton; platform is cpu, so it runs its CPU path"),
        ("gptq-head", "cuda:7.5", "gptq_marlin", "needs CUDA compute capability >= 8.0; platform is cuda:7.5, so it runs its CPU path"),
        ("awq-head", "cuda:9.0", "cpu_awq", "cpu_wna16 runs on the CPU; platform is cuda:9.0"),
        ("gptq-head", "cpu", "gptq", "requested"),
    ],
    ids=["awq-marlin-on-cpu", "gptq-marlin-on-turing", "cpu-awq-alias-on-cuda", "reference-on-cpu"],
)  # fmt: skip
def test_requested_methods_say_which_path_they_run(checkpoints, family, platform, requested, why):
    res = resolve(checkpoints[family], platform=platform, requested=requested)
    chosen = next(c for c in res.candidates if c.accepted)
    assert chosen.name == quantreg.registry.normalize_name(requested)
    assert why in chosen.reason
    assert all(c.reason == "not requested" for c in res.candidates if not c.accepted)


@pytest.mark.parametrize(
    ("family", "requested", "message"),
    [
        ("gptq-asym", "gptq_marlin", r"requested method 'gptq_marlin' cannot run 'lm_head' of .*: gptq_marlin needs symmetric quantization"),
        ("awq-group256", "awq_marlin", r"cannot run 'lm_head' .*: awq_marlin supports group_size -1, 32, 64, 128; this layer has 256"),
        ("unquantized", "awq", r"requested method 'awq' cannot read .*: the checkpoint has no quantization_config"),
        ("awq-head", "gptq", r"quant_method 'awq', which only awq, awq_marlin, cpu_wna16 can read"),
        ("awq-head", "unquantized", r"requested method 'unquantized' cannot read"),
    ],
    ids=["marlin-needs-sym", "marlin-group-size", "quantized-method-on-float", "other-family", "unquantized-on-quantized-head"],
)  # fmt: skip
def test_requested_methods_that_cannot_serve_the_layer(checkpoints, family, requested, message):
    with pytest.raises(ConfigError, match=message):
        resolve(checkpoints[family], platform="cuda:9.0", requested=requested)


def test_unknown_requested_method_suggests_the_closest(checkpoints):
    with pytest.raises(
        UnknownMethodError,
        match=r"unknown quantization method 'awq-marlin'.*did you mean 'awq_marlin'\?",
    ):
        resolve(checkpoints["awq-head"], platform="cpu", requested="awq-marlin")


def test_declined_candidates_say_why(checkpoints):
    res = resolve(checkpoints["gptq-asym"], platform="cuda:9.0")
    reasons = {c.name: c.reason for c in res.candidates}
    assert reasons["gptq_marlin"].startswith("gptq_marlin needs symmetric quantization")
    assert reasons["cpu_wna16"] == "cpu_wna16 runs on the CPU; platform is cuda:9.0"
    assert reasons["gptq"] == "highest-priority method that reads 'gptq' and runs on cuda:9.0"


# -- config says one thing, tensors another ------------------------------------------------


@pytest.mark.parametrize(
    ("qcfg", "tensors", "method", "rule"),
    [
        (AWQ, awq_head(), "cpu_wna16", "tensors: lm_head.qweight, qzeros and scales are AWQ-packed; also: lm_head: false (absent)"),
        ({**AWQ, "lm_head": False}, awq_head(), "cpu_wna16", "tensors: lm_head.qweight, qzeros and scales are AWQ-packed; also: lm_head: false"),
        ({**GPTQ, "lm_head": True, "dynamic": {"-:lm_head": {}}}, gptq_head(), "cpu_wna16", "tensors: lm_head.qweight, qzeros, scales and g_idx are GPTQ-packed; also: dynamic '-:lm_head'; lm_head: true"),
    ],
    ids=["awq-no-lm-head-key", "awq-lm-head-false", "gptq-excluded-by-dynamic"],
)  # fmt: skip
def test_packed_head_tensors_win_over_a_config_that_keeps_the_head_unquantized(
    tmp_path, qcfg, tensors, method, rule
):
    write_checkpoint(tmp_path, config=llama_config(qcfg), tensors=tensors)
    res = resolve(tmp_path, platform="cpu")
    assert (res.method, res.quantized, res.rule) == (method, True, rule)
    assert res.tensors == "quantized" and res.tensors_agree is True
    assert "they are loaded quantized, as the tensors say" in res.notes[-1]


def test_quantized_tensors_of_another_layout_are_reported_not_loaded(tmp_path):
    write_checkpoint(tmp_path, config=llama_config(AWQ), tensors=ct_packed_head())
    res = resolve(tmp_path, platform="cpu")
    assert res.method is None and res.tensors_agree is False
    assert "but the checkpoint's tensors are quantized: lm_head.weight_packed (I32)" in res.notes[0]


def test_quantized_config_over_a_float_head_is_reported(tmp_path):
    write_checkpoint(tmp_path, config=llama_config({**AWQ, "lm_head": True}), tensors=float_head())
    res = resolve(tmp_path, platform="cpu")
    assert res.method == "cpu_wna16" and res.tensors_agree is False
    assert "holds float tensors: lm_head.weight (F16)" in res.notes[0]


def test_a_checkpoint_without_head_tensors_is_noted(tmp_path):
    write_checkpoint(tmp_path, config=llama_config(), tensors=float_head(prefix="embed_tokens"))
    res = resolve(tmp_path, platform="cpu")
    assert res.tensors == "absent" and res.tensors_agree is None
    assert "no 'lm_head.*' tensors (a tied or shared head)" in res.notes[0]


def test_w8a8_heads_run_weight_only_and_say_so():
    qcfg = ct(["lm_head"], [])
    qcfg["format"] = "int-quantized"
    qcfg["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}  # fmt: skip
    res = resolve(qcfg, platform="cpu")
    assert res.method == "compressed-tensors"
    assert "runs the layer weight-only: activations stay float (load with activation_dtype='int8' for dynamic int8 activations)" in res.notes[0]  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "weights", "message"),
    [
        ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 32}, r"nvfp4-pack-quantized weights must be \('float', 4, 'tensor_group', 16\); got \('float', 4, 'tensor_group', 32\)"),
        ("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "block", "block_structure": [128, 128]}, r"weight strategy 'block' \(targets \['lm_head'\]\) is supported for float8 weights only"),
        ("pack-quantized", {"num_bits": 2, "type": "int", "strategy": "channel"}, r"pack-quantized weights must be int4 or int8; got int2"),
        ("sparse-24-bitmask", W8A16, r"format 'sparse-24-bitmask' .* is not supported yet"),
    ],
    ids=["nvfp4-group-32", "block", "int2", "sparse"],
)  # fmt: skip
def test_unsupported_compressed_tensors_heads_fail_naming_format_and_layer(fmt, weights, message):
    qcfg = ct(["lm_head"], [], weights)
    qcfg["format"] = fmt
    with pytest.raises(
        ConfigError, match=r"(?s)no method can run the quantized 'lm_head' .*" + message
    ):
        resolve(qcfg, platform="cpu")


# -- sources and detection ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: write_checkpoint(p, config=llama_config({**AWQ, "lm_head": True}), tensors=awq_head()), "cpu_wna16"),
        (lambda p: write_checkpoint(p, config=llama_config({**AWQ, "lm_head": True}), tensors=awq_head()) / "config.json", "cpu_wna16"),
        (lambda p: {**AWQ, "lm_head": True}, "cpu_wna16"),
        (lambda p: llama_config({**AWQ, "lm_head": True}), "cpu_wna16"),
        (lambda p: {"text_config": llama_config({**GPTQ, "lm_head": True})}, "cpu_wna16"),
        (lambda p: {"compression_config": ct(["lm_head"], [])}, "compressed-tensors"),
        (lambda p: {"compression_config": {"quantization_config": {k: v for k, v in ct(["lm_head"], []).items() if k != "quant_method"}}}, "compressed-tensors"),
        (lambda p: write_checkpoint(p, config=llama_config(), tensors=gptq_head(), extra_files={"quantize_config.json": json.dumps({"bits": 4, "group_size": 32, "sym": True, "desc_act": False, "lm_head": True})}), "cpu_wna16"),
        (lambda p: write_checkpoint(p, config=llama_config(), tensors=awq_head(), extra_files={"quant_config.json": json.dumps({"w_bit": 4, "q_group_size": 32, "zero_point": True, "version": "GEMM", "lm_head": True})}), "cpu_wna16"),
        (lambda p: write_checkpoint(p, config=llama_config({**AWQ, "lm_head": True}), tensors=awq_head(), shards=3), "cpu_wna16"),
    ],
    ids=["folder", "config-json-path", "quantization-config-dict", "config-dict", "text-config",
         "compression-config", "compression-config-nested", "legacy-quantize-config", "legacy-quant-config", "sharded"],
)  # fmt: skip
def test_sources(tmp_path, make, expected):
    assert resolve(make(tmp_path), platform="cpu").method == expected


def test_quantization_config_wins_over_legacy_files(tmp_path):
    write_checkpoint(tmp_path, config=llama_config(ct(["lm_head"], [])), tensors=ct_packed_head(),
                     extra_files={"quantize_config.json": json.dumps({"bits": 4, "group_size": 32})})  # fmt: skip
    assert resolve(tmp_path, platform="cpu").format == "compressed-tensors"


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda p: p / "missing", CheckpointError, r"checkpoint path .*missing does not exist"),
        (lambda p: p, ConfigError, r"has no config.json \(nor quantize_config.json / quant_config.json\)"),
        (lambda p: (p / "config.json").write_text("{not json") and p, ConfigError, r"config file .*config.json is not valid JSON: .* line 1 column 2"),
        (lambda p: (p / "config.json").write_text("[1]") and p, ConfigError, r"config file .*config.json must hold a JSON object"),
        (lambda p: {"quantization_config": {"bits": 4}}, ConfigError, r"<config dict> \(quantization_config\) has no 'quant_method' key"),
        (lambda p: {"quantization_config": [1]}, ConfigError, r"\(quantization_config\) must be a JSON object, got list"),
        (lambda p: {"quant_method": "awqq", "bits": 4}, ConfigError, r"field 'quant_method': unknown quantization method 'awqq'.*did you mean 'awq'"),
        (lambda p: {"quant_method": 4}, ConfigError, r"field 'quant_method' = 4: expected a method name"),
        (lambda p: {**GPTQ, "bits": 3, "lm_head": True}, ConfigError, r"invalid gptq quantization_config in <quantization_config dict>: field 'bits' = 3"),
        (lambda p: 42, InputError, r"resolve\(\) takes a checkpoint folder, a config.json path or a dict; got 42"),
    ],
    ids=["missing-path", "no-config", "config-not-json", "config-not-object", "no-quant-method",
         "quant-config-not-object", "unknown-quant-method", "quant-method-not-string", "bad-field", "bad-source"],
)  # fmt: skip
def test_bad_sources(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        resolve(make(tmp_path), platform="cpu")


def test_bad_platform_argument():
    with pytest.raises(InputError, match=r"'cuda:0' looks like a torch device"):
        resolve(AWQ, platform="cuda:0")


def test_platform_defaults_to_the_detected_one():
    assert resolve({**AWQ, "lm_head": True}).platform == Platform.detect()


def test_other_prefixes(tmp_path):
    write_checkpoint(tmp_path, config=llama_config({**GPTQ, "dynamic": {"-:.*fc.*": {}}}),
                     tensors={**float_head(), **gptq_head(prefix="model.layers.0.mlp.down_proj"), **float_head(prefix="fc")})  # fmt: skip
    down = resolve(tmp_path, platform="cpu", prefix="model.layers.0.mlp.down_proj")
    assert (down.method, down.tensors) == ("cpu_wna16", "quantized")
    fc = resolve(tmp_path, platform="cpu", prefix="fc")
    assert (fc.method, fc.rule) == (None, "dynamic '-:.*fc.*'")


# -- output forms, logging, caching -----------------------------------------------------


def test_to_dict_is_json_safe_and_complete(checkpoints):
    data = json.loads(
        json.dumps(resolve(checkpoints["gptq-dynamic-w8g64"], platform="cpu").to_dict())
    )
    assert {"method", "quantized", "rule", "candidates", "config"} <= data.keys()
    assert data["config"]["checkpoint"]["bits"] == 8
    assert data["tensors"]["state"] == "quantized"
    assert [c["name"] for c in data["candidates"]] == [
        "gptq_marlin",
        "cpu_wna16",
        "gptq",
    ]  # by priority
    assert data["candidates"][1] == {"name": "cpu_wna16", "accepted": True, "priority": 10,
                                     "reason": "highest-priority method that reads 'gptq' and runs on cpu"}  # fmt: skip


def test_explain_reads_as_an_account(checkpoints):
    text = resolve(checkpoints["awq-head"], platform="cuda:9.0").explain()
    assert "method: awq_marlin (quantized)" in text
    assert "rule: lm_head: true" in text
    assert "+ awq_marlin [priority 20]: highest-priority method" in text
    assert "- cpu_wna16 [priority 10]: cpu_wna16 runs on the CPU" in text
    assert "tensors: quantized (lm_head.qweight I32 [64, 128]" in text


def test_one_info_line_per_decision(checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="quantreg"):
        resolve(checkpoints["awq-head"], platform="cpu")
    [record] = [r for r in caplog.records if r.levelno == logging.INFO]
    assert (
        "lm_head of" in record.getMessage()
        and "-> cpu_wna16 (lm_head: true)" in record.getMessage()
    )


def test_resolving_again_does_not_reread_until_files_change(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, config=llama_config({**AWQ, "lm_head": True}), tensors=awq_head())
    from quantreg import view

    reads = []
    real = view.tensor_infos
    monkeypatch.setattr(view, "tensor_infos", lambda *a, **k: reads.append(1) or real(*a, **k))
    resolve(tmp_path, platform="cpu")
    resolve(tmp_path, platform="cuda:9.0")
    assert len(reads) == 1
    config = tmp_path / "config.json"
    config.write_text(json.dumps(llama_config()))
    os.utime(config, ns=(1, 1))  # a different mtime even on coarse clocks
    assert resolve(tmp_path, platform="cpu").method is None
    assert len(reads) == 2


# -- plugins take part in upgrades ---------------------------------------------------------


class _Noop(LinearMethod):
    def create_weights(self, layer: Any, *args: Any, **extra: Any) -> None:
        pass

    def apply(self, layer: Any, x: Any, bias: Any = None) -> Any:
        return x


def test_a_loaded_plugin_with_a_higher_priority_wins():
    @register_quant_method("fast_awq")
    class FastAWQ(QuantConfig):
        linear_method = _Noop
        supports_lm_head: ClassVar[bool] = True
        checkpoint_formats: ClassVar[tuple[str, ...]] = ("awq",)
        upgrade_priority: ClassVar[int] = 50

        def layer_rule(self, prefix: str) -> LayerRule:
            return LayerRule(True, "lm_head: true")

    res = resolve({**AWQ, "lm_head": True}, platform="cpu")
    assert res.method == "fast_awq" and res.config.model_extra["bits"] == 4
    reasons = {c.name: c.reason for c in res.candidates}
    assert reasons["cpu_wna16"] == "viable, but 'fast_awq' has a higher priority"


def test_a_plugin_whose_hook_raises_is_declined_not_fatal():
    @register_quant_method("flaky")
    class Flaky(QuantConfig):
        linear_method = _Noop
        supports_lm_head: ClassVar[bool] = True
        checkpoint_formats: ClassVar[tuple[str, ...]] = ("awq",)
        upgrade_priority: ClassVar[int] = 50

        def platform_reason(self, platform: Platform) -> str | None:
            raise RuntimeError("boom")

    res = resolve({**AWQ, "lm_head": True}, platform="cpu")
    assert res.method == "cpu_wna16"
    assert {c.name: c.reason for c in res.candidates}["flaky"] == "failed: RuntimeError: boom"


def test_a_broken_plugin_is_a_declined_candidate(tmp_path, monkeypatch, registry):
    site = tmp_path / "site"
    dist = site / "broken_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[quantreg.methods]\nbroken = no_such_module_xyz:Cfg\n")
    monkeypatch.syspath_prepend(str(site))
    quantreg.registry.set_default_registry(fresh := quantreg.registry.Registry())
    assert next(i for i in quantreg.list_quant_methods() if i.name == "broken").error
    res = resolve({**AWQ, "lm_head": True}, platform="cpu")
    assert res.method == "cpu_wna16" and fresh is quantreg.registry.default_registry()
    broken = next(c for c in res.candidates if c.name == "broken")
    assert not broken.accepted and "broken-plugin 1.0" in broken.reason


# -- the command line ----------------------------------------------------------------------


def test_cli_resolve_json(checkpoints):
    out = run_cli(
        "resolve", str(checkpoints["gptq-dynamic-w8g64"]), "--platform", "cuda:9.0", "--json"
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["method"], data["quantized"]) == ("gptq_marlin", True)
    assert data["rule"].startswith("dynamic '+:lm_head'")


def test_cli_resolve_text_with_quantization_and_prefix(checkpoints):
    out = run_cli(
        "resolve",
        str(checkpoints["awq-head"]),
        "--platform",
        "cpu",
        "--quantization",
        "awq",
        "--prefix",
        "lm_head",
    )
    assert out.returncode == 0 and "method: awq (quantized)" in out.stdout


def test_cli_unknown_quantization_exits_1_with_a_suggestion(checkpoints):
    out = run_cli(
        "resolve", str(checkpoints["awq-head"]), "--platform", "cpu", "--quantization", "awq-marlin"
    )
    assert out.returncode == 1
    assert "did you mean 'awq_marlin'?" in out.stderr and "Traceback" not in out.stderr


def test_cli_bad_platform_exits_1(checkpoints):
    out = run_cli("resolve", str(checkpoints["awq-head"]), "--platform", "cuda:0")
    assert out.returncode == 1 and "looks like a torch device" in out.stderr

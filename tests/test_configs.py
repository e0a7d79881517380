"""Config models of the built-in families: strict known fields, unknown keys kept."""

from __future__ import annotations

import logging

import pytest

import quantreg
from quantreg import ConfigError

AUTOAWQ = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4,
           "version": "gemm", "modules_to_not_convert": None}  # fmt: skip
GPTQMODEL_AWQ = {"bits": 4, "checkpoint_format": "gemm", "desc_act": False, "format": "gemm",
                 "group_size": 128, "lm_head": True, "method": "awq", "pack_dtype": "int32",
                 "quant_method": "awq", "version": "gemm", "zero_point": True,
                 "meta": {"quantizer": ["gptqmodel:7.6.0"]}}  # fmt: skip
AUTOGPTQ = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False,
            "static_groups": False, "sym": True, "true_sequential": True,
            "model_name_or_path": None, "model_file_base_name": None,
            "is_marlin_format": False, "quant_method": "gptq"}  # fmt: skip
GPTQMODEL = {"bits": 4, "group_size": 128, "desc_act": True, "sym": True, "lm_head": True,
             "method": "gptq", "quant_method": "gptq", "format": "gptq",
             "checkpoint_format": "gptq", "pack_dtype": "int32",
             "dynamic": {"+:lm_head": {"bits": 8, "group_size": 64}, "-:.*fc.*": {}},
             "meta": {"quantizer": ["gptqmodel:7.6.0"], "damp_percent": 0.01,
                      "act_group_aware": False}}  # fmt: skip
CT_W8A16 = {
    "quant_method": "compressed-tensors", "version": "0.20.0", "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["re:.*lm_head"], "format": "pack-quantized",
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                    "group_size": None, "dynamic": False, "observer": "minmax",
                    "observer_kwargs": {}, "block_structure": None, "actorder": None},
        "input_activations": None, "output_activations": None}},
    "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None,
    "sparsity_config": {}, "transform_config": {},
}  # fmt: skip


def parse(method: str, data: dict) -> quantreg.QuantConfig:
    return quantreg.get_quant_config_cls(method).from_quant_config(
        data, method=method, source="/ckpt/config.json"
    )


@pytest.mark.parametrize(
    ("method", "data", "expected"),
    [
        ("awq", AUTOAWQ, {"bits": 4, "group_size": 128, "lm_head": False}),
        ("awq", GPTQMODEL_AWQ, {"lm_head": True, "version": "gemm"}),
        ("awq", {**GPTQMODEL_AWQ, "sym": True, "zero_point": False}, {"zero_point": False}),
        ("awq", {"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"},
         {"bits": 4, "group_size": 64, "version": "gemm"}),
        ("gptq", AUTOGPTQ, {"bits": 4, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}),
        ("gptq", GPTQMODEL, {"lm_head": True, "desc_act": True, "format": "gptq"}),
        ("gptq", {**AUTOGPTQ, "checkpoint_format": "gptq_v2"}, {"checkpoint_format": "gptq_v2"}),
        ("compressed-tensors", CT_W8A16, {"format": "pack-quantized", "ignore": []}),
    ],
    ids=["autoawq", "gptqmodel-awq", "gptqmodel-awq-sym-no-zero-point", "legacy-awq-keys", "autogptq", "gptqmodel", "gptq-v2", "ct-w8a16"],
)  # fmt: skip
def test_real_producer_configs_parse(method, data, expected):
    config = parse(method, data)
    assert {k: getattr(config, k) for k in expected} == expected


def test_unknown_keys_are_kept_and_logged_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="quantreg.contract"):
        config = parse("gptq", GPTQMODEL)
    assert config.model_extra["meta"]["quantizer"] == ["gptqmodel:7.6.0"]
    assert config.model_extra["pack_dtype"] == "int32"
    assert "keeping unknown keys ['meta', 'method', 'pack_dtype']" in caplog.text


def test_compressed_tensors_keeps_nested_unknown_keys():
    config = parse("compressed-tensors", CT_W8A16)
    weights = config.config_groups["group_0"].weights
    assert weights.model_extra == {"observer": "minmax", "observer_kwargs": {}}


def test_gptq_dynamic_rules_are_parsed():
    rule = parse("gptq", GPTQMODEL).dynamic["+:lm_head"]
    assert (rule.bits, rule.group_size) == (8, 64)


@pytest.mark.parametrize(
    ("method", "data", "message"),
    [
        ("awq", {**AUTOAWQ, "bits": True}, r"field 'bits' = True: Input should be a valid integer"),
        ("awq", {**AUTOAWQ, "bits": "4"}, r"field 'bits' = '4': Input should be a valid integer"),
        ("awq", {**AUTOAWQ, "bits": 3}, r"field 'bits' = 3: AWQ checkpoints are supported with 4-bit codes only"),
        ("awq", {**AUTOAWQ, "version": "gemv"}, r"field 'version' = 'gemv': only the 'gemm' layout"),
        ("awq", {**AUTOAWQ, "group_size": 0}, r"field 'group_size' = 0: expected -1 \(one group\) or a positive"),
        ("awq", {**AUTOAWQ, "modules_to_not_convert": "lm_head"}, r"field 'modules_to_not_convert' = 'lm_head'"),
        ("awq", {**AUTOAWQ, "lm_head": "yes"}, r"field 'lm_head' = 'yes': Input should be a valid boolean"),
        ("gptq", {**AUTOGPTQ, "bits": 3}, r"field 'bits' = 3: supported GPTQ widths are 4 and 8 bits"),
        ("gptq", {**AUTOGPTQ, "bits": 2}, r"field 'bits' = 2: supported GPTQ widths are 4 and 8"),
        ("gptq", {k: v for k, v in AUTOGPTQ.items() if k != "bits"}, r"field 'bits' is required"),
        ("gptq", {**AUTOGPTQ, "is_marlin_format": True}, r"field 'is_marlin_format' = True: AutoGPTQ marlin-format checkpoints are not supported"),
        ("gptq", {**GPTQMODEL, "format": "marlin"}, r"field 'format' = 'marlin': the 'marlin' GPTQ layout is not supported; expected one of gptq, gptq_v2"),
        ("gptq", {**GPTQMODEL, "format": "bitblas"}, r"'bitblas' GPTQ layout is not supported"),
        ("gptq", {**GPTQMODEL, "format": "qqq"}, r"'qqq' GPTQ layout is not supported"),
        ("gptq", {**AUTOGPTQ, "checkpoint_format": "gptq_v3"}, r"field 'checkpoint_format' = 'gptq_v3': expected one of gptq, gptq_v2"),
        ("gptq", {**GPTQMODEL, "dynamic": {"+:lm_head": {"bits": 3}}}, r"field 'dynamic.\+:lm_head.bits' = 3: supported GPTQ widths"),
        ("gptq", {**GPTQMODEL, "dynamic": {"+:(lm_head": {}}}, r"rule '\+:\(lm_head' is not a valid regular expression"),
        ("gptq", {**GPTQMODEL, "dynamic": ["lm_head"]}, r"field 'dynamic' = \['lm_head'\]"),
        ("compressed-tensors", {**CT_W8A16, "format": "pack_quantized"}, r"field 'format' = 'pack_quantized': unknown compressed-tensors format; expected one of dense"),
        ("compressed-tensors", {**CT_W8A16, "ignore": "lm_head"}, r"field 'ignore' = 'lm_head': Input should be a valid list"),
        ("compressed-tensors", {**CT_W8A16, "ignore": ["re:("]}, r"'re:\(' is not a valid regular expression"),
        ("compressed-tensors", {**CT_W8A16, "quantization_status": "done"}, r"field 'quantization_status' = 'done': expected one of initialized"),
        ("compressed-tensors", {**CT_W8A16, "config_groups": {"g": {"weights": {}}}}, r"field 'config_groups.g.targets' is required"),
        ("compressed-tensors", {**CT_W8A16, "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": "8"}}}}, r"field 'config_groups.g.weights.num_bits' = '8'"),
        ("compressed-tensors", {**CT_W8A16, "config_groups": {"g": {"targets": ["Linear"], "weights": {"strategy": "rows"}}}}, r"field 'config_groups.g.weights.strategy' = 'rows': Input should be 'tensor', 'channel'"),
    ],
    ids=[
        "awq-bits-bool", "awq-bits-string", "awq-3bit", "awq-gemv",
        "awq-group-0", "awq-skip-not-list", "awq-lm-head-string", "gptq-3bit", "gptq-2bit",
        "gptq-no-bits", "autogptq-marlin", "gptqmodel-marlin", "gptqmodel-bitblas",
        "gptqmodel-qqq", "gptq-bad-checkpoint-format", "dynamic-3bit", "dynamic-bad-regex",
        "dynamic-not-dict", "ct-bad-format", "ct-ignore-not-list", "ct-bad-regex",
        "ct-bad-status", "ct-no-targets", "ct-bits-string", "ct-bad-strategy",
    ],
)  # fmt: skip
def test_bad_values_name_the_file_method_field_and_what_is_allowed(method, data, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse(method, data)
    assert f"invalid {method} quantization_config in /ckpt/config.json" in str(info.value)
    assert info.value.__cause__ is not None  # the pydantic error is kept


def test_a_config_that_is_not_an_object_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"quantization_config in /ckpt/config.json must be a JSON object, got list",
    ):
        parse("awq", [1, 2])  # type: ignore[arg-type]


def test_cpu_wna16_wraps_either_family():
    cls = quantreg.get_quant_config_cls("cpu_wna16")
    awq = cls.from_quant_config(AUTOAWQ, method="cpu_wna16")
    gptq = cls.from_quant_config(GPTQMODEL, method="cpu_wna16")
    assert (awq.source_format, gptq.source_format) == ("awq", "gptq")
    assert gptq.checkpoint.lm_head is True
    with pytest.raises(
        ConfigError,
        match=r"cpu_wna16 reads AWQ and GPTQ checkpoints; quant_method 'compressed-tensors' in x is neither",
    ):
        cls.from_quant_config(CT_W8A16, method="cpu_wna16", source="x")


def test_configs_are_immutable():
    config = parse("awq", AUTOAWQ)
    with pytest.raises(ValueError, match="frozen"):
        config.bits = 8

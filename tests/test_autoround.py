"""The ``auto-round`` method (alias ``intel/auto-round``): AutoRound's own format, read by the
GPTQ or AWQ methods by its ``packing_format``, each layer decided by ``extra_config``.

The producer's own checkpoints are in tests/fixtures/producers (``autoround_*``, conformance in
test_conformance.py); here: the decision rules on configs (pure), the tensors winning over the
config, and the bad inputs, each refused with the field, the value and what is expected.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt import with_
from safetensors.torch import load_file, save_file

from quantreg import CheckpointError, ConfigError, list_quant_methods, load_lm_head, resolve

FIXTURES = Path(__file__).parent / "fixtures" / "producers"
GPTQ_FIXTURE = FIXTURES / "autoround_gptq_lmhead"
DENSE_FIXTURE = FIXTURES / "autoround_gptq_lmhead_dense"

# auto-round 0.16.1's export of a W4A16 model with its head quantized (tests/fixtures/producers),
# the head entry trimmed to the scheme fields quantreg reads.
BASE = {
    "bits": 4, "data_type": "int", "group_size": 128, "sym": True, "autoround_version": "0.16.1",
    "block_name_to_quantize": "model.layers", "quant_method": "auto-round",
    "packing_format": "auto_round:auto_gptq",
    "extra_config": {"lm_head": {"bits": 4, "group_size": 128, "sym": True, "data_type": "int"}},
}  # fmt: skip
GPTQ_LAYOUT = {"cpu": "cpu_wna16", "cuda:9.0": "gptq_marlin"}
AWQ_LAYOUT = {"cpu": "cpu_wna16", "cuda:9.0": "awq_marlin"}
HEAD = "lm_head"
BODY = "model.layers.0.mlp.down_proj"
ROUTER = "model.layers.0.mlp.gate"
PACKING = "(packing_format 'auto_round:auto_gptq')"


def config(**changes: Any) -> dict[str, Any]:
    """BASE with some keys replaced (None removes a key)."""
    return with_(BASE, **changes)


# -- which layers are quantized, and how -------------------------------------------------------

# id -> (config, layer, (method on cpu and cuda:9.0 or None for float), rule, effective fields)
RULES: dict[str, tuple[dict, str, dict | None, str, dict]] = {
    "head-named-exactly": (config(), HEAD, GPTQ_LAYOUT, f"extra_config 'lm_head' → bits=4, group_size=128, sym=true {PACKING}", {"bits": 4, "group_size": 128}),
    "head-override-bits-and-group": (config(extra_config={"lm_head": {"bits": 8, "group_size": 64}}), HEAD, GPTQ_LAYOUT, "extra_config 'lm_head' → bits=8, group_size=64, sym=true", {"bits": 8, "group_size": 64}),
    "head-override-sym-false": (config(extra_config={"lm_head": {"sym": False}}), HEAD, {"cpu": "cpu_wna16", "cuda:9.0": "gptq"}, "extra_config 'lm_head' → bits=4, group_size=128, sym=false", {"sym": False}),
    "head-by-regex": (config(extra_config={r".*lm_head.*": {"bits": 8}}), HEAD, GPTQ_LAYOUT, "extra_config '.*lm_head.*' → bits=8", {"bits": 8}),
    "head-exact-wins-over-regex": (config(extra_config={r".*head$": {"bits": 8}, "lm_head": {"bits": 4}}), HEAD, GPTQ_LAYOUT, "extra_config 'lm_head' → bits=4", {"bits": 4}),
    "head-bits-16": (config(extra_config={"lm_head": {"bits": 16, "data_type": "float"}}), HEAD, None, f"extra_config 'lm_head': bits=16 {PACKING}", {}),
    "head-not-named": (config(extra_config=None), HEAD, None, "extra_config: no entry names 'lm_head' (AutoRound quantizes a head only through one; packing_format 'auto_round:auto_gptq')", {}),
    "head-awq-packing": (config(packing_format="auto_round:auto_awq", sym=False), HEAD, AWQ_LAYOUT, "extra_config 'lm_head' → bits=4, group_size=128, sym=true (packing_format 'auto_round:auto_awq')", {"zero_point": False}),
    "head-awq-asym-entry": (config(packing_format="auto_round:awq", extra_config={"lm_head": {"sym": False}}), HEAD, AWQ_LAYOUT, "extra_config 'lm_head' → bits=4, group_size=128, sym=false (packing_format 'auto_round:awq')", {"zero_point": True}),
    "head-no-packing-format": (config(packing_format=None), HEAD, GPTQ_LAYOUT, "extra_config 'lm_head' → bits=4, group_size=128, sym=true (no packing_format (read as 'auto_round:auto_gptq'))", {"g_idx": False}),
    "head-intel-label-keeps-g_idx": (config(quant_method="intel/auto-round", packing_format=None), HEAD, GPTQ_LAYOUT, "extra_config 'lm_head' → bits=4", {"g_idx": True}),
    "body-in-block": (config(), BODY, GPTQ_LAYOUT, "packing_format 'auto_round:auto_gptq': bits=4, group_size=128, sym=true", {"bits": 4, "g_idx": False}),
    "body-outside-blocks": (config(block_name_to_quantize="model.layers.1,model.layers.2"), BODY, None, "block_name_to_quantize: no block covers 'model.layers.0.mlp.down_proj'", {}),
    "body-to_quant_block_names-list": (config(block_name_to_quantize=None, to_quant_block_names=[["model.layers.0"]]), BODY, GPTQ_LAYOUT, "packing_format 'auto_round:auto_gptq'", {}),
    "router-kept-float-by-regex": (config(extra_config={r".*mlp\.gate$": {"bits": 16}}), ROUTER, None, r"extra_config '.*mlp\.gate$': bits=16", {}),
}  # fmt: skip


def effective(config: Any) -> Any:
    """The GPTQ or AWQ config itself (cpu_wna16 wraps it)."""
    return getattr(config, "checkpoint", config)


@pytest.mark.parametrize("platform", ["cpu", "cuda:9.0"])
@pytest.mark.parametrize(("qcfg", "prefix", "methods", "rule", "fields"), RULES.values(), ids=RULES)
def test_each_layer_is_decided_by_extra_config_then_the_blocks(qcfg, prefix, methods, rule, fields, platform):  # fmt: skip
    res = resolve(qcfg, prefix=prefix, platform=platform)
    assert res.rule.startswith(rule), res.rule
    if methods is None:
        assert (res.method, res.quantized) == (None, False)
        return
    assert (res.method, res.quantized) == (methods[platform], True)
    assert {k: getattr(effective(res.config), k) for k in fields} == fields
    assert any("quant_method" in note and "so it is read as" in note for note in res.notes)


def test_intel_auto_round_is_an_alias():
    (info,) = [m for m in list_quant_methods() if m.name == "auto-round"]
    assert (info.aliases, info.source) == (("intel/auto-round",), "built-in")


# -- the tensors win over the config -----------------------------------------------------------


def test_the_dense_head_autoround_writes_by_default_is_its_fake_quantized_weight():
    """auto-round 0.16.1's default flow saves the head dense (float32) while extra_config says
    4-bit g32: it loads float, and equals the packed head's dequantization (same RTN, the same
    model) within float16 rounding."""
    head = load_lm_head(DENSE_FIXTURE, dtype=torch.float32)
    assert head.resolution.method is None
    assert head.resolution.rule.startswith("tensors: lm_head.weight is float")
    assert "also: extra_config 'lm_head' → bits=4, group_size=32" in head.resolution.rule
    packed = load_file(str(GPTQ_FIXTURE / "reference.safetensors"))["lm_head.weight_dequant"]
    weight_t = head.compute_logits(torch.eye(head.embedding_dim))
    torch.testing.assert_close(weight_t.T, packed.float(), rtol=0, atol=2e-5)


def copy_fixture(tmp_path: Path, folder: Path = GPTQ_FIXTURE) -> Path:
    shutil.copytree(folder, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "quantization_config.json").unlink()
    return tmp_path / "ckpt"


def edit_qcfg(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def test_packed_head_tensors_load_quantized_when_the_config_does_not_name_the_head(tmp_path):
    folder = copy_fixture(tmp_path)
    edit_qcfg(folder, lambda q: q.pop("extra_config"))
    res = resolve(folder, platform="cpu")
    assert (res.method, res.quantized) == ("cpu_wna16", True)
    assert res.rule.startswith("tensors: lm_head.qweight, qzeros and scales are GPTQ-packed")
    assert "extra_config: no entry names 'lm_head'" in res.rule
    head = load_lm_head(folder, dtype=torch.float32)
    ref = load_file(str(GPTQ_FIXTURE / "reference.safetensors"))["lm_head.weight_dequant"]
    assert torch.equal(head.compute_logits(torch.eye(64)).T, ref.float())


# -- bad inputs ----------------------------------------------------------------------------------

INVALID = r"invalid auto-round quantization_config in .*config\.json \(quantization_config\): "
NESTED = r"repeats without bound a part that can match the same text in more than one way"
# id -> (change to the fixture's quantization_config, error, message)
BAD_CONFIGS = [
    ("packing-unknown", lambda q: q.update(packing_format="auto_round:llm_compressor"), ConfigError, INVALID + r"field 'packing_format' = 'auto_round:llm_compressor': expected one of auto_round:auto_gptq, auto_round:gptq, auto_round:auto_awq, auto_round:awq; AutoRound's other packings"),
    ("packing-asymmetric-auto_round", lambda q: q.update(packing_format="auto_round"), ConfigError, INVALID + r"field 'packing_format' = 'auto_round': expected one of"),
    ("packing-not-a-string", lambda q: q.update(packing_format=4), ConfigError, INVALID + r"field 'packing_format' = 4"),
    ("data-type-nv_fp", lambda q: q.update(data_type="nv_fp"), ConfigError, INVALID + r"field 'data_type' = 'nv_fp': quantreg reads AutoRound's integer weights only"),
    ("bits-3", lambda q: q.update(bits=3), ConfigError, INVALID + r"field 'bits' = 3: packing_format 'auto_round:auto_gptq' \(GPTQ v1 \(no g_idx\) tensors, read as gptq\) holds 4 or 8-bit codes"),
    ("bits-8-awq", lambda q: q.update(bits=8, packing_format="auto_round:auto_awq"), ConfigError, INVALID + r"field 'bits' = 8: packing_format 'auto_round:auto_awq' \(AutoAWQ GEMM tensors, read as awq\) holds 4-bit codes"),
    ("bits-a-string", lambda q: q.update(bits="4"), ConfigError, INVALID + r"field 'bits' = '4'"),
    ("bits-missing", lambda q: q.pop("bits"), ConfigError, INVALID + r"field 'bits' is required"),
    ("group-size-0", lambda q: q.update(group_size=0), ConfigError, INVALID + r"field 'group_size' = 0: expected -1 \(one group\) or a positive group size"),
    ("extra-config-not-an-object", lambda q: q.update(extra_config=["lm_head"]), ConfigError, INVALID + r"field 'extra_config' = \['lm_head'\]"),
    ("extra-entry-not-an-object", lambda q: q["extra_config"].update(lm_head=4), ConfigError, INVALID + r"field 'extra_config\.lm_head' = 4"),
    ("extra-entry-bits-a-string", lambda q: q["extra_config"]["lm_head"].update(bits="8"), ConfigError, INVALID + r"field 'extra_config\.lm_head\.bits' = '8'"),
    ("extra-entry-group-size-minus-2", lambda q: q["extra_config"]["lm_head"].update(group_size=-2), ConfigError, INVALID + r"field 'extra_config\.lm_head\.group_size' = -2: expected -1"),
    ("extra-entry-bad-regex", lambda q: q["extra_config"].update({"lm_head[": {"bits": 16}}), ConfigError, INVALID + r"field 'extra_config': entry 'lm_head\[' is not a valid regular expression"),
    ("extra-entry-nested-regex", lambda q: q["extra_config"].update({r"(a|ab)*c$": {"bits": 16}}), ConfigError, INVALID + r"field 'extra_config': entry '\(a\|ab\)\*c\$' " + NESTED),
    ("head-entry-bits-3", lambda q: q["extra_config"]["lm_head"].update(bits=3), ConfigError, r"auto-round extra_config 'lm_head' quantizes 'lm_head' with bits=3: packing_format 'auto_round:auto_gptq' .* holds 4 or 8-bit codes"),
    ("head-entry-mx_fp", lambda q: q["extra_config"]["lm_head"].update(data_type="mx_fp"), ConfigError, r"auto-round extra_config 'lm_head' quantizes 'lm_head' with data_type 'mx_fp'; quantreg reads AutoRound's integer weights only"),
    ("head-entry-rotated", lambda q: q["extra_config"]["lm_head"].update(rotation_config={"r1": True}), ConfigError, r"auto-round extra_config 'lm_head' rotates 'lm_head' \(rotation_config \{'r1': True\}\); rotated layers are not supported"),
    ("head-entry-group-size-the-tensors-lack", lambda q: q["extra_config"]["lm_head"].update(group_size=64), CheckpointError, r"lm_head\.qzeros: expected shape I32 \[1, 128\], found I32 \[2, 128\]"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "error", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])  # fmt: skip
def test_bad_configs_are_refused_naming_the_field(tmp_path, change, error, message):
    folder = copy_fixture(tmp_path)
    edit_qcfg(folder, change)
    with pytest.raises(error, match=message):
        load_lm_head(folder, dtype=torch.float32)


def test_an_unsupported_variant_still_resolves_a_float_head(tmp_path):
    qcfg = config(data_type="nv_fp", extra_config=None)
    res = resolve(qcfg, platform="cpu")
    assert (res.method, res.quantized) == (None, False)
    assert any("auto-round layers are not supported by quantreg" in note for note in res.notes)


def rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


BAD_TENSORS = [
    ("scales-missing", lambda t: t.pop("lm_head.scales"), r"missing lm_head\.scales: expected F32 \[2, 1024\]"),
    ("qzeros-missing", lambda t: t.pop("lm_head.qzeros"), r"missing lm_head\.qzeros: expected I32 \[2, 128\]"),
    ("g_idx-not-written-by-autoround", lambda t: t.update({"lm_head.g_idx": torch.arange(64, dtype=torch.int32) // 32}), r"no parameter consumes lm_head\.g_idx; 'lm_head' resolved as cpu_wna16 \(extra_config 'lm_head'"),
    ("qweight-of-another-width", lambda t: t.update({"lm_head.qweight": torch.zeros(16, 1024, dtype=torch.int32)}), r"lm_head\.qweight: expected shape I32 \[8, 1024\], found I32 \[16, 1024\]"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in BAD_TENSORS], ids=[c[0] for c in BAD_TENSORS])  # fmt: skip
def test_head_tensors_that_disagree_with_the_config_are_refused(tmp_path, change, message):
    folder = copy_fixture(tmp_path)
    rewrite_tensors(folder, change)
    with pytest.raises(CheckpointError, match=message):
        load_lm_head(folder, dtype=torch.float32)


def test_autoround_negative_scales_load_without_a_warning(caplog):
    """AutoRound's symmetric quantizer writes negative scales on purpose (1009 of the 2048 of
    this head): loading its checkpoint warns about nothing, while the same scales in a plain
    GPTQ checkpoint are warned about (tests/test_poisoned_values.py)."""
    folder = Path(__file__).parent / "fixtures" / "producers" / "autoround_gptq_lmhead"
    assert (load_file(folder / "model.safetensors")["lm_head.scales"] < 0).any()
    with caplog.at_level("WARNING"):
        head = load_lm_head(folder, dtype=torch.float32)
    config = head.resolution.config  # cpu_wna16 here: the GPTQ config it wraps
    assert getattr(config, "checkpoint", config).signed_scales
    assert not caplog.records, caplog.text

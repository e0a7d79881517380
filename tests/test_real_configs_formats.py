"""Layout and sparsity fields producers write (issue 17, items 1-3): GPTQModel's ``format``
(GPTQ v2 named only there), AWQ ``format`` vs ``version``, compressed-tensors FP8 weights under
``naive-quantized``, and ``sparsity_config``. Each rule is checked on checkpoints that load, and
against a table of configs copied from producers and public model repositories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt import awq_head, ct_packed_head, float_head, gptq_head, llama_config, with_
from ckpt import write_checkpoint as write_raw
from ct_library import compress_head
from safetensors.torch import load_file
from wna16_spec import gptq_dequantize

from quantreg import ConfigError, load_lm_head, resolve, write_checkpoint

VOCAB, HIDDEN = 1024, 128


def random_weight(n: int = VOCAB, k: int = HIDDEN, dtype=torch.float16, seed: int = 0):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def weight_t(head) -> torch.Tensor:
    """``W.T`` as the head computes it (logits of the identity, exact in float32)."""
    return head.compute_logits(torch.eye(head.embedding_dim))


def edit_qcfg(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


# -- 1. GPTQ v2 named only by GPTQModel's ``format`` -------------------------------------------


def write_v2_format_only(tmp_path: Path, sym: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """A GPTQ v2 head (stored zeros are the zeros) whose config says v2 only in ``format``,
    as GPTQModel writes it."""
    write_checkpoint(tmp_path, random_weight(), "gptq", group_size=32, sym=sym,
                     checkpoint_format="gptq_v2")  # fmt: skip

    def only_format(qcfg: dict) -> None:
        del qcfg["checkpoint_format"]
        qcfg["format"] = "gptq_v2"

    edit_qcfg(tmp_path, only_format)
    tensors = {k.removeprefix("lm_head."): v for k, v in load_file(tmp_path / "model.safetensors").items()}  # fmt: skip
    return tmp_path, tensors


def gptq_config(config):
    """The GPTQ config itself (cpu_wna16 wraps it)."""
    return getattr(config, "checkpoint", config)


@pytest.fixture
def gptq_v2_format_only(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    return write_v2_format_only(tmp_path, sym=False)


@pytest.mark.parametrize(
    ("sym", "method"),
    [(False, None), (False, "gptq"), (False, "cpu_wna16"), (True, "gptq_marlin"), (True, "gptq")],
    ids=["asym-selected", "asym-gptq", "asym-cpu_wna16", "sym-gptq_marlin", "sym-gptq"],
)
def test_gptq_v2_named_only_by_format_loads_with_its_own_zero_points(tmp_path, sym, method):
    folder, t = write_v2_format_only(tmp_path, sym)
    expected = gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, v1=False)
    as_v1 = gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, v1=True)
    assert not torch.equal(expected, as_v1)  # reading it as v1 would be silently wrong
    head = load_lm_head(folder, dtype=torch.float32, requested=method)
    assert gptq_config(head.resolution.config).checkpoint_format == "gptq_v2"
    assert torch.equal(weight_t(head), expected.float().T)
    x = torch.randn(5, HIDDEN)
    reference = x.double() @ expected.double().T
    assert (
        (head.compute_logits(x).double() - reference).abs().max() / reference.abs().max()
    ) < 1e-5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": "gptq_v2", "checkpoint_format": "gptq"},
         r"the layout fields disagree: format = 'gptq_v2', checkpoint_format = 'gptq'"),
        ({"format": "gptq", "checkpoint_format": "gptq_v2"},
         r"the layout fields disagree: format = 'gptq', checkpoint_format = 'gptq_v2'"),
        ({"format": "gptq", "checkpoint_format": "gemm"},
         r"field 'checkpoint_format' = 'gemm': 'gemm' is an AWQ layout"),
    ],
    ids=["v2-format-v1-checkpoint_format", "v1-format-v2-checkpoint_format", "gptq-format-awq-checkpoint_format"],
)  # fmt: skip
def test_gptq_layout_fields_that_disagree_are_refused(gptq_v2_format_only, fields, message):
    folder, _ = gptq_v2_format_only
    edit_qcfg(folder, lambda qcfg: qcfg.update(fields))
    with pytest.raises(ConfigError, match=message) as info:
        load_lm_head(folder, dtype=torch.float32)
    assert str(folder / "config.json") in str(info.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": "gemv_fast"}, r"field 'format' = 'gemv_fast': only the 'gemm' layout is supported"),
        ({"format": "gemv", "version": "gemm"}, r"the layout fields disagree: format = 'gemv', version = 'gemm'"),
        ({"format": "gemm", "checkpoint_format": "gemv"}, r"format = 'gemm', checkpoint_format = 'gemv'"),
    ],
    ids=["gemv_fast-format-no-version", "gemv-format-gemm-version", "gemm-format-gemv-checkpoint_format"],
)  # fmt: skip
def test_awq_format_decides_when_version_is_absent(tmp_path, fields, message):
    write_checkpoint(tmp_path, random_weight(), "awq", group_size=64)
    edit_qcfg(tmp_path, lambda qcfg: (qcfg.pop("version"), qcfg.update(fields)))
    with pytest.raises(ConfigError, match=message):
        load_lm_head(tmp_path, dtype=torch.float32)


def test_awq_gemm_named_only_by_format_loads_as_before(tmp_path):
    write_checkpoint(tmp_path, random_weight(), "awq", group_size=64)
    before = weight_t(load_lm_head(tmp_path, dtype=torch.float32))
    edit_qcfg(tmp_path, lambda qcfg: (qcfg.pop("version"), qcfg.update(format="gemm")))
    assert torch.equal(weight_t(load_lm_head(tmp_path, dtype=torch.float32)), before)


# -- 2. FP8 weights under naive-quantized ------------------------------------------------------


def fp8_weights(strategy: str) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}  # fmt: skip


FP8_TOKEN_ACTS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}  # fmt: skip
# Schemes the library (0.20.0) writes as naive-quantized: FP8 weights without input activations
# (W8A16-FP8) are its fallback format; W8A8-FP8 with the format asked for explicitly.
NAIVE_FP8_SCHEMES = {
    "w8a16-fp8-channel-bf16": ({"targets": ["lm_head"], "weights": fp8_weights("channel")}, torch.bfloat16),
    "w8a16-fp8-tensor-fp16": ({"targets": ["lm_head"], "weights": fp8_weights("tensor")}, torch.float16),
    "w8a8-fp8-channel-bf16": ({"targets": ["lm_head"], "format": "naive-quantized", "weights": fp8_weights("channel"), "input_activations": FP8_TOKEN_ACTS}, torch.bfloat16),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NAIVE_FP8_SCHEMES))
def test_naive_quantized_fp8_is_bit_exact_against_the_library(tmp_path, name):
    scheme, dtype = NAIVE_FP8_SCHEMES[name]
    reference = compress_head(tmp_path, random_weight(1000, HIDDEN, dtype), scheme)
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "naive-quantized"
    assert load_file(tmp_path / "model.safetensors")["lm_head.weight"].dtype == torch.float8_e4m3fn
    head = load_lm_head(tmp_path, dtype=torch.float32)
    assert head.resolution.method == "compressed-tensors" and head.quantized
    got = weight_t(head)
    assert torch.equal(got.T.to(reference.dtype), reference)
    assert torch.equal(got, reference.float().T)


def test_naive_quantized_fp8_other_widths_are_refused(tmp_path):
    compress_head(tmp_path, random_weight(1000, HIDDEN), NAIVE_FP8_SCHEMES["w8a16-fp8-tensor-fp16"][0])  # fmt: skip
    edit_qcfg(tmp_path, lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4))
    with pytest.raises(
        ConfigError, match=r"naive-quantized weights must be 8-bit float; got float4"
    ):
        load_lm_head(tmp_path, dtype=torch.float32)


# -- 3. sparsity_config --------------------------------------------------------------------------


@pytest.fixture
def ct_head(tmp_path) -> tuple[Path, torch.Tensor]:
    write_checkpoint(tmp_path, random_weight(1000, HIDDEN), "compressed-tensors",
                     format="pack-quantized", bits=4, group_size=32)  # fmt: skip
    return tmp_path, weight_t(load_lm_head(tmp_path, dtype=torch.float32))


SPARSE_24 = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "global_sparsity": 0.5}


@pytest.mark.parametrize(
    ("sparsity", "message"),
    [
        ({**SPARSE_24, "targets": ["Linear"], "ignore": []},
         r"sparsity_config format 'sparse-24-bitmask' compresses layer 'lm_head' \(targets 'Linear', sparsity_structure '2:4'\)"),
        ({"format": "sparse-bitmask", "global_sparsity": 19.1},
         r"sparsity_config format 'sparse-bitmask' compresses layer 'lm_head' \(targets null \(every layer\)\)"),
        ({**SPARSE_24, "targets": ["re:.*lm_head"], "ignore": ["re:.*mlp.*"]},
         r"sparsity_config format 'sparse-24-bitmask' compresses layer 'lm_head' \(targets 're:\.\*lm_head'"),
    ],
    ids=["sparse-24-linear", "sparse-bitmask-every-layer", "sparse-24-regex"],
)  # fmt: skip
def test_a_layer_the_sparsity_config_compresses_is_refused(ct_head, sparsity, message):
    folder, _ = ct_head
    edit_qcfg(folder, lambda qcfg: qcfg.update(sparsity_config=sparsity))
    with pytest.raises(ConfigError, match=message) as info:
        load_lm_head(folder, dtype=torch.float32)
    assert info.value.field == "sparsity_config" and str(folder / "config.json") in str(info.value)


@pytest.mark.parametrize(
    "sparsity",
    [
        {},
        None,
        {"format": "dense", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": []},
        {**SPARSE_24, "targets": ["Linear"], "ignore": ["lm_head"]},
        {**SPARSE_24, "targets": ["re:.*mlp.*"]},
    ],
    ids=["empty", "null", "dense", "head-ignored", "head-not-targeted"],
)
def test_dense_and_ignored_layers_resolve_as_before(ct_head, sparsity):
    folder, before = ct_head
    edit_qcfg(folder, lambda qcfg: qcfg.update(sparsity_config=sparsity))
    assert torch.equal(weight_t(load_lm_head(folder, dtype=torch.float32)), before)


def test_an_unquantized_head_the_sparsity_config_compresses_is_refused(tmp_path):
    qcfg = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
            "sparsity_config": {**SPARSE_24, "targets": ["Linear"]}}  # fmt: skip
    write_raw(tmp_path, config=llama_config(qcfg), tensors=float_head())
    with pytest.raises(ConfigError, match=r"sparsity_config format 'sparse-24-bitmask'"):
        resolve(tmp_path, platform="cpu")


@pytest.mark.parametrize(
    ("sparsity", "message"),
    [
        ({"targets": ["Linear"]}, r"field 'sparsity_config.format' is required"),
        ({"format": "sparse-48"}, r"field 'sparsity_config.format' = 'sparse-48': unknown compressed-tensors format"),
        ({"format": "dense", "targets": "Linear"}, r"field 'sparsity_config.targets' = 'Linear'"),
        ({"format": "dense", "ignore": ["re:("]}, r"'re:\(' is not a valid regular expression"),
    ],
    ids=["no-format", "unknown-format", "targets-not-list", "bad-regex"],
)  # fmt: skip
def test_bad_sparsity_configs_name_the_field(ct_head, sparsity, message):
    folder, _ = ct_head
    edit_qcfg(folder, lambda qcfg: qcfg.update(sparsity_config=sparsity))
    with pytest.raises(ConfigError, match=message):
        load_lm_head(folder, dtype=torch.float32)


# -- real-world configs -------------------------------------------------------------------------

# The head tensors each case is written with ("awq" layout for GPTQModel's AWQ exports).
HEADS = {
    "gptq": lambda: gptq_head(n=VOCAB, k=64, group=32), "awq": lambda: awq_head(n=VOCAB, k=64, group=32),
    "ct-int4": lambda: ct_packed_head(n=VOCAB, k=64, bits=4) | {"lm_head.weight_scale": torch.zeros(VOCAB, 2, dtype=torch.float16)},
    "float": lambda: float_head(n=VOCAB, k=64),
}  # fmt: skip
# GPTQModel 7.6.0's quantize_config.json (tests/fixtures/producers, meta trimmed, no dynamic),
# without its layout fields: each case sets them to values of GPTQModel's FORMAT enum
# (gptqmodel/quantization/config.py: gptq, gptq_v2, gptq_p, marlin, bitblas, qqq, gguf, fp8,
# exl3, ..., gemm, gemv, gemv_fast, llm-awq). GPTQModel reads checkpoint_format as a synonym
# of format, and other writers of its configs give only format.
GPTQMODEL_7_6 = {"bits": 4, "group_size": 32, "desc_act": False, "sym": True, "lm_head": True, "method": "gptq", "quant_method": "gptq", "pack_dtype": "int32", "meta": {"quantizer": ["gptqmodel:7.6.0"], "uri": "https://github.com/modelcloud/gptqmodel"}}  # fmt: skip
# An optimum 2.1.0 + GPTQModel 6.0.3 export of a Llama 3 model (config.json, both fields).
OPTIMUM_2_1_V2 = {"act_group_aware": True, "backend": "auto", "batch_size": 1, "bits": 4, "block_name_to_quantize": None, "cache_block_outputs": True, "checkpoint_format": "gptq_v2", "damp_percent": 0.1, "desc_act": False, "format": "gptq_v2", "group_size": 128, "max_input_length": None, "meta": {"quantizer": ["optimum:2.1.0", "gptqmodel:6.0.3"]}, "model_seqlen": None, "module_name_preceding_first_block": None, "modules_in_block_to_quantize": None, "pad_token_id": None, "quant_method": "gptq", "sym": True, "tokenizer": None, "true_sequential": True}  # fmt: skip
# nm-testing/Meta-Llama-3.1-8B-Instruct-FP8-hf, as transformers' compressed-tensors guide quotes it.
NM_FP8_NAIVE = {"config_groups": {"group_0": {"input_activations": {"num_bits": 8, "strategy": "tensor", "type": "float"}, "targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "tensor", "type": "float"}}}, "format": "naive-quantized", "ignore": ["lm_head"], "quant_method": "compressed-tensors", "quantization_status": "frozen"}  # fmt: skip
# vLLM's serialized per-tensor fp8 (quant_method fp8, no weight_block_size). What AutoFP8's
# quantize.py writes (save_quantized_model, verbatim): the script the first model card of
# neuralmagic/Meta-Llama-3-8B-Instruct-FP8 (now RedHatAI/) cites (AutoFP8 commit b0c1f78);
# it quantizes model.model's Linears only, so the head stays bf16.
AUTOFP8_SCRIPT = {"quant_method": "fp8", "activation_scheme": "static"}
# What the auto_fp8 package writes (save_quantized_model) for ignore_patterns ["re:.*lm_head"],
# the pattern the later card of that model names: the matched module names as ignored_layers.
AUTOFP8_LIB = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
# compressed-tensors' own tests (tests/test_compressors/model_compressors): its sparsity and
# quantization configs, combined as ModelCompressor writes them.
CT_LIB_QUANT = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel", "symmetric": True, "type": "int"}}}, "format": "pack-quantized", "global_compression_ratio": 1.891791164021256, "ignore": ["lm_head"], "quant_method": "compressed-tensors", "quantization_status": "frozen"}  # fmt: skip
CT_LIB_SPARSE = {"format": "sparse-bitmask", "global_sparsity": 19.098103233975568, "registry_requires_subclass": False, "sparsity_structure": "unstructured"}  # fmt: skip
# llm-compressor's 2:4 + W4A16 example (examples/quantization_2of4_sparse_w4a16): marlin-24
# quantization of the body, sparse-24-bitmask, lm_head and attention left dense.
LLMC_2OF4_W4A16 = {"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}, "input_activations": None}}, "ignore": ["lm_head", "re:.*self_attn.*", "re:.*embed.*"], "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["lm_head", "re:.*self_attn.*"]}}  # fmt: skip
# SGLang's compressed-tensors 2:4 test: sparse-24-bitmask over every Linear, nothing ignored.
SGLANG_24_W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": [], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}}}, "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": []}}  # fmt: skip


REAL = [
    pytest.param(with_(GPTQMODEL_7_6, format="gptq_v2"), "gptq", ("gptq", 0),
                 id="gptqmodel-7.6-gptq_v2-format-only"),
    pytest.param(with_(GPTQMODEL_7_6, format="gptq", checkpoint_format="gptq"), "gptq", ("gptq", 1),
                 id="gptqmodel-7.6-gptq-both-fields"),
    pytest.param(with_(OPTIMUM_2_1_V2, group_size=32), "gptq", ("gptq", 0),
                 id="optimum-2.1.0+gptqmodel-6.0.3-gptq_v2-both-fields"),
    pytest.param(with_(GPTQMODEL_7_6, format="gptq_v2", checkpoint_format="gptq"), "gptq",
                 r"format = 'gptq_v2', checkpoint_format = 'gptq'", id="gptqmodel-7.6-gptq_v2-vs-gptq"),
    pytest.param(with_(GPTQMODEL_7_6, format="marlin"), "gptq",
                 r"field 'format' = 'marlin': the 'marlin' GPTQ layout is not supported", id="gptqmodel-7.6-marlin"),
    pytest.param(with_(GPTQMODEL_7_6, format="bitblas"), "gptq",
                 r"the 'bitblas' GPTQ layout is not supported", id="gptqmodel-7.6-bitblas"),
    pytest.param(with_(GPTQMODEL_7_6, format="gptq_p"), "gptq",
                 r"the 'gptq_p' GPTQ layout is not supported", id="gptqmodel-7.6-gptq_p"),
    pytest.param(with_(GPTQMODEL_7_6, format="gguf"), "gptq",
                 r"'gguf' is a GPTQModel format whose tensors are not GPTQ's", id="gptqmodel-7.6-gguf"),
    pytest.param(with_(GPTQMODEL_7_6, format="gemm", checkpoint_format="gemm", sym=False), "awq",
                 ("awq", None), id="gptqmodel-7.6-awq-export-gemm-relabelled"),
    pytest.param(with_(GPTQMODEL_7_6, format="gemv_fast", checkpoint_format="gemv_fast"), "awq",
                 r"field 'format' = 'gemv_fast': only the 'gemm' layout is supported",
                 id="gptqmodel-7.6-awq-export-gemv_fast"),
    pytest.param(with_(GPTQMODEL_7_6, quant_method="awq", method="awq", format="gemv", zero_point=True), "awq",
                 r"field 'format' = 'gemv': only the 'gemm' layout", id="gptqmodel-7.6-awq-gemv-no-version"),
    pytest.param(with_(GPTQMODEL_7_6, quant_method="awq", method="awq", format="gemm", checkpoint_format="gemm",
                       version="gemm", zero_point=True), "awq", ("awq", None), id="gptqmodel-7.6-awq-gemm-all-fields"),
    pytest.param(NM_FP8_NAIVE, "float", (None, None), id="nm-testing-llama3.1-fp8-naive-quantized-head-ignored"),
    pytest.param(with_(NM_FP8_NAIVE, ignore=[]), "fp8", ("compressed-tensors", None),
                 id="nm-testing-llama3.1-fp8-naive-quantized-head-targeted"),
    pytest.param(AUTOFP8_SCRIPT, "float", (None, None), id="neuralmagic-llama3-8b-fp8-autofp8-script-bf16-head"),
    pytest.param(AUTOFP8_SCRIPT, "fp8", ("fp8", None), id="autofp8-script-static-fp8-head"),
    pytest.param(AUTOFP8_LIB, "float", (None, None), id="autofp8-lib-ignored-lm_head"),
    pytest.param(AUTOFP8_LIB, "fp8", ("fp8", None), id="autofp8-lib-ignored-but-fp8-tensors"),
    pytest.param(with_(CT_LIB_QUANT, sparsity_config=CT_LIB_SPARSE), "float",
                 r"sparsity_config format 'sparse-bitmask' compresses layer 'lm_head'",
                 id="compressed-tensors-lib-tests-sparse-bitmask-every-layer"),
    pytest.param(with_(CT_LIB_QUANT, sparsity_config={**CT_LIB_SPARSE, "format": "dense"}), "float", (None, None),
                 id="compressed-tensors-lib-tests-dense"),
    pytest.param(LLMC_2OF4_W4A16, "float", (None, None), id="llm-compressor-2of4-w4a16-head-ignored"),
    pytest.param(SGLANG_24_W4A16, "ct-int4", r"sparsity_config format 'sparse-24-bitmask' compresses layer 'lm_head'",
                 id="sglang-test-sparse-24-bitmask-linear"),
]  # fmt: skip


def fp8_head() -> dict[str, torch.Tensor]:
    return {"lm_head.weight": torch.zeros(VOCAB, 64, dtype=torch.float8_e4m3fn),
            "lm_head.weight_scale": torch.ones(1, dtype=torch.bfloat16),
            "lm_head.input_scale": torch.ones(1, dtype=torch.bfloat16)}  # fmt: skip


@pytest.mark.parametrize(("qcfg", "head", "expected"), REAL)
def test_real_configs(tmp_path, qcfg, head, expected):
    tensors = fp8_head() if head == "fp8" else HEADS[head]()
    write_raw(tmp_path, config=llama_config(qcfg, vocab_size=VOCAB), tensors=tensors)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            resolve(tmp_path, platform="cpu")
        return
    fmt, zero_point_offset = expected
    res = resolve(tmp_path, platform="cpu")
    assert res.quantized == (fmt is not None)
    if fmt is not None:
        assert res.format == fmt
    if zero_point_offset is not None:
        assert gptq_config(res.config).zero_point_offset == zero_point_offset


@pytest.mark.parametrize(
    ("qcfg", "head", "method", "rule"),
    [
        (AUTOFP8_SCRIPT, "float", None, "quant_method 'fp8': no lm_head key"),
        (AUTOFP8_SCRIPT, "fp8", "fp8", "tensors: lm_head.weight with weight_scale are fp8"),
        (AUTOFP8_LIB, "float", None, "ignored_layers 'lm_head'"),
        (AUTOFP8_LIB, "fp8", "fp8", "tensors: lm_head.weight with weight_scale are fp8; also: ignored_layers 'lm_head'"),
        (with_(NM_FP8_NAIVE, ignore=[]), "fp8", "compressed-tensors", "targets 'Linear' (group_0)"),
    ],
    ids=["autofp8-script-bf16-head", "autofp8-script-fp8-head", "autofp8-lib-bf16-head", "autofp8-lib-fp8-head", "nm-testing-static-fp8-head-targeted"],
)  # fmt: skip
def test_real_per_tensor_fp8_configs_resolve_with_their_rule(tmp_path, qcfg, head, method, rule):
    tensors = fp8_head() if head == "fp8" else HEADS[head]()
    write_raw(tmp_path, config=llama_config(qcfg, vocab_size=VOCAB), tensors=tensors)
    res = resolve(tmp_path, platform="cpu")
    assert (res.method, res.quantized) == (method, method is not None)
    assert res.rule.startswith(rule), res.rule
    if method is not None:  # static activations: weight-only, the input_scale never applied
        assert any("not applied" in note for note in res.notes), res.notes


# -- ModelOpt (methods/modelopt.py): hf_quant_config.json and config.json forms ----------------

# nvidia/Qwen3-32B-NVFP4 hf_quant_config.json (modelopt 0.33.0), as ai-dynamo/aiconfigurator
# stores it (src/aiconfigurator/model_configs/nvidia--Qwen3-32B-NVFP4_hf_quant_config.json).
QWEN3_32B_NVFP4 = {"producer": {"name": "modelopt", "version": "0.33.0"}, "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16, "exclude_modules": ["lm_head"]}}  # fmt: skip
# nvidia/Qwen3-30B-A3B-NVFP4 (modelopt 0.33.0, same source): the 48 router gates and lm_head;
# 3 of the gates kept here.
QWEN3_30B_A3B_NVFP4 = {"producer": {"name": "modelopt", "version": "0.33.0"}, "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16, "exclude_modules": ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "model.layers.10.mlp.gate", "lm_head"]}}  # fmt: skip
# nvidia/DeepSeek-V3-0324-NVFP4 (modelopt 0.27.0, same source): 250 entries, ModelOpt's
# "prefix*" summaries among them; these 8 kept in their order.
DEEPSEEK_V3_NVFP4 = {"producer": {"name": "modelopt", "version": "0.27.0"}, "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["model.layers.11.mlp.gate", "model.layers.11.input_layernorm", "model.layers.21.self_attn*", "model.layers.44.self_attn*", "lm_head", "model.layers.61*", "model.embed_tokens", "model.norm"]}}  # fmt: skip
# ModelOpt's own FP8 example (modelopt/torch/export/convert_hf_config.py docstring, 0.19.0) and
# its conversion into config.json's quantization_config (the same function's output).
MODELOPT_FP8_EXAMPLE = {"producer": {"name": "modelopt", "version": "0.19.0"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}  # fmt: skip
MODELOPT_FP8_CONVERTED = {"config_groups": {"group_0": {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"}, "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}}, "ignore": ["lm_head"], "quant_algo": "FP8", "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}, "producer": {"name": "modelopt", "version": "0.19.0"}, "quant_method": "modelopt"}  # fmt: skip

MODELOPT_REAL = [
    pytest.param(QWEN3_32B_NVFP4, "lm_head", "exclude_modules 'lm_head'", id="nvidia-qwen3-32b-nvfp4-head"),
    pytest.param(QWEN3_32B_NVFP4, "model.layers.0.mlp.down_proj", "quant_algo 'NVFP4'", id="nvidia-qwen3-32b-nvfp4-body"),
    pytest.param(QWEN3_30B_A3B_NVFP4, "lm_head", "exclude_modules 'lm_head'", id="nvidia-qwen3-30b-a3b-nvfp4-head"),
    pytest.param(QWEN3_30B_A3B_NVFP4, "model.layers.1.mlp.gate", "exclude_modules 'model.layers.1.mlp.gate'", id="nvidia-qwen3-30b-a3b-nvfp4-router"),
    pytest.param(QWEN3_30B_A3B_NVFP4, "model.layers.1.mlp.experts.0.gate_proj", "quant_algo 'NVFP4'", id="nvidia-qwen3-30b-a3b-nvfp4-expert"),
    pytest.param(DEEPSEEK_V3_NVFP4, "lm_head", "exclude_modules 'lm_head'", id="nvidia-deepseek-v3-0324-nvfp4-head"),
    pytest.param(DEEPSEEK_V3_NVFP4, "model.layers.21.self_attn.kv_a_proj_with_mqa", "exclude_modules 'model.layers.21.self_attn*'", id="nvidia-deepseek-v3-0324-nvfp4-attention-summary"),
    pytest.param(DEEPSEEK_V3_NVFP4, "model.layers.61.eh_proj", "exclude_modules 'model.layers.61*'", id="nvidia-deepseek-v3-0324-nvfp4-mtp-layer"),
    pytest.param(DEEPSEEK_V3_NVFP4, "model.layers.22.self_attn.o_proj", "quant_algo 'NVFP4'", id="nvidia-deepseek-v3-0324-nvfp4-other-attention"),
    pytest.param(MODELOPT_FP8_EXAMPLE, "lm_head", "exclude_modules 'lm_head'", id="modelopt-0.19-fp8-example-head"),
    pytest.param(MODELOPT_FP8_EXAMPLE, "model.layers.0.self_attn.q_proj", "quant_algo 'FP8'", id="modelopt-0.19-fp8-example-body"),
    pytest.param(MODELOPT_FP8_CONVERTED, "lm_head", "ignore 'lm_head'", id="modelopt-0.19-fp8-config.json-head"),
    pytest.param(MODELOPT_FP8_CONVERTED, "model.layers.0.self_attn.q_proj", "quant_algo 'FP8'", id="modelopt-0.19-fp8-config.json-body"),
]  # fmt: skip


@pytest.mark.parametrize("platform", ["cpu", "cuda:9.0"])
@pytest.mark.parametrize(("source", "prefix", "rule"), MODELOPT_REAL)
def test_real_modelopt_configs(tmp_path, source, prefix, rule, platform):
    """A side file beside a config.json without quantization_config, or config.json's own."""
    if "quant_method" in source:
        write_raw(tmp_path, config=llama_config(source, vocab_size=VOCAB), tensors=HEADS["float"]())
    else:
        (tmp_path / "hf_quant_config.json").write_text(json.dumps(source))
        write_raw(tmp_path, config=llama_config(vocab_size=VOCAB), tensors=HEADS["float"]())
    res = resolve(tmp_path, prefix=prefix, platform=platform)
    assert res.rule.startswith(rule), res.rule
    assert (res.method, res.quantized) == (("modelopt", True) if rule.startswith("quant_algo") else (None, False))  # fmt: skip
    if prefix == "lm_head":
        assert load_lm_head(tmp_path, dtype=torch.float32).resolution.method is None


# -- AutoRound (issue 18) ------------------------------------------------------------------------

# quantization_config.json of an auto-round 0.12.3 W4A16 RTN export of Qwen/Qwen3-8B (AutoRound's
# default scheme and packing, as a public quantization run log prints it).
AUTOROUND_0_12_QWEN3_8B = {"bits": 4, "data_type": "int", "group_size": 128, "sym": True, "iters": 0, "autoround_version": "0.12.3", "quant_method": "auto-round", "packing_format": "auto_round:auto_gptq"}  # fmt: skip
# config.json quantization_config of an auto-round 0.12.3 RTN export of unsloth/gemma-4-E4B-it
# (a multimodal model: only the language model's blocks are quantized).
AUTOROUND_0_12_GEMMA4 = {"autoround_version": "0.12.3", "bits": 4, "block_name_to_quantize": "model.language_model.layers", "data_type": "int", "group_size": 128, "iters": 0, "low_gpu_mem_usage": True, "packing_format": "auto_round:auto_gptq", "quant_method": "auto-round", "seqlen": 256, "sym": True}  # fmt: skip
# auto-round 0.14.2's model-free RTN export of a Qwen3.6-27B fine-tune (W4A16), extra_config cut
# after its first four of many entries (every norm is listed at 16 bits; the head is float).
AUTOROUND_0_14_MODEL_FREE = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 4, "group_size": 128, "sym": True, "data_type": "int", "iters": 0, "model_free": True, "autoround_version": "0.14.2", "extra_config": {"lm_head": {"bits": 16, "data_type": "float"}, "model.language_model.layers.0.input_layernorm": {"bits": 16, "data_type": "float"}, "model.language_model.layers.0.linear_attn.norm": {"bits": 16, "data_type": "float"}, "model.language_model.layers.0.post_attention_layernorm": {"bits": 16, "data_type": "float"}}}  # fmt: skip
# vllm-omni's INC regression check (a Qwen-Omni thinker): a regex extra_config entry keeps the MoE
# routers float. Its dict has no quant_method (it is given to INCConfig); "auto-round" added.
VLLM_OMNI_THINKER = {"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True, "packing_format": "auto_round:auto_gptq", "block_name_to_quantize": "thinker.model.layers", "extra_config": {r".*thinker\.model\.layers\.\d+\.mlp\.gate.*": {"bits": 16}}}  # fmt: skip
# auto-round 0.5.1's auto_gptq export (format "auto_gptq": quant_method "gptq") of Qwen3-14B,
# following Intel/Qwen3-14B-int4-AutoRound-gptq-inc, as its README quotes it.
AUTOROUND_0_5_GPTQ_QWEN3_14B = {"act_bits": 16, "act_data_type": "int", "act_dynamic": True, "act_group_size": 128, "act_sym": True, "amp": True, "autoround_version": "0.5.1", "batch_size": 8, "bits": 4, "damp_percent": 0.01, "data_type": "int", "desc_act": False, "enable_minmax_tuning": True, "enable_norm_bias_tuning": False, "enable_quanted_input": True, "gradient_accumulate_steps": 1, "group_size": 128, "iters": 1000, "low_gpu_mem_usage": True, "lr": 0.001, "minmax_lr": 0.001, "nsamples": 512, "quant_method": "gptq", "scale_dtype": "torch.float16", "seqlen": 2048, "super_bits": None, "super_group_size": None, "sym": True, "to_quant_block_names": None, "true_sequential": False}  # fmt: skip

AR_GPTQ = {"cpu": "cpu_wna16", "cuda:9.0": "gptq_marlin"}
AR_NO_HEAD = "extra_config: no entry names 'lm_head' (AutoRound quantizes a head only through one; packing_format 'auto_round:auto_gptq')"  # fmt: skip
# id -> (config, body layer, head: (methods by platform or None, rule), body: (methods or None, rule))
AUTOROUND_REAL = {
    "auto-round-0.12.3-qwen3-8b-default": (AUTOROUND_0_12_QWEN3_8B, "model.layers.0.mlp.down_proj", (None, AR_NO_HEAD), (AR_GPTQ, "packing_format 'auto_round:auto_gptq': bits=4, group_size=128, sym=true")),
    "auto-round-0.12.3-gemma-4-language-blocks": (AUTOROUND_0_12_GEMMA4, "model.language_model.layers.3.self_attn.q_proj", (None, AR_NO_HEAD), (AR_GPTQ, "packing_format 'auto_round:auto_gptq'")),
    "auto-round-0.12.3-gemma-4-vision-tower-float": (AUTOROUND_0_12_GEMMA4, "model.vision_tower.encoder.layers.0.mlp.fc1", (None, AR_NO_HEAD), (None, "block_name_to_quantize: no block covers 'model.vision_tower.encoder.layers.0.mlp.fc1'")),
    "auto-round-0.14.2-model-free-head-16-bit": (AUTOROUND_0_14_MODEL_FREE, "model.language_model.layers.0.mlp.down_proj", (None, "extra_config 'lm_head': bits=16 (packing_format 'auto_round:auto_gptq')"), (AR_GPTQ, "packing_format 'auto_round:auto_gptq'")),
    "vllm-omni-thinker-router-regex": (VLLM_OMNI_THINKER, "thinker.model.layers.5.mlp.gate", (None, AR_NO_HEAD), (None, r"extra_config '.*thinker\.model\.layers\.\d+\.mlp\.gate.*': bits=16")),
    "vllm-omni-thinker-experts": (VLLM_OMNI_THINKER, "thinker.model.layers.5.mlp.experts.7.down_proj", (None, AR_NO_HEAD), (AR_GPTQ, "packing_format 'auto_round:auto_gptq'")),
    "auto-round-0.5.1-auto_gptq-export-is-gptq": (AUTOROUND_0_5_GPTQ_QWEN3_14B, "model.layers.0.mlp.down_proj", (None, "lm_head: false (absent)"), (AR_GPTQ, "quant_method 'gptq': every linear layer")),
}  # fmt: skip


@pytest.mark.parametrize("platform", ["cpu", "cuda:9.0"])
@pytest.mark.parametrize(("qcfg", "body", "head_expect", "body_expect"), AUTOROUND_REAL.values(), ids=AUTOROUND_REAL)  # fmt: skip
def test_real_autoround_configs(qcfg, body, head_expect, body_expect, platform):
    for prefix, (methods, rule) in (("lm_head", head_expect), (body, body_expect)):
        res = resolve(qcfg, prefix=prefix, platform=platform)
        assert res.rule.startswith(rule), (prefix, res.rule)
        expected = None if methods is None else methods[platform]
        assert (res.method, res.quantized) == (expected, expected is not None), prefix
        if qcfg["quant_method"] == "auto-round":
            assert any("quant_method 'auto-round' with packing_format" in n for n in res.notes)

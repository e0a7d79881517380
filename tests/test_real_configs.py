"""Real-world quantization configs: a layer the config keeps float resolves float (with a note
naming what quantreg could not run), a quantized layer under a method quantreg does not
implement is "known but not supported", and quantreg's own methods resolve as before.

The configs are copied from public model repositories and producer code (the producer and
its version are in each id); each is resolved for the head and for a body layer, on ``cpu``
and ``cuda:9.0``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt import ct_packed_head, float_head, llama_config, write_checkpoint

import quantreg
from quantreg import CheckpointError, ConfigError, resolve

PLATFORMS = ("cpu", "cuda:9.0")
NOT_SUPPORTED = r"quantization method '{}' is known but not supported by quantreg \(supported: auto-round, awq, .*; a plugin can register it\)"  # fmt: skip
GPTQ_LAYOUT = {"cpu": "cpu_wna16", "cuda:9.0": "gptq_marlin"}
AWQ_LAYOUT = {"cpu": "cpu_wna16", "cuda:9.0": "awq_marlin"}

# openai/gpt-oss-20b (and -120b) config.json, transformers >= 4.55.
GPT_OSS = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
    ],
    "quant_method": "mxfp4",
}  # fmt: skip
# deepseek-ai/DeepSeek-V3 config.json (block-wise FP8, no exclusion key; the head is bf16).
DEEPSEEK_FP8 = {
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
    "weight_block_size": [128, 128],
}  # fmt: skip
# transformers FineGrainedFP8Config.to_dict() (as TensorRT-LLM's auto_deploy documents it).
FINEGRAINED_FP8 = {
    "quant_method": "fp8", "weight_block_size": [128, 128],
    "modules_to_not_convert": ["gate", "lm_head"],
}  # fmt: skip
# vLLM Fp8Config's own key (llm-compressor / vLLM fp8 exports).
VLLM_FP8 = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
# ModelOpt hf_quant_config.json (the legacy side file vLLM reads), FP8 and NVFP4.
MODELOPT_FP8 = {
    "producer": {"name": "modelopt", "version": "0.29.0"},
    "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]},
}  # fmt: skip
MODELOPT_NVFP4 = {
    "producer": {"name": "modelopt"},
    "quantization": {
        "quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head"],
    },
}  # fmt: skip
# ModelOpt >= 0.31 config.json form (quant_method "modelopt", wildcard "ignore").
MODELOPT_CONFIG_NVFP4 = {
    "quant_algo": "NVFP4", "quant_method": "modelopt",
    "weights": {"num_bits": 4, "type": "float", "group_size": 16},
    "input_activations": {"num_bits": 4, "type": "float", "group_size": 16},
    "ignore": ["lm_head", "model.layers.*.block_sparse_moe.gate", "model.layers.*.self_attn*"],
}  # fmt: skip
# ModelOpt MIXED_PRECISION (nvidia/Qwen3.6-27B-NVFP4 style): only quantized_layers are quantized.
MODELOPT_MIXED = {
    "quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8",
    "quantized_layers": {
        "model.layers.0.mlp.down_proj": {"quant_algo": "W4A16_NVFP4"},
        "model.layers.0.self_attn.qkv_proj": {"quant_algo": "FP8"},
    },
}  # fmt: skip
# transformers BitsAndBytesConfig.to_dict() (unsloth *-bnb-4bit uploads list their skips).
BNB_NF4 = {
    "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True, "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": ["lm_head", "multi_modal_projector"],
    "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}  # fmt: skip
BNB_INT8_NO_SKIP = {**BNB_NF4, "llm_int8_skip_modules": None, "_load_in_4bit": False,
                    "load_in_4bit": False, "_load_in_8bit": True, "load_in_8bit": True}  # fmt: skip
# AMD Quark QuantizationConfig.to_dict() (quark 0.9).
QUARK = {
    "quant_method": "quark",
    "global_quant_config": {
        "weight": {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False},
        "input_tensors": {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False},
        "output_tensors": None, "bias": None,
    },
    "exclude": ["lm_head"], "algo_config": None, "softmax_quant_spec": None,
    "layer_type_quant_config": {}, "layer_quant_config": {}, "kv_cache_quant_config": {},
    "export": {"kv_cache_group": [], "pack_method": "reorder", "weight_format": "real_quantized"},
}  # fmt: skip
# Intel auto-round 0.5 export (auto_gptq packing; the head is float unless extra_config names it).
AUTO_ROUND = {
    "bits": 4, "group_size": 128, "sym": True, "data_type": "int", "iters": 200,
    "quant_method": "auto-round", "packing_format": "auto_round:auto_gptq",
    "block_name_to_quantize": "model.layers",
    "extra_config": {"model.layers.0.mlp.down_proj": {"bits": 16, "data_type": "float"}},
}  # fmt: skip
# transformers TorchAoConfig.to_dict() (torchao 0.12, Int4WeightOnlyConfig).
TORCHAO = {
    "quant_method": "torchao",
    "quant_type": {"default": {"_type": "Int4WeightOnlyConfig", "_version": 2,
                               "_data": {"group_size": 128}}},
    "quant_type_kwargs": {}, "modules_to_not_convert": None,
    "include_input_output_embeddings": False, "untie_embedding_weights": False,
}  # fmt: skip
# transformers HqqConfig.to_dict() (hqq 0.2; skip_modules defaults to ["lm_head"]).
HQQ = {
    "quant_method": "hqq", "skip_modules": ["lm_head"],
    "quant_config": {"quant_config": {"weight_quant_params": {"nbits": 4, "group_size": 64}}},
}  # fmt: skip
# ISTA-DASLab AQLM 2-bit uploads (aqlm 1.x).
AQLM = {
    "quant_method": "aqlm", "in_group_size": 8, "nbits_per_codebook": 16, "num_codebooks": 1,
    "out_group_size": 1, "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight"],
}  # fmt: skip
# meta-llama/Llama-3.1-405B-Instruct-FP8 (fbgemm 0.8).
FBGEMM_FP8 = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
              "modules_to_not_convert": ["model.layers.0.mlp.down_proj", "lm_head"]}  # fmt: skip
# TheBloke *-GPTQ uploads: AutoGPTQ 0.4 quantize_config.json, 3-bit (the head is never packed).
AUTOGPTQ_3BIT = {
    "bits": 3, "group_size": 128, "damp_percent": 0.1, "desc_act": True, "sym": True,
    "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
    "quant_method": "gptq",
}  # fmt: skip
# AutoGPTQ 0.7 save_quantized(use_marlin=True) quantize_config.json.
AUTOGPTQ_MARLIN = {
    "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
    "sym": True, "true_sequential": True, "model_name_or_path": None,
    "model_file_base_name": "model", "is_marlin_format": True, "quant_method": "gptq",
}  # fmt: skip
# AutoAWQ 0.2 GEMV export (config.json) and its legacy quant_config.json.
AUTOAWQ_GEMV = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4,
                "version": "gemv", "modules_to_not_convert": None}  # fmt: skip
AUTOAWQ_GEMV_LEGACY = {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMV"}
# GPTQModel 7.6 AWQ export (tests/fixtures/producers/awq_gptqmodel_nolmhead) saved as GEMV.
GPTQMODEL_AWQ_GEMV = {
    "bits": 4, "checkpoint_format": "gemv", "desc_act": False, "format": "gemv", "group_size": 64,
    "lm_head": False, "meta": {"quantizer": ["gptqmodel:7.6.0"]}, "method": "awq",
    "pack_dtype": "int32", "quant_method": "awq", "version": "gemv", "zero_point": True,
}  # fmt: skip
# Controls: quantreg's own methods, as before.
AUTOAWQ_GEMM = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4,
                "version": "gemm", "modules_to_not_convert": None}  # fmt: skip
GPTQMODEL_LMHEAD = {
    "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "lm_head": True,
    "quant_method": "gptq", "checkpoint_format": "gptq",
    "meta": {"quantizer": ["gptqmodel:2.2.0"]},
}  # fmt: skip
LLMCOMPRESSOR_W4A16 = {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "quantization_status": "compressed", "ignore": ["lm_head"],
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}},
}  # fmt: skip

# llm-compressor 0.6 NVFP4 (RedHatAI *-NVFP4 uploads, compressed-tensors 0.11) and FP8 block.
NVFP4_ARGS = {
    "actorder": None, "block_structure": None, "dynamic": False, "group_size": 16, "num_bits": 4,
    "observer": "minmax", "observer_kwargs": {}, "strategy": "tensor_group", "symmetric": True,
    "type": "float",
}  # fmt: skip
LLMCOMPRESSOR_NVFP4 = {
    "config_groups": {"group_0": {
        "format": "nvfp4-pack-quantized", "input_activations": {**NVFP4_ARGS, "dynamic": "local"},
        "output_activations": None, "targets": ["Linear"], "weights": NVFP4_ARGS}},
    "format": "nvfp4-pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors",
    "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
    "version": "0.11.0",
}  # fmt: skip
LLMCOMPRESSOR_FP8_BLOCK = {
    "config_groups": {"group_0": {
        "input_activations": {"dynamic": True, "group_size": 128, "num_bits": 8,
                              "strategy": "group", "symmetric": True, "type": "float"},
        "output_activations": None, "targets": ["Linear"],
        "weights": {"block_structure": [128, 128], "dynamic": False, "num_bits": 8,
                    "observer": "static_minmax", "strategy": "block", "symmetric": True,
                    "type": "float"}}},
    "format": "float-quantized", "ignore": ["lm_head"], "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}  # fmt: skip

BODY = "model.layers.0.mlp.down_proj"
ATTN = "model.layers.0.self_attn.q_proj"
# id -> (source: a quantization_config dict, or {file name: JSON} beside a bare config.json),
# body prefix, expected for lm_head, expected for the body layer. An expectation is
# ("float", rule prefix), ("unsupported", method), ("error", regex) or ("method", by platform).
CASES: dict[str, tuple[Any, str, tuple[str, Any], tuple[str, Any]]] = {
    "gpt-oss-20b-mxfp4-lm_head-excluded": (GPT_OSS, BODY, ("float", "modules_to_not_convert 'lm_head'"), ("unsupported", "mxfp4")),
    "gpt-oss-20b-mxfp4-attention-excluded": (GPT_OSS, ATTN, ("float", "modules_to_not_convert 'lm_head'"), ("float", "modules_to_not_convert 'model.layers.*.self_attn'")),
    "deepseek-v3-fp8-no-exclusion": (DEEPSEEK_FP8, BODY, ("float", "quant_method 'fp8': no lm_head"), ("method", {"cpu": "fp8", "cuda:9.0": "fp8"})),
    "transformers-4.51-finegrained-fp8-modules_to_not_convert": (FINEGRAINED_FP8, BODY, ("float", "modules_to_not_convert 'lm_head'"), ("method", {"cpu": "fp8", "cuda:9.0": "fp8"})),
    "vllm-0.9-fp8-ignored_layers": (VLLM_FP8, BODY, ("float", "ignored_layers 'lm_head'"), ("method", {"cpu": "fp8", "cuda:9.0": "fp8"})),
    "modelopt-0.29-fp8-exclude_modules": ({"hf_quant_config.json": MODELOPT_FP8}, BODY, ("float", "exclude_modules 'lm_head'"), ("method", {"cpu": "modelopt", "cuda:9.0": "modelopt"})),
    "modelopt-nvfp4-hf_quant_config-exclude_modules": ({"hf_quant_config.json": MODELOPT_NVFP4}, BODY, ("float", "exclude_modules 'lm_head'"), ("method", {"cpu": "modelopt", "cuda:9.0": "modelopt"})),
    "modelopt-0.31-nvfp4-config-ignore-wildcards": (MODELOPT_CONFIG_NVFP4, ATTN, ("float", "ignore 'lm_head'"), ("float", "ignore 'model.layers.*.self_attn*'")),
    "modelopt-mixed-precision-quantized_layers": (MODELOPT_MIXED, BODY, ("float", "quantized_layers: no entry covers 'lm_head'"), ("method", {"cpu": "modelopt", "cuda:9.0": "modelopt"})),
    "transformers-bnb-nf4-llm_int8_skip_modules": (BNB_NF4, BODY, ("float", "llm_int8_skip_modules 'lm_head'"), ("unsupported", "bitsandbytes")),
    "transformers-bnb-int8-no-skip": (BNB_INT8_NO_SKIP, BODY, ("float", "quant_method 'bitsandbytes'"), ("unsupported", "bitsandbytes")),
    "quark-0.9-fp8-exclude": (QUARK, BODY, ("float", "exclude 'lm_head'"), ("unsupported", "quark")),
    "auto-round-0.5-block_name_to_quantize": (AUTO_ROUND, ATTN, ("float", "extra_config: no entry names 'lm_head'"), ("method", GPTQ_LAYOUT)),
    "auto-round-0.5-extra_config-bits16": (AUTO_ROUND, BODY, ("float", "extra_config: no entry names 'lm_head'"), ("float", "extra_config 'model.layers.0.mlp.down_proj': bits=16")),
    "torchao-0.12-int4-include_input_output_embeddings-false": (TORCHAO, BODY, ("float", "include_input_output_embeddings: false"), ("unsupported", "torchao")),
    "hqq-0.2-skip_modules": (HQQ, BODY, ("float", "skip_modules 'lm_head'"), ("unsupported", "hqq")),
    "aqlm-1.1-linear_weights_not_to_quantize": (AQLM, BODY, ("float", "linear_weights_not_to_quantize 'lm_head.weight'"), ("unsupported", "aqlm")),
    "fbgemm-fp8-llama-3.1-405b-modules_to_not_convert": (FBGEMM_FP8, ATTN, ("float", "modules_to_not_convert 'lm_head'"), ("unsupported", "fbgemm_fp8")),
    "autogptq-0.4-3bit-quantize_config": ({"quantize_config.json": AUTOGPTQ_3BIT}, BODY, ("float", "lm_head: false (absent)"), ("error", r"field 'bits' = 3: supported GPTQ widths are 4 and 8")),
    "autogptq-0.7-is_marlin_format": ({"quantize_config.json": AUTOGPTQ_MARLIN}, BODY, ("float", "lm_head: false (absent)"), ("error", r"field 'is_marlin_format' = True: AutoGPTQ marlin-format")),
    "autoawq-0.2-gemv": (AUTOAWQ_GEMV, BODY, ("float", "lm_head: false (absent)"), ("error", r"field 'version' = 'gemv': only the 'gemm' layout")),
    "autoawq-0.2-gemv-quant_config": ({"quant_config.json": AUTOAWQ_GEMV_LEGACY}, BODY, ("float", "lm_head: false (absent)"), ("error", r"field 'version' = 'GEMV'")),
    "gptqmodel-7.6-awq-gemv-lm_head-false": (GPTQMODEL_AWQ_GEMV, BODY, ("float", "lm_head: false"), ("error", r"field 'version' = 'gemv'")),
    "autoawq-0.1-3bit-quant_config-w_bit": ({"quant_config.json": {"zero_point": True, "q_group_size": 128, "w_bit": 3, "version": "GEMM"}}, BODY, ("float", "lm_head: false (absent)"), ("error", r"field 'w_bit' = 3: AWQ checkpoints are supported with 4-bit codes only")),
    "auto-round-0.5-extra_config-lm_head-4bit": ({**AUTO_ROUND, "block_name_to_quantize": None, "extra_config": {"lm_head": {"bits": 4, "group_size": 128}}}, BODY, ("method", GPTQ_LAYOUT), ("method", GPTQ_LAYOUT)),
    "modelopt-mixed-precision-lm_head-quantized": ({**MODELOPT_MIXED, "quantized_layers": {"lm_head": {"quant_algo": "FP8"}}}, ATTN, ("method", {"cpu": "modelopt", "cuda:9.0": "modelopt"}), ("float", "quantized_layers: no entry covers")),
    "auto-round-0.2-intel-label": ({"bits": 4, "group_size": 128, "sym": False, "data_type": "int", "quant_method": "intel/auto-round", "backend": "autoround:gptq:exllamav2"}, BODY, ("float", "extra_config: no entry names 'lm_head'"), ("method", {"cpu": "cpu_wna16", "cuda:9.0": "gptq"})),
    "autoawq-0.2-gemm": (AUTOAWQ_GEMM, BODY, ("float", "lm_head: false (absent)"), ("method", AWQ_LAYOUT)),
    "gptqmodel-2.2-lm_head": (GPTQMODEL_LMHEAD, BODY, ("method", GPTQ_LAYOUT), ("method", GPTQ_LAYOUT)),
    "llm-compressor-0.6-w4a16-ignore-lm_head": (LLMCOMPRESSOR_W4A16, BODY, ("float", "ignore 'lm_head'"), ("method", {"cpu": "compressed-tensors", "cuda:9.0": "compressed-tensors"})),
    "llm-compressor-0.6-nvfp4-ignore-lm_head": (LLMCOMPRESSOR_NVFP4, BODY, ("float", "ignore 'lm_head'"), ("method", {"cpu": "compressed-tensors", "cuda:9.0": "compressed-tensors"})),
    "llm-compressor-0.6-fp8-block-ignore-lm_head": (LLMCOMPRESSOR_FP8_BLOCK, BODY, ("float", "ignore 'lm_head'"), ("method", {"cpu": "compressed-tensors", "cuda:9.0": "compressed-tensors"})),
}  # fmt: skip
# Configs quantreg runs whole: a float layer needs no note about the others.
CONTROLS = (
    "auto-round-",
    "autoawq-0.2-gemm", "gptqmodel-2.2-lm_head", "llm-compressor-0.6-w4a16",
    "llm-compressor-0.6-fp8-block", "llm-compressor-0.6-nvfp4", "deepseek-v3-fp8", "transformers-4.51-finegrained-fp8",
    "vllm-0.9-fp8",
    "modelopt-",  # quantreg runs modelopt FP8 and NVFP4 (methods/modelopt.py)
)  # fmt: skip


def source_of(tmp_path: Path, source: Any) -> Any:
    """A dict as is; side files go beside a config.json without a quantization_config."""
    if "quant_method" in source:
        return source
    (tmp_path / "config.json").write_text(json.dumps(llama_config()))
    for name, data in source.items():
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def cases() -> list[Any]:
    rows = []
    for cid, (source, body, head_expect, body_expect) in CASES.items():
        for platform in PLATFORMS:
            for prefix, expect, what in (
                ("lm_head", head_expect, "head"),
                (body, body_expect, "body"),
            ):
                rows.append(pytest.param(source, prefix, platform, expect, id=f"{cid}-{what}-{platform}"))  # fmt: skip
    return rows


@pytest.mark.parametrize(("source", "prefix", "platform", "expect"), cases())
def test_real_configs(request, tmp_path, source, prefix, platform, expect):
    kind, value = expect
    src = source_of(tmp_path, source)
    if kind in ("unsupported", "error"):
        pattern = NOT_SUPPORTED.format(value) if kind == "unsupported" else value
        with pytest.raises(ConfigError, match=pattern) as info:
            resolve(src, prefix=prefix, platform=platform)
        assert f"'{prefix}'" in str(info.value), "the error names the layer"
        return
    res = resolve(src, prefix=prefix, platform=platform)
    if kind == "method":
        assert (res.method, res.quantized) == (value[platform], True)
        return
    assert (res.method, res.quantized, res.config) == (None, False, None)
    assert res.rule.startswith(value), res.rule
    noted = any("supported by quantreg" in note for note in res.notes)
    assert noted is (not request.node.callspec.id.startswith(CONTROLS)), res.notes


# -- the tensors decide when the config does not ------------------------------------------


def fp8_checkpoint(tmp_path: Path, qcfg: dict, head: dict[str, torch.Tensor]) -> Path:
    return write_checkpoint(tmp_path, config=llama_config(qcfg), tensors=head)


def test_a_float_head_under_fp8_without_exclusion_loads_float(tmp_path):
    head = {"lm_head.weight": torch.randn(1000, 64).half()}
    path = fp8_checkpoint(tmp_path, DEEPSEEK_FP8, head)
    res = resolve(path, platform="cpu")
    assert (res.method, res.quantized, res.tensors) == (None, False, "unquantized")
    assert res.rule.startswith("quant_method 'fp8': no lm_head key")
    loaded = quantreg.load_lm_head(path, dtype=torch.float32)
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded.compute_logits(x), x @ head["lm_head.weight"].float().T)


def test_a_producer_checkpoint_saved_as_gemv_loads_its_float_head(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "producers" / "awq_gptqmodel_nolmhead"
    shutil.copytree(fixture, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["quantization_config"].update(version="gemv", format="gemv", checkpoint_format="gemv")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    res = resolve(tmp_path / "ckpt", platform="cuda:9.0")
    assert (res.method, res.quantized, res.tensors) == (None, False, "unquantized")
    assert res.rule == "lm_head: false"
    assert any("field 'version' = 'gemv'" in note for note in res.notes)
    head = quantreg.load_lm_head(tmp_path / "ckpt", dtype=torch.float32, platform="cpu")
    assert head.resolution.method is None and not head.quantized


def test_float_tensors_win_over_a_config_that_quantizes_the_layer(tmp_path):
    path = fp8_checkpoint(tmp_path, GPT_OSS, float_head(prefix=BODY))
    res = resolve(path, prefix=BODY, platform="cpu")
    assert (res.method, res.quantized) == (None, False)
    assert res.rule.startswith(
        f"tensors: {BODY}.weight (F16) are float; also: quant_method 'mxfp4'"
    )


@pytest.mark.parametrize(
    ("qcfg", "error", "message"),
    [
        (
            DEEPSEEK_FP8,
            CheckpointError,
            r"missing lm_head.weight_scale_inv: expected F32 \[8, 1\]\n  - present but not expected: lm_head.weight_scale",
        ),
        (VLLM_FP8, None, None),
    ],
    ids=["block-config", "per-tensor-config"],
)
def test_a_per_tensor_fp8_head_on_disk_loads_only_under_a_per_tensor_config(tmp_path, qcfg, error, message):  # fmt: skip
    head = {"lm_head.weight": torch.ones(1000, 64).to(torch.float8_e4m3fn),
            "lm_head.weight_scale": torch.full((1,), 0.5)}  # fmt: skip
    if qcfg is VLLM_FP8:  # static activations: AutoFP8 / vLLM store an input_scale too
        head["lm_head.input_scale"] = torch.ones(1)
    path = fp8_checkpoint(tmp_path, qcfg, head)
    assert resolve(path, platform="cpu").quantized
    if error is None:
        loaded = quantreg.load_lm_head(path, dtype=torch.float32)
        assert torch.equal(loaded.compute_logits(torch.eye(64)), torch.full((64, 1000), 0.5))
        return
    with pytest.raises(error, match=message):
        quantreg.load_lm_head(path, dtype=torch.float32)


class Fp8LinearMethod(quantreg.LinearMethod):
    def create_weights(self, layer, *args, **extra):
        pass

    def apply(self, layer, x, bias=None):
        return x


class Fp8Config(quantreg.QuantConfig):
    linear_method = Fp8LinearMethod


def test_a_plugin_registered_under_a_built_in_name_wins_with_override(registry):
    registry.register("fp8", Fp8Config, override=True)
    res = resolve(DEEPSEEK_FP8, prefix=BODY, platform="cpu")
    assert (res.method, res.quantized, res.rule) == ("fp8", True, "quant_method: every layer is quantized")  # fmt: skip
    assert not any("not supported" in note for note in res.notes)


def test_an_unknown_name_keeps_the_closest_match():
    with pytest.raises(
        ConfigError, match=r"unknown quantization method 'gptqq'.*did you mean 'gptq'"
    ):
        resolve({"quant_method": "gptqq", "bits": 4})


def test_a_requested_method_cannot_read_an_unsupported_config():
    with pytest.raises(ConfigError, match=r"requested method 'awq' cannot read .*'mxfp4' is known"):
        resolve(GPT_OSS, requested="awq", platform="cpu")
    assert resolve(GPT_OSS, requested="unquantized", platform="cpu").method is None
    # A refused variant of quantreg's own method: requesting that method keeps the float head.
    assert resolve(AUTOAWQ_GEMV, requested="awq", platform="cpu").method is None
    with pytest.raises(
        ConfigError, match=r"requested method 'gptq' cannot read .*field 'version' = 'gemv'"
    ):
        resolve(AUTOAWQ_GEMV, requested="gptq", platform="cpu")


@pytest.mark.parametrize(
    ("qcfg", "message"),
    [
        ({**AUTOGPTQ_3BIT, "bits": "4"}, r"field 'bits' = '4': Input should be a valid integer"),
        ({**AUTOAWQ_GEMM, "group_size": 0}, r"field 'group_size' = 0"),
        ({**GPTQMODEL_LMHEAD, "lm_head": False, "dynamic": {"-:(": {}}}, r"not a valid regular expression"),
        ({**AUTOGPTQ_3BIT, "dynamic": {"+:.*down_proj": {"bits": 3}}}, r"field 'dynamic.\+:.\*down_proj.bits' = 3"),
    ],
    ids=["bits-string", "group-size-0", "dynamic-bad-regex", "dynamic-3bit-with-3bit-base"],
)  # fmt: skip
def test_a_bad_config_is_not_a_variant_and_still_fails_for_a_float_head(qcfg, message):
    with pytest.raises(ConfigError, match=message):
        resolve(qcfg, platform="cpu")


def test_modelopt_side_file_must_hold_a_quantization_section(tmp_path):
    src = source_of(tmp_path, {"hf_quant_config.json": {"producer": {"name": "modelopt"}}})
    with pytest.raises(
        ConfigError, match=r"hf_quant_config.json: field 'quantization' must be a JSON object"
    ):
        resolve(src)


# -- compressed-tensors' class target over a float head -------------------------------------

CT_LINEAR = {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}},
}  # fmt: skip


def test_a_class_target_over_a_float_head_loads_it_unquantized(tmp_path):
    head = {"lm_head.weight": torch.randn(1000, 64).half()}
    path = write_checkpoint(tmp_path, config=llama_config(CT_LINEAR), tensors=head)
    res = resolve(path, platform="cuda:9.0")
    assert (res.method, res.quantized) == (None, False)
    assert res.rule == "tensors: lm_head.weight (F16) are float over the class target; also: targets 'Linear' (group_0)"  # fmt: skip
    assert any("never quantize a head through a class target" in n for n in res.notes)
    loaded = quantreg.load_lm_head(path, dtype=torch.float32)
    x = torch.randn(2, 64)
    torch.testing.assert_close(loaded.compute_logits(x), x @ head["lm_head.weight"].float().T)


def test_a_class_target_over_a_packed_head_stays_quantized(tmp_path):
    path = write_checkpoint(tmp_path, config=llama_config(CT_LINEAR), tensors=ct_packed_head())
    res = resolve(path, platform="cpu")
    assert (res.method, res.quantized) == ("compressed-tensors", True)
    assert res.rule == "targets 'Linear' (group_0); also: tensors: packed, so the class target quantizes the head"  # fmt: skip


def test_the_producer_fixture_with_a_class_target_stays_quantized():
    fixture = Path(__file__).parent / "fixtures" / "producers" / "ct_w4a16_group_lmhead"
    res = resolve(fixture, platform="cpu")
    assert (res.method, res.quantized) == ("compressed-tensors", True)
    assert "packed, so the class target quantizes the head" in res.rule


def test_a_class_target_without_tensors_follows_the_config():
    res = resolve(CT_LINEAR, platform="cpu")
    assert (res.method, res.quantized, res.rule) == ("compressed-tensors", True, "targets 'Linear' (group_0)")  # fmt: skip

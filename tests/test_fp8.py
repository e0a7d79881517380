"""The ``fp8`` method (transformers FineGrainedFP8 / DeepSeek-V3 block-wise fp8): the
dequantized head is ``weight * weight_scale_inv`` expanded per block, exactly; real configs;
shards that cut a block; the writer; bad inputs refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from ckpt import llama_config
from ckpt import write_checkpoint as write_raw
from cli_runner import run_cli
from safetensors.torch import load_file
from two_ranks import run_two_ranks

from quantreg import CheckpointError, ConfigError, InputError, load_lm_head, quantize, resolve

# deepseek-ai/DeepSeek-V3 config.json, verbatim (its lm_head is bf16 on disk).
DEEPSEEK_V3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}  # fmt: skip
# transformers 5.x FineGrainedFP8Config().to_dict() with an exclusion list (Qwen3-FP8 style).
FINEGRAINED = {"quant_method": "fp8", "modules_to_not_convert": ["lm_head"], "modules_to_convert": None, "activation_scheme": "dynamic", "weight_block_size": [128, 128], "dequantize": False, "scale_fmt": "float", "expert_dtype": "fp8"}  # fmt: skip


def fp8_tensors(n: int, k: int, block: tuple[int, int], seed: int = 0) -> dict:
    """Independent of quantreg's writer: random e4m3 codes and random positive float32 block
    scales, as a producer stores them."""
    gen = torch.Generator().manual_seed(seed)
    codes = (torch.randn(n, k, generator=gen) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=gen) * 1e-3 + 1e-5
    return {"lm_head.weight": codes, "lm_head.weight_scale_inv": scale}


def expected_weight(tensors: dict, block: tuple[int, int]) -> torch.Tensor:
    codes, scale = tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"]
    n, k = codes.shape
    full = scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return codes.float() * full


def fp8_folder(path, qcfg: dict, tensors: dict, dtype: str = "bfloat16"):
    n, k = tensors["lm_head.weight"].shape
    config = llama_config(qcfg, hidden_size=k, vocab_size=n, torch_dtype=dtype)
    return write_raw(path, config=config, tensors=tensors)


def weight_t(head) -> torch.Tensor:
    return head.compute_logits(torch.eye(head.embedding_dim))


@pytest.mark.parametrize(
    ("n", "k", "block"),
    [(1000, 300, (128, 128)), (1088, 256, (128, 128)), (100, 64, (128, 128)), (999, 130, (64, 32)), (257, 129, (1, 1))],
    ids=["ragged-both", "ragged-vocab", "block-wider-than-head", "64x32-ragged", "1x1-per-element"],
)  # fmt: skip
def test_the_head_is_weight_times_scale_inv_per_block_exactly(tmp_path, n, k, block):
    tensors = fp8_tensors(n, k, block)
    qcfg = {**DEEPSEEK_V3, "weight_block_size": [*block]}
    head = load_lm_head(fp8_folder(tmp_path, qcfg, tensors), dtype=torch.float32)
    assert (head.resolution.method, head.kernel.name) == ("fp8", "reference")
    assert torch.equal(weight_t(head).T, expected_weight(tensors, block))


@pytest.mark.parametrize(
    ("qcfg", "head_fp8", "quantized", "rule"),
    [
        (DEEPSEEK_V3, False, False, "quant_method 'fp8': no lm_head key"),
        (DEEPSEEK_V3, True, True, "tensors: lm_head.weight with weight_scale_inv are fp8"),
        (FINEGRAINED, False, False, "modules_to_not_convert 'lm_head'"),
        (FINEGRAINED, True, True, "tensors: lm_head.weight with weight_scale_inv are fp8"),
        ({**DEEPSEEK_V3, "modules_to_convert": ["mlp"]}, False, False, "modules_to_convert: no entry covers 'lm_head'"),
    ],
    ids=["deepseek-v3-bf16-head", "deepseek-v3-fp8-head", "finegrained-excluded-bf16-head", "finegrained-excluded-but-fp8-tensors", "modules_to_convert"],
)  # fmt: skip
def test_real_configs_the_tensors_decide_the_head(tmp_path, qcfg, head_fp8, quantized, rule):
    tensors = fp8_tensors(1000, 256, (128, 128))
    if not head_fp8:
        tensors = {"lm_head.weight": expected_weight(tensors, (128, 128)).bfloat16()}
    folder = fp8_folder(tmp_path, qcfg, tensors)
    res = resolve(folder, platform="cpu")
    assert (res.method, res.quantized) == (("fp8", True) if quantized else (None, False))
    assert res.rule.startswith(rule), res.rule
    if quantized:
        assert any("weight-only: activations stay float" in note for note in res.notes)
    head = load_lm_head(folder, dtype=torch.float32)
    expected = expected_weight(tensors, (128, 128)) if head_fp8 else tensors["lm_head.weight"]
    assert torch.equal(weight_t(head).T, expected.float())


def test_two_ranks_share_the_block_their_boundary_cuts(tmp_path):
    # vocab 1088: 544 rows per rank, so 128-row block 4 (rows 512..639) is cut.
    tensors = fp8_tensors(1088, 256, (128, 128), seed=1)
    folder = fp8_folder(tmp_path / "ckpt", DEEPSEEK_V3, tensors)
    runs = run_two_ranks(tmp_path, {"fp8": (str(folder), {})})
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(0))
    expected = x @ expected_weight(tensors, (128, 128)).T
    for got in runs["fp8"]:
        assert torch.allclose(got["logits"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", ["128x128", "64x32"])
def test_cli_writer_writes_what_transformers_reads(tmp_path, block):
    from transformers import FineGrainedFP8Config

    w = (torch.randn(1000, 300, generator=torch.Generator().manual_seed(2)) * 0.05).bfloat16()
    config = llama_config(hidden_size=300, torch_dtype="bfloat16")
    write_raw(tmp_path / "src", config=config, tensors={"lm_head.weight": w})
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "fp8", "--block-size", block)  # fmt: skip
    assert out.returncode == 0, out.stderr
    tensors = load_file(str(tmp_path / "dst" / "model.safetensors"))
    rows, cols = map(int, block.split("x"))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "lm_head.weight": (torch.float8_e4m3fn, (1000, 300)),
        "lm_head.weight_scale_inv": (torch.float32, (-(-1000 // rows), -(-300 // cols))),
    }
    qcfg = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    parsed = FineGrainedFP8Config(**{k: v for k, v in qcfg.items() if k != "quant_method"})
    assert tuple(parsed.weight_block_size) == (rows, cols)
    head = load_lm_head(tmp_path / "dst", dtype=torch.float32)
    assert torch.equal(weight_t(head).T, expected_weight(tensors, (rows, cols)))
    assert (weight_t(head).T - w.float()).abs().max() < 0.02


def nan_code(tensors: dict) -> dict:
    codes = tensors["lm_head.weight"].clone()
    codes.view(torch.uint8)[700, 3] = 0xFF
    return {**tensors, "lm_head.weight": codes}


GOOD = fp8_tensors(1000, 256, (128, 128))


@pytest.mark.parametrize(
    ("qcfg", "tensors", "error", "message"),
    [
        (DEEPSEEK_V3, {**GOOD, "lm_head.weight_scale_inv": torch.ones(8, 1)}, CheckpointError, r"lm_head.weight_scale_inv: expected shape F32 \[8, 2\], found F32 \[8, 1\]"),
        (DEEPSEEK_V3, {**GOOD, "lm_head.weight_scale_inv": torch.full((8, 2), float("inf"))}, CheckpointError, r"lm_head.weight_scale_inv holds 16 non-finite value\(s\)"),
        (DEEPSEEK_V3, {**GOOD, "lm_head.weight_scale_inv": torch.full((8, 2), 1e37)}, CheckpointError, r"lm_head.weight_scale_inv: scale 1e\+37 .* beyond 3.40282e\+38"),
        (DEEPSEEK_V3, nan_code(GOOD), CheckpointError, r"lm_head.weight holds 1 NaN float8 code\(s\) .* first at \[700, 3\]"),
        ({**DEEPSEEK_V3, "weight_block_size": [128]}, GOOD, ConfigError, r"weight_block_size.*expected \[rows, cols\]"),
        ({**DEEPSEEK_V3, "weight_block_size": [0, 128]}, GOOD, ConfigError, r"weight_block_size.*expected \[rows, cols\]"),
        ({**DEEPSEEK_V3, "weight_block_size": [128.0, 128]}, GOOD, ConfigError, r"weight_block_size"),
        ({**DEEPSEEK_V3, "fmt": "e5m2"}, GOOD, ConfigError, r"fmt 'e5m2' is not supported"),
        ({**DEEPSEEK_V3, "scale_fmt": "ue8m0"}, GOOD, ConfigError, r"scale_fmt 'ue8m0' is not supported"),
        ({**DEEPSEEK_V3, "activation_scheme": "static"}, GOOD, ConfigError, r"activation_scheme 'static' with weight_block_size is not supported"),
        ({**DEEPSEEK_V3, "is_checkpoint_fp8_serialized": False}, GOOD, ConfigError, r"is_checkpoint_fp8_serialized false: vLLM quantizes such weights at load time"),
        ({**DEEPSEEK_V3, "activation_scheme": "token"}, GOOD, ConfigError, r"activation_scheme.*expected 'dynamic' or 'static'"),
    ],
    ids=["scale-shape", "inf-scale", "overflowing-scale", "nan-code", "block-one-number", "zero-block", "float-block", "e5m2", "ue8m0-scales", "static", "not-serialized", "bad-scheme"],
)  # fmt: skip
def test_bad_inputs_are_refused_naming_the_tensor_or_field(tmp_path, qcfg, tensors, error, message):
    with pytest.raises(error, match=message):
        load_lm_head(fp8_folder(tmp_path, qcfg, tensors), dtype=torch.float32)


@pytest.mark.parametrize(
    ("params", "message"),
    [({"block_size": (128,)}, r"block size: expected \[rows, cols\]"), ({"bits": 4}, r"unsupported option\(s\) bits")],
    ids=["one-number", "bits"],
)  # fmt: skip
def test_writer_errors(params, message):
    with pytest.raises(InputError, match=message):
        quantize(torch.randn(256, 128), "fp8", **params)

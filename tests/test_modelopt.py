"""``modelopt``: NVIDIA ModelOpt's FP8 and NVFP4 heads, bit for bit against checkpoints that
nvidia-modelopt 0.47.0 wrote and dequantized itself (tests/fixtures/producers/modelopt_*), on one
and two ranks; ``exclude_modules`` / ``ignore`` wildcards; bad tensors and configs; the
``modelopt`` writer and compressed-tensors' ``nvfp4-pack-quantized`` writer read back by the
library itself."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from ckpt import llama_config
from ckpt import write_checkpoint as write_raw
from cli_runner import run_cli
from safetensors.torch import load_file, save_file
from two_ranks import run_two_ranks

from quantreg import CheckpointError, ConfigError, InputError, load_lm_head, resolve
from quantreg import write_checkpoint as write_head

FIXTURES = Path(__file__).parent / "fixtures" / "producers"
# fixture -> the quant_algo ModelOpt wrote (config.json and hf_quant_config.json agree)
QUANTIZED = {
    "modelopt_fp8_lmhead": "FP8",
    "modelopt_fp8_pcpt_lmhead": "FP8_PER_CHANNEL_PER_TOKEN",
    "modelopt_nvfp4_lmhead": "NVFP4",
    "modelopt_w4a16_nvfp4_lmhead": "W4A16_NVFP4",
}
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def reference(name: str) -> torch.Tensor:
    return load_file(str(FIXTURES / name / "reference.safetensors"))["lm_head.weight_dequant"]


def weight_t(head) -> torch.Tensor:
    return head.compute_logits(torch.eye(head.embedding_dim))


def side_file_only(tmp_path: Path, name: str) -> Path:
    """The fixture as older ModelOpt exports are: hf_quant_config.json, no quantization_config."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# -- the producer's own checkpoints ------------------------------------------------------------


@pytest.mark.parametrize("form", ["config.json", "hf_quant_config.json"])
@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_modelopt_heads_equal_modelopts_own_dequantization_bit_for_bit(tmp_path, name, form):
    folder = FIXTURES / name if form == "config.json" else side_file_only(tmp_path, name)
    head = load_lm_head(folder, dtype=torch.float32)
    res = head.resolution
    assert (res.method, head.kernel.name) == ("modelopt", "reference")
    assert res.rule == f"quant_algo '{QUANTIZED[name]}': every linear layer not excluded"
    assert torch.equal(weight_t(head).T, reference(name))


@pytest.mark.parametrize(
    ("form", "rule"),
    [("config.json", "ignore 'lm_head'"), ("hf_quant_config.json", "exclude_modules 'lm_head'")],
)
def test_a_head_modelopt_excluded_loads_float(tmp_path, form, rule):
    name = "modelopt_nvfp4_nolmhead"
    folder = FIXTURES / name if form == "config.json" else side_file_only(tmp_path, name)
    head = load_lm_head(folder, dtype=torch.float32)
    assert (head.resolution.method, head.resolution.rule) == (None, rule)
    weight = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(weight_t(head).T, weight.float())
    body = resolve(folder, prefix="model.layers.0.mlp.down_proj", platform="cpu")
    assert body.method == "modelopt"


def test_two_ranks_match_modelopts_dequantization(tmp_path):
    runs = run_two_ranks(tmp_path, {n: (str(FIXTURES / n), {}) for n in QUANTIZED})
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    for name in QUANTIZED:
        expected = x @ reference(name).T
        for got in runs[name]:
            torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-6)


# -- which layers are quantized -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "prefix", "quantized", "rule"),
    [
        (["lm_head"], "lm_head", False, "exclude_modules 'lm_head'"),
        (["model.embed_tokens"], "lm_head", True, "quant_algo 'NVFP4': every linear layer not excluded"),
        (["*lm_head*"], "lm_head", False, "exclude_modules '*lm_head*'"),
        (["*mlp.gate"], "model.layers.3.mlp.gate", False, "exclude_modules '*mlp.gate'"),
        (["*mlp.gate"], "model.layers.3.mlp.gate_proj", True, "quant_algo"),
        (["model.layers.0.*"], "model.layers.0.self_attn.q_proj", False, "exclude_modules 'model.layers.0.*'"),
        (["model.layers.0.*"], "model.layers.10.self_attn.q_proj", True, "quant_algo"),
        (["model.layers.61*"], "model.layers.61.mlp.down_proj", False, "exclude_modules 'model.layers.61*'"),
        (["model.layers.21.self_attn*"], "model.layers.21.self_attn.o_proj", False, "exclude_modules 'model.layers.21.self_attn*'"),
        (["model.layers.[0-1].mlp?down_proj"], "model.layers.1.mlp.down_proj", False, "exclude_modules 'model.layers.[0-1].mlp?down_proj'"),
        (["mlp.gate"], "model.layers.3.mlp.gate", False, "exclude_modules 'mlp.gate'"),  # vLLM: substring
        (["vision_tower", "lm_head"], "model.lm_head", False, "exclude_modules 'lm_head'"),
    ],
    ids=["exact", "other", "wildcard-head", "suffix-wildcard", "suffix-wildcard-no-prefix-match",
         "layer-wildcard", "layer-wildcard-not-10", "modelopt-prefix-summary", "self_attn-summary",
         "class-and-any-char", "substring-as-vllm", "nested-head"],
)  # fmt: skip
def test_exclude_modules_entries_as_vllm_matches_them(entries, prefix, quantized, rule):
    qcfg = {"quant_method": "modelopt", "quant_algo": "NVFP4", "exclude_modules": entries}
    res = resolve(qcfg, prefix=prefix, platform="cpu")
    assert res.quantized is quantized and res.rule.startswith(rule), res.rule


def test_mixed_precision_quantizes_the_layers_it_lists_with_their_own_algo():
    qcfg = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
            "quantized_layers": {"lm_head": {"quant_algo": "NVFP4", "group_size": 16},
                                 "model.layers.0.mlp.down_proj": {"quant_algo": "W4A8_AWQ"}}}  # fmt: skip
    head = resolve(qcfg, prefix="lm_head", platform="cpu")
    assert (head.method, head.rule) == ("modelopt", "quantized_layers 'lm_head': NVFP4")
    assert head.config.algo == "NVFP4"
    other = resolve(qcfg, prefix="model.layers.1.mlp.down_proj", platform="cpu")
    assert (other.quantized, other.rule) == (False, "quantized_layers: no entry covers 'model.layers.1.mlp.down_proj'")  # fmt: skip
    with pytest.raises(ConfigError, match=r"quant_algo 'W4A8_AWQ' is not supported; supported: FP8, FP8_PER_CHANNEL_PER_TOKEN, NVFP4, W4A16_NVFP4"):  # fmt: skip
        resolve(qcfg, prefix="model.layers.0.mlp.down_proj", platform="cpu")


# -- bad inputs ---------------------------------------------------------------------------------


def edited(tmp_path: Path, name: str, config=None, **tensors: torch.Tensor) -> Path:
    """A fixture with head tensors replaced (None: removed) and config.json's
    quantization_config changed."""
    folder = tmp_path / "edited"
    shutil.copytree(FIXTURES / name, folder)
    data = load_file(str(folder / "model.safetensors"))
    for key, value in tensors.items():
        data.pop(f"lm_head.{key}")
        if value is not None:
            data[f"lm_head.{key}"] = value
    save_file(data, str(folder / "model.safetensors"))
    if config is not None:
        full = json.loads((folder / "config.json").read_text())
        full["quantization_config"].update(config)
        (folder / "config.json").write_text(json.dumps(full))
    return folder


def nan_code(shape: tuple[int, int], at: tuple[int, int]) -> torch.Tensor:
    codes = torch.ones(shape).to(torch.float8_e4m3fn)
    codes.view(torch.uint8)[at] = 0x7F
    return codes


CONFIG_KEYS = ("quant_algo", "group_size", "ignore")  # the rest of a change: head tensors
NV, FP8, PCPT = "modelopt_nvfp4_lmhead", "modelopt_fp8_lmhead", "modelopt_fp8_pcpt_lmhead"
F32 = torch.float32
BAD = {
    "nvfp4-weight_scale_2-zero": (NV, {"weight_scale_2": torch.tensor(0.0)}, CheckpointError, r"lm_head\.weight_scale_2 = 0\.0; expected a finite positive float32 \(ModelOpt writes amax / 6 \* 448\)"),
    "nvfp4-weight_scale_2-negative": (NV, {"weight_scale_2": torch.tensor(-1.0)}, CheckpointError, r"lm_head\.weight_scale_2 = -1\.0; expected a finite positive"),
    "nvfp4-weight_scale_2-inf": (NV, {"weight_scale_2": torch.tensor(float("inf"))}, CheckpointError, r"lm_head\.weight_scale_2 holds 1 non-finite value\(s\)"),
    "nvfp4-weight_scale_2-shape": (NV, {"weight_scale_2": torch.ones(1)}, CheckpointError, r"lm_head\.weight_scale_2: expected shape F32 \[\], found F32 \[1\]"),
    "nvfp4-weight_scale_2-missing": (NV, {"weight_scale_2": None}, CheckpointError, r"missing lm_head\.weight_scale_2: expected F32 \[\]"),
    "nvfp4-weight-shape": (NV, {"weight": torch.zeros(1000, 64, dtype=torch.uint8)}, CheckpointError, r"lm_head\.weight: expected shape U8 \[1000, 32\], found U8 \[1000, 64\]"),
    "nvfp4-weight_scale-shape": (NV, {"weight_scale": torch.ones(1000, 2).to(torch.float8_e4m3fn)}, CheckpointError, r"lm_head\.weight_scale: expected shape F8_E4M3 \[1000, 4\], found F8_E4M3 \[1000, 2\]"),
    "nvfp4-weight_scale-dtype": (NV, {"weight_scale": torch.ones(1000, 4)}, CheckpointError, r"lm_head\.weight_scale: expected dtype F8_E4M3 \[1000, 4\], found F32 \[1000, 4\]"),
    "nvfp4-weight_scale-nan-code": (NV, {"weight_scale": nan_code((1000, 4), (7, 3))}, CheckpointError, r"lm_head\.weight_scale holds 1 NaN float8 code\(s\) .* first at \[7, 3\]"),
    "nvfp4-input_scale-zero": (NV, {"input_scale": torch.tensor(0.0)}, CheckpointError, r"lm_head\.input_scale = 0\.0; expected a finite positive float32"),
    "nvfp4-input_scale-missing": (NV, {"input_scale": None}, CheckpointError, r"missing lm_head\.input_scale: expected F32 \[\]"),
    "fp8-weight_scale-zero": (FP8, {"weight_scale": torch.tensor(0.0)}, CheckpointError, r"lm_head\.weight_scale = 0\.0; expected a finite positive float32 \(ModelOpt writes amax / 448\)"),
    "fp8-weight_scale-nan": (FP8, {"weight_scale": torch.tensor(float("nan"))}, CheckpointError, r"lm_head\.weight_scale holds 1 non-finite value\(s\)"),
    "fp8-weight_scale-per-channel": (FP8, {"weight_scale": torch.ones(1000)}, CheckpointError, r"lm_head\.weight_scale: expected shape F32 \[\], found F32 \[1000\]"),
    "fp8-weight-nan-code": (FP8, {"weight": nan_code((1000, 64), (11, 5))}, CheckpointError, r"lm_head\.weight holds 1 NaN float8 code\(s\) .* first at \[11, 5\]"),
    "fp8-weight-int8": (FP8, {"weight": torch.zeros(1000, 64, dtype=torch.int8)}, CheckpointError, r"lm_head\.weight: expected dtype F8_E4M3 \[1000, 64\], found I8 \[1000, 64\]"),
    "pcpt-weight_scale-overflows-fp32": (PCPT, {"weight_scale": torch.full((1000,), 1e37)}, CheckpointError, r"lm_head\.weight_scale: scale 1e\+37 .* beyond 3\.40282e\+38, the largest finite value of the scale dtype float32"),
    "pcpt-weight_scale-scalar": (PCPT, {"weight_scale": torch.tensor(1.0)}, CheckpointError, r"lm_head\.weight_scale: expected shape F32 \[1000\], found F32 \[\]"),
    "quant_algo-w4a8_awq": (NV, {"quant_algo": "W4A8_AWQ"}, ConfigError, r"quant_algo 'W4A8_AWQ' is not supported; supported: FP8, FP8_PER_CHANNEL_PER_TOKEN, NVFP4, W4A16_NVFP4"),
    "quant_algo-w4a16_awq": (NV, {"quant_algo": "W4A16_AWQ"}, ConfigError, r"quant_algo 'W4A16_AWQ' is not supported"),
    "quant_algo-missing": (NV, {"quant_algo": None}, ConfigError, r"no quant_algo; supported: FP8, FP8_PER_CHANNEL_PER_TOKEN, NVFP4, W4A16_NVFP4"),
    "nvfp4-group_size-32": (NV, {"group_size": 32}, ConfigError, r"NVFP4 with group_size 32 is not supported; expected 16"),
    "ignore-not-a-list": (NV, {"ignore": "lm_head"}, ConfigError, r"invalid modelopt quantization_config .* field 'ignore' = 'lm_head'"),
}  # fmt: skip


@pytest.mark.parametrize(("name", "change", "error", "message"), BAD.values(), ids=BAD.keys())
def test_bad_modelopt_checkpoints_are_refused_naming_the_tensor_or_field(tmp_path, name, change, error, message):  # fmt: skip
    config = {k: v for k, v in change.items() if k in CONFIG_KEYS}
    tensors = {k: v for k, v in change.items() if k not in CONFIG_KEYS}
    with pytest.raises(error, match=message):
        load_lm_head(edited(tmp_path, name, config or None, **tensors), dtype=torch.float32)


def test_nvfp4_scales_overflowing_the_compute_dtype_are_refused(tmp_path):
    folder = edited(tmp_path, NV, weight_scale_2=torch.tensor(100.0))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight_scale_2: scale .* beyond 65504, the largest finite value of the compute dtype float16"):  # fmt: skip
        load_lm_head(folder, dtype=torch.float16)


@pytest.mark.parametrize("hidden", [40, 72], ids=["k-40", "k-72"])
def test_an_nvfp4_input_size_not_a_multiple_of_16_is_refused(tmp_path, hidden):
    qcfg = {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": []}
    tensors = {"lm_head.weight": torch.zeros(1000, hidden // 2, dtype=torch.uint8)}
    write_raw(tmp_path, config=llama_config(qcfg, hidden_size=hidden), tensors=tensors)
    with pytest.raises(ConfigError, match=rf"modelopt: NVFP4 groups of 16 do not divide the input size {hidden} of lm_head; expected a multiple of 16"):  # fmt: skip
        load_lm_head(tmp_path, dtype=torch.float32)


# -- writers ------------------------------------------------------------------------------------


def random_weight(n: int = 1000, k: int = 64, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    weight[3, :16] = 0  # an all-zero group
    return weight


@pytest.mark.parametrize(
    ("fmt", "algo", "bound"), [("fp8", "FP8_PER_CHANNEL_PER_TOKEN", 0.05), ("nvfp4", "W4A16_NVFP4", 0.12)]
)  # fmt: skip
def test_the_modelopt_writer_round_trips(tmp_path, fmt, algo, bound):
    weight = random_weight()
    write_head(tmp_path, weight, "modelopt", format=fmt)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["quant_algo"]) == ("modelopt", algo)
    t = {k.removeprefix("lm_head."): v for k, v in load_file(str(tmp_path / "model.safetensors")).items()}  # fmt: skip
    if fmt == "fp8":
        expected = t["weight"].float() * t["weight_scale"][:, None]
    else:  # ModelOpt's relation, spelled out: e2m1 * (float32(weight_scale) * weight_scale_2)
        codes = torch.stack((t["weight"] & 15, t["weight"] >> 4), -1).reshape(1000, 64).long()
        scales = (t["weight_scale"].float() * t["weight_scale_2"]).repeat_interleave(16, 1)
        expected = E2M1[codes] * scales
        assert t["weight_scale_2"].shape == () and t["weight_scale"].dtype == torch.float8_e4m3fn
    head = load_lm_head(tmp_path, dtype=torch.float32)
    assert head.resolution.method == "modelopt"
    assert torch.equal(weight_t(head).T, expected)
    assert float((expected - weight).norm() / weight.norm()) < bound


def test_the_modelopt_writer_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(InputError, match=r"modelopt writer: format 'int4' is not supported; expected fp8 or nvfp4"):  # fmt: skip
        write_head(tmp_path / "a", random_weight(), "modelopt", format="int4")
    with pytest.raises(InputError, match=r"modelopt writer: nvfp4 needs an input size that is a multiple of 16 \(its group size\); got 40"):  # fmt: skip
        write_head(tmp_path / "b", random_weight(k=40), "modelopt", format="nvfp4")
    with pytest.raises(InputError, match=r"modelopt writer: unsupported option\(s\) bits"):
        write_head(tmp_path / "c", random_weight(), "modelopt", bits=4)


def library_decompress_nvfp4(folder: Path) -> torch.Tensor:
    """compressed-tensors' own reading of an ``nvfp4-pack-quantized`` head: its config
    validated, its module initialized (``weight_packed`` is registered by compression, so it is
    added here), then ``ModelCompressor.decompress_model``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    config = json.loads((folder / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(
        {k: v for k, v in config["quantization_config"].items() if k != "quant_method"}
    )
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
    apply_quantization_config(model, qcfg)
    for key, tensor in load_file(str(folder / "model.safetensors")).items():
        name = key.removeprefix("lm_head.")
        if hasattr(model.lm_head, name):
            getattr(model.lm_head, name).data = tensor
        else:
            model.lm_head.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    ModelCompressor(quantization_config=qcfg).decompress_model(model)
    return model.lm_head.weight.detach().clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_compressed_tensors_nvfp4_writer_is_read_back_by_the_library(tmp_path, dtype):
    weight = random_weight(seed=1).to(dtype)
    write_head(tmp_path, weight, "compressed-tensors", format="nvfp4-pack-quantized", dtype=dtype)
    t = load_file(str(tmp_path / "model.safetensors"))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "lm_head.weight_packed": (torch.uint8, (1000, 32)),
        "lm_head.weight_scale": (torch.float8_e4m3fn, (1000, 4)),
        "lm_head.weight_global_scale": (torch.float32, (1,)),
    }
    reference = library_decompress_nvfp4(tmp_path)
    assert reference.dtype == torch.bfloat16
    head = load_lm_head(tmp_path, dtype=torch.float32)
    assert torch.equal(weight_t(head).T, reference.float())
    assert float((reference.float() - weight.float()).norm() / weight.float().norm()) < 0.12


@pytest.mark.parametrize(
    ("option", "message"),
    [(("--bits", "8"), r"nvfp4-pack-quantized takes no bits 8 \(expected 4\)"),
     (("--group-size", "32"), r"nvfp4-pack-quantized takes no group_size 32 \(expected 16\)"),
     (("--no-sym",), r"nvfp4-pack-quantized takes no sym False \(expected True\)")],
    ids=["bits-8", "group-32", "asymmetric"],
)  # fmt: skip
def test_the_compressed_tensors_nvfp4_writer_refuses_other_options(tmp_path, option, message):
    write_raw(tmp_path / "src", config=llama_config(), tensors={"lm_head.weight": random_weight().half()})  # fmt: skip
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method",
                  "compressed-tensors", "--format", "nvfp4-pack-quantized", *option)  # fmt: skip
    assert out.returncode == 1 and re.search(message, out.stderr), out.stderr


@pytest.mark.parametrize(
    ("method", "fmt", "chosen"),
    [("modelopt", "fp8", "modelopt"), ("modelopt", "nvfp4", "modelopt"),
     ("compressed-tensors", "nvfp4-pack-quantized", "compressed-tensors")],
    ids=["modelopt-fp8", "modelopt-nvfp4", "ct-nvfp4"],
)  # fmt: skip
def test_quantize_and_run_from_the_command_line(tmp_path, method, fmt, chosen):
    tensors = {"lm_head.weight": random_weight().half(), "fc.weight": torch.ones(4, 4, dtype=torch.float16)}  # fmt: skip
    write_raw(tmp_path / "src", config=llama_config(), tensors=tensors)
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", method, "--format", fmt)  # fmt: skip
    assert out.returncode == 0, out.stderr
    qcfg = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    if method == "modelopt":
        assert qcfg["ignore"] == ["fc"]  # every float module, as vLLM reads it
    run = run_cli("run", str(tmp_path / "dst"), "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["method"] == chosen
    assert resolve(tmp_path / "dst", prefix="fc", platform="cpu").quantized is False

"""AWQ and GPTQ heads: writers, every method that reads them, TP shards, and error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from ckpt import llama_config
from ckpt import write_checkpoint as write_raw
from cli_runner import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from two_ranks import run_two_ranks
from wna16_spec import awq_dequantize, gptq_dequantize

import quantreg
from quantreg import (
    CheckpointError,
    ConfigError,
    InputError,
    load_lm_head,
    quantize,
    quantize_checkpoint,
    resolve,
    write_checkpoint,
)

AWQ_METHODS = ["awq", "awq_marlin", "cpu_wna16"]
GPTQ_METHODS = ["gptq", "gptq_marlin", "cpu_wna16"]


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).half()


def head_weight_t(head) -> torch.Tensor:
    """``W.T`` as the head computes it: logits of the identity (exact in float32)."""
    return head.compute_logits(torch.eye(head.embedding_dim, dtype=head.params_dtype))


def expected_weight(method: str, tensors: dict, params: dict) -> torch.Tensor:
    if method == "awq":
        return awq_dequantize(
            tensors["qweight"], tensors["qzeros"], tensors["scales"], params.get("group_size", 128)
        )
    return gptq_dequantize(
        tensors["qweight"],
        tensors["qzeros"],
        tensors["scales"],
        tensors["g_idx"],
        params.get("bits", 4),
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    family=st.sampled_from(["awq", "gptq"]),
    bits=st.sampled_from([4, 8]),
    group_size=st.sampled_from([32, 64, 128, -1]),
    sym=st.booleans(),
    desc_act=st.booleans(),
    n=st.sampled_from([64, 520, 1000]),
    seed=st.integers(0, 1000),
)
def test_writer_loader_round_trip(
    tmp_path_factory, family, bits, group_size, sym, desc_act, n, seed
):
    k = 256
    params = {"group_size": group_size, "sym": sym}
    if family == "gptq":
        params |= {"bits": bits, "desc_act": desc_act}
    weight = random_weight(n, k, seed)
    tensors = quantize(weight, family, **params)
    expected = expected_weight(family, tensors, params)
    # round to nearest: every weight within half a step of the original (plus fp16 rounding)
    scale = tensors["scales"].double().max()
    assert (expected.double() - weight.double()).abs().max() <= 0.5 * scale * 1.01 + 1e-3
    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt"), weight, family, **params)
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    for method in AWQ_METHODS if family == "awq" else GPTQ_METHODS:
        marlin_declines = method == "gptq_marlin" and (
            not sym or group_size not in (-1, 32, 64, 128)
        )
        if marlin_declines:
            with pytest.raises(ConfigError, match="gptq_marlin needs symmetric"):
                load_lm_head(folder, dtype=torch.float32, requested=method)
            continue
        head = load_lm_head(folder, dtype=torch.float32, requested=method)
        assert head.resolution.method == method and head.resolution.config is not None
        got = head_weight_t(head)
        assert torch.equal(got, expected.float().T), (method, cfg)


def test_act_order_scatters_g_idx_but_keeps_rows_in_place():
    weight = random_weight(64, 256)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    tensors = quantize(weight, "gptq", group_size=32, desc_act=True, perm=perm)
    g_idx = tensors["g_idx"]
    assert torch.equal(g_idx[perm], (torch.arange(256) // 32).to(torch.int32))
    assert torch.bincount(g_idx.long()).tolist() == [32] * 8
    plain = quantize(weight, "gptq", group_size=32)
    assert torch.equal(plain["g_idx"], (torch.arange(256) // 32).to(torch.int32))


@pytest.mark.parametrize(
    ("method", "params", "shapes"),
    [
        ("awq", {"group_size": 64}, {"qweight": (256, 125), "qzeros": (4, 125), "scales": (4, 1000)}),
        ("gptq", {"group_size": 64}, {"qweight": (32, 1000), "qzeros": (4, 125), "scales": (4, 1000), "g_idx": (256,)}),
        ("gptq", {"bits": 8, "group_size": -1}, {"qweight": (64, 1000), "qzeros": (1, 250), "scales": (1, 1000), "g_idx": (256,)}),
    ],
    ids=["awq-g64", "gptq-4bit-g64", "gptq-8bit-per-channel"],
)  # fmt: skip
def test_writer_shapes_follow_the_formats(method, params, shapes):
    tensors = quantize(random_weight(1000, 256), method, **params)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == shapes
    assert all(tensors[name].dtype == torch.int32 for name in ("qweight", "qzeros"))
    assert tensors["scales"].dtype == torch.float16


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("awq", {"bits": 8}, r"field 'bits' = 8: AWQ checkpoints are supported with 4-bit codes only"),
        ("awq", {"group_size": 96}, r"AWQ needs out % 8 == 0 and in % group_size == 0; got out=1000, in=256, group_size=96"),
        ("awq", {"desc_act": True}, r"awq writer: unsupported option\(s\) desc_act"),
        ("gptq", {"bits": 3}, r"field 'bits' = 3: supported GPTQ widths are 4 and 8"),
        ("gptq", {"perm": torch.arange(256)}, r"perm orders act-order groups; pass desc_act=True with it"),
        ("gptq", {"desc_act": True, "perm": torch.zeros(256, dtype=torch.int64)}, r"perm must be a permutation of range\(256\)"),
        ("gptq", {"checkpoint_format": "marlin"}, r"the 'marlin' GPTQ layout is not supported"),
        ("unquantized", {}, r"UnquantizedConfig has no writer"),
    ],
    ids=["awq-8bit", "awq-group-does-not-divide", "awq-desc-act", "gptq-3bit", "perm-without-desc-act", "perm-not-permutation", "marlin-format", "no-writer"],
)  # fmt: skip
def test_writer_errors(method, params, message):
    with pytest.raises(InputError, match=message):
        quantize(random_weight(1000, 256), method, **params)


def test_quantize_takes_a_2d_float_weight():
    with pytest.raises(
        InputError, match=r"quantize\(\) takes a 2-D float \[out, in\] weight; got \[10\]"
    ):
        quantize(torch.zeros(10), "gptq")
    with pytest.raises(quantreg.UnknownMethodError, match="did you mean 'gptq'"):
        quantize(torch.zeros(8, 8), "gptqq")


def test_write_checkpoint_never_overwrites(tmp_path):
    write_checkpoint(tmp_path, random_weight(64, 128), "gptq", group_size=32)
    with pytest.raises(
        CheckpointError, match=r"config.json exists; write_checkpoint never overwrites"
    ):
        write_checkpoint(tmp_path, random_weight(64, 128), "awq")


def test_write_checkpoint_writes_an_eagle3_drafter(tmp_path):
    d2t = torch.arange(64) * 2
    write_checkpoint(
        tmp_path,
        random_weight(64, 128),
        "gptq",
        group_size=32,
        d2t=d2t,
        vocab_size=200,
        bias=torch.ones(64),
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert (config["draft_vocab_size"], config["vocab_size"], config["hidden_size"]) == (
        64,
        200,
        128,
    )
    assert config["quantization_config"] == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "desc_act": False,
        "sym": True,
        "lm_head": True,
        "checkpoint_format": "gptq",
    }
    head = load_lm_head(tmp_path, dtype=torch.float32)
    assert head.has_bias and torch.equal(head.draft_to_target, torch.arange(64) * 3)


# -- the loader refuses bad tensors ------------------------------------------------------


def gptq_folder(tmp_path, **changes):
    tensors = {
        f"lm_head.{k}": v
        for k, v in quantize(random_weight(1000, 256), "gptq", group_size=64).items()
    }
    tensors.update(changes)
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "lm_head": True}
    return write_raw(tmp_path, config=llama_config(qcfg, hidden_size=256), tensors=tensors)


@pytest.mark.parametrize("method", GPTQ_METHODS)
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lm_head.g_idx": torch.full((256,), 4, dtype=torch.int32)}, r"lm_head.g_idx\[0\] = 4 is outside the 4 groups of lm_head.scales; 256 such entries"),
        ({"lm_head.scales": torch.full((4, 1000), float("nan"), dtype=torch.float16)}, r"lm_head.scales holds 4000 non-finite value\(s\) \(NaN or inf\)"),
        ({"lm_head.qweight": torch.zeros(1000, 32, dtype=torch.int32)}, r"lm_head.qweight: expected shape I32 \[32, 1000\], found I32 \[1000, 32\]"),
        ({"lm_head.qzeros": torch.zeros(4, 1000, dtype=torch.int32)}, r"lm_head.qzeros: expected shape I32 \[4, 125\], found I32 \[4, 1000\]"),
        ({"lm_head.qweight": torch.zeros(32, 1000, dtype=torch.float16)}, r"lm_head.qweight: expected dtype I32 \[32, 1000\], found F16"),
    ],
    ids=["g-idx-out-of-range", "nan-scales", "transposed-qweight", "unpacked-qzeros", "float-qweight"],
)  # fmt: skip
def test_bad_gptq_tensors(tmp_path, method, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load_lm_head(gptq_folder(tmp_path, **changes), dtype=torch.float32, requested=method)


def test_awq_transposed_layout_is_named(tmp_path):
    tensors = {
        f"lm_head.{k}": v
        for k, v in quantize(random_weight(1000, 256), "awq", group_size=64).items()
    }
    tensors["lm_head.qweight"] = tensors["lm_head.qweight"].T.contiguous()
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": 64, "lm_head": True}
    write_raw(tmp_path, config=llama_config(qcfg, hidden_size=256), tensors=tensors)
    with pytest.raises(
        CheckpointError,
        match=r"lm_head.qweight: expected shape I32 \[256, 125\], found I32 \[125, 256\]",
    ):
        load_lm_head(tmp_path, dtype=torch.float32)


# -- memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "method", "dtype"),
    [(f, m, d) for f, ms in (("awq", AWQ_METHODS), ("gptq", GPTQ_METHODS)) for m in ms for d in (torch.float32, torch.bfloat16)],
)  # fmt: skip
def test_a_4bit_g128_head_is_at_most_0_3x_its_bf16_size(tmp_path, family, method, dtype):
    n, k = 2048, 1024
    write_checkpoint(tmp_path, random_weight(n, k), family, group_size=128)
    head = load_lm_head(tmp_path, dtype=dtype, requested=method)
    assert head.resident_bytes() <= 0.3 * n * k * 2


MEMORY_SCRIPT = """
import resource, sys, torch, quantreg
torch.set_num_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
head = quantreg.load_lm_head(sys.argv[1], dtype=torch.float32, requested=sys.argv[2])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, head.resident_bytes())
"""


@pytest.mark.slow
def test_loading_never_holds_a_float_copy_of_the_whole_weight(tmp_path):
    """Each method loads in a fresh process (peak RSS is per process); the three processes
    run side by side."""
    folder = tmp_path / "big_gptq"
    n, k = 16384, 2048
    write_checkpoint(folder, random_weight(n, k), "gptq", group_size=128, desc_act=True)
    methods = ["gptq", "gptq_marlin", "cpu_wna16"]
    runs = {
        method: subprocess.Popen(
            [sys.executable, "-c", MEMORY_SCRIPT, str(folder), method],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for method in methods
    }
    float_copy = n * k * 4
    for method, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        peak_growth, resident = map(int, stdout.split())
        assert peak_growth < 0.5 * float_copy, (
            f"{method}: peak grew by {peak_growth / 2**20:.0f} MiB while loading"
        )
        assert resident <= 0.3 * n * k * 2, method


# -- quantreg quantize ------------------------------------------------------------------------


def test_quantize_checkpoint_keeps_everything_else(tmp_path):
    src = tmp_path / "src"
    weight = random_weight(1000, 256)
    write_raw(src, config=llama_config(hidden_size=256, custom_key=7), tensors={"lm_head.weight": weight, "fc.weight": torch.ones(4, 4), "d2t": torch.zeros(1000, dtype=torch.int64)}, extra_files={"tokenizer.json": "{}"})  # fmt: skip
    out = run_cli("quantize", str(src), str(tmp_path / "dst"), "--method", "gptq", "--bits", "8", "--group-size", "64", "--desc-act")  # fmt: skip
    assert out.returncode == 0, out.stderr
    dst = tmp_path / "dst"
    config = json.loads((dst / "config.json").read_text())
    assert config["custom_key"] == 7 and config["quantization_config"]["bits"] == 8
    assert config["quantization_config"]["desc_act"] is True
    tensors = load_file(str(dst / "model.safetensors"))
    assert torch.equal(tensors["fc.weight"], torch.ones(4, 4)) and "lm_head.weight" not in tensors
    assert (dst / "tokenizer.json").read_text() == "{}"
    head = load_lm_head(dst, dtype=torch.float32)
    assert head.resolution.method == "cpu_wna16"
    expected = gptq_dequantize(
        tensors["lm_head.qweight"],
        tensors["lm_head.qzeros"],
        tensors["lm_head.scales"],
        tensors["lm_head.g_idx"],
        8,
    )
    assert torch.equal(head_weight_t(head), expected.float().T)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda p: write_raw(p / "src", config=llama_config({"quant_method": "awq", "bits": 4, "group_size": 32}), tensors={"lm_head.weight": torch.zeros(8, 64)}), ConfigError, r"already declares quant_method 'awq'; quantreg quantize only quantizes the head of an unquantized checkpoint"),
        (lambda p: write_raw(p / "src", config=llama_config(), tensors={"fc.weight": torch.zeros(8, 64)}), CheckpointError, r"has no float 2-D lm_head.weight to quantize"),
        (lambda p: (write_raw(p / "src", config=llama_config(), tensors={"lm_head.weight": torch.zeros(8, 64)}), (p / "dst").mkdir(), (p / "dst" / "x").write_text("")), CheckpointError, r"dst is not empty; quantize writes into a new folder"),
    ],
    ids=["already-quantized", "no-head", "dst-not-empty"],
)  # fmt: skip
def test_quantize_checkpoint_errors(tmp_path, make, error, message):
    make(tmp_path)
    with pytest.raises(error, match=message):
        quantize_checkpoint(tmp_path / "src", tmp_path / "dst", "gptq")


def test_cli_quantize_error_exits_1(tmp_path):
    write_raw(
        tmp_path / "src", config=llama_config(), tensors={"lm_head.weight": torch.zeros(1000, 64)}
    )
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "awq", "--bits", "8")  # fmt: skip
    assert (
        out.returncode == 1 and "AWQ checkpoints are supported with 4-bit codes only" in out.stderr
    )
    assert "Traceback" not in out.stderr


# -- two ranks, vocab 1000 on dim 1 ---------------------------------------------------------


TWO_RANK_CASES = {
    "awq": ("awq", {"group_size": 64}, "awq"),
    "awq-cpu-wna16": ("awq", {"group_size": 64}, "cpu_wna16"),
    "gptq-act-order": ("gptq", {"group_size": 64, "desc_act": True}, "gptq"),
    "gptq-8bit-asym-cpu-wna16": ("gptq", {"bits": 8, "group_size": 32, "sym": False}, "cpu_wna16"),
    "gptq-marlin-act-order": ("gptq", {"group_size": 64, "desc_act": True}, "gptq_marlin"),
}  # fmt: skip


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Every case of the table loaded on two ranks, in one spawn."""
    root = tmp_path_factory.mktemp("two_ranks")
    jobs = {}
    for name, (family, params, method) in TWO_RANK_CASES.items():
        write_checkpoint(root / name, random_weight(1000, 64), family, **params)
        jobs[name] = (str(root / name), {"requested": method})
    return root, run_two_ranks(root, jobs)


@pytest.mark.parametrize("case", list(TWO_RANK_CASES))
def test_two_ranks_with_vocab_1000_match_one_process(two_rank_runs, case):
    root, runs = two_rank_runs
    single = load_lm_head(root / case, dtype=torch.float32, requested=TWO_RANK_CASES[case][2])
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    expected = single.compute_logits(x)
    for got in runs[case]:
        torch.testing.assert_close(got["logits"], expected, rtol=1e-6, atol=1e-6)


BODY = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "midlayer.fc"]


@pytest.mark.parametrize(
    ("method", "params", "key"),
    [("awq", {"group_size": 64}, "modules_to_not_convert"),
     ("gptq", {"group_size": 64, "desc_act": True}, "dynamic"),
     ("compressed-tensors", {"format": "pack-quantized", "bits": 4, "group_size": 64}, "config_groups")],
    ids=["awq", "gptq", "compressed-tensors"],
)  # fmt: skip
def test_a_quantized_head_is_the_only_layer_the_written_config_quantizes(tmp_path, method, params, key):  # fmt: skip
    """The config names what stays float in the keys engines read, so that vLLM (without the
    plugin), transformers and quantreg agree -- also for modules an engine renames."""
    tensors = {f"{m}.weight": torch.zeros(128, 128, dtype=torch.float16) for m in BODY}
    tensors["lm_head.weight"] = random_weight(1000, 128)
    write_raw(tmp_path / "src", config=llama_config(hidden_size=128), tensors=tensors)
    quantize_checkpoint(tmp_path / "src", tmp_path / "dst", method, **params)
    qcfg = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    assert qcfg[key]
    assert resolve(tmp_path / "dst", platform="cpu").quantized
    renamed = ["layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj", "layers.0.fc"]
    for prefix in [*BODY, *renamed]:
        res = resolve(tmp_path / "dst", platform="cpu", prefix=prefix)
        assert not res.quantized, (prefix, res.rule)


def test_the_cli_says_what_quantize_did(tmp_path):
    write_raw(tmp_path / "src", config=llama_config(), tensors={"lm_head.weight": random_weight(1000, 64), "model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64)})  # fmt: skip
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "awq", "--group-size", "64")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "lm_head quantized with awq by round-to-nearest (no calibration data)" in out.stdout
    assert '"group_size": 64' in out.stdout and 'modules_to_not_convert: ["up_proj"]' in out.stdout

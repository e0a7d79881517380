"""load_lm_head: resolve, validate every tensor before reading, load this rank's slice."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from ckpt import awq_head, float_head, llama_config, write_checkpoint
from cli_runner import run_cli
from safetensors.torch import load_file, save_file

import quantreg
from quantreg import CheckpointError, ConfigError, InputError, load_lm_head
from quantreg.loading import parse_dtype

FIXTURES = Path(__file__).parent / "fixtures" / "producers"


def random_head(
    n: int = 1000,
    k: int = 64,
    dtype: torch.dtype = torch.float16,
    bias: bool = False,
    seed: int = 0,
):
    gen = torch.Generator().manual_seed(seed)
    tensors = {"lm_head.weight": torch.randn(n, k, generator=gen).to(dtype)}
    if bias:
        tensors["lm_head.bias"] = torch.randn(n, generator=gen).to(dtype)
    return tensors


def reference_logits(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = x.double() @ tensors["lm_head.weight"].double().T
    if "lm_head.bias" in tensors:
        out = out + tensors["lm_head.bias"].double()
    return out


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)],
    ids=["fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shards", [1, 3], ids=["single-file", "sharded"])
def test_unquantized_head_end_to_end(tmp_path, dtype, rtol, bias, shards):
    tensors = random_head(bias=bias)
    write_checkpoint(
        tmp_path,
        config=llama_config(),
        tensors={**tensors, "fc.weight": torch.zeros(4, 4)},
        shards=shards,
    )
    head = load_lm_head(tmp_path, dtype=dtype)
    assert head.resolution.method is None and head.params_dtype == dtype and head.has_bias is bias
    x = torch.randn(5, 64)
    logits = head.compute_logits(x.to(dtype))
    assert logits.shape == (5, 1000) and logits.dtype == dtype
    ref = reference_logits(tensors, x.to(dtype).double())
    assert ((logits.double() - ref).abs().max() / ref.abs().max()).item() < rtol


@pytest.mark.parametrize(
    ("config", "tensors", "expected"),
    [
        ({"torch_dtype": "bfloat16"}, random_head(dtype=torch.float16), torch.bfloat16),
        (
            {"dtype": "float32", "torch_dtype": "float16"},
            random_head(dtype=torch.float16),
            torch.float32,
        ),
        ({"torch_dtype": None}, random_head(dtype=torch.float16), torch.float16),
        ({"torch_dtype": "auto"}, random_head(dtype=torch.bfloat16), torch.bfloat16),
    ],
    ids=["torch-dtype", "dtype-wins", "from-tensor", "auto-from-tensor"],
)
def test_default_dtype(tmp_path, config, tensors, expected):
    write_checkpoint(tmp_path, config={**llama_config(), **config}, tensors=tensors)
    assert load_lm_head(tmp_path).params_dtype == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("torch.float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=["float32", "bf16", "torch-prefix", "dtype"],
)
def test_parse_dtype(value, expected):
    assert parse_dtype(value) is expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("int8", r"unsupported dtype 'int8': expected float32, float16 or bfloat16"),
        (torch.float64, r"unsupported dtype torch.float64"),
        (3, r"dtype must be a torch.dtype or a string, got 3"),
    ],
    ids=["int8", "float64", "number"],
)
def test_parse_dtype_rejects(value, message):
    with pytest.raises(InputError, match=message):
        parse_dtype(value)


def test_geometry_from_config_or_tensor(tmp_path):
    write_checkpoint(tmp_path, config={"architectures": ["X"]}, tensors=random_head(n=300, k=32))
    head = load_lm_head(tmp_path, dtype="float32")
    assert (head.num_embeddings, head.embedding_dim) == (300, 32)


def test_nested_text_config_geometry(tmp_path):
    write_checkpoint(
        tmp_path,
        config={"text_config": {"vocab_size": 1000, "hidden_size": 64}},
        tensors=random_head(),
    )
    assert load_lm_head(tmp_path, dtype="float32").num_embeddings == 1000


# -- every bad checkpoint is refused before anything is read -----------------------------


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        (llama_config(hidden_size=128), random_head(), r"lm_head.weight: expected shape F32 \[1000, 128\], found F16 \[1000, 64\] in model.safetensors"),
        (llama_config(vocab_size=1024), random_head(), r"lm_head.weight: expected shape F32 \[1024, 64\], found F16 \[1000, 64\]"),
        (llama_config(), {"lm_head.weight": torch.zeros(64, 1000, dtype=torch.float16)}, r"expected shape F32 \[1000, 64\], found F16 \[64, 1000\]"),
        (llama_config(), {"lm_head.weight": torch.zeros(1000, 64, dtype=torch.int32)}, r"lm_head.weight: expected dtype F32 \[1000, 64\], found I32"),
        (llama_config(), {"lm_head.bias": torch.zeros(1000)}, r"missing lm_head.weight: expected F32 \[1000, 64\]"),
        (llama_config(), {**random_head(), "lm_head.bias": torch.zeros(999)}, r"lm_head.bias: expected shape F32 \[1000\], found F32 \[999\]"),
        (llama_config(), awq_head(n=1000, k=64), r"missing lm_head.weight.*\n.*present but not expected: lm_head.qweight, lm_head.qzeros, lm_head.scales"),
    ],
    ids=["hidden-size-mismatch", "vocab-mismatch", "transposed", "int-weight", "missing-weight", "bias-shape", "quantized-tensors-on-an-unquantized-head"],
)  # fmt: skip
def test_mismatched_tensors_are_reported_all_at_once(tmp_path, config, tensors, message):
    write_checkpoint(tmp_path, config=config, tensors=tensors)
    with pytest.raises(CheckpointError, match=message) as info:
        load_lm_head(tmp_path, dtype="float32")
    assert "the lm_head tensors do not match 'lm_head' resolved as unquantized" in str(info.value)
    assert "model.safetensors" in str(info.value)
    with pytest.raises(CheckpointError, match=message):  # the same check, headers only
        quantreg.check_lm_head(quantreg.resolve(tmp_path), dtype="float32")


# -- check_lm_head: the header check alone, for engines that load the weights themselves ---

QUANTIZED_FIXTURES = sorted(
    p.name for p in FIXTURES.iterdir()
    if p.is_dir() and any(n.startswith("lm_head.q") or n.startswith("lm_head.weight_")
                          for n in load_file(p / "model.safetensors"))
)  # fmt: skip


@pytest.mark.parametrize("fixture", QUANTIZED_FIXTURES)
def test_check_lm_head_passes_every_producer_head(fixture):
    resolution = quantreg.resolve(FIXTURES / fixture)
    assert resolution.quantized
    assert quantreg.check_lm_head(resolution) is None


def test_check_lm_head_names_a_missing_tensor(tmp_path):
    tensors = load_file(FIXTURES / "gptq_gptqmodel_lmhead_desc_act" / "model.safetensors")
    del tensors["lm_head.g_idx"]
    config = json.loads((FIXTURES / "gptq_gptqmodel_lmhead_desc_act" / "config.json").read_text())
    write_checkpoint(tmp_path, config=config, tensors=tensors)
    with pytest.raises(
        CheckpointError,
        match=r"lm_head tensors do not match 'lm_head' resolved as cpu_wna16 .*\n  - missing lm_head\.g_idx: expected I32 \[64\]",
    ) as info:
        quantreg.check_lm_head(quantreg.resolve(tmp_path, platform="cpu"))
    assert info.value.path == tmp_path / "model.safetensors" or str(info.value.path).endswith(
        "model.safetensors"
    )


def test_check_lm_head_allocates_nothing_for_an_absurd_config(tmp_path):
    """A config claiming a 2^30 x 16384 AWQ head over small tensors: refused from the
    headers (the head is built on the meta device; materialized it would need terabytes)."""
    config = llama_config({"quant_method": "awq", "bits": 4, "group_size": 32, "lm_head": True},
                          vocab_size=2**30, hidden_size=16384)  # fmt: skip
    write_checkpoint(tmp_path, config=config, tensors=awq_head(n=1024, k=64))
    with pytest.raises(
        CheckpointError, match=r"lm_head\.qweight: expected shape I32 \[16384, 134217728\]"
    ):
        quantreg.check_lm_head(quantreg.resolve(tmp_path))


def test_check_lm_head_needs_a_resolution_of_a_folder():
    resolution = quantreg.resolve({"quant_method": "awq", "bits": 4, "group_size": 32})
    with pytest.raises(
        InputError,
        match=r"check_lm_head takes a Resolution from quantreg\.resolve\(<checkpoint folder>\)",
    ):
        quantreg.check_lm_head(resolution)


def test_unconsumed_head_tensors_name_the_rule(tmp_path):
    tensors = {**random_head(), "lm_head.qweight": torch.zeros(64, 125, dtype=torch.int32)}
    write_checkpoint(
        tmp_path,
        config=llama_config({"quant_method": "awq", "bits": 4, "group_size": 32}),
        tensors=tensors,
    )
    with pytest.raises(
        CheckpointError,
        match=r"no parameter consumes lm_head.qweight; 'lm_head' resolved as unquantized \(lm_head: false \(absent\)",
    ) as info:
        load_lm_head(tmp_path, dtype="float32")
    assert info.value.tensor == "lm_head.qweight"


def test_strict_false_only_warns_about_unconsumed_tensors(tmp_path, caplog):
    tensors = {**random_head(), "lm_head.extra": torch.zeros(3)}
    write_checkpoint(tmp_path, config=llama_config(), tensors=tensors)
    with caplog.at_level(logging.WARNING, logger="quantreg.loading"):
        head = load_lm_head(tmp_path, dtype="float32", strict=False)
    assert head.num_embeddings == 1000
    assert "no parameter consumes lm_head.extra" in caplog.text and "strict=False" in caplog.text


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda p: (p / "config.json").write_text("{oops"), ConfigError, r"config file .*config.json is not valid JSON"),
        (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]), CheckpointError, r"model.safetensors: tensor 'lm_head.weight': data_offsets .* fall outside"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 4), CheckpointError, r"model.safetensors: truncated safetensors file"),
        (lambda p: ((p / "model.safetensors").rename(p / "model-1.safetensors"), (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../model-1.safetensors"}}))), CheckpointError, r"model.safetensors.index.json entry 'lm_head.weight': file name '../model-1.safetensors' must be a plain relative name"),
        (lambda p: (p / "model.safetensors").unlink(), CheckpointError, r"has no safetensors weights"),
        (lambda p: ((p / "model.safetensors").unlink(), (p / "pytorch_model.bin").write_bytes(b"x")), CheckpointError, r"pickle checkpoints are not read"),
        (lambda p: (p / "config.json").write_text(json.dumps(llama_config(vocab_size=0))), ConfigError, r"field 'vocab_size' = 0: expected a positive integer"),
        (lambda p: (p / "config.json").write_text(json.dumps(llama_config(hidden_size="64"))), ConfigError, r"field 'hidden_size' = '64': expected a positive integer"),
    ],
    ids=["config-not-json", "truncated-data", "truncated-header", "index-escapes-folder", "no-weights", "pickle-only", "zero-vocab", "hidden-size-string"],
)  # fmt: skip
def test_broken_checkpoints_name_the_file_and_leave_it_unchanged(tmp_path, damage, error, message):
    write_checkpoint(tmp_path, config=llama_config(), tensors=random_head())
    damage(tmp_path)
    before = digest(tmp_path)
    with pytest.raises(error, match=message):
        load_lm_head(tmp_path, dtype="float32")
    assert digest(tmp_path) == before


def test_geometry_that_nothing_tells_is_an_error(tmp_path):
    write_checkpoint(tmp_path, config={"architectures": ["X"]}, tensors=awq_head())
    with pytest.raises(
        CheckpointError,
        match=r"cannot tell the lm_head size: config.json has no draft_vocab_size / vocab_size",
    ):
        load_lm_head(tmp_path)


def test_producer_fixture_ct_head_in_ignore_beside_a_quantized_fc():
    folder = FIXTURES / "ct_ignore_lmhead"
    head = load_lm_head(folder, dtype=torch.float32)
    assert head.resolution.method is None and head.resolution.rule.startswith("ignore 'lm_head'")
    weight = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
    x = torch.randn(4, 64)
    torch.testing.assert_close(
        head.compute_logits(x).double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5
    )


# -- command line --------------------------------------------------------------------------


def test_cli_run_hidden_out(tmp_path):
    tensors = random_head(bias=True)
    write_checkpoint(tmp_path / "ckpt", config=llama_config(), tensors=tensors)
    x = torch.randn(3, 64)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    out = run_cli(
        "run",
        str(tmp_path / "ckpt"),
        "--hidden",
        str(tmp_path / "x.safetensors"),
        "--out",
        str(tmp_path / "o.safetensors"),
        "--dtype",
        "float32",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {
        "method", "kernel", "kernel_reason", "activation_dtype", "load_s", "forward_s",
        "resident_bytes", "top5", "tp_size", "resident_bytes_per_rank",
    }  # fmt: skip
    assert data["activation_dtype"] is None
    assert data["method"] is None and data["resident_bytes"] == (1024 * 64 + 1024) * 4
    assert data["kernel"] == "dense" and "F.linear" in data["kernel_reason"]
    logits = load_file(str(tmp_path / "o.safetensors"))["logits"]
    ref = reference_logits(tensors, x)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-4)
    assert data["top5"] == ref.topk(5).indices.tolist()


def test_cli_run_text_with_random_tokens(tmp_path):
    write_checkpoint(tmp_path, config=llama_config(), tensors=random_head())
    out = run_cli("run", str(tmp_path), "--tokens", "2")
    assert out.returncode == 0, out.stderr
    assert "method: unquantized" in out.stdout and out.stdout.count("top-5 ids") == 2


@pytest.mark.parametrize(
    ("make_hidden", "message"),
    [
        (lambda p: save_file({"y": torch.zeros(2, 64)}, str(p)), r"has no tensor 'x' \(found: y\)"),
        (lambda p: save_file({"x": torch.zeros(2, 32)}, str(p)), r"tensor 'x' has 32 features; the head expects hidden size 64"),
        (lambda p: save_file({"x": torch.zeros(64)}, str(p)), r"tensor 'x' must be a 2-D float \[tokens, hidden\] tensor"),
        (lambda p: p.write_bytes(b"junk"), r"cannot read .*x.safetensors"),
    ],
    ids=["no-x", "wrong-hidden", "1-d", "not-safetensors"],
)  # fmt: skip
def test_cli_run_bad_hidden_exits_1(tmp_path, make_hidden, message):
    write_checkpoint(tmp_path / "ckpt", config=llama_config(), tensors=random_head())
    make_hidden(tmp_path / "x.safetensors")
    out = run_cli("run", str(tmp_path / "ckpt"), "--hidden", str(tmp_path / "x.safetensors"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("quantreg: error:")
    import re

    assert re.search(message, out.stderr), out.stderr


def test_cli_run_broken_checkpoint_exits_1(tmp_path):
    write_checkpoint(tmp_path, config=llama_config(), tensors=random_head())
    (tmp_path / "model.safetensors").write_bytes(b"\x01")
    out = run_cli("run", str(tmp_path))
    assert out.returncode == 1 and "model.safetensors: truncated safetensors file" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_inspect_json(tmp_path):
    write_checkpoint(
        tmp_path,
        config=llama_config({"quant_method": "awq", "bits": 4, "group_size": 32, "lm_head": True}),
        tensors={**awq_head(), **float_head(prefix="fc")},
    )
    out = run_cli("inspect", str(tmp_path), "--json", "--platform", "cuda:9.0")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["method"] == "awq_marlin" and data["config"]["quantization_config"]["bits"] == 4
    by_name = {t["name"]: t for t in data["tensors"]}
    assert by_name["lm_head.qweight"] == {
        "name": "lm_head.qweight",
        "dtype": "I32",
        "shape": [64, 128],
        "bytes": 64 * 128 * 4,
        "quantized": True,
        "file": "model.safetensors",
    }
    assert by_name["fc.weight"]["quantized"] is False


def test_cli_inspect_text(tmp_path):
    write_checkpoint(tmp_path, config=llama_config(), tensors=random_head())
    out = run_cli("inspect", str(tmp_path))
    assert out.returncode == 0 and "lm_head -> unquantized (no quantization_config)" in out.stdout


def test_public_load_lm_head_is_the_loader():
    assert quantreg.load_lm_head is load_lm_head

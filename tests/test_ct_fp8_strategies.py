"""compressed-tensors float8 with strategy ``tensor`` and ``channel``: static activations (an
``input_scale``, as RedHatAI's FP8 checkpoints store it) are read weight-only; the library's own
decompress agrees with quantreg's head; quantreg's writer (``--strategy``) is read back by the
library, by ``load_lm_head`` and by ``quantreg run``; a bad ``input_scale`` is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from ckpt import llama_config
from ckpt import write_checkpoint as write_raw
from cli_runner import run_cli
from ct_library import compress_head, library_decompress
from safetensors.torch import load_file, save_file

from quantreg import CheckpointError, load_lm_head

VOCAB, HIDDEN = 1000, 128
STATIC_TENSOR_ACTS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}  # fmt: skip


def fp8_scheme(strategy: str, acts: dict | None) -> dict:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy}
    return {"targets": ["lm_head"], "weights": weights, "input_activations": acts}


def weight(dtype: torch.dtype, seed: int = 0, shape=(VOCAB, HIDDEN)) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def weight_t(head) -> torch.Tensor:
    return head.compute_logits(torch.eye(head.embedding_dim))


# W8A8-FP8 with static per-tensor activations (llm-compressor's FP8 preset on channel and tensor
# weights): compressed by the library, which also decompresses the reference.
LIBRARY = {
    "channel-static-bf16": (fp8_scheme("channel", STATIC_TENSOR_ACTS), torch.bfloat16),
    "tensor-static-fp16": (fp8_scheme("tensor", STATIC_TENSOR_ACTS), torch.float16),
    "tensor-weight-only-bf16": (fp8_scheme("tensor", None), torch.bfloat16),
}


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_tensor_and_channel_heads_match_its_decompress(tmp_path, name):
    scheme, dtype = LIBRARY[name]
    reference = compress_head(tmp_path, weight(dtype), scheme)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.input_scale" in stored) == (scheme["input_activations"] is not None)
    head = load_lm_head(tmp_path, dtype=torch.float32)
    assert (head.resolution.method, head.quantized) == ("compressed-tensors", True)
    assert torch.equal(weight_t(head).T, reference.float())
    if scheme["input_activations"] is not None:
        note = "static: its input_scale is checked (finite, positive) but not applied"
        assert any(note in n for n in head.resolution.notes), head.resolution.notes


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), r"lm_head.input_scale holds 1 non-finite value"),
        (0.0, r"lm_head.input_scale holds 1 scale\(s\) <= 0, the first 0"),
        (-0.5, r"lm_head.input_scale holds 1 scale\(s\) <= 0, the first -0.5"),
    ],
    ids=["nan", "zero", "negative"],
)
def test_a_bad_static_input_scale_is_refused_by_name(tmp_path, value, message):
    compress_head(tmp_path, weight(torch.float16), LIBRARY["tensor-static-fp16"][0])
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["lm_head.input_scale"] = torch.full_like(tensors["lm_head.input_scale"], value)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_lm_head(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize(
    ("strategy", "scale_shape"),
    [("tensor", (1,)), ("channel", (VOCAB, 1)), ("block", (8, 3))],
    ids=["tensor", "channel", "block"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cli_strategy_reads_back_in_the_library_and_runs(tmp_path, strategy, scale_shape, dtype):
    w = weight(dtype, seed=4, shape=(VOCAB, 300))
    config = llama_config(hidden_size=300, vocab_size=VOCAB, torch_dtype=str(dtype)[6:])
    write_raw(tmp_path / "src", config=config, tensors={"lm_head.weight": w})
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "compressed-tensors", "--format", "float-quantized", "--strategy", strategy)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"strategy {strategy}" in out.stdout
    tensors = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert tensors["lm_head.weight"].dtype == torch.float8_e4m3fn
    assert (tensors["lm_head.weight_scale"].dtype, tuple(tensors["lm_head.weight_scale"].shape)) == (dtype, scale_shape)  # fmt: skip
    qcfg = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["weights"]["strategy"] == strategy
    reference = library_decompress(tmp_path / "dst", dtype)
    assert (reference.double() - w.double()).abs().max() < 0.02
    head = load_lm_head(tmp_path / "dst", dtype=torch.float32)
    assert torch.equal(weight_t(head).T, reference.float())
    ran = run_cli("run", str(tmp_path / "dst"), "--tokens", "4", "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["method"] == "compressed-tensors"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "float-quantized", "--strategy", "group"], r"strategy 'group' is not supported for float-quantized"),
        (["--format", "pack-quantized", "--strategy", "block"], r"strategy 'block' is not supported for pack-quantized"),
        (["--format", "float-quantized", "--strategy", "row"], r"strategy 'row' is not supported"),
    ],
    ids=["float-group", "int-block", "unknown"],
)  # fmt: skip
def test_cli_strategy_errors(tmp_path, args, message):
    write_raw(tmp_path / "src", config=llama_config(hidden_size=128, vocab_size=256),
              tensors={"lm_head.weight": weight(torch.float16, shape=(256, 128))})  # fmt: skip
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "compressed-tensors", *args)  # fmt: skip
    assert out.returncode == 1 and re.search(message, out.stderr), out.stderr


def test_fp8_writer_has_no_strategy_option(tmp_path):
    write_raw(tmp_path / "src", config=llama_config(hidden_size=128, vocab_size=256),
              tensors={"lm_head.weight": weight(torch.float16, shape=(256, 128))})  # fmt: skip
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "fp8", "--strategy", "tensor")  # fmt: skip
    assert out.returncode == 1
    assert "fp8 writer: no 'strategy' option (its options: format, block_size); writers with 'strategy': compressed-tensors" in out.stderr, out.stderr  # fmt: skip

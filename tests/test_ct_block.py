"""compressed-tensors float8 with strategy ``block``: the library's own checkpoints bit for bit,
shards whose boundary cuts a block, quantreg's writer read back by the library, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from ckpt import llama_config
from ckpt import write_checkpoint as write_raw
from cli_runner import run_cli
from ct_library import compress_head, library_decompress
from safetensors.torch import load_file
from two_ranks import run_two_ranks

from quantreg import (
    CheckpointError,
    ConfigError,
    InputError,
    load_lm_head,
    quantize,
    write_checkpoint,
)

# (block_structure, [vocab, hidden], dtype): ragged sizes leave a partial last block.
LIBRARY_CASES = {
    "128x128-ragged-bf16": ([128, 128], (1088, 300), torch.bfloat16),
    "128x128-ragged-fp16": ([128, 128], (1000, 200), torch.float16),
    "64x32-even-bf16": ([64, 32], (1024, 128), torch.bfloat16),
    "100x48-odd-fp16": ([100, 48], (1000, 100), torch.float16),
    "block-wider-than-head": ([128, 128], (100, 64), torch.bfloat16),
}


def block_scheme(block: list[int]) -> dict:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block"}
    return {"targets": ["lm_head"], "weights": {**weights, "block_structure": block}}


def weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def weight_t(head) -> torch.Tensor:
    return head.compute_logits(torch.eye(head.embedding_dim))


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ct_block")
    out = {}
    for name, (block, shape, dtype) in LIBRARY_CASES.items():
        out[name] = (
            root / name,
            compress_head(root / name, weight(shape, dtype), block_scheme(block)),
        )
    return out


@pytest.mark.parametrize("name", sorted(LIBRARY_CASES))
def test_library_block_checkpoints_load_bit_for_bit(library, name):
    folder, reference = library[name]
    head = load_lm_head(folder, dtype=torch.float32)
    assert head.resolution.method == "compressed-tensors" and head.kernel.name == "reference"
    assert torch.equal(weight_t(head).T, reference.float())


# vocab 1088 on two ranks: 544 rows each, so the 128-row block 4 (rows 512..639) is cut.
TWO_RANK_CASES = ["128x128-ragged-bf16", "100x48-odd-fp16"]


def test_two_ranks_share_the_block_their_boundary_cuts(library, tmp_path):
    jobs = {name: (str(library[name][0]), {}) for name in TWO_RANK_CASES}
    runs = run_two_ranks(tmp_path, jobs)
    for name in TWO_RANK_CASES:
        reference = library[name][1]
        x = torch.randn(6, reference.shape[1], generator=torch.Generator().manual_seed(0))
        expected = x @ reference.float().T
        for got in runs[name]:
            assert torch.allclose(got["logits"], expected, rtol=1e-5, atol=1e-6)


# -- quantreg's writer, read back by compressed-tensors ------------------------------------------


@pytest.mark.parametrize(
    ("block", "shape"),
    [((128, 128), (1000, 300)), ((64, 32), (1000, 128)), ((7, 5), (100, 64))],
    ids=["128x128-ragged", "64x32", "7x5-odd"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_writer_output_reads_back_in_compressed_tensors(tmp_path, block, shape, dtype):
    w = weight(shape, dtype, seed=3)
    write_raw(
        tmp_path / "src",
        config=llama_config(hidden_size=shape[1], vocab_size=shape[0], torch_dtype=str(dtype)[6:]),
        tensors={"lm_head.weight": w},
    )
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "compressed-tensors", "--format", "float-quantized", "--block-size", "x".join(map(str, block)))  # fmt: skip
    assert out.returncode == 0, out.stderr
    tensors = load_file(str(tmp_path / "dst" / "model.safetensors"))
    scale = tensors["lm_head.weight_scale"]
    assert scale.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    assert tensors["lm_head.weight"].dtype == torch.float8_e4m3fn and scale.dtype == dtype
    reference = library_decompress(tmp_path / "dst", dtype)
    assert (reference.double() - w.double()).abs().max() < 0.02
    head = load_lm_head(tmp_path / "dst", dtype=torch.float32)
    assert torch.equal(weight_t(head).T, reference.float())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"format": "pack-quantized", "block_structure": [128, 128]}, r"strategy 'block' is not supported for pack-quantized"),
        ({"format": "float-quantized", "strategy": "channel", "block_structure": [128, 128]}, r"block_size needs strategy 'block'"),
        ({"format": "float-quantized", "block_structure": [128]}, r"block size: expected \[rows, cols\]"),
        ({"format": "float-quantized", "block_structure": [0, 128]}, r"block size: expected \[rows, cols\]"),
    ],
    ids=["int-format", "strategy-channel", "one-number", "zero-rows"],
)  # fmt: skip
def test_writer_errors(params, message):
    with pytest.raises(InputError, match=message):
        quantize(weight((256, 128), torch.float16), "compressed-tensors", **params)


# -- bad checkpoints ------------------------------------------------------------------------------


def bad_folder(tmp_path, *, weights=None, **tensors) -> object:
    """A 1000 x 200 block checkpoint by quantreg's writer with ``tensors`` replaced and the
    weights' config fields updated by ``weights`` (``"drop"``: removed)."""
    src = tmp_path / "src"
    write_checkpoint(src, weight((1000, 200), torch.float16), "compressed-tensors", format="float-quantized", block_structure=(128, 128))  # fmt: skip
    data = load_file(str(src / "model.safetensors"))
    data.update({f"lm_head.{k}": v for k, v in tensors.items()})
    config = json.loads((src / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    changed = {**group["weights"], **(weights or {})}
    group["weights"] = {k: v for k, v in changed.items() if v != "drop"}
    return write_raw(tmp_path / "ckpt", config=config, tensors=data)


def nan_codes() -> torch.Tensor:
    codes = weight((1000, 200), torch.float16).to(torch.float8_e4m3fn)
    codes.view(torch.uint8)[700, 3] = 0x7F
    return codes


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"weight_scale": torch.ones(8, 1, dtype=torch.float16)}, CheckpointError, r"lm_head.weight_scale: expected shape F\d+ \[8, 2\], found F16 \[8, 1\]"),
        ({"weight_scale": torch.full((8, 2), float("nan"), dtype=torch.float16)}, CheckpointError, r"lm_head.weight_scale holds 16 non-finite value\(s\)"),
        ({"weight_scale": torch.full((8, 2), 60000.0, dtype=torch.float16)}, CheckpointError, r"lm_head.weight_scale: scale 60000 .* beyond 65504"),
        ({"weight": nan_codes()}, CheckpointError, r"lm_head.weight holds 1 NaN float8 code\(s\) .* first at \[700, 3\]"),
        ({"weights": {"block_structure": [128]}}, ConfigError, r"block_structure.*expected \[rows, cols\]"),
        ({"weights": {"block_structure": [0, 128]}}, ConfigError, r"block_structure.*expected \[rows, cols\]"),
        ({"weights": {"block_structure": [128.0, 128]}}, ConfigError, r"block_structure"),
        ({"weights": {"block_structure": "drop"}}, ConfigError, r"strategy 'block' needs a block_structure"),
        ({"weights": {"type": "int"}}, ConfigError, r"float-quantized weights must be 8-bit float; got int8"),
    ],
    ids=["scale-shape", "nan-scale", "overflowing-scale", "nan-code", "block-one-number", "zero-block", "float-block", "no-block-structure", "int-block"],
)  # fmt: skip
def test_bad_block_checkpoints_are_refused_naming_the_tensor_or_field(
    tmp_path, changes, error, message
):
    folder = bad_folder(tmp_path, **changes)
    with pytest.raises(error, match=message):
        load_lm_head(folder, dtype=torch.float32)


def test_block_config_is_what_compressed_tensors_validates(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    write_checkpoint(tmp_path, weight((256, 128), torch.float16), "compressed-tensors", format="float-quantized", block_structure=(64, 32))  # fmt: skip
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate({k: v for k, v in qcfg.items() if k != "quant_method"})  # fmt: skip
    assert parsed.config_groups["group_0"].weights.block_structure == [64, 32]
    assert parsed.config_groups["group_0"].weights.strategy == "block"

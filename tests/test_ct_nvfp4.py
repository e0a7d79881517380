"""compressed-tensors ``nvfp4-pack-quantized``: the library's own checkpoints bit for bit (the
global scale divides the group scales; the result is bfloat16), two ranks, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from ct_library import compress_head
from safetensors.torch import load_file, save_file
from two_ranks import run_two_ranks

from quantreg import CheckpointError, ConfigError, load_lm_head

NVFP4 = {"preset": "NVFP4A16", "targets": ["lm_head"]}
CASES = {
    "bf16-1000x256": ((1000, 256), torch.bfloat16),
    "fp16-1000x160": ((1000, 160), torch.float16),
    "bf16-1088x48": ((1088, 48), torch.bfloat16),
}


def weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nvfp4")
    return {
        name: (root / name, compress_head(root / name, weight(shape, dtype), NVFP4))
        for name, (shape, dtype) in CASES.items()
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_library_nvfp4_checkpoints_load_bit_for_bit(library, name):
    folder, reference = library[name]
    assert reference.dtype == torch.bfloat16  # the library's decompress ends in bf16
    head = load_lm_head(folder, dtype=torch.float32)
    assert (head.resolution.method, head.kernel.name) == ("compressed-tensors", "reference")
    assert torch.equal(head.compute_logits(torch.eye(head.embedding_dim)).T, reference.float())


def test_two_ranks(library, tmp_path):
    folder, reference = library["bf16-1088x48"]
    runs = run_two_ranks(tmp_path, {"nvfp4": (str(folder), {})})
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(0))
    expected = x @ reference.float().T
    for got in runs["nvfp4"]:
        assert torch.allclose(got["logits"], expected, rtol=1e-5, atol=1e-6)


def edited(library, tmp_path, qcfg_weights=None, **tensors):
    """The bf16 1000 x 256 library checkpoint with tensors replaced / config fields changed."""
    folder = library["bf16-1000x256"][0]
    data = load_file(str(folder / "model.safetensors"))
    data.update({f"lm_head.{k}": v for k, v in tensors.items()})
    config = json.loads((folder / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["weights"].update(qcfg_weights or {})
    save_file(data, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def nan_scale_code() -> torch.Tensor:
    scale = torch.ones(1000, 16).to(torch.float8_e4m3fn)
    scale.view(torch.uint8)[5, 2] = 0x7F
    return scale


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"weight_global_scale": torch.zeros(1)}, CheckpointError, r"lm_head.weight_global_scale = 0.0; expected a finite non-zero"),
        ({"weight_global_scale": torch.full((1,), float("inf"))}, CheckpointError, r"lm_head.weight_global_scale holds 1 non-finite value\(s\)"),
        ({"weight_global_scale": torch.full((1,), 1e-38)}, CheckpointError, r"lm_head.weight_scale / lm_head.weight_global_scale .* beyond the largest finite bfloat16"),
        ({"weight_scale": nan_scale_code()}, CheckpointError, r"lm_head.weight_scale holds 1 NaN float8 code\(s\) .* first at \[5, 2\]"),
        ({"weight_scale": torch.ones(1000, 8).to(torch.float8_e4m3fn)}, CheckpointError, r"lm_head.weight_scale: expected shape F8_E4M3 \[1000, 16\], found F8_E4M3 \[1000, 8\]"),
        ({"weight_packed": torch.zeros(1000, 256, dtype=torch.uint8)}, CheckpointError, r"lm_head.weight_packed: expected shape U8 \[1000, 128\], found U8 \[1000, 256\]"),
        ({"qcfg_weights": {"group_size": 32}}, ConfigError, r"nvfp4-pack-quantized weights must be \('float', 4, 'tensor_group', 16\)"),
    ],
    ids=["zero-global-scale", "inf-global-scale", "overflowing-scales", "nan-scale-code", "scale-shape", "packed-shape", "group-32"],
)  # fmt: skip
def test_bad_nvfp4_checkpoints_are_refused_naming_the_tensor(library, tmp_path, change, error, message):  # fmt: skip
    with pytest.raises(error, match=message):
        load_lm_head(edited(library, tmp_path, **change), dtype=torch.float32)

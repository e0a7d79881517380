"""compressed-tensors heads: every supported format, the library's own output, TP shards."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from ckpt import llama_config
from ckpt import write_checkpoint as write_raw
from cli_runner import run_cli
from ct_library import compress_head
from safetensors.torch import load_file
from two_ranks import run_two_ranks

from quantreg import (
    CheckpointError,
    ConfigError,
    InputError,
    load_lm_head,
    quantize,
    resolve,
    write_checkpoint,
)

VOCAB, HIDDEN = 1000, 128


def random_weight(dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.Tensor:
    return (torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.05).to(
        dtype
    )


def weight_t(head) -> torch.Tensor:
    return head.compute_logits(torch.eye(head.embedding_dim))


def int_scheme(targets: list[str], **weights) -> dict:
    return {"targets": targets, "weights": {"type": "int", "dynamic": False, **weights}}


# Every format the library (0.20.0) still writes for a head, as compressed-tensors itself writes it.
LIBRARY_SCHEMES = {
    "w8a16-channel": (int_scheme(["re:.*lm_head"], num_bits=8, symmetric=True, strategy="channel"), torch.float16),
    "w4a16-group-sym": (int_scheme(["Linear"], num_bits=4, symmetric=True, strategy="group", group_size=32), torch.float16),
    "w4a16-group-asym": (int_scheme(["lm_head"], num_bits=4, symmetric=False, strategy="group", group_size=64), torch.float16),
    "w8a16-group-asym": (int_scheme(["lm_head"], num_bits=8, symmetric=False, strategy="group", group_size=32), torch.bfloat16),
    "w4a16-channel-asym": (int_scheme(["lm_head"], num_bits=4, symmetric=False, strategy="channel"), torch.bfloat16),
    "w4a16-tensor": (int_scheme(["lm_head"], num_bits=4, symmetric=True, strategy="tensor"), torch.float16),
    "w8a8-int": ({"preset": "W8A8", "targets": ["lm_head"]}, torch.float16),
    "fp8-dynamic": ({"preset": "FP8_DYNAMIC", "targets": ["lm_head"]}, torch.bfloat16),
    "fp8-tensor": ({"preset": "FP8", "targets": ["lm_head"]}, torch.float16),
}  # fmt: skip


@pytest.fixture(scope="module")
def library_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ct_library")
    out = {}
    for name, (scheme, dtype) in LIBRARY_SCHEMES.items():
        folder = root / name
        out[name] = (folder, compress_head(folder, random_weight(dtype), scheme))
    return out


@pytest.mark.parametrize("name", sorted(LIBRARY_SCHEMES))
def test_library_checkpoints_load_bit_for_bit(library_checkpoints, name):
    folder, reference = library_checkpoints[name]
    head = load_lm_head(folder, dtype=torch.float32)
    assert head.resolution.method == "compressed-tensors" and head.quantized
    got = weight_t(head)
    assert torch.equal(got.T.to(reference.dtype), reference) and torch.equal(
        got, reference.float().T
    )
    x = torch.randn(5, HIDDEN)
    expected = x.double() @ reference.double().T
    assert ((head.compute_logits(x).double() - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["w8a8-int", "fp8-dynamic"])
def test_activation_quantized_checkpoints_run_weight_only_and_say_so(library_checkpoints, name):
    res = resolve(library_checkpoints[name][0], platform="cpu")
    assert any("weight-only: activations stay float" in note for note in res.notes)


TWO_RANK_NAMES = ["w8a16-channel", "w4a16-group-asym", "fp8-dynamic"]


@pytest.fixture(scope="module")
def two_rank_runs(library_checkpoints, tmp_path_factory):
    """Each library checkpoint on two ranks, with the kernel selection picks and with the
    exact reference kernel forced: one spawn for all."""
    jobs = {}
    for name in TWO_RANK_NAMES:
        folder = str(library_checkpoints[name][0])
        jobs[f"{name}-selected"] = (folder, {})
        jobs[f"{name}-reference"] = (folder, {"kernel": "reference"})
    return run_two_ranks(tmp_path_factory.mktemp("two_ranks"), jobs)


@pytest.mark.parametrize("name", TWO_RANK_NAMES)
@pytest.mark.parametrize("kernel", ["selected", "reference"])
def test_two_ranks_with_vocab_1000(library_checkpoints, two_rank_runs, name, kernel):
    _, reference = library_checkpoints[name]
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(0))
    expected = x.double() @ reference.double().T
    for got in two_rank_runs[f"{name}-{kernel}"]:
        assert ((got["logits"].double() - expected).abs().max() / expected.abs().max()) < 1e-5
        if name == "w4a16-group-asym" and kernel == "reference":  # each rank: its 512 rows
            assert got["kernel.zeros"].shape == (2, 512)


# -- quantreg's own writer ----------------------------------------------------------------------


WRITER_CASES = {
    "pack-int4-group-sym": {"format": "pack-quantized", "bits": 4, "group_size": 32},
    "pack-int4-group-asym": {"format": "pack-quantized", "bits": 4, "group_size": 64, "sym": False},
    "pack-int8-channel": {"format": "pack-quantized", "bits": 8, "strategy": "channel"},
    "pack-int8-channel-asym": {"format": "pack-quantized", "bits": 8, "strategy": "channel", "sym": False},
    "pack-int4-tensor": {"format": "pack-quantized", "bits": 4, "strategy": "tensor"},
    "pack-int4-actorder-group": {"format": "pack-quantized", "bits": 4, "group_size": 32, "actorder": "group"},
    "int-quantized-channel": {"format": "int-quantized", "strategy": "channel"},
    "naive-quantized-tensor": {"format": "naive-quantized", "strategy": "tensor"},
    "naive-quantized-channel-asym": {"format": "naive-quantized", "strategy": "channel", "sym": False},
    "float-quantized-channel": {"format": "float-quantized", "strategy": "channel"},
    "float-quantized-tensor": {"format": "float-quantized", "strategy": "tensor"},
}  # fmt: skip


def decode(tensors: dict, params: dict) -> torch.Tensor:
    """An independent decoder of the formats, from FORMATS.md §3."""
    bits = params.get("bits", 4 if params["format"] == "pack-quantized" else 8)
    scale = tensors["weight_scale"]
    if "weight_packed" in tensors:
        words = tensors["weight_packed"].to(torch.int64) & 0xFFFFFFFF
        pf = 32 // bits
        q = torch.stack([(words >> (j * bits)) & ((1 << bits) - 1) for j in range(pf)], -1).reshape(
            VOCAB, -1
        )[:, :HIDDEN] - (1 << (bits - 1))
    else:
        q = tensors["weight"].to(torch.float64)
    g_idx = tensors.get("weight_g_idx")
    if scale.numel() == 1:
        cols = torch.zeros(HIDDEN, dtype=torch.int64)
        scale = scale.reshape(1, 1).expand(VOCAB, 1)
    elif g_idx is not None:
        cols = g_idx.to(torch.int64)
    else:
        cols = torch.arange(HIDDEN) // (HIDDEN // scale.shape[1])
    zp = tensors.get("weight_zero_point")
    if zp is not None and "weight_packed" in tensors:
        zw = zp.to(torch.int64) & 0xFFFFFFFF
        pf = 32 // bits
        zp = torch.stack([(zw >> (j * bits)) & ((1 << bits) - 1) for j in range(pf)], 1).reshape(
            -1, zp.shape[1]
        )[:VOCAB] - (1 << (bits - 1))
    zero = (
        0
        if zp is None
        else (zp.reshape(1, 1) if zp.numel() == 1 else zp)[:, cols]
        if zp.numel() > 1
        else zp.reshape(1, 1)
    )
    return ((q.double() - zero) * scale[:, cols].double()).to(scale.dtype)


@pytest.mark.parametrize("case", sorted(WRITER_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_writer_loader_round_trip(tmp_path, case, dtype):
    params = WRITER_CASES[case]
    weight = random_weight(dtype, seed=3)
    tensors = quantize(weight, "compressed-tensors", scale_dtype=dtype, **params)
    expected = decode(tensors, params)
    error = (expected.double() - weight.double()).abs().max()
    assert error < (0.05 if "float" not in params["format"] else 0.02)
    write_checkpoint(tmp_path, weight, "compressed-tensors", dtype=dtype, **params)
    head = load_lm_head(tmp_path, dtype=torch.float32)
    assert torch.equal(weight_t(head), expected.float().T)


def test_writer_config_is_what_compressed_tensors_writes(tmp_path):
    write_checkpoint(
        tmp_path,
        random_weight(),
        "compressed-tensors",
        format="pack-quantized",
        bits=8,
        strategy="channel",
    )
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(
        {k: v for k, v in qcfg.items() if k != "quant_method"}
    )
    assert parsed.config_groups["group_0"].weights.strategy == "channel"
    assert qcfg["format"] == "pack-quantized" and qcfg["quantization_status"] == "compressed"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"format": "mxfp4-pack-quantized"}, r"format 'mxfp4-pack-quantized' is not supported"),
        ({"format": "nvfp4-pack-quantized", "strategy": "group"}, r"nvfp4-pack-quantized takes no strategy 'group' \(expected 'tensor_group'\)"),
        ({"format": "pack-quantized", "bits": 2}, r"pack-quantized with 2-bit weights is not supported"),
        ({"format": "int-quantized", "strategy": "group"}, r"strategy 'group' is not supported for int-quantized"),
        ({"format": "float-quantized", "sym": False}, r"fp8 weights are symmetric"),
        ({"format": "pack-quantized", "actorder": "weight"}, r"actorder must be None, or 'group' with strategy 'group'"),
        ({"format": "pack-quantized", "perm": torch.arange(HIDDEN)}, r"perm needs actorder='group'"),
        ({"format": "pack-quantized", "desc_act": True}, r"unsupported option\(s\) desc_act"),
    ],
    ids=["mxfp4", "nvfp4-group", "2-bit", "int-group", "fp8-asym", "actorder-weight", "perm-without-actorder", "unknown-option"],
)  # fmt: skip
def test_writer_errors(params, message):
    with pytest.raises(InputError, match=message):
        quantize(random_weight(), "compressed-tensors", **params)


# -- loading errors and matching ---------------------------------------------------------------


def ct_folder(tmp_path, params: dict, **changes):
    write_checkpoint(tmp_path / "src", random_weight(), "compressed-tensors", **params)
    data = load_file(str(tmp_path / "src" / "model.safetensors"))
    data.update(changes)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    return write_raw(tmp_path / "ckpt", config=config, tensors=data)


@pytest.mark.parametrize(
    ("params", "changes", "message"),
    [
        ({"format": "pack-quantized", "bits": 8, "strategy": "channel"}, {"lm_head.weight_shape": torch.tensor([999, HIDDEN])}, r"lm_head.weight_shape = \[999, 128\]; expected \[1000, 128\]"),
        ({"format": "pack-quantized", "bits": 4, "group_size": 32, "actorder": "group"}, {"lm_head.weight_g_idx": torch.full((HIDDEN,), 9, dtype=torch.int32)}, r"lm_head.weight_g_idx\[0\] = 9 is outside the 4 groups"),
        ({"format": "pack-quantized", "bits": 8, "strategy": "channel"}, {"lm_head.weight_scale": torch.full((VOCAB, 1), float("inf"), dtype=torch.float16)}, r"lm_head.weight_scale holds 1000 non-finite value\(s\)"),
        ({"format": "pack-quantized", "bits": 8, "strategy": "channel"}, {"lm_head.weight_packed": torch.zeros(VOCAB, 16, dtype=torch.int32)}, r"lm_head.weight_packed: expected shape I32 \[1000, 32\], found I32 \[1000, 16\]"),
        ({"format": "int-quantized", "strategy": "channel"}, {"lm_head.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.int16)}, r"lm_head.weight: expected dtype I8 \[1000, 128\], found I16"),
    ],
    ids=["weight-shape", "g-idx-out-of-range", "inf-scale", "packed-for-4-bit-but-8-bit-config", "int16-weight"],
)  # fmt: skip
def test_bad_tensors_are_named(tmp_path, params, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load_lm_head(ct_folder(tmp_path, params, **changes), dtype=torch.float32)


def test_unsupported_formats_fail_naming_the_format_and_the_layer(tmp_path):
    cfg = {"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "config_groups": {"group_0": {"targets": ["lm_head"], "weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32}}}}  # fmt: skip
    write_raw(
        tmp_path,
        config=llama_config(cfg),
        tensors={"lm_head.weight_packed": torch.zeros(1000, 32, dtype=torch.uint8)},
    )
    with pytest.raises(
        ConfigError,
        match=r"format 'mxfp4-pack-quantized' \(targets \['lm_head'\]\) is not supported yet",
    ):
        load_lm_head(tmp_path, dtype=torch.float32)


def test_unmatched_targets_and_ignores_warn(tmp_path, caplog):
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["lm_head", "re:.*q_proj"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}},
            "ignore": ["re:.*vision.*", "fc"]}  # fmt: skip
    tensors = {
        f"lm_head.{k}": v
        for k, v in quantize(
            random_weight(),
            "compressed-tensors",
            format="pack-quantized",
            bits=8,
            strategy="channel",
        ).items()
    }
    write_raw(
        tmp_path,
        config=llama_config(qcfg, hidden_size=HIDDEN),
        tensors={**tensors, "fc.weight": torch.zeros(2, 2)},
    )
    with caplog.at_level(logging.WARNING, logger="quantreg.resolution"):
        res = resolve(tmp_path, platform="cpu")
    assert "ignore entry 're:.*vision.*' matches no module of the checkpoint" in caplog.text
    assert "targets (group_0) entry 're:.*q_proj' matches no module" in caplog.text
    assert "'fc'" not in caplog.text and "entry 'lm_head'" not in caplog.text
    assert len([n for n in res.notes if "matches no module" in n]) == 2


def test_head_tensors_in_different_shards(tmp_path):
    weight = random_weight()
    write_checkpoint(
        tmp_path / "one",
        weight,
        "compressed-tensors",
        format="pack-quantized",
        bits=4,
        group_size=64,
        sym=False,
    )
    data = load_file(str(tmp_path / "one" / "model.safetensors"))
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    write_raw(tmp_path / "sharded", config=config, tensors=data, shards=len(data))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    assert len(set(index.values())) == len(data)
    one, sharded = (
        load_lm_head(tmp_path / "one", dtype=torch.float32),
        load_lm_head(tmp_path / "sharded", dtype=torch.float32),
    )
    assert torch.equal(weight_t(one), weight_t(sharded))


def test_cli_quantize_compressed_tensors(tmp_path):
    write_raw(
        tmp_path / "src",
        config=llama_config(hidden_size=HIDDEN),
        tensors={"lm_head.weight": random_weight()},
    )
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "compressed-tensors", "--format", "pack-quantized", "--bits", "8", "--group-size", "-1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    head = load_lm_head(tmp_path / "dst", dtype=torch.float32)
    assert head.resolution.method == "compressed-tensors"
    assert head.resolution.config.scheme.weights.strategy == "channel"

"""Reading checkpoint folders: index safety, links, and validated safetensors headers."""

from __future__ import annotations

import json
import os
import struct

import pytest
from ckpt import awq_head, float_head, llama_config, write_checkpoint

from quantreg import CheckpointError
from quantreg.checkpoint import read_header, tensor_infos, weight_files


def raw_safetensors(path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_single_file_headers(tmp_path):
    write_checkpoint(
        tmp_path, config=llama_config(), tensors={**awq_head(), **float_head(prefix="fc")}
    )
    infos = tensor_infos(tmp_path, prefix="lm_head")
    assert sorted(infos) == ["lm_head.qweight", "lm_head.qzeros", "lm_head.scales"]
    assert infos["lm_head.qweight"].dtype == "I32" and infos["lm_head.qweight"].shape == (64, 128)
    assert infos["lm_head.scales"].nbytes == 2 * 1024 * 2


def test_sharded_reads_only_the_shards_holding_the_prefix(tmp_path):
    write_checkpoint(
        tmp_path, config=llama_config(), tensors={**awq_head(), **float_head(prefix="fc")}, shards=4
    )
    holder = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][
        "fc.weight"
    ]
    (tmp_path / holder).write_bytes(b"garbage")  # never opened for prefix lm_head
    assert len(tensor_infos(tmp_path, prefix="lm_head")) == 3


def test_only_model_safetensors_is_read_without_an_index(tmp_path):
    write_checkpoint(tmp_path, config=llama_config(), tensors=float_head())
    (tmp_path / "other.safetensors").write_bytes(b"not read")
    files, weight_map = weight_files(tmp_path)
    assert files == [tmp_path / "model.safetensors"] and weight_map is None


def test_no_weights_gives_none(tmp_path):
    assert tensor_infos(tmp_path) is None


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("../outside.safetensors", r"entry 'lm_head.weight': file name '../outside.safetensors' must be a plain relative name"),
        ("/etc/passwd", r"file name '/etc/passwd' must be a plain relative name"),
        ("sub/../../x.safetensors", r"must be a plain relative name"),
        ("a\\..\\b.safetensors", r"must be a plain relative name"),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "backslash"],
)  # fmt: skip
def test_index_entries_must_stay_inside_the_folder(tmp_path, shard, message):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": shard}})
    )
    with pytest.raises(CheckpointError, match=message):
        tensor_infos(tmp_path)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("{", r"safetensors index .* is not valid JSON"),
        ("[]", r"expected a 'weight_map' object"),
        ('{"weight_map": {"a": 1}}', r"expected a 'weight_map' object"),
    ],
    ids=["not-json", "not-object", "bad-weight-map"],
)
def test_bad_index(tmp_path, index, message):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message):
        tensor_infos(tmp_path)


def test_index_pointing_to_a_missing_tensor(tmp_path):
    write_checkpoint(tmp_path, config=None, tensors=float_head(), shards=2)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["lm_head.bias"] = next(iter(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    with pytest.raises(
        CheckpointError,
        match=r"maps tensor 'lm_head.bias' to model-0000\d-of-00002.safetensors, but .* does not contain it",
    ):
        tensor_infos(tmp_path)


def test_links_outside_the_folder_are_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    write_checkpoint(outside, config=None, tensors=float_head())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink(outside / "model.safetensors", ckpt / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors is a link to .*elsewhere/model.safetensors, outside the checkpoint folder",
    ):
        tensor_infos(ckpt)


def test_links_inside_the_folder_and_into_the_hub_cache_blobs_are_followed(tmp_path):
    repo = tmp_path / "models--org--drafter"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    write_checkpoint(blobs, config=None, tensors=float_head())
    (blobs / "model.safetensors").rename(blobs / "sha256")
    snapshot.mkdir(parents=True)
    os.symlink("../../blobs/sha256", snapshot / "model.safetensors")
    assert list(tensor_infos(snapshot)) == ["lm_head.weight"]
    local = tmp_path / "local"
    write_checkpoint(local, config=None, tensors=float_head())
    (local / "model.safetensors").rename(local / "real.safetensors")
    os.symlink("real.safetensors", local / "model.safetensors")
    assert list(tensor_infos(local)) == ["lm_head.weight"]


def test_pickle_only_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(
        CheckpointError, match=r"holds only pytorch_model.bin: pickle checkpoints are not read"
    ):
        tensor_infos(tmp_path)


TENSOR = {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x01\x02"), r"truncated safetensors file \(2 bytes, no header length\)"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10_000) + b"{}"), r"header length 10000 exceeds the file \(10 bytes\)"),
        (lambda p: p.write_bytes(struct.pack("<Q", 3) + b"{x}"), r"safetensors header is not valid JSON"),
        (lambda p: raw_safetensors(p, ["x"]), r"header must be a JSON object"),
        (lambda p: raw_safetensors(p, {"t": "x"}), r"tensor 't': header entry must be an object"),
        (lambda p: raw_safetensors(p, {"t": {**TENSOR, "dtype": 5}}, bytes(8)), r"tensor 't': dtype must be a string"),
        (lambda p: raw_safetensors(p, {"t": {**TENSOR, "shape": [2, -1]}}, bytes(8)), r"shape must be a list of non-negative integers"),
        (lambda p: raw_safetensors(p, {"t": {**TENSOR, "data_offsets": [0]}}, bytes(8)), r"data_offsets must be \[begin, end\]"),
        (lambda p: raw_safetensors(p, {"t": TENSOR}, bytes(4)), r"data_offsets \[0, 8\] fall outside the 4-byte data section"),
        (lambda p: raw_safetensors(p, {"t": {**TENSOR, "dtype": "F32"}}, bytes(8)), r"8 bytes do not hold a F32 tensor of shape \[2, 2\] \(16 bytes expected\)"),
        (lambda p: raw_safetensors(p, {"a": TENSOR, "b": {**TENSOR, "data_offsets": [4, 12]}}, bytes(12)), r"tensors 'a' and 'b' overlap"),
    ],
    ids=["truncated", "header-length-lies", "header-not-json", "header-not-object", "entry-not-object",
         "dtype-not-string", "negative-dim", "bad-offsets", "offsets-out-of-bounds", "size-mismatch", "overlap"],
)  # fmt: skip
def test_malformed_headers_name_the_file_and_tensor(tmp_path, make, message):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value) and info.value.path == path


def test_metadata_and_sub_byte_dtypes_are_read_as_safetensors_reads_them(tmp_path):
    # F4 packs two values a byte: [2, 2] is 2 bytes. (This test once gave it 8 bytes and
    # expected quantreg to pass the file, which safetensors' safe_open refuses.)
    path = tmp_path / "model.safetensors"
    raw_safetensors(
        path,
        {"__metadata__": {"format": "pt"}, "t": {"dtype": "F4", "shape": [2, 2], "data_offsets": [0, 2]}},
        bytes(2),
    )  # fmt: skip
    assert read_header(path)["t"].dtype == "F4" and read_header(path)["t"].nbytes == 2

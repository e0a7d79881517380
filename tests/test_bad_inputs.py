"""A catalogue of malformed checkpoints: each gives a clear QuantregError, through the API and
the CLI, and leaves the checkpoint's files as they were."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import quantreg
from quantreg import CheckpointError, ConfigError, PluginError, QuantregError, load_lm_head, resolve
from quantreg.registry import BUILTIN_METHODS, Registry, set_default_registry

VOCAB, HIDDEN = 1000, 64


def base(folder: Path, method: str = "gptq", **params) -> Path:
    weight = (torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.05).half()
    d2t = torch.arange(VOCAB, dtype=torch.int64)
    if method in ("gptq", "compressed-tensors"):  # groups that divide HIDDEN
        params = {"group_size": 32, **params}
    quantreg.write_checkpoint(folder, weight, method, d2t=d2t, vocab_size=2 * VOCAB, **params)
    return folder


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return damage


def edit_tensors(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        tensors = load_file(str(folder / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "model.safetensors"))

    return damage


def shard(folder: Path, weight_map: dict | None = None, names: dict | None = None) -> None:
    """Move model.safetensors to a shard named in an index (optionally a bad one)."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    tensors = load_file(str(folder / "model-00001-of-00001.safetensors"))
    mapping = weight_map or dict.fromkeys(tensors, "model-00001-of-00001.safetensors")
    mapping.update(names or {})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": mapping}))


def rewrite_header(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        raw = path.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        change(header)
        blob = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])

    return damage


def first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def set_scale(value: float) -> Callable[[dict], None]:
    def change(t: dict) -> None:
        t["lm_head.scales"][0, 3] = value

    return change


CATALOGUE = [
    # config.json
    ("config-not-json", lambda p: (p / "config.json").write_text("{oops"), ConfigError, r"config.json is not valid JSON"),
    ("config-is-a-list", lambda p: (p / "config.json").write_text("[1, 2]"), ConfigError, r"config.json must hold a JSON object"),
    ("config-not-utf8", lambda p: (p / "config.json").write_bytes(b"\xff\xfe{"), ConfigError, r"config.json is not UTF-8"),
    ("quantization-config-not-object", edit_config(lambda c: c.update(quantization_config="gptq")), ConfigError, r"config.json \(quantization_config\) must be a JSON object, got str"),
    ("no-quant-method", edit_config(lambda c: c["quantization_config"].pop("quant_method")), ConfigError, r"config.json \(quantization_config\) has no 'quant_method' key"),
    ("unknown-quant-method", edit_config(lambda c: c["quantization_config"].update(quant_method="gptqq")), ConfigError, r"config.json \(quantization_config\): field 'quant_method': unknown quantization method 'gptqq'.*did you mean 'gptq'"),
    ("bits-as-string", edit_config(lambda c: c["quantization_config"].update(bits="4")), ConfigError, r"invalid gptq quantization_config in .*config.json.*: field 'bits' = '4'"),
    ("bits-3", edit_config(lambda c: c["quantization_config"].update(bits=3)), ConfigError, r"field 'bits' = 3: supported GPTQ widths are 4 and 8"),
    ("group-size-0", edit_config(lambda c: c["quantization_config"].update(group_size=0)), ConfigError, r"field 'group_size' = 0: expected -1 \(one group\) or a positive group size"),
    ("gptqmodel-marlin-format", edit_config(lambda c: c["quantization_config"].update(format="marlin")), ConfigError, r"field 'format' = 'marlin': the 'marlin' GPTQ layout is not supported"),
    ("dynamic-bad-regex", edit_config(lambda c: c["quantization_config"].update(dynamic={"+:lm_head(": {}})), ConfigError, r"rule '\+:lm_head\(' is not a valid regular expression"),
    ("zero-vocab", edit_config(lambda c: c.update(draft_vocab_size=0)), ConfigError, r"config.json: field 'draft_vocab_size' = 0: expected a positive integer"),
    ("hidden-size-bool", edit_config(lambda c: c.update(hidden_size=True)), ConfigError, r"field 'hidden_size' = True: expected a positive integer"),
    ("auto-round-packing-unknown", edit_config(lambda c: c.update(quantization_config={"quant_method": "auto-round", "bits": 4, "group_size": 32, "packing_format": "auto_round:gptqmodel", "extra_config": {"lm_head": {"bits": 4}}})), ConfigError, r"invalid auto-round quantization_config in .*config.json.*: field 'packing_format' = 'auto_round:gptqmodel': expected one of auto_round:auto_gptq"),
    ("auto-round-extra-config-bad-regex", edit_config(lambda c: c.update(quantization_config={"quant_method": "auto-round", "bits": 4, "group_size": 32, "extra_config": {"lm_head(": {"bits": 4}}})), ConfigError, r"field 'extra_config': entry 'lm_head\(' is not a valid regular expression"),
    ("auto-round-head-3-bit", edit_config(lambda c: c.update(quantization_config={"quant_method": "auto-round", "bits": 4, "group_size": 32, "extra_config": {"lm_head": {"bits": 3}}})), ConfigError, r"auto-round extra_config 'lm_head' quantizes 'lm_head' with bits=3"),
    ("unsupported-ct-format", edit_config(lambda c: c.update(quantization_config={"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "config_groups": {"g": {"targets": ["lm_head"], "weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32}}}})), ConfigError, r"format 'mxfp4-pack-quantized' \(targets \['lm_head'\]\) is not supported yet"),
    # the index
    ("index-missing-shard", lambda p: shard(p, names={"lm_head.qweight": "model-00002-of-00002.safetensors"}), CheckpointError, r"model-00002-of-00002.safetensors"),
    ("index-escapes-folder", lambda p: shard(p, names={"lm_head.qweight": "../outside.safetensors"}), CheckpointError, r"model.safetensors.index.json entry 'lm_head.qweight': file name '../outside.safetensors' must be a plain relative name"),
    ("index-absolute-path", lambda p: shard(p, names={"lm_head.qweight": "/etc/passwd"}), CheckpointError, r"file name '/etc/passwd' must be a plain relative name"),
    ("index-not-json", lambda p: (shard(p), (p / "model.safetensors.index.json").write_text("{")), CheckpointError, r"model.safetensors.index.json is not valid JSON"),
    ("index-names-a-tensor-its-shard-lacks", lambda p: shard(p, names={"lm_head.extra": "model-00001-of-00001.safetensors"}), CheckpointError, r"maps tensor 'lm_head.extra' to model-00001-of-00001.safetensors, but .* does not contain it"),
    ("symlink-outside", lambda p: ((p / "model.safetensors").rename(p.parent / "elsewhere.safetensors"), os.symlink(p.parent / "elsewhere.safetensors", p / "model.safetensors")), CheckpointError, r"model.safetensors is a link to .*elsewhere.safetensors, outside the checkpoint folder"),
    # safetensors files
    ("truncated-data", lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-64]), CheckpointError, r"model.safetensors: tensor '.*': data_offsets .* fall outside"),
    ("truncated-header", lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00"), CheckpointError, r"model.safetensors: truncated safetensors file"),
    ("header-length-lies", lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + (p / "model.safetensors").read_bytes()[8:]), CheckpointError, r"model.safetensors: safetensors header length 1000000000 exceeds the file"),
    ("overlapping-offsets", rewrite_header(lambda h: first_tensor(h).update(data_offsets=[first_tensor(h)["data_offsets"][0] + 4, first_tensor(h)["data_offsets"][1] + 4])), CheckpointError, r"overlap|fall outside|do not hold"),
    ("header-wrong-size", rewrite_header(lambda h: h["lm_head.scales"].update(dtype="F32")), CheckpointError, r"tensor 'lm_head.scales': .* bytes do not hold a F32 tensor"),
    ("pickle-only", lambda p: ((p / "model.safetensors").unlink(), (p / "pytorch_model.bin").write_bytes(b"\x80")), CheckpointError, r"holds only pytorch_model.bin: pickle checkpoints are not read"),
    # tensor names and shapes
    ("missing-scales", edit_tensors(lambda t: t.pop("lm_head.scales")), CheckpointError, r"missing lm_head.scales: expected F32 \[2, 1000\]"),
    ("qweight-wrong-dtype", edit_tensors(lambda t: t.update({"lm_head.qweight": t["lm_head.qweight"].to(torch.float16)})), CheckpointError, r"lm_head.qweight: expected dtype I32 \[8, 1000\], found F16 \[8, 1000\] in model.safetensors"),
    ("hidden-size-mismatch", edit_config(lambda c: c.update(hidden_size=128)), CheckpointError, r"lm_head.qweight: expected shape I32 \[16, 1000\], found I32 \[8, 1000\] in model.safetensors"),
    ("transposed-qweight", edit_tensors(lambda t: t.update({"lm_head.qweight": t["lm_head.qweight"].T.contiguous()})), CheckpointError, r"lm_head.qweight: expected shape I32 \[8, 1000\], found I32 \[1000, 8\]"),
    ("unconsumed-tensor", edit_tensors(lambda t: t.update({"lm_head.weight_scale": torch.ones(1)})), CheckpointError, r"no parameter consumes lm_head.weight_scale"),
    # values
    ("nan-scale", edit_tensors(set_scale(float("nan"))), CheckpointError, r"model.safetensors: lm_head.scales holds 1 non-finite value\(s\) \(NaN or inf\)"),
    ("inf-scale", edit_tensors(set_scale(float("inf"))), CheckpointError, r"model.safetensors: lm_head.scales holds 1 non-finite value"),
    ("g-idx-past-the-groups", edit_tensors(lambda t: t["lm_head.g_idx"].__setitem__(5, 2)), CheckpointError, r"model.safetensors: lm_head.g_idx\[5\] = 2 is outside the 2 groups of lm_head.scales"),
    ("negative-g-idx", edit_tensors(lambda t: t["lm_head.g_idx"].__setitem__(0, -1)), CheckpointError, r"lm_head.g_idx\[0\] = -1 is outside"),
    ("d2t-out-of-range", edit_tensors(lambda t: t["d2t"].__setitem__(7, 5000)), CheckpointError, r"model.safetensors: tensor 'd2t' maps draft id 7 to target id 5007"),
    ("d2t-wrong-length", edit_tensors(lambda t: t.update(d2t=t["d2t"][:10])), CheckpointError, r"tensor 'd2t' has shape \[10\]; expected \[1000\]"),
]  # fmt: skip
IDS = [case[0] for case in CATALOGUE]


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def broken(request, tmp_path) -> tuple[Path, type, str]:
    _, damage, error, message = request.param
    folder = base(tmp_path / "ckpt")
    damage(folder)
    return folder, error, message


@pytest.mark.parametrize("broken", CATALOGUE, ids=IDS, indirect=True)
def test_every_bad_input_gives_a_clear_error_and_changes_nothing(broken):
    folder, error, message = broken
    before = digest(folder)
    with pytest.raises(error, match=message) as info:
        load_lm_head(folder, dtype=torch.float32)
    assert isinstance(info.value, QuantregError)
    assert digest(folder) == before


def test_the_catalogue_is_at_least_30_distinct_inputs():
    assert len(set(IDS)) == len(IDS) >= 30


def test_the_cli_exits_1_with_the_message_and_no_traceback(tmp_path):
    argvs, expected = [], []
    for name, damage, _, message in CATALOGUE:
        folder = base(tmp_path / name)
        damage(folder)
        argvs.append(["run", str(folder), "--dtype", "float32"])
        expected.append(message)
    results = run_cli_batch(argvs, timeout=600)
    for name, result, message in zip(IDS, results, expected, strict=True):
        assert result["code"] == 1, name
        assert result["stderr"].startswith("quantreg: error: "), (name, result["stderr"])
        assert "Traceback" not in result["stderr"], name
        assert re.search(message, result["stderr"]), (name, result["stderr"])


def test_a_cli_run_in_its_own_process(tmp_path):
    folder = base(tmp_path / "ckpt")
    edit_tensors(set_scale(float("nan")))(folder)
    out = subprocess.run([sys.executable, "-m", "quantreg", "run", str(folder)], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1 and "lm_head.scales holds 1 non-finite value" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_broken_plugin_requested_by_name(tmp_path):
    folder = base(tmp_path / "ckpt")
    set_default_registry(Registry({**BUILTIN_METHODS, "broken": "quantreg_missing_module:Config"}))
    with pytest.raises(
        PluginError, match=r"quantization method 'broken' failed to load: ModuleNotFoundError"
    ):
        load_lm_head(folder, requested="broken")


# -- fuzzing ----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 300)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = ["bits", "group_size", "sym", "desc_act", "lm_head", "zero_point", "version", "format", "checkpoint_format",
        "dynamic", "modules_to_not_convert", "config_groups", "ignore", "quantization_status", "w_bit", "q_group_size",
        "packing_format", "data_type", "extra_config", "block_name_to_quantize", "to_quant_block_names"]  # fmt: skip
FUZZ_METHODS = ["awq", "gptq", "compressed-tensors", "cpu_awq", "AWQ", "auto-round", "intel/auto-round", "bogus", ""]  # fmt: skip
QUANT_CONFIGS = st.fixed_dictionaries(
    {"quant_method": st.sampled_from(FUZZ_METHODS) | JSON},
    optional={key: JSON for key in KEYS}
    | {
        "config_groups": st.dictionaries(
            st.text(max_size=5),
            st.fixed_dictionaries(
                {
                    "targets": st.lists(
                        st.sampled_from(["lm_head", "Linear", "re:.*", "re:(", "fc"])
                        | st.text(max_size=5),
                        max_size=3,
                    )
                },
                optional={
                    "weights": st.dictionaries(
                        st.sampled_from(
                            ["num_bits", "type", "symmetric", "strategy", "group_size", "actorder"]
                        ),
                        JSON,
                        max_size=4,
                    ),
                    "format": JSON,
                },
            ),
            max_size=2,
        )
    },
)


FUZZ_SECONDS = 5.0  # per example, on a loaded 2-core machine: a hang or blow-up fails


@settings(max_examples=300, deadline=None)
@given(qcfg=QUANT_CONFIGS, platform=st.sampled_from(["cpu", "cuda:9.0", "cuda:7.5"]))
def test_random_configs_only_ever_raise_quantreg_errors(qcfg, platform):
    start = time.perf_counter()
    with contextlib.suppress(QuantregError):
        resolve(qcfg, platform=platform)
    assert time.perf_counter() - start < FUZZ_SECONDS


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> dict[str, bytes]:
    folder = base(tmp_path_factory.mktemp("fuzz_base"), "gptq", group_size=32)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_byte_mutations_only_ever_raise_quantreg_errors(
    tmp_path_factory, small_checkpoint, data
):
    folder = tmp_path_factory.mktemp("fuzz")
    name = data.draw(st.sampled_from(sorted(small_checkpoint)))
    raw = bytearray(small_checkpoint[name])
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(raw) - 1))
        if name == "model.safetensors" and data.draw(st.booleans()):
            position = data.draw(st.integers(0, min(len(raw) - 1, 600)))  # the header, often
        raw[position] = data.draw(st.integers(0, 255))
    for file, content in small_checkpoint.items():
        (folder / file).write_bytes(bytes(raw) if file == name else content)
    start = time.perf_counter()
    try:
        head = load_lm_head(folder, dtype=torch.float32)
        logits = head.compute_logits(torch.randn(2, head.embedding_dim))
    except QuantregError:
        pass
    else:  # a mutation that still loads must not poison the logits
        assert torch.isfinite(logits).all()
    assert time.perf_counter() - start < FUZZ_SECONDS

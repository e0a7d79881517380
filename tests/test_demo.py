"""``quantreg demo``: the story it tells (a naive float head, the tensors winning over the config,
two tensor-parallel ranks), the table, ``--keep`` and ``--json``. One demo run serves the module
(``conftest.demo_run``); the text output is checked in tests/test_cli.py."""

from __future__ import annotations

import json
import re

import pytest
from cli_runner import run_cli

import quantreg
from quantreg.demo import CHECKPOINTS, DRAFT_VOCAB

RANKS = 2


def test_the_demo_exits_0_with_one_json_document(demo_run):
    folder, code, data = demo_run
    assert code == 0 and data["ok"] is True
    assert list(data) == [
        "version", "checkpoints", "ok", "drafter", "tensors_win", "tensor_parallel", "rows",
    ]  # fmt: skip
    assert (data["version"], data["checkpoints"]) == (quantreg.__version__, str(folder))


def test_keep_leaves_every_checkpoint_in_the_folder(demo_run):
    folder, _, _ = demo_run
    assert sorted(p.name for p in folder.iterdir()) == sorted(CHECKPOINTS)
    for name in CHECKPOINTS:
        assert {p.name for p in (folder / name).iterdir()} == {"config.json", "model.safetensors"}


def test_a_float_head_built_from_the_target_config_finds_packed_tensors_and_garbage(demo_run):
    folder, _, data = demo_run
    naive, ours = data["drafter"]["naive"], data["drafter"]["quantreg"]
    assert naive["missing"] == ["weight"]
    assert naive["unexpected"] == ["qweight", "qzeros", "scales"]
    assert naive["strict"] == (
        'Missing key(s) in state_dict: "weight". '
        'Unexpected key(s) in state_dict: "qweight", "qzeros", "scales".'
    )
    assert naive["rel_error"] > 0.5 and naive["top1"] < 0.1, "a random head: no better than noise"
    resolution = quantreg.resolve(folder / "awq_int4_g128")
    assert resolution.quantized and ours["method"] == resolution.method
    assert ours["explain"].startswith(resolution.explain())
    assert f"kernel: {ours['kernel']} (" in ours["explain"]
    same = next(
        r for r in data["rows"] if r["name"] == "awq int4 g128" and r["method"] == ours["method"]
    )
    assert (ours["rel_error"], ours["top1"]) == (same["rel_error"], same["top1"])
    assert ours["rel_error"] < naive["rel_error"] / 5 and ours["top1"] > naive["top1"]


def test_packed_tensors_win_over_an_autoawq_config_without_lm_head(demo_run):
    folder, _, data = demo_run
    path = folder / "autoawq_no_lm_head_key"
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and "lm_head" not in config
    shown = data["tensors_win"]
    resolution = quantreg.resolve(path)
    assert resolution.quantized and shown["method"] == resolution.method
    assert shown["rule"] == (
        "tensors: lm_head.qweight, qzeros and scales are AWQ-packed; also: lm_head: false (absent)"
    )
    assert shown["tensors"] == ["lm_head.qweight", "lm_head.qzeros", "lm_head.scales"]
    assert len(shown["notes"]) == 1 and "loaded quantized, as the tensors say" in shown["notes"][0]


def test_two_ranks_read_their_vocab_slice_on_dim_1_and_gather_the_same_logits(demo_run):
    _, _, data = demo_run
    shown = data["tensor_parallel"]
    per_rank = -(-DRAFT_VOCAB // (64 * RANKS)) * 64  # padded to 64 x ranks, split evenly
    assert DRAFT_VOCAB % 64 and per_rank == 512
    expected = []
    for rank in range(RANKS):
        start, stop = rank * per_rank, min((rank + 1) * per_rank, DRAFT_VOCAB)
        words = [1, start // 8, -(-stop // 8)]  # AWQ: vocab on dim 1, 8 ids per int32 word
        reads = {"lm_head.qweight": words, "lm_head.qzeros": words, "lm_head.scales": [1, start, stop]}  # fmt: skip
        expected.append({"rank": rank, "start": start, "stop": start + per_rank,
                         "real": stop - start, "reads": reads})  # fmt: skip
    assert shown["shards"] == expected
    run = shown["run"]
    assert run["error"] is None and run["equal"] is True
    assert [r["rows"] for r in run["ranks"]] == [[s["start"], s["stop"]] for s in expected]


def test_every_row_says_how_its_method_was_chosen_and_how_it_did(demo_run):
    _, _, data = demo_run
    rows = data["rows"]
    forced = {(r["name"], r["requested"]) for r in rows if r["requested"]}
    assert forced == {
        ("awq int4 g128", "awq"), ("awq int4 g128", "awq_marlin"), ("awq int4 g128", "cpu_wna16"),
        ("gptq int4 g128 act-order", "gptq"), ("gptq int4 g128 act-order", "gptq_marlin"),
        ("gptq int4 g128 act-order", "cpu_wna16"),
    }  # fmt: skip
    for row in rows:
        assert row["requested"] in (None, row["method"]), row
        if row["requested"] is None:
            assert row["resolved"] == row["method"], row
        assert 0 <= row["top1"] <= 1 and row["load_s"] > 0 and row["forward_s"] > 0, row
    for row in rows[:2]:  # the float heads: float32 against float64 of the same weight
        assert row["rel_error"] < 1e-6 and row["top1"] == 1.0
    int8 = [r for r in rows if "int8" in r["name"]]
    int4 = [r for r in rows if "int4" in r["name"] or "w4a16" in r["name"]]
    assert max(r["rel_error"] for r in int8) < min(r["rel_error"] for r in int4)
    fp8 = [r for r in rows if "fp8" in r["name"]]
    fp4 = [r for r in rows if "nvfp4" in r["name"]]
    assert len(fp8) == 3 and len(fp4) == 2
    # 8-bit floats beat 4-bit ones; on the reference kernel (float32 here) fp8 holds a byte a
    # weight and NVFP4 its e2m1 values as float8 bytes too, plus fp32 scales
    assert max(r["rel_error"] for r in fp8) < min(r["rel_error"] for r in fp4)
    assert all(r["vs_bf16"] < 0.56 for r in fp8) and all(r["vs_bf16"] < 0.7 for r in fp4)


@pytest.mark.parametrize(
    ("existing", "match"),
    [
        (
            "folder",
            r"--keep .*keep: the folder is not empty; the demo writes its 14 checkpoints into a new or empty folder and never overwrites anything",
        ),
        ("file", r"--keep .*keep: is a file; pass a new or empty folder"),
    ],
    ids=["non-empty-folder", "a-file"],
)
def test_keep_refuses_what_it_would_overwrite(tmp_path, existing, match):
    target = tmp_path / "keep"
    if existing == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target.write_text("mine")
    out = run_cli("demo", "--keep", str(target))
    assert out.returncode == 1 and out.stdout == ""
    assert re.search(match, out.stderr), out.stderr
    assert "Traceback" not in out.stderr
    assert (target / "notes.txt" if existing == "folder" else target).read_text() == "mine"
    if existing == "folder":
        assert [p.name for p in target.iterdir()] == ["notes.txt"]

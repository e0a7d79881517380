"""The benchmark harness runs end to end (a smoke run: no timing is asserted).

The CLI is called in-process: what is tested is the harness and its outputs, not the process
boundary (``.ci/run`` smoke-runs the installed ``quantreg bench`` once).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest

from quantreg import kernels
from quantreg.bench import FORMATS, estimate
from quantreg.bench_report import BASELINE, append_results, format_table
from quantreg.cli import main

ROW_KEYS = {"method", "kernel", "bits", "N", "K", "M", "dtype", "median_ms", "ratio_vs_bf16", "gbps",
            "resident_bytes", "peak_transient_bytes", "max_rel_err"}  # fmt: skip


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run with --json and --append-results: (exit code, stdout, json, results)."""
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["bench", "--quick", "--m", "1,4", "--budget", "0", "--json",
                     str(out / "out.json"), "--append-results", str(out / "RESULTS.md")])  # fmt: skip
    result = json.loads((out / "out.json").read_text())
    return code, stdout.getvalue(), result, (out / "RESULTS.md").read_text()


def test_quick_bench_writes_json_and_results(quick):
    code, stdout, result, text = quick
    assert code == 0
    assert {"cpu", "cores", "threads", "isa", "torch", "date"} <= result["machine"].keys()
    rows = result["rows"]
    assert all(row.keys() >= ROW_KEYS for row in rows)
    methods = {row["method"] for row in rows}
    expected = {"dense fp32", "dense bf16", "torch int4pack", "torch int8pack"}
    expected |= {m for fmt in FORMATS for m in fmt.methods}
    assert methods == expected
    assert {row["M"] for row in rows} == {1, 4}
    assert all(row["max_rel_err"] < 2e-2 for row in rows), [
        r for r in rows if r["max_rel_err"] >= 2e-2
    ]
    bf16 = [row for row in rows if row["method"] == "dense bf16"]
    assert all(row["ratio_vs_bf16"] == 1.0 for row in bf16)
    assert text.startswith("\n## ") and "| method | kernel | format | N | K | M |" in text
    assert "| dense bf16 | dense |" in stdout


def test_every_row_names_the_kernel_that_ran(quick):
    _, _, result, _ = quick
    names = set(kernels.kernel_names()) | {"dense"}
    assert all(row["kernel"] in names for row in result["rows"])
    by_method = {row["method"]: row["kernel"] for row in result["rows"]}
    assert by_method["awq"] == by_method["gptq"] == "reference"  # the exact reference methods
    assert by_method["awq_marlin"] == "reference"  # no CUDA here: Triton declines


def test_format_table_and_append(tmp_path):
    result = {"machine": {"date": "2026-01-01 00:00 UTC", "cpu": "X", "cores": 2, "threads": 2, "isa": [], "torch": "2.13"},
              "rows": [{"method": "m", "kernel": "k", "format": "f", "N": 1, "K": 2, "M": 3, "dtype": "bfloat16",
                        "median_ms": 1.0, "ratio_vs_bf16": 2.0, "gbps": 1.0, "resident_bytes": 2**20,
                        "peak_transient_bytes": 0, "max_rel_err": 0.0}]}  # fmt: skip
    assert (
        "| m | k | f | 1 | 2 | 3 | bfloat16 | 1.000 | 2.00 | 1.0 | 1.0 | 0.0 | 0.0e+00 |"
        in format_table(result)
    )
    append_results(result, tmp_path / "R.md", note="hello")
    assert (
        "## 2026-01-01 00:00 UTC — X, 2 cores (2 threads), no AVX-512, torch 2.13"
        in (tmp_path / "R.md").read_text()
    )
    # current numbers first: a newer run goes before the older ones, after the intro
    (tmp_path / "R.md").write_text("# Results\n\nintro\n\n## older run\n")
    append_results({**result, "machine": {**result["machine"], "date": "2026-02-02"}}, tmp_path / "R.md")  # fmt: skip
    text = (tmp_path / "R.md").read_text()
    assert text.startswith("# Results\n\nintro\n") and text.index("2026-02-02") < text.index(
        "older run"
    )


def test_plot_needs_matplotlib_or_writes_a_png(tmp_path, capsys):
    code = main(["bench", "--shape", "256x256", "--m", "1", "--budget", "0", "--methods", "torch",
                 "--plot", str(tmp_path / "p.png")])  # fmt: skip
    if importlib.util.find_spec("matplotlib") is None:
        assert code == 1
        assert "--plot needs matplotlib: pip install 'quantreg[bench]'" in capsys.readouterr().err
    else:
        assert code == 0 and (tmp_path / "p.png").stat().st_size > 0


def test_methods_keeps_only_those_and_the_dense_baselines(tmp_path, capsys):
    code = main(["bench", "--shape", "256x256", "--m", "1", "--budget", "0", "--methods",
                 "cpu_wna16,torch", "--json", str(tmp_path / "o.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {
        "dense fp32", "dense bf16", "cpu_wna16", "torch int4pack", "torch int8pack"
    }  # fmt: skip


def test_formats_keeps_only_those_labels_and_the_dense_baselines(tmp_path, capsys):
    code = main(["bench", "--shape", "256x256", "--m", "1", "--budget", "0", "--formats",
                 "fp8 block 128x128,ct nvfp4 g16", "--json", str(tmp_path / "o.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert {(r["method"], r["format"]) for r in rows} == {
        ("dense fp32", "float32"), ("dense bf16", "bfloat16"),
        ("fp8", "fp8 block 128x128"), ("compressed-tensors", "ct nvfp4 g16"),
    }  # fmt: skip


def test_unknown_formats_are_a_clear_error(capsys):
    assert main(["bench", "--quick", "--formats", "ct fp8 channel,fp9"]) == 1
    assert "--formats: unknown 'fp9'; expected some of 'awq int4 g128'," in capsys.readouterr().err


def test_unknown_methods_are_a_clear_error(capsys):
    assert main(["bench", "--quick", "--methods", "awq,nope"]) == 1
    assert "--methods: unknown nope; expected some of" in capsys.readouterr().err


def test_every_median_comes_with_its_spread_and_the_table_states_its_baseline(quick):
    _, stdout, result, _ = quick
    assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in result["rows"])
    assert "| median ms (min–max) | × dense bf16 |" in stdout
    assert BASELINE in stdout and "same N, K and M" in BASELINE and "same group" in BASELINE
    row = {**result["rows"][0], "median_ms": 1.0, "min_ms": 0.9, "max_ms": 1.25}
    assert "| 1.000 (0.900–1.250) |" in format_table({"rows": [row]})


def test_the_estimate_is_said_before_any_timing(capsys):
    argv = ["bench", "--shape", "256x256", "--m", "1,2", "--budget", "0", "--methods", "torch"]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == estimate(((256, 256),), (1, 2), 0.0, ("torch",))
    assert err[0].startswith("bench: 1 shape(s) x 2 groups x 2 token counts, 0 s of timing each")


def test_a_new_run_becomes_the_current_numbers_and_the_old_ones_history(tmp_path):
    path = tmp_path / "R.md"
    path.write_text("# Results\n\nintro\n")
    machine = {"cpu": "X", "cores": 2, "threads": 2, "isa": [], "torch": "2.13"}
    for date in ("2026-01-01", "2026-02-02", "2026-03-03"):
        append_results({"machine": {**machine, "date": date}, "rows": []}, path)
    text = path.read_text()
    assert text.startswith("# Results\n\nintro\n\n## Current numbers\n\n### 2026-03-03 — X")
    current, history = text.split("\n## History\n")
    assert "2026-02-02" not in current and "2026-01-01" not in current
    assert history.index("### 2026-02-02") < history.index("### 2026-01-01")
    assert text.count("\n## ") == 2 and text.count("\n### ") == 3


def test_results_md_opens_with_the_current_numbers_then_the_history_newest_first():
    text = (Path(__file__).parents[1] / "bench" / "RESULTS.md").read_text()
    sections = re.findall(r"(?m)^## (.*)$", text)
    assert sections == ["Current numbers", "History"]
    current, history = text.split("\n## History\n")
    dates = re.findall(r"(?m)^### (\d{4}-\d\d-\d\d \d\d:\d\d UTC) — ", history)
    (now,) = re.findall(r"(?m)^### (\d{4}-\d\d-\d\d \d\d:\d\d UTC) — ", current)
    assert dates == sorted(dates, reverse=True) and now > dates[0]


def test_the_run_measures_the_read_bandwidth_and_sets_every_row_against_the_fastest_dense_path(
    quick,
):
    _, stdout, result, _ = quick
    reads = result["bandwidth"]
    groups = [r["group"] for r in reads]
    assert groups[:2] == ["dense", "dense"] and len(set(groups)) > 2  # a read in every group
    assert [r["M"] for r in reads] == [1, 4] * len(set(groups)) and all(r["gbps"] > 0 for r in reads)  # fmt: skip
    assert all(r["bytes"] == r["N"] * r["K"] * 4 for r in reads)  # the fp32 weight's size
    rows = result["rows"]
    assert all(0 <= r["ratio_vs_fastest_dense"] <= r["ratio_vs_bf16"] for r in rows), [
        (r["method"], r["ratio_vs_fastest_dense"], r["ratio_vs_bf16"]) for r in rows
    ]
    beside = {(r["group"], r["M"]): r["gbps"] for r in reads}
    for r in rows:  # each row's read is its own group's, at its M
        group = "dense" if r["method"].startswith("dense") else r["format"]
        group = "torch ops" if r["method"].startswith("torch") else group
        assert r["read_gbps"] == beside[(group, r["M"])], (r["method"], r["format"])
        assert r["read_fraction"] == round(r["gbps"] / r["read_gbps"], 3)
        assert 0 <= r["read_fraction_of_best"] <= r["read_fraction"] + 1e-3
    for m in (1, 4):
        (fastest,) = {r["fastest_dense"] for r in rows if r["M"] == m}
        assert fastest in ("dense fp32", "dense bf16")
        assert [r["ratio_vs_fastest_dense"] for r in rows if (r["M"], r["method"]) == (m, fastest)] == [1.0]  # fmt: skip
    assert (
        "| × fastest dense | % of read |" in stdout and "- read bandwidth, N=1024 K=512: " in stdout
    )


def test_each_round_calls_every_call_once_in_an_order_of_its_own():
    """After the untimed warm-up rounds (in order), every round calls each once, its order
    drawn (seeded): what runs just before a call changes its time, so none always follows the
    same one."""
    from quantreg.bench import _timings

    log: list[int] = []
    calls = [lambda i=i: log.append(i) for i in range(5)]
    times = _timings(calls, budget_s=0.0, warmup=2)
    rounds = [log[j : j + 5] for j in range(0, len(log), 5)]
    assert rounds[:2] == [[0, 1, 2, 3, 4]] * 2
    assert len(rounds) == 5 and all(sorted(r) == [0, 1, 2, 3, 4] for r in rounds[2:])
    assert len({tuple(r) for r in rounds[2:]}) == 3
    assert len(times) == 5 and all(low <= median <= high for median, low, high in times)

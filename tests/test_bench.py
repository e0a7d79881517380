"""The benchmark harness runs end to end (a smoke run: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from quantreg.bench import FORMATS, append_results, format_table

ROW_KEYS = {"method", "bits", "N", "K", "M", "dtype", "median_ms", "ratio_vs_bf16", "gbps",
            "resident_bytes", "peak_transient_bytes", "max_rel_err"}  # fmt: skip


def test_quick_bench_writes_json_and_results(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "quantreg", "bench", "--quick", "--m", "1,4", "--budget", "0",
         "--json", str(tmp_path / "out.json"), "--append-results", str(tmp_path / "RESULTS.md")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "out.json").read_text())
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
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("\n## ") and "| method | format | N | K | M |" in text
    assert "| dense bf16 |" in out.stdout


def test_format_table_and_append(tmp_path):
    result = {"machine": {"date": "2026-01-01 00:00 UTC", "cpu": "X", "cores": 2, "threads": 2, "isa": [], "torch": "2.13"},
              "rows": [{"method": "m", "format": "f", "N": 1, "K": 2, "M": 3, "dtype": "bfloat16", "median_ms": 1.0,
                        "ratio_vs_bf16": 2.0, "gbps": 1.0, "resident_bytes": 2**20, "peak_transient_bytes": 0, "max_rel_err": 0.0}]}  # fmt: skip
    assert (
        "| m | f | 1 | 2 | 3 | bfloat16 | 1.000 | 2.00 | 1.0 | 1.0 | 0.0 | 0.0e+00 |"
        in format_table(result)
    )
    append_results(result, tmp_path / "R.md", note="hello")
    assert (
        "## 2026-01-01 00:00 UTC — X, 2 cores (2 threads), no AVX-512, torch 2.13"
        in (tmp_path / "R.md").read_text()
    )


def test_plot_needs_matplotlib_or_writes_a_png(tmp_path):
    import importlib.util

    out = subprocess.run(
        [sys.executable, "-m", "quantreg", "bench", "--shape", "256x256", "--m", "1", "--budget", "0",
         "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if importlib.util.find_spec("matplotlib") is None:
        assert (
            out.returncode == 1
            and "--plot needs matplotlib: pip install 'quantreg[bench]'" in out.stderr
        )
    else:
        assert out.returncode == 0 and (tmp_path / "p.png").stat().st_size > 0


def test_methods_keeps_only_those_and_the_dense_baselines(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "quantreg", "bench", "--shape", "256x256", "--m", "1",
         "--budget", "0", "--methods", "cpu_wna16,torch", "--json", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {
        "dense fp32", "dense bf16", "cpu_wna16", "torch int4pack", "torch int8pack"
    }  # fmt: skip


def test_unknown_methods_are_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "quantreg", "bench", "--quick", "--methods", "awq,nope"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode != 0
    assert "--methods: unknown nope; expected some of" in out.stderr

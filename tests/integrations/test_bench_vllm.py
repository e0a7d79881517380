"""``quantreg bench --peers vllm`` in a vLLM 0.32 venv: every vLLM peer row is either timed, with
a finite error against the exact result of its weights, or says why it cannot run on this CPU
(an op missing from the vLLM library loaded here, an AMX-only path, a oneDNN primitive this CPU
lacks) -- never a crash. Nothing is timed against anything: speed is for the bench to print.

Without vLLM the module is skipped (CI runs it in the vLLM venv of ``.ci/run``).
"""

from __future__ import annotations

import json
import math

import pytest
from vllm_env import import_vllm

vllm = import_vllm()

from quantreg.bench_peers import PEERS  # noqa: E402
from quantreg.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",
)
# int8 activations (W4A8, W8A8) round x per token; on AVX2 oneDNN's int8 matmul also
# saturates int16 partial sums with full-range int8 weights (measured 5e-2 to 1e-1 here)
LIMIT = {"vllm W4A8": 0.2, "vllm W8A8": 0.2}


@pytest.fixture(scope="module")
def peer_rows(tmp_path_factory):
    """One tiny ``--peers vllm`` run (torch's ops as the only other group): the vLLM rows."""
    out = tmp_path_factory.mktemp("bench") / "o.json"
    argv = ["bench", "--shape", "256x256", "--m", "1,4", "--budget", "0", "--methods", "torch",
            "--peers", "vllm", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    return rows, [row for row in rows if row["method"].startswith("vllm ")]


def test_every_vllm_peer_has_a_row_per_m(peer_rows):
    _, rows = peer_rows
    assert sorted((r["method"], r["M"]) for r in rows) == sorted(
        (peer.method, m) for peer in PEERS for m in (1, 4)
    )


@pytest.mark.parametrize("peer", [peer.method for peer in PEERS])
def test_each_peer_row_is_timed_with_a_finite_error_or_says_why_it_cannot_run(peer_rows, peer):
    _, rows = peer_rows
    for row in (r for r in rows if r["method"] == peer):
        if row["unavailable"]:
            assert row["median_ms"] == "NaN" and row["max_rel_err"] == "NaN", row
        else:
            assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
            assert row["max_rel_err"] < LIMIT.get(peer, 2e-2), row


def test_the_fastest_dense_path_is_one_of_the_dense_rows_including_vllms(peer_rows):
    rows, _ = peer_rows
    dense = {r["method"] for r in rows if r["dense"] and not r["unavailable"]}
    assert {"dense fp32", "dense bf16"} <= dense
    assert {r["fastest_dense"] for r in rows} <= dense

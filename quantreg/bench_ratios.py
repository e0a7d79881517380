"""The bench's reference points: the machine's read bandwidth measured beside every row, and the
fastest dense path of the run, against which every row is also reported.

* The read is STREAM-like: ``torch.sum`` over a float32 buffer as large as the largest weight of
  the run (the fp32 copy of the dense weight, N * K * 4 bytes), with torch's threads (the
  kernels' threads), rotated over as many copies as the weights and timed in every group,
  interleaved with its rows (as their dense bf16 baseline is). A row's ``read_fraction`` is its
  ``gbps`` (weight bytes read per call / median time) over that read (``read_gbps``): 1.0 is
  the machine's measured limit at the time the row ran. ``read_fraction_of_best`` sets it
  against the best read of its shape in the whole run instead, which this VM's slow stretches
  (minutes long, hitting one group and not the next) move by up to a fifth.
* ``ratio_vs_fastest_dense`` is a row's ``ratio_vs_bf16`` over the highest ``ratio_vs_bf16``
  of the dense rows (dense fp32 and bf16 ``F.linear``, and a peer's dense path) of the same N,
  K and M: every group times dense bf16 interleaved with its cases, so ratios of different
  groups meet through that common baseline. ``fastest_dense`` names that row's method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

READ = "memory read"
READ_COMPUTES = (
    "torch.sum over a float32 buffer of N*K*4 bytes (the fp32 weight's size), with torch's "
    "threads, rotated over the weights' copy count"
)


def read_bytes(n: int, k: int) -> int:
    """The bytes one read call sums: N * K float32 values (the fp32 weight's size)."""
    return n * k * 4


def read_calls(n: int, k: int, copies: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """One STREAM-like read per copy: a sum over ``n * k`` float32 values, every page written
    first (an untouched page reads as the shared zero page, which is faster than memory)."""
    buffers = [torch.full((n, k), 1.0 / (n * k)) for _ in range(copies)]
    return [lambda x, b=b: b.sum() for b in buffers]


def read_record(
    n: int, k: int, m: int, copies: int, timing: tuple[float, float, float], group: str
) -> dict[str, Any]:
    """One read measurement (timed in ``group``, beside its rows of token count ``m``), as
    written to ``--json`` under ``bandwidth``."""
    median, low, high = timing
    size = read_bytes(n, k)
    return {
        "method": READ, "group": group, "N": n, "K": k, "M": m, "bytes": size, "copies": copies,
        "threads": torch.get_num_threads(), "median_ms": round(median, 4),
        "min_ms": round(low, 4), "max_ms": round(high, 4),
        "gbps": round(size / median / 1e6, 2), "computes": READ_COMPUTES,
    }  # fmt: skip


def best_reads(reads: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
    """The machine's read bandwidth per shape: the best GB/s of its read measurements."""
    best: dict[tuple[int, int], float] = {}
    for read in reads:
        key = (read["N"], read["K"])
        if math.isfinite(read["gbps"]):
            best[key] = max(best.get(key, 0.0), read["gbps"])
    return best


def fastest_dense(rows: list[dict[str, Any]]) -> dict[tuple[int, int, int], tuple[float, str]]:
    """Per (N, K, M): the highest ``ratio_vs_bf16`` of a dense row, and that row's method."""
    best: dict[tuple[int, int, int], tuple[float, str]] = {}
    for row in rows:
        ratio = row["ratio_vs_bf16"]
        key = (row["N"], row["K"], row["M"])
        if row.get("dense") and math.isfinite(ratio) and ratio > best.get(key, (0.0, ""))[0]:
            best[key] = (ratio, row["method"])
    return best


def annotate(rows: list[dict[str, Any]], reads: list[dict[str, Any]]) -> None:
    """Fill in every row's ``ratio_vs_fastest_dense``, ``fastest_dense``, ``read_fraction``
    and ``read_fraction_of_best`` (see the module doc); NaN where a row or its reference has
    no time."""
    fastest = fastest_dense(rows)
    bandwidth = best_reads(reads)
    for row in rows:
        ratio, method = fastest.get((row["N"], row["K"], row["M"]), (math.nan, ""))
        best = bandwidth.get((row["N"], row["K"])) or math.nan
        row["fastest_dense"] = method
        row["ratio_vs_fastest_dense"] = round(row["ratio_vs_bf16"] / ratio, 3)
        row["read_fraction"] = round(row["gbps"] / (row.get("read_gbps") or math.nan), 3)
        row["read_fraction_of_best"] = round(row["gbps"] / best, 3)

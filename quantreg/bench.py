"""``quantreg bench``: every quantized lm_head method side by side with dense ``F.linear``.

One process, one table: dense fp32 and bf16 ``F.linear`` and each method's head -- written as a
checkpoint in the format's own layout and loaded by ``load_lm_head``, so every row runs the
kernel the loader selected and names it (``kernel``) -- plus torch's own weight-only ops as
peers (and vLLM's CPU kernels with ``peers=("vllm",)``, :mod:`quantreg.bench_peers`), for
(N, K) in {(32000, 4096), (128256, 4096)} and M in {1, 4, 16, 64}. Heads are rotated across
copies until their weights exceed the caches, every timed slice starts with a warm-up call on
every copy, runs are interleaved across methods, and the median is reported with the spread of
the timed rounds (``min_ms``, ``max_ms``). The machine's read bandwidth is measured in every
group, beside its rows (``bandwidth``; :mod:`quantreg.bench_ratios`).

* ``ratio_vs_bf16`` = median time of dense bf16 ``F.linear`` of the same N, K and M, timed in
  the same group (interleaved with the case) / median time of the case (higher is faster);
* ``ratio_vs_fastest_dense``: the same against the fastest dense path of the run with the same
  N, K and M (``fastest_dense`` names it), via each group's bf16 baseline;
* ``gbps`` = resident weight bytes / median time (the bytes read per call); ``read_gbps``: the
  machine's read bandwidth timed in the same group (interleaved with the row, like its bf16
  baseline); ``read_fraction`` = ``gbps`` / ``read_gbps``, and ``read_fraction_of_best`` =
  ``gbps`` / the best read of the shape in the whole run;
* ``peak_transient_bytes``: the peak of (bytes allocated - bytes freed) by torch's CPU
  allocator during one call, from ``torch.profiler`` memory events (each op's own
  allocations, the output included);
* ``max_rel_err`` = max |y - y_ref| / max |y_ref|, where ``y_ref`` is the exact float32
  result of the same format (weights dequantized and rounded to the scale dtype, as the
  producers do) on the same activations.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from quantreg import ParallelLMHead, bench_peers, bench_ratios, load_lm_head
from quantreg.bench_cases import FORMATS, Case, Format, dense_cases, torch_peer_cases, write_format
from quantreg.bench_report import machine
from quantreg.errors import InputError

logger = logging.getLogger(__name__)

FULL_SHAPES = ((32000, 4096), (128256, 4096))
QUICK_SHAPES = ((1024, 512),)
MS = (1, 4, 16, 64)
CACHE_BYTES = 256 * 2**20  # rotate copies until the weights exceed this
# Seconds per weight element, timed case and M beyond the timing budget (writing, loading,
# warm-up, profiling and the exact reference of every case): the pace of a 2-core CPU, where a
# full run took about 45 minutes.
PACE_S = 6e-8


@dataclass
class Row:
    """One benchmark case, as written to ``--json``."""

    method: str
    format: str
    bits: int
    N: int
    K: int
    M: int
    dtype: str
    median_ms: float
    min_ms: float
    max_ms: float
    ratio_vs_bf16: float
    gbps: float
    resident_bytes: int
    peak_transient_bytes: int
    max_rel_err: float
    computes: str
    kernel: str
    dense: bool = False  # a dense path: a candidate for the fastest dense path of the run
    unavailable: str = ""  # why a peer's row has no numbers (it cannot run here)
    read_gbps: float = math.nan  # the read timed in the row's group, interleaved with it
    # filled in by bench_ratios.annotate once every group is timed
    ratio_vs_fastest_dense: float = math.nan
    fastest_dense: str = ""
    read_fraction: float = math.nan
    read_fraction_of_best: float = math.nan


def load_head(
    folder: Path, method: str, dtype: torch.dtype, activation_dtype: str | None = None
) -> ParallelLMHead:
    """A head of ``method`` loaded by ``load_lm_head`` (resolution, checks, kernel choice)."""
    return load_lm_head(
        folder, dtype=dtype, requested=method, tp=1, activation_dtype=activation_dtype
    )


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's native layer prints to fd 2; keep the table readable."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_transient_bytes(call: Callable[[], Any]) -> int:
    """Peak of allocated-minus-freed CPU bytes during one call (torch.profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # self_ (not total) usage: an op's total also counts what its children allocated
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def run_bench(
    *,
    quick: bool = False,
    shapes: tuple[tuple[int, int], ...] | None = None,
    ms: tuple[int, ...] = MS,
    budget_s: float = 2.0,
    progress: Callable[[str], None] | None = None,
    methods: tuple[str, ...] | None = None,
    formats: tuple[str, ...] | None = None,
    peers: tuple[str, ...] = (),
    activation_dtypes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run every case; returns ``{"machine", "rows", "bandwidth"}`` (see the module doc).

    ``methods`` keeps only those methods (``"torch"`` for torch's ops), ``formats`` only the
    formats of those labels (and no torch ops); the dense baselines and the read-bandwidth
    measurement always run. ``peers=("vllm",)`` adds vLLM's CPU kernels
    (:mod:`quantreg.bench_peers`). ``activation_dtypes=("int8",)`` adds, beside each
    method's weight-only row, the same head loaded with that ``activation_dtype`` (method
    ``"<method> a8"``) wherever a kernel runs it.

    Cases are timed one group at a time (the dense baselines, each format with all the methods
    that run it, torch's ops, vLLM's kernels), interleaved with dense bf16 ``F.linear`` and the
    read inside every group, so that only one group's heads are in memory and every ratio and
    read fraction has its reference measured alongside it (this VM has slow stretches lasting
    minutes: a read timed in another group once put the same kernel at 70 % or 95 %).

    Raises:
        PluginError: ``peers`` names vllm and vllm does not import.
    """
    say = progress or (lambda message: logger.info("%s", message))
    shapes = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    if "vllm" in peers:
        bench_peers.require_vllm()
    say(estimate(shapes, ms, budget_s, methods, formats, peers, activation_dtypes))
    rows: list[Row] = []
    reads: list[dict[str, Any]] = []
    for n, k in shapes:
        copies = max(1, min(8, math.ceil(CACHE_BYTES / (n * k * 2))))
        dense = dense_cases(n, k, copies)
        groups = _groups(n, k, copies, say, (methods, formats, peers, activation_dtypes))
        read = bench_ratios.read_calls(n, k, copies)  # timed in every group, beside its rows
        for index, (group, make) in enumerate(groups):
            cases = dense if index == 0 else [dense[1], *make()]
            for m in ms:
                names = [c.method + (" (unavailable)" if c.unavailable else "") for c in cases]
                say(f"timing N={n} K={k} M={m}: {', '.join(names)}, {bench_ratios.READ}")
                timed, read_timing = _time_group(
                    cases, n, k, m, budget_s, skip=0 if index == 0 else 1, read=read
                )
                rows += timed
                reads.append(bench_ratios.read_record(n, k, m, copies, read_timing, group))
            del cases
            gc.collect()
        del read
    result = [asdict(r) for r in rows]
    bench_ratios.annotate(result, reads)
    return {"machine": machine(), "rows": result, "bandwidth": reads}


def _groups(
    n: int,
    k: int,
    copies: int,
    say: Callable[[str], None],
    kept: tuple[tuple[str, ...] | None, tuple[str, ...] | None, tuple[str, ...], tuple[str, ...]],
) -> list[tuple[str, Callable[[], list[Case]]]]:
    """What to time, one group after the other, each named (as its reads are in the JSON):
    the dense baselines first (``list``: no cases of its own), then each format, torch's ops
    and vLLM's kernels; ``kept``: the methods, formats, peers and activation dtypes asked for."""
    methods, formats, peers, activation_dtypes = kept
    groups: list[tuple[str, Callable[[], list[Case]]]] = [("dense", list)]
    for fmt in _kept(methods, formats):
        make = functools.partial(_method_cases, fmt, n, k, copies, say, activation_dtypes)
        groups.append((fmt.label, make))
    if (methods is None or "torch" in methods) and formats is None:
        groups.append(("torch ops", functools.partial(torch_peer_cases, n, k, copies)))
    if "vllm" in peers:
        groups.append(("vllm", functools.partial(bench_peers.vllm_cases, n, k, copies, say)))
    return groups


def _kept(methods: tuple[str, ...] | None, formats: tuple[str, ...] | None) -> list[Format]:
    """The formats to run, each with the methods kept."""
    kept = []
    for fmt in FORMATS:
        names = tuple(m for m in fmt.methods if methods is None or m in methods)
        if names and (formats is None or fmt.label in formats):
            kept.append(replace(fmt, methods=names))
    return kept


def estimate(
    shapes: tuple[tuple[int, int], ...],
    ms: tuple[int, ...],
    budget_s: float,
    methods: tuple[str, ...] | None = None,
    formats: tuple[str, ...] | None = None,
    peers: tuple[str, ...] = (),
    activation_dtypes: tuple[str, ...] = (),
) -> str:
    """What a run will cost, said before it starts: the timing budget it spends for sure,
    plus the work that grows with the weights (at ``PACE_S``, a 2-core CPU's pace)."""
    kept = [f.methods for f in _kept(methods, formats)]
    ops = 2 if (methods is None or "torch" in methods) and formats is None else 0
    engines = len(bench_peers.PEERS) if "vllm" in peers else 0
    groups = 1 + sum(1 for m in kept if m) + (1 if ops else 0) + (1 if engines else 0)
    cases = 2 + sum(len(m) for m in kept) * (1 + len(activation_dtypes)) + ops + engines
    timing = len(shapes) * groups * len(ms) * budget_s
    work = sum(n * k for n, k in shapes) * cases * len(ms) * PACE_S
    total = timing + work
    about = f"{total / 60:.0f} min" if total >= 90 else f"{max(total, 1):.0f} s"
    return (
        f"bench: {len(shapes)} shape(s) x {groups} groups x {len(ms)} token counts, "
        f"{budget_s:g} s of timing each ({timing:.0f} s), plus writing, loading and checking "
        f"{cases} cases per shape: about {about} in all on a 2-core CPU"
    )


def _time_group(
    cases: list[Case],
    n: int,
    k: int,
    m: int,
    budget_s: float,
    skip: int,
    read: list[Callable[[torch.Tensor], torch.Tensor]],
) -> tuple[list[Row], tuple[float, float, float]]:
    """Time ``cases`` and the ``read`` interleaved (``cases[0]`` or ``[1]`` is dense bf16: the
    baseline); return a row for each case after the first ``skip`` (an unavailable one
    untimed, saying why) and the read's timing."""
    x32 = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    timed = [(case, x32.to(case.dtype)) for case in cases if not case.unavailable]
    calls = [_cycle(c.fns, x) for c, x in timed] + [_cycle(read, x32)]
    copies = max(len(fns) for fns in [read, *(c.fns for c, _ in timed)])
    times = _timings(calls, budget_s, warmup=copies)
    found = {id(c): (x, t) for (c, x), t in zip(timed, times, strict=False)}  # times: + the read
    bf16 = next(found[id(c)][1][0] for c in cases if c.method == "dense bf16")
    read_gbps = round(bench_ratios.read_bytes(n, k) / times[-1][0] / 1e6, 2)
    references: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # one exact result per format
    rows = []
    for case in cases[skip:]:
        if case.unavailable:
            rows.append(_unavailable_row(case, n, k, m))
            continue
        x, (median, low, high) = found[id(case)]
        key = (id(getattr(case.reference, "__self__", case.reference)), case.dtype)
        if key not in references:
            references[key] = case.reference(x.float())
        out, ref = case.fns[0](x).float(), references[key]
        rows.append(
            Row(
                method=case.method, format=case.format, bits=case.bits, N=n, K=k, M=m,
                dtype=str(case.dtype).removeprefix("torch."), median_ms=round(median, 4),
                min_ms=round(low, 4), max_ms=round(high, 4), ratio_vs_bf16=round(bf16 / median, 3),
                gbps=round(case.resident_bytes / median / 1e6, 2),
                resident_bytes=case.resident_bytes,
                peak_transient_bytes=peak_transient_bytes(lambda c=case, x=x: c.fns[0](x)),
                max_rel_err=float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30)),
                computes=case.computes, kernel=case.kernel, dense=case.dense, read_gbps=read_gbps,
            )
        )  # fmt: skip
    return rows, times[-1]


def _unavailable_row(case: Case, n: int, k: int, m: int) -> Row:
    """The row of a case that cannot run here: no numbers, and ``unavailable`` says why."""
    nan = math.nan
    return Row(
        method=case.method, format=case.format, bits=case.bits, N=n, K=k, M=m,
        dtype=str(case.dtype).removeprefix("torch."), median_ms=nan, min_ms=nan, max_ms=nan,
        ratio_vs_bf16=nan, gbps=nan, resident_bytes=0, peak_transient_bytes=0, max_rel_err=nan,
        computes=case.computes, kernel=case.kernel, dense=case.dense, unavailable=case.unavailable,
    )  # fmt: skip


def _method_cases(
    fmt: Format,
    n: int,
    k: int,
    copies: int,
    say: Callable[[str], None],
    activation_dtypes: tuple[str, ...] = (),
) -> list[Case]:
    """Every method of one format, in bf16, with ``copies`` heads to rotate through; then
    each method again with each of ``activation_dtypes`` where a kernel runs it."""
    say(f"writing and loading {fmt.label} heads for N={n} K={k}")
    with tempfile.TemporaryDirectory(prefix="quantreg-bench-") as tmp:
        folder = write_format(Path(tmp), fmt, n, k, seed=0)
        # float32 heads dequantize exactly (rounded to the scale dtype); cpu_wna16's kernels
        # do it fastest, bit for bit like the reference methods
        exact = "cpu_wna16" if "cpu_wna16" in fmt.methods else fmt.methods[0]
        reference = load_head(folder, exact, torch.float32)
        cases = []
        for method, act in [(m, a) for a in (None, *activation_dtypes) for m in fmt.methods]:
            try:
                heads = [load_head(folder, method, torch.bfloat16, act) for _ in range(copies)]
            except InputError as exc:
                if act is None:
                    raise
                say(f"{fmt.label}: {method} runs no {act} activations ({exc})")
                continue
            kernel = heads[0].kernel
            assert kernel is not None  # recorded by the loader
            label = method if act is None else f"{method} a{act.removeprefix('int')}"
            cases.append(
                Case(label, fmt.label, fmt.bits, torch.bfloat16,
                     [h.compute_logits for h in heads], heads[0].resident_bytes(),
                     f"{method}: {kernel.reason}, "
                     + (f"{act} activations" if act else "weight-only"),
                     reference.compute_logits, kernel.name)
            )  # fmt: skip
    return cases


def _cycle(fns: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> Callable[[], Any]:
    """One call per invocation, rotating through the copies so weights come from memory."""
    position = [0]

    def call() -> Any:
        position[0] += 1
        return fns[position[0] % len(fns)](x)

    return call


def _timings(
    calls: list[Callable[[], Any]], budget_s: float, warmup: int = 1, seed: int = 0
) -> list[tuple[float, float, float]]:
    """(median, min, max) ms per call: ``warmup`` untimed rounds (one per rotated copy, so
    every copy is touched: memory left alone for a second or two reads several times slower
    on its next passes), then rounds of one call each (interleaved) until the budget is spent
    (at least 3 rounds, at most 50). Each round calls them in its own order (seeded): what
    ran just before a call changes its time on this project's VM (an int4 call at M = 1 took
    up to 6 % longer after dense ``F.linear`` or a read than after another int4 call), so no
    call always follows the same one."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    order, shuffle = list(range(len(calls))), random.Random(seed).shuffle
    start = time.perf_counter()
    for round_ in range(50):
        shuffle(order)
        for i in order:
            t0 = time.perf_counter()
            calls[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
        if round_ >= 2 and time.perf_counter() - start > budget_s:
            break
    return [(statistics.median(t), min(t), max(t)) for t in times]

"""``quantreg bench``: every quantized lm_head method side by side with dense ``F.linear``.

One process, one table: dense fp32 and bf16 ``F.linear`` and each method's head -- written as a
checkpoint in the format's own layout and loaded by ``load_lm_head``, so every row runs the
kernel the loader selected and names it (``kernel``) -- plus torch's own weight-only ops as
peers, for (N, K) in {(32000, 4096), (128256, 4096)} and M in {1, 4, 16,
64}. Heads are rotated across copies until their weights exceed the caches, every case is
warmed up, runs are interleaved across methods, and the median is reported with the spread of
the timed rounds (``min_ms``, ``max_ms``).

* ``ratio_vs_bf16`` = median time of dense bf16 ``F.linear`` of the same N, K and M, timed in
  the same group (interleaved with the case) / median time of the case (higher is faster);
* ``gbps`` = resident weight bytes / median time;
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
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quantreg import ParallelLMHead, get_quant_config_cls, load_lm_head
from quantreg.bench_report import machine

logger = logging.getLogger(__name__)

FULL_SHAPES = ((32000, 4096), (128256, 4096))
QUICK_SHAPES = ((1024, 512),)
MS = (1, 4, 16, 64)
CACHE_BYTES = 256 * 2**20  # rotate copies until the weights exceed this
ROW_CHUNK = 8192  # vocab rows quantized per step when building a head
# Seconds per weight element, timed case and M beyond the timing budget (writing, loading,
# warm-up, profiling and the exact reference of every case): the pace of a 2-core CPU, where a
# full run took about 45 minutes.
PACE_S = 6e-8


@dataclass(frozen=True)
class Format:
    """One quantized layout to benchmark: the writer's method and options, and the methods
    that run it (the first one is the exact reference)."""

    label: str
    writer: str
    bits: int
    params: dict[str, Any]
    methods: tuple[str, ...]


FORMATS = (
    Format("awq int4 g128", "awq", 4, {"group_size": 128}, ("awq", "awq_marlin", "cpu_wna16")),
    Format("gptq int4 g128", "gptq", 4, {"group_size": 128}, ("gptq", "gptq_marlin", "cpu_wna16")),
    Format("gptq int8 g128", "gptq", 8, {"bits": 8, "group_size": 128}, ("gptq", "cpu_wna16")),
    Format("gptq int8 channel", "gptq", 8, {"bits": 8, "group_size": -1}, ("gptq", "cpu_wna16")),
    Format("ct int4 g128", "compressed-tensors", 4,
           {"format": "pack-quantized", "bits": 4, "group_size": 128}, ("compressed-tensors",)),
    Format("ct int8 channel", "compressed-tensors", 8,
           {"format": "pack-quantized", "bits": 8, "strategy": "channel"}, ("compressed-tensors",)),
    Format("ct fp8 channel", "compressed-tensors", 8,
           {"format": "float-quantized", "strategy": "channel"}, ("compressed-tensors",)),
    Format("fp8 block 128x128", "fp8", 8, {"block_size": (128, 128)}, ("fp8",)),
    # the global scale of the whole head, which write_format quantizes in pieces
    Format("ct nvfp4 g16", "compressed-tensors", 4,
           {"format": "nvfp4-pack-quantized", "tensor_amax": 0.125}, ("compressed-tensors",)),
)  # fmt: skip


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


def write_format(folder: Path, fmt: Format, n: int, k: int, seed: int) -> Path:
    """Write a checkpoint whose lm_head is ``fmt`` tensors of a random fp16 ``[n, k]``
    weight, quantized by the method's own writer ``ROW_CHUNK`` vocab rows at a time (the
    writers work in float64; one chunk at a time keeps that small)."""
    from safetensors.torch import save_file

    quantize = get_quant_config_cls(fmt.writer).quantize_weight
    vocab_dim = 1 if fmt.writer in ("awq", "gptq") else 0
    parts, qcfg = [], {}
    for start in range(0, n, ROW_CHUNK):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
        weight = (torch.randn(min(ROW_CHUNK, n - start), k, generator=gen) * 0.02).half()
        part, qcfg = quantize(weight, scale_dtype=torch.float16, **fmt.params)
        parts.append(part)
    tensors = {}
    for name, first in parts[0].items():
        if name == "weight_shape":
            tensors[name] = torch.tensor([n, k], dtype=torch.int64)
        elif name == "g_idx" or first.numel() == 1:  # replicated: same for every chunk
            tensors[name] = first
        else:
            tensors[name] = torch.cat([p[name] for p in parts], dim=vocab_dim)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"hidden_size": k, "vocab_size": n, "torch_dtype": "float16",
              "quantization_config": qcfg}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    save_file({f"lm_head.{name}": t.contiguous() for name, t in tensors.items()},
              str(folder / "model.safetensors"))  # fmt: skip
    return folder


def load_head(folder: Path, method: str, dtype: torch.dtype) -> ParallelLMHead:
    """A head of ``method`` loaded by ``load_lm_head`` (resolution, checks, kernel choice)."""
    return load_lm_head(folder, dtype=dtype, requested=method, tp=1)


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


@dataclass
class Case:
    """Something to time: a name, what it computes, and one callable per rotated copy."""

    method: str
    format: str
    bits: int
    dtype: torch.dtype
    fns: list[Callable[[torch.Tensor], torch.Tensor]]
    resident_bytes: int
    computes: str
    reference: Callable[[torch.Tensor], torch.Tensor]  # exact float32 result for max_rel_err
    kernel: str


def run_bench(
    *,
    quick: bool = False,
    shapes: tuple[tuple[int, int], ...] | None = None,
    ms: tuple[int, ...] = MS,
    budget_s: float = 2.0,
    progress: Callable[[str], None] | None = None,
    methods: tuple[str, ...] | None = None,
    formats: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Run every case; returns ``{"machine": ..., "rows": [...]}`` (see the module doc).

    ``methods`` keeps only those methods (``"torch"`` for torch's ops), ``formats`` only the
    formats of those labels (and no torch ops); the dense baselines always run.

    Cases are timed one group at a time (the dense baselines, each format with all the
    methods that run it, torch's ops), interleaved with dense bf16 ``F.linear`` inside every
    group, so that only one group's heads are in memory and every ratio has a baseline
    measured alongside it.
    """
    say = progress or (lambda message: logger.info("%s", message))
    shapes = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    say(estimate(shapes, ms, budget_s, methods, formats))
    rows: list[Row] = []
    for n, k in shapes:
        copies = max(1, min(8, math.ceil(CACHE_BYTES / (n * k * 2))))
        dense = _dense_cases(n, k)
        groups: list[Callable[[], list[Case]]] = [list]
        for fmt in _kept(methods, formats):
            groups.append(functools.partial(_method_cases, fmt, n, k, copies, say))
        if (methods is None or "torch" in methods) and formats is None:
            groups.append(functools.partial(_torch_peers, n, k, copies))
        for index, make in enumerate(groups):
            cases = dense if index == 0 else [dense[1], *make()]
            for m in ms:
                say(f"timing N={n} K={k} M={m}: {', '.join(c.method for c in cases)}")
                rows += _time_group(cases, n, k, m, budget_s, skip=0 if index == 0 else 1)
            del cases
            gc.collect()
    return {"machine": machine(), "rows": [asdict(r) for r in rows]}


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
) -> str:
    """What a run will cost, said before it starts: the timing budget it spends for sure,
    plus the work that grows with the weights (at ``PACE_S``, a 2-core CPU's pace)."""
    kept = [f.methods for f in _kept(methods, formats)]
    peers = 2 if (methods is None or "torch" in methods) and formats is None else 0
    groups = 1 + sum(1 for m in kept if m) + (1 if peers else 0)
    cases = 2 + sum(len(m) for m in kept) + peers
    timing = len(shapes) * groups * len(ms) * budget_s
    work = sum(n * k for n, k in shapes) * cases * len(ms) * PACE_S
    total = timing + work
    about = f"{total / 60:.0f} min" if total >= 90 else f"{max(total, 1):.0f} s"
    return (
        f"bench: {len(shapes)} shape(s) x {groups} groups x {len(ms)} token counts, "
        f"{budget_s:g} s of timing each ({timing:.0f} s), plus writing, loading and checking "
        f"{cases} cases per shape: about {about} in all on a 2-core CPU"
    )


def _time_group(cases: list[Case], n: int, k: int, m: int, budget_s: float, skip: int) -> list[Row]:
    """Time ``cases`` interleaved (``cases[0]`` or ``[1]`` is dense bf16: the baseline) and
    return a row for each case after the first ``skip``."""
    x32 = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    inputs = [x32.to(case.dtype) for case in cases]
    times = _timings([_cycle(c.fns, x) for c, x in zip(cases, inputs, strict=True)], budget_s)
    bf16 = next(t[0] for c, t in zip(cases, times, strict=True) if c.method == "dense bf16")
    references: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # one exact result per format
    rows = []
    for case, x, (median, low, high) in list(zip(cases, inputs, times, strict=True))[skip:]:
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
                computes=case.computes, kernel=case.kernel,
            )
        )  # fmt: skip
    return rows


def _dense_cases(n: int, k: int) -> list[Case]:
    """The baselines: dense ``F.linear`` in fp32 (row 0) and bf16 (row 1, the ratio's base)."""
    w32 = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02
    w16 = w32.to(torch.bfloat16)
    w16_exact = w16.float()
    return [
        Case("dense fp32", "float32", 32, torch.float32, [lambda x: F.linear(x, w32)], n * k * 4,
             "x @ W.T, fp32", lambda x: F.linear(x, w32), "dense"),
        Case("dense bf16", "bfloat16", 16, torch.bfloat16, [lambda x: F.linear(x, w16)], n * k * 2,
             "x @ W.T, bf16", lambda x: F.linear(x, w16_exact), "dense"),
    ]  # fmt: skip


def _method_cases(
    fmt: Format, n: int, k: int, copies: int, say: Callable[[str], None]
) -> list[Case]:
    """Every method of one format, in bf16, with ``copies`` heads to rotate through."""
    say(f"writing and loading {fmt.label} heads for N={n} K={k}")
    with tempfile.TemporaryDirectory(prefix="quantreg-bench-") as tmp:
        folder = write_format(Path(tmp), fmt, n, k, seed=0)
        # float32 heads dequantize exactly (rounded to the scale dtype); cpu_wna16's kernels
        # do it fastest, bit for bit like the reference methods
        exact = "cpu_wna16" if "cpu_wna16" in fmt.methods else fmt.methods[0]
        reference = load_head(folder, exact, torch.float32)
        cases = []
        for method in fmt.methods:
            heads = [load_head(folder, method, torch.bfloat16) for _ in range(copies)]
            kernel = heads[0].kernel
            assert kernel is not None  # recorded by the loader
            cases.append(
                Case(method, fmt.label, fmt.bits, torch.bfloat16,
                     [h.compute_logits for h in heads], heads[0].resident_bytes(),
                     f"{method}: {kernel.reason}, weight-only", reference.compute_logits,
                     kernel.name)
            )  # fmt: skip
    return cases


def _cycle(fns: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> Callable[[], Any]:
    """One call per invocation, rotating through the copies so weights come from memory."""
    position = [0]

    def call() -> Any:
        position[0] += 1
        return fns[position[0] % len(fns)](x)

    return call


def _timings(calls: list[Callable[[], Any]], budget_s: float) -> list[tuple[float, float, float]]:
    """(median, min, max) ms per call: warm-up, then rounds of one call each (interleaved)
    until the budget is spent (at least 3 rounds, at most 50)."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    for round_ in range(50):
        for i, call in enumerate(calls):
            t0 = time.perf_counter()
            call()
            times[i].append((time.perf_counter() - t0) * 1e3)
        if round_ >= 2 and time.perf_counter() - start > budget_s:
            break
    return [(statistics.median(t), min(t), max(t)) for t in times]


def _torch_peers(n: int, k: int, copies: int) -> list[Case]:
    """torch's own weight-only CPU ops on random codes (what each computes is in its label)."""
    peers = []
    gen = torch.Generator().manual_seed(7)
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and n % 16 == 0 and k % 128 == 0:
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        packed = torch.cat(
            [convert(codes[r : r + 1024].to(torch.int32), 1) for r in range(0, n, 1024)]
        )
        scales = (torch.rand(k // 128, n, generator=gen) * 0.002 + 0.001).to(torch.bfloat16)
        sz = torch.stack([scales, torch.zeros_like(scales)], -1).contiguous()
        col_scales = scales.float().T.repeat_interleave(128, 1)  # [n, k]: the weights' scale

        def rows4(r0: int, r1: int) -> torch.Tensor:
            return (codes[r0:r1].float() - 8) * col_scales[r0:r1]

        peers.append(
            Case("torch int4pack", "int4 g128", 4, torch.bfloat16,
                 [lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz)],
                 packed.numel() + sz.numel() * 2,
                 "torch._weight_int4pack_mm_for_cpu (zeros added as floats)",
                 lambda x: _by_rows(x, rows4, n), "torch-int4pack")
        )  # fmt: skip
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        w8 = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        s8 = (torch.rand(n, generator=gen) * 0.002 + 0.001).to(torch.bfloat16)

        def rows8(r0: int, r1: int) -> torch.Tensor:
            return w8[r0:r1].float() * s8[r0:r1].float()[:, None]

        peers.append(
            Case("torch int8pack", "int8 channel", 8, torch.bfloat16,
                 [lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, s8)], w8.numel() + n * 2,
                 "torch._weight_int8pack_mm", lambda x: _by_rows(x, rows8, n), "torch-int8pack")
        )  # fmt: skip
    return peers


def _by_rows(x: torch.Tensor, rows: Callable[[int, int], torch.Tensor], n: int) -> torch.Tensor:
    """``x @ W.T`` with ``W`` built 4096 rows at a time (never the whole float weight)."""
    return torch.cat([x @ rows(r, min(r + 4096, n)).T for r in range(0, n, 4096)], dim=-1)

"""What ``quantreg bench`` reports: the machine, a Markdown table, JSON, a plot, RESULTS.md."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from quantreg.errors import InputError
from quantreg.output_files import strict_json, write_file


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    names = [
        line.split(":", 1)[1].strip()
        for line in flags.splitlines()
        if line.startswith("model name")
    ]
    model = names[0] if names else platform.processor()
    isa = [
        f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f" {f}" in flags
    ]
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "isa": isa,
        "memory_bytes": mem,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


CURRENT, HISTORY = "\n## Current numbers\n", "\n## History\n"
BASELINE = (
    "× dense bf16 = median time of dense bf16 `F.linear` with the same N, K and M, timed in the "
    "same group as the row (interleaved with it), / the row's median time: higher is faster. "
    "median ms (min–max): over the row's timed rounds."
)


FASTEST = (
    "× fastest dense = the row's × dense bf16 / the highest × dense bf16 of a dense path (dense "
    "fp32 and bf16 `F.linear`, a peer's dense path) with the same N, K and M: the ratio against "
    "the fastest dense path of the run. GB/s = weight bytes read per call / median time; "
    "% of read = GB/s / the machine's read bandwidth timed in the same group as the row "
    "(interleaved with it); % of best read = GB/s / the best read of the run (below)."
)


def _cells(r: dict[str, Any]) -> str:
    """A row's cells after its labels: times, ratios, bandwidth, memory, error."""
    if r.get("unavailable"):
        return f"unavailable: {r['unavailable']} |" + " – |" * 10
    spread = f" ({r['min_ms']:.3f}–{r['max_ms']:.3f})" if "min_ms" in r else ""
    cells = (
        f"{r['median_ms']:.3f}{spread} | {r['ratio_vs_bf16']:.2f} | {r['gbps']:.1f} | "
        f"{r['resident_bytes'] / 2**20:.1f} | {r['peak_transient_bytes'] / 2**20:.1f} | "
        f"{r['max_rel_err']:.1e} |"
    )
    if "ratio_vs_fastest_dense" in r:
        fractions = [100 * r.get(f, math.nan) for f in ("read_fraction", "read_fraction_of_best")]
        cells += f" {r['ratio_vs_fastest_dense']:.2f} | {fractions[0]:.0f} | {fractions[1]:.0f} |"
    return cells


def format_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table, with the baseline of the ratios, the fastest dense path
    and the measured read bandwidth under it."""
    lines = [
        "| method | kernel | format | N | K | M | dtype | median ms (min–max) | × dense bf16 "
        "| GB/s | resident MiB | peak transient MiB | max rel err | × fastest dense | % of read "
        "| % of best read |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r.get('kernel', '')} | {r['format']} | {r['N']} | {r['K']} | "
            f"{r['M']} | {r['dtype']} | {_cells(r)}"
        )
    notes = ["", BASELINE, "", FASTEST]
    fastest: dict[tuple[int, int], list[str]] = {}
    for r in result["rows"]:
        if r.get("fastest_dense") and r["method"] == r["fastest_dense"]:
            fastest.setdefault((r["N"], r["K"]), []).append(f"M={r['M']}: {r['method']}")
    for (n, k), picks in sorted(fastest.items()):
        notes.append(f"- fastest dense path, N={n} K={k}: {', '.join(picks)}")
    return "\n".join([*lines, *notes, *_read_notes(result.get("bandwidth", []))])


def _read_notes(reads: list[dict[str, Any]]) -> list[str]:
    """A line per shape: its best read, the range of its reads and what they computed."""
    shapes: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for read in reads:
        shapes.setdefault((read["N"], read["K"]), []).append(read)
    notes = []
    for (n, k), found in sorted(shapes.items()):
        speeds = [r["gbps"] for r in found]
        notes.append(
            f"- read bandwidth, N={n} K={k}: {max(speeds):.1f} GB/s at best, "
            f"{min(speeds):.1f} at worst ({len(found)} slices: one in each group at each M, "
            f"beside its rows; {found[0]['computes']}, {found[0]['threads']} threads)"
        )
    return notes


def append_results(result: dict[str, Any], path: Path, note: str = "") -> None:
    """Record a run in ``path`` (e.g. bench/RESULTS.md) as its current numbers: the section
    under ``## Current numbers`` moves to the top of ``## History`` (newest first), and the new
    one (date, machine, note, table) takes its place. A file without those headings gets them
    before its first ``## `` section (after its intro)."""
    m = result["machine"]
    header = (
        f"\n### {m['date']} — {m['cpu']}, {m['cores']} cores ({m['threads']} threads), "
        f"{', '.join(m['isa']) or 'no AVX-512'}, torch {m['torch']}\n"
    )
    section = header + (f"\n{note}\n" if note else "") + "\n" + format_table(result) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if CURRENT in text:
        start = text.index(CURRENT) + len(CURRENT)
        end = text.find("\n## ", start)
        end = len(text) if end < 0 else end
        previous, text = text[start:end], text[:start] + text[end:]
        if HISTORY not in text:
            text = text.rstrip("\n") + "\n" + HISTORY
        at = text.index(HISTORY) + len(HISTORY)
        text = text[:at] + previous + text[at:]
        at = text.index(CURRENT) + len(CURRENT)
        text = text[:at] + section + text[at:]
    else:
        first = text.find("\n## ")
        block = CURRENT + section
        text = text + block if first < 0 else text[:first] + block + text[first:]
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what="--append-results")


def plot(result: dict[str, Any], path: Path) -> None:
    """Time vs M per method, one panel per shape (needs the ``bench`` extra: matplotlib).

    Raises:
        InputError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise InputError("--plot needs matplotlib: pip install 'quantreg[bench]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["N"], r["K"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 5), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in result["rows"]:
            if (r["N"], r["K"]) == (n, k):
                series.setdefault(f"{r['method']} [{r['format']}]", []).append(
                    (r["M"], r["median_ms"])
                )
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="M (tokens)",
            ylabel="median ms",
            title=f"N={n} K={k}",
        )
        ax.legend(fontsize=6)
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), what="--plot")
    plt.close(fig)


def write_json(result: dict[str, Any], path: Path) -> None:
    """``result`` as strict JSON (non-finite numbers as strings), written atomically."""
    text = strict_json(result) + "\n"
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what="--json")

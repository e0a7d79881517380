"""Load time and peak RSS of ``load_lm_head`` for every format, against reading the file.

For each format it writes a ``--shape`` head (default 32000x4096, a random fp16 weight through
the method's own writer, ``quantreg.bench.write_format``; kept in ``--dir`` and reused), then
in a fresh process per format:

* ``read``: ``safe_open(...)`` and ``get_tensor`` of every tensor, twice; the second is reported
  (the file is in the page cache by then: this is the cost of getting its bytes, not the disk);
* ``load``: ``load_lm_head(path, dtype=--dtype)``, median of 3 (the first one also loads the
  kernel's extension; ``first`` shows it);
* ``peak``: the first load's high-water RSS (``VmHWM``) minus the RSS before it (after the
  imports), against the budget ``1.3 x resident bytes + file bytes``;
* ``goal``: ``2 x read + 0.3 s``.

Usage: ``python bench/load_time.py [--dir DIR] [--formats "gptq int4 g128,..."]
[--trees A,B]``: with ``--trees`` each format is measured in every source tree in turn (the
child process runs in that tree and imports its quantreg), so two trees are compared
interleaved on the same files. ``--profile LABEL`` prints a cProfile of one load instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FORMAT_EXTRA = "modelopt nvfp4"
GOAL_FACTOR, GOAL_CONSTANT_S, RSS_FACTOR = 2.0, 0.3, 1.3


def formats() -> dict[str, object]:
    """bench's formats and ModelOpt NVFP4, by label."""
    from quantreg.bench import FORMATS, Format

    extra = Format(FORMAT_EXTRA, "modelopt", 4, {"format": "nvfp4"}, ("modelopt",))
    return {f.label: f for f in (*FORMATS, extra)}


def status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (``VmHWM``, unlike ``ru_maxrss``, does not
    carry the parent's peak across ``exec``)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def read_all(path: Path) -> float:
    from safetensors import safe_open

    start = time.perf_counter()
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        # get_tensor may map the file lazily: a copy makes every byte read
        tensors = {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118
    seconds = time.perf_counter() - start
    del tensors
    return seconds


def measure(path: Path, dtype: str) -> dict[str, object]:
    """One format, in this (fresh) process."""
    import torch

    import quantreg
    import quantreg.methods

    torch.zeros(1)
    base = status_mb("VmRSS")
    loads = []
    start = time.perf_counter()
    head = quantreg.load_lm_head(path, dtype=dtype)
    loads.append(time.perf_counter() - start)
    peak = status_mb("VmHWM") - base
    kernel, resident = head.kernel.name, head.resident_bytes()
    del head
    for _ in range(2):
        start = time.perf_counter()
        head = quantreg.load_lm_head(path, dtype=dtype)
        loads.append(time.perf_counter() - start)
        del head
    read_all(path)
    read = read_all(path)
    return {"kernel": kernel, "first": loads[0], "load": statistics.median(loads), "read": read,
            "peak_mb": peak, "resident_mb": resident / 2**20,
            "file_mb": (path / "model.safetensors").stat().st_size / 2**20}  # fmt: skip


def profile(path: Path, dtype: str) -> None:
    import cProfile
    import pstats

    import quantreg
    import quantreg.methods

    quantreg.load_lm_head(path, dtype=dtype)  # the extension and caches, not profiled
    prof = cProfile.Profile()
    prof.enable()
    quantreg.load_lm_head(path, dtype=dtype)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "quantreg-load"))
    parser.add_argument("--formats", default=None, help="comma-separated labels (default all)")
    parser.add_argument("--shape", default="32000x4096")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--profile", default=None, help="print a cProfile of this format's load")
    parser.add_argument("--trees", default=None, help="comma-separated source trees to compare")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one folder
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(Path(args.one), args.dtype)))
        return
    table = formats()
    labels = args.formats.split(",") if args.formats else list(table)
    n, k = map(int, args.shape.split("x"))
    folders = {}
    for label in labels:
        folder = Path(args.dir) / f"{label.replace(' ', '_')}_{n}x{k}"
        if not (folder / "model.safetensors").exists():
            from quantreg.bench import write_format

            write_format(folder, table[label], n, k, seed=0)  # type: ignore[arg-type]
        folders[label] = folder
    if args.profile:
        profile(folders[args.profile], args.dtype)
        return
    trees = args.trees.split(",") if args.trees else [os.getcwd()]
    print(f"{'format':20} {'tree':10} {'kernel':16} {'read s':>7} {'load s':>7} {'first':>6} "
          f"{'goal s':>7} {'x read':>7} {'peak MB':>8} {'budget':>7}")  # fmt: skip
    for label, folder in folders.items():
        for tree in trees:
            report(label, tree, child(folder, tree, args.dtype))


def child(folder: Path, tree: str, dtype: str) -> dict[str, Any]:
    """:func:`measure` in a fresh process that imports ``tree``'s quantreg: ``tree`` first on
    its path (the script's own folder comes first, and has no quantreg; without this an
    editable install's tree would answer for every tree)."""
    command = [sys.executable, os.path.abspath(__file__), "--one", str(folder), "--dtype", dtype]
    path = os.pathsep.join(p for p in (os.path.abspath(tree), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tree, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(label: str, tree: str, r: dict[str, Any]) -> None:
    goal = GOAL_FACTOR * r["read"] + GOAL_CONSTANT_S
    budget = RSS_FACTOR * r["resident_mb"] + r["file_mb"]
    flags = ("" if r["load"] <= goal else "  SLOW") + ("" if r["peak_mb"] <= budget else "  RSS")
    print(f"{label:20} {os.path.basename(tree.rstrip('/')):10} {r['kernel']:16} "
          f"{r['read']:7.3f} {r['load']:7.3f} {r['first']:6.2f} {goal:7.3f} "
          f"{r['load'] / r['read']:7.1f} {r['peak_mb']:8.0f} {budget:7.0f}{flags}",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

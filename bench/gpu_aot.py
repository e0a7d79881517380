"""Compile, without a GPU, every Triton launch ``bench/gpu.py`` can make on a card.

    python bench/gpu_aot.py [--arch 80,90] [--json out.json] [--quick]

For each kernel path (int4 / int8 with regular or per-row groups, fp8 per-channel, fp8 blocks,
NVFP4 packed e2m1; fp16 and bf16 activations, and the group sizes of the producer fixtures)
and every configuration the tuner may try for the shapes ``bench/gpu.py`` runs, the launch is
compiled for each architecture by ``quantreg.kernels.triton_aot``: a kernel that does not
compile, or a configuration whose block needs more shared memory than the card allows, shows
here instead of in the device's few minutes. Prints one line per path and architecture (how
many launches, failures, shared memory, registers, spills, tensor-core instruction) and exits 1
if any launch fails to compile or a path's first (heuristic) choice does not fit.

Run it without ``TRITON_INTERPRET=1`` (the kernels must be compiled Triton functions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are imported: compiled functions
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from gpu_checks import make_float8

from quantreg.kernels import triton_float8, triton_wna16
from quantreg.kernels.triton_aot import compile_launch

# (N, K) the script multiplies: timings, correctness; M values of both
SHAPES = [(32000, 4096), (128256, 4096), (1000, 4096), (4000, 4096)]
MS = [1, 4, 5, 7, 16, 64]
QUICK = {"shapes": [(32000, 4096)], "ms": [1, 64]}
# bits, group, per-row groups, name: the timed heads, and the fixtures' group sizes
INT_PATHS = [(4, 128, False, "int4 g128"), (4, 32, False, "int4 g32"), (4, 64, False, "int4 g64"),
             (4, 128, True, "int4 act-order"), (8, 256, False, "int8 channel"),
             (8, 32, False, "int8 g32"), (8, 64, False, "int8 g64")]  # fmt: skip


def int_paths(dtype: torch.dtype) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    """Integer paths as ``launch_spec`` arguments on tiny tensors: (name, fields)."""
    k, n = 256, 128
    paths = []
    for bits, group, per_row, label in INT_PATHS:
        groups = -(-k // group)
        fields = {
            "x": torch.zeros(1, k, dtype=dtype),
            "wq": torch.zeros(k * bits // 32, n, dtype=torch.int32),
            "scales": torch.zeros(groups, n, dtype=dtype),
            "zeros": torch.zeros(groups, n, dtype=torch.uint8),
            "bits": bits, "group_size": group, "per_row": per_row,
            "gidx": (torch.arange(k) // group).int() if per_row else None,
        }  # fmt: skip
        paths.append((label, fields))
    return paths


def launches(arch_plan: dict) -> list[tuple[str, str, object]]:  # type: ignore[type-arg]
    """Every distinct (path, dtype, launch) the plan's shapes and Ms can make."""
    out, seen = [], set()
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for label, f in int_paths(dtype):
            for n, k in arch_plan["shapes"]:
                for m in arch_plan["ms"]:
                    x = torch.zeros(m, f["wq"].shape[0] * 32 // f["bits"], dtype=dtype)
                    group = k if label == "int8 channel" else f["group_size"]
                    for cfg in triton_wna16.candidates(m, n, k, group):
                        spec = triton_wna16.launch_spec(
                            x, f["wq"], f["scales"], f["zeros"], f["bits"], f["group_size"],
                            f["gidx"], f["per_row"], cfg)  # fmt: skip
                        _add(out, seen, label, name, spec)
        for kind in ("fp8 channel", "fp8 block", "nvfp4"):
            layout = make_float8(kind, 256, 256, dtype, "cpu", dense=False)[0]
            fast = triton_float8.TritonFloat8Layout.build(layout)
            group = None if fast.col_groups is not None else fast.group_size
            for _, k in arch_plan["shapes"]:
                for m in arch_plan["ms"]:
                    x = torch.zeros(m, 256, dtype=dtype)
                    for cfg in triton_float8.candidates(m, k, group):
                        _add(out, seen, kind, name, triton_float8.launch_spec(x, fast, cfg))
    return out


def _add(out: list, seen: set, label: str, dtype: str, spec) -> None:  # type: ignore[type-arg, no-untyped-def]
    """Keep ``spec`` unless a launch compiling to the same code is kept already."""
    key = (label, dtype, spec.config.num_warps, spec.config.num_stages,
           tuple(sorted((k, str(v)) for k, v in spec.constexprs.items())))  # fmt: skip
    if key not in seen:
        seen.add(key)
        out.append((label, dtype, spec))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--json", default=None, help="write every launch's result")
    parser.add_argument("--quick", action="store_true", help="one shape, M = 1 and 64")
    args = parser.parse_args(argv)
    import triton

    plan = QUICK if args.quick else {"shapes": SHAPES, "ms": MS}
    todo = launches(plan)
    rows, start = [], time.monotonic()
    for arch in (int(a) for a in args.arch.split(",")):
        for label, dtype, spec in todo:
            row = {"arch": arch, "path": label, "dtype": dtype, "config": vars(spec.config)}
            try:
                done = compile_launch(spec, arch)
                row.update(shared=done.shared, registers=done.registers, spilled=done.spilled,
                           mma=done.mma, fits=done.fits, ok=True)  # fmt: skip
            except Exception as exc:  # a row: every failure is listed
                row.update(ok=False, fits=False, error=f"{type(exc).__name__}: {exc}"[:500])
            rows.append(row)
    print(summary(rows, triton.__version__, time.monotonic() - start))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    broken = [r for r in rows if not r["ok"]]
    unfit_first = _unfit_first(rows)
    for row in broken:
        print(f"FAILED {row['arch']} {row['path']} {row['dtype']} {row['config']}: {row['error']}")
    for row in unfit_first:
        print(f"FIRST CHOICE DOES NOT FIT {row['arch']} {row['path']} {row['dtype']}")
    return 1 if broken or unfit_first else 0


def _unfit_first(rows: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    """The heuristic (first) launch of each path, dtype and arch, where it does not fit."""
    firsts: dict[tuple, dict] = {}  # type: ignore[type-arg]
    for row in rows:
        firsts.setdefault((row["arch"], row["path"], row["dtype"]), row)
    return [row for row in firsts.values() if not row["fits"]]


def summary(rows: list[dict], version: str, seconds: float) -> str:  # type: ignore[type-arg]
    """A markdown table: one line per architecture, path and dtype."""
    groups: dict[tuple, list[dict]] = defaultdict(list)  # type: ignore[type-arg]
    for row in rows:
        groups[(row["arch"], row["path"], row["dtype"])].append(row)
    head = (
        "| arch | path | dtype | launches | failed | not fitting | shared KiB (max) | "
        "registers (max) | spilled bytes (max) | tensor cores |"
    )
    lines = [f"Triton {version}: {len(rows)} launches compiled in {seconds:.0f} s", "", head,
             "|---" * 10 + "|"]  # fmt: skip
    for (arch, path, dtype), group in groups.items():
        done = [r for r in group if r["ok"]]
        mma = sorted({str(r["mma"]) for r in done})
        lines.append(
            f"| sm_{arch} | {path} | {dtype} | {len(group)} | {len(group) - len(done)} | "
            f"{sum(not r['fits'] for r in done)} | "
            f"{max((r['shared'] for r in done), default=0) / 1024:.0f} | "
            f"{max((r['registers'] or 0 for r in done), default=0)} | "
            f"{max((r['spilled'] or 0 for r in done), default=0)} | {', '.join(mma)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

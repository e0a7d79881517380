"""A/B in one process, interleaved: quantreg's AVX2 int kernel (``cpu-avx2-wna16``: bf16 rows in
int16 fixed point, and its float32 FMA path, which float32 rows take) and its opt-in int8
activations (``cpu-avx2-a8``) against torch's weight-only ops, dense ``F.linear`` (bf16,
float32) and a STREAM-like read.

Usage: ``python bench/cpu_int_ab.py [--n 32000] [--k 4096] [--rounds 3] [--against REV]
[--build avx2|vnni]``. ``--build vnni`` times the same source's AVX512-VNNI build instead
(``cpu-vnni-wna16``, ``cpu-vnni-a8``; rows ``vnni ...``). ``--against REV`` (a git revision of
this repository, e.g. ``HEAD~1``; repeatable) builds that revision's ``wna16_avx2_kernel.cpp``
(as ``--build`` says) beside the current one and times its bf16 rows on the same layouts (rows
``... @REV``): a before/after of a kernel change in one process. Prints, per M, the
median time of each path (each timed slice starts with untimed warm-up calls: memory left
untouched for a while is slower on its next passes), its ratio against dense bf16 ``F.linear``
and, at M=1, its effective bandwidth against the read: ``torch.sum`` over a buffer as large as
the int4 weights, of float32 ones (an int32 sum accumulates in int64 and runs far below the
memory's speed).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantreg.kernels import IntWeights, cpu_avx2, cpu_build, cpu_vnni, torch_ops

# --build -> (the build's kernel name in cpu_build, its weight-only and int8-activation calls)
BUILDS = {
    "avx2": ("wna16_avx2", cpu_avx2.avx2_int_matmul, cpu_avx2.avx2_a8_matmul),
    "vnni": ("wna16_vnni", cpu_vnni.vnni_int_matmul, cpu_vnni.vnni_a8_matmul),
}

READS = ("read float32 sum",)


def int_weights(n: int, k: int, bits: int, group: int | None, seed: int = 0) -> IntWeights:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    groups = 1 if group is None else k // group
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    zeros = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32)
    return IntWeights.create(bits=bits, k=k, codes=lambda c0, c1: codes[:, c0:c1],
                             scales=scales, zeros=zeros)  # fmt: skip


def paths(n: int, k: int, build: str) -> dict[str, tuple[Callable[[torch.Tensor], object], int]]:
    """name -> (call on x, bytes it reads); ``build``'s kernels in the rows ``<build> ...``."""
    bf = torch.bfloat16
    _, avx2, a8 = BUILDS[build]
    w4, w8 = int_weights(n, k, 4, 128), int_weights(n, k, 8, None)
    l4, l8 = cpu_avx2.AVX2IntLayout.build(w4), cpu_avx2.AVX2IntLayout.build(w8)
    t4, t8 = torch_ops.TorchInt4Layout.build(w4, bf), torch_ops.TorchInt8Layout.build(w8, bf)
    dense = torch.randn(n, k) * 0.02
    dense_bf = dense.to(bf)
    buf = torch.full((n * k // 8,), 0x3F800000, dtype=torch.int32)  # 1.0 as a float32
    return {
        "read float32 sum": (lambda x: buf.view(torch.float32).sum(), buf.nbytes),
        f"{build} int4 g128": (lambda x: avx2(x, l4), l4.codes.nbytes),
        f"{build} int4 float path": (lambda x: avx2(x.float(), l4), l4.codes.nbytes),
        f"{build} a8 int4 g128": (lambda x: a8(x, l4), l4.codes.nbytes),
        "torch int4pack": (lambda x: torch_ops.int4_matmul(x, t4), t4.weight.nbytes),
        f"{build} int8 channel": (lambda x: avx2(x, l8), l8.codes.nbytes),
        f"{build} int8 float path": (lambda x: avx2(x.float(), l8), l8.codes.nbytes),
        f"{build} a8 int8 channel": (lambda x: a8(x, l8), l8.codes.nbytes),
        "torch int8pack": (lambda x: torch_ops.int8_matmul(x, t8), t8.weight.nbytes),
        "dense bf16": (lambda x: torch.nn.functional.linear(x, dense_bf), dense_bf.nbytes),
        "dense fp32": (lambda x: torch.nn.functional.linear(x.float(), dense), dense.nbytes),
    }


def build_at(rev: str, build: str) -> Any:
    """``build`` of the int extension from ``rev``'s source (cached like the current one)."""
    return kernel_at(rev, BUILDS[build][0], "AVX2_SOURCE")


def kernel_at(rev: str, kernel: str, source_attr: str) -> Any:
    """The extension ``kernel`` (a ``cpu_build`` kernel name) built from ``rev``'s version of
    the source ``cpu_build.<source_attr>`` names (cached like the current one)."""
    root = Path(__file__).resolve().parent.parent
    name = getattr(cpu_build, source_attr).name
    text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:quantreg/kernels/{name}"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / name
        source.write_text(text)
        saved = getattr(cpu_build, source_attr)
        setattr(cpu_build, source_attr, source)
        try:
            return cpu_build.build(kernel)
        finally:
            setattr(cpu_build, source_attr, saved)


def paths_at(
    rev: str, n: int, k: int, build: str
) -> dict[str, tuple[Callable[[torch.Tensor], object], int]]:
    """``rev``'s kernel on this tree's layouts, bf16 rows (its int16 path) and int8 activations:
    for revisions whose ``AVX2IntLayout`` and ``wxa_avx2_gemm`` are this tree's."""
    module = build_at(rev, build)
    w4, w8 = int_weights(n, k, 4, 128), int_weights(n, k, 8, None)
    layouts = {"int4 g128": w4, "int8 channel": w8}
    found = {}
    for label, w in layouts.items():
        lay = cpu_avx2.AVX2IntLayout.build(w)
        args = (lay.codes, lay.scales, lay.zeros, lay.bits, lay.group_size)
        for act, limit, name in ((16, 256.0, build), (8, 0.0, f"{build} a8")):
            call = functools.partial(_at_rev, module, args, n, act, limit)
            found[f"{name} {label} @{rev}"] = (call, lay.codes.nbytes)
    return found


def _at_rev(
    module: Any, args: tuple, n: int, act: int, limit: float, x: torch.Tensor
) -> torch.Tensor:
    """``module``'s kernel on ``x`` in one call (the M this script times fit one tile)."""
    out = torch.empty((x.shape[0], n), dtype=x.dtype)
    module.wxa_avx2_gemm(x, out, *args, act, limit)
    return out


def slice_ms(call: Callable[[torch.Tensor], object], x: torch.Tensor, reps: int) -> float:
    for _ in range(2):
        call(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def common_args(ap: argparse.ArgumentParser) -> None:
    """The options every A/B script here takes: the shape, rounds, token counts, revisions."""
    ap.add_argument("--n", type=int, default=32000)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--against", action="append", default=[], metavar="REV")


def time_paths(ps: dict[str, tuple[Callable[[torch.Tensor], object], int]], args: Any) -> None:
    """Each path of ``ps`` (and the reads, at M = 1 only) at every M, round after round; prints
    its median, its ratio against ``dense bf16`` and, at M = 1, its bandwidth against the read."""
    print(f"N={args.n} K={args.k}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    width = max(map(len, ps))
    for m in args.m:
        x = torch.randn(m, args.k).to(torch.bfloat16)
        got: dict[str, list[float]] = {name: [] for name in ps}
        for _ in range(args.rounds):
            for name, (call, _) in ps.items():
                if m > 1 and name.startswith("read"):
                    continue
                got[name].append(slice_ms(call, x, 5 if m <= 16 else 2))
        base = statistics.median(got["dense bf16"])
        reads = [ps[r][1] / statistics.median(got[r]) / 1e6 for r in READS if got[r]]
        for name, ms in got.items():
            if not ms:
                continue
            med = statistics.median(ms)
            line = f"M={m:<3} {name:<{width}} {med:8.2f} ms  {base / med:5.2f}x dense bf16"
            if reads:
                gbs = ps[name][1] / med / 1e6
                line += f"  {gbs:5.1f} GB/s = {gbs / max(reads):4.0%} of the read"
            print(line + f"  [{' '.join(f'{t:.2f}' for t in ms)}]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--build", choices=sorted(BUILDS), default="avx2")
    args = ap.parse_args()
    ps = paths(args.n, args.k, args.build)
    for rev in args.against:
        ps.update(paths_at(rev, args.n, args.k, args.build))
    time_paths(ps, args)


if __name__ == "__main__":
    main()

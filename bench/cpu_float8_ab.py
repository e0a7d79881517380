"""A/B in one process, interleaved: quantreg's two float8 kernels -- ``cpu-avx2-float8`` (AVX2
FMA) and ``cpu-avx512-float8`` (AVX512-BF16 ``vdpbf16ps``), one layout -- on fp8 per channel,
fp8 in 128-row blocks and NVFP4 (groups of 16, e4m3 scales over a global one), against dense
bf16 ``F.linear`` and a STREAM-like read.

Usage: ``python bench/cpu_float8_ab.py [--n 32000] [--k 4096] [--rounds 3] [--m 1 4 16 64]
[--against REV]``. ``--against REV`` (a git revision of this repository, e.g. ``HEAD~1``;
repeatable) builds that revision's ``float8_avx512_kernel.cpp`` beside the current one and times
it on the same layouts (rows ``avx512 ... @REV``): a before/after of a change to that kernel.
Prints, per M, each path's median time (each timed slice starts with untimed calls), its ratio
against dense bf16 ``F.linear`` and, at M = 1, its bandwidth against the read (``torch.sum``
over a float32 buffer as large as the fp8 weights). A build the CPU cannot run is left out,
saying why.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from cpu_int_ab import common_args, kernel_at, time_paths

from quantreg.kernels import Float8Layout, cpu_float8, cpu_float8_avx512
from quantreg.kernels.cpu_float8 import CPUFloat8Layout, run_float8_mm

Paths = dict[str, tuple[Callable[[torch.Tensor], object], int]]


def float8_layouts(n: int, k: int, seed: int = 0) -> dict[str, CPUFloat8Layout]:
    """label -> the kernels' layout of random weights in that format."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x42  # no NaN
    fp8 = codes.view(torch.float8_e4m3fn)
    channel_scales = (torch.rand(1, n, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)
    channel = Float8Layout.build(fp8, channel_scales)
    blocks = Float8Layout.build(
        fp8, torch.rand(-(-k // 128), n, generator=gen) * 0.01 + 1e-4, None, torch.arange(k) // 128
    )
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.0, -2.0, -6.0])
    values = e2m1[torch.randint(0, len(e2m1), (n, k), generator=gen)].to(torch.float8_e4m3fn)
    group_scales = (torch.rand(k // 16, n, generator=gen) * 448).to(torch.float8_e4m3fn)
    nvfp4 = Float8Layout.build(values, group_scales.float() / 726.5, None,
                               torch.arange(k) // 16, round_to=torch.bfloat16)  # fmt: skip
    built = {"fp8 channel": channel, "fp8 block 128": blocks, "nvfp4 g16": nvfp4}
    return {label: CPUFloat8Layout.build(w) for label, w in built.items()}


def call(module: Any, mm: str, layout: CPUFloat8Layout) -> Callable[[torch.Tensor], object]:
    """``module``'s tiling entry point ``mm`` on ``layout``."""
    return lambda x: run_float8_mm(getattr(module, mm), x, layout)


def paths(n: int, k: int, against: list[str]) -> Paths:
    """name -> (call on x, bytes it reads): each build this CPU has, each revision's AVX-512
    build, dense bf16 and the read."""
    lays = float8_layouts(n, k)
    builds = [("avx2", cpu_float8, "float8_mm"), ("avx512", cpu_float8_avx512, "float8_512_mm")]
    found: Paths = {}
    for name, unit, mm in builds:
        if unit.extension() is None:
            print(f"{name}: left out, {unit.unavailable_reason()}")
            continue
        for label, lay in lays.items():
            found[f"{name} {label}"] = (call(unit.extension(), mm, lay), lay.codes.nbytes)
    for rev in against:
        module = build_at(rev)
        for label, lay in lays.items():
            found[f"avx512 {label} @{rev}"] = (call(module, "float8_512_mm", lay), lay.codes.nbytes)
    dense = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    buf = torch.ones(n * k // 4, dtype=torch.float32)
    found["dense bf16"] = (lambda x: torch.nn.functional.linear(x, dense), dense.nbytes)
    found["read float32 sum"] = (lambda x: buf.sum(), buf.nbytes)  # cpu_int_ab.READS
    return found


def build_at(rev: str) -> Any:
    """The AVX512-BF16 float8 extension from ``rev``'s source (cached like the current one)."""
    return kernel_at(rev, "float8_avx512", "FLOAT8_512_SOURCE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    args = ap.parse_args()
    time_paths(paths(args.n, args.k, args.against), args)


if __name__ == "__main__":
    main()

"""The Python a Triton matmul spends around its launch, per call, measured on a CPU.

    python bench/triton_overhead.py [--calls 5000]

At M = 1 an int4 head of 32000 x 4096 is 15 us of an H200's memory; a call whose Python
around the launch costs as much leaves the GPU waiting when run eagerly (CUDA graphs hide it,
eager engines do not). Here each kernel's launch is replaced by nothing (``Launch.run`` only
adds the split-K sums of the empty output), the kernels imported under the interpreter, and a
call through ``quantreg.select_kernel``'s kernel is timed: what quantreg adds to Triton's own
launch. Prints microseconds per call, median of 5 rounds, for each path. Run it at two
revisions (a worktree) for a before / after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # no GPU here: the kernels are never launched anyway
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from gpu_checks import make_float8, make_weights

import quantreg
from quantreg.kernels import triton_launch


def no_launch(self: triton_launch.Launch) -> torch.Tensor:
    return self.out[0] if self.out.shape[0] == 1 else self.out.sum(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args(argv)
    triton_launch.Launch.run = no_launch  # type: ignore[method-assign]
    dtype, n, k = torch.bfloat16, 1024, 4096
    paths = {
        "int4 g128": (make_weights(4, n, k, 128, dtype, "cpu")[0], "triton"),
        "int4 g128 act-order": (make_weights(4, n, k, 128, dtype, "cpu", True)[0], "triton"),
        "int8 channel": (make_weights(8, n, k, k, dtype, "cpu")[0], "triton"),
        "fp8 block": (make_float8("fp8 block", n, k, dtype, "cpu", dense=False)[0],
                      "triton-float8"),
        "nvfp4": (make_float8("nvfp4", n, k, dtype, "cpu", dense=False)[0], "triton-float8"),
    }  # fmt: skip
    x = torch.randn(1, k).to(dtype)
    for name, (weights, kernel) in paths.items():
        call = quantreg.select_kernel(weights, dtype=dtype, requested=kernel)
        rounds = []
        for _ in range(5):
            for _ in range(50):
                call(x)
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call(x)
            rounds.append((time.perf_counter() - t0) / args.calls * 1e6)
        print(f"{name:22s} {statistics.median(rounds):6.1f} us a call (launch left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load time and peak RSS of ``load_lm_head`` on one checkpoint, one load per process.

Used to show what a change to the load path costs: run it once per source tree on the same
checkpoint, e.g. ``QUANTREG_SRC=... PYTHONPATH=<tree> python bench/load_time.py DIR``
(a checkpoint written by ``quantreg.write_checkpoint``; see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import quantreg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="checkpoint folder")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    args = parser.parse_args()
    torch.zeros(1)  # torch's own start-up is not the load's
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    head = quantreg.load_lm_head(args.path, dtype=args.dtype)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert head.kernel is not None
    print(
        f"{args.path}: load {seconds:.3f} s, peak RSS {peak:.0f} MB (before the load {base:.0f} "
        f"MB), resident head {head.resident_bytes() / 2**20:.0f} MiB, kernel {head.kernel.name}"
    )


if __name__ == "__main__":
    main()

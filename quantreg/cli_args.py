"""Argument types of the ``quantreg`` command line: numbers checked against their documented
range while parsing, so a malformed command line is a usage error (exit 2) before any work.

Names (methods, kernels, dtypes, devices, platforms) are checked by the library that owns them
and files by the code that opens them: those are errors of a well-formed command (exit 1).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_TOKENS = 65536  # rows of hidden states for `run --tokens` and `bench --m`
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_BITS = 16
MAX_GROUP_SIZE = 2**20
MAX_ROWS, MAX_FEATURES = 2**22, 2**17  # bench --shape NxK: vocab and hidden sizes
MAX_BUDGET_S = 3600.0


def bounded_int(low: int, high: int, *, also: tuple[int, ...] = ()) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (or one of ``also``)."""

    def parse(text: str) -> int:
        value = _int(text)
        if not (low <= value <= high or value in also):
            extra = "".join(f" or {v}" for v in also)
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range: expected an integer from {low} to {high}{extra}"
            )
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def token_counts(text: str) -> tuple[int, ...]:
    """``bench --m``: comma-separated token counts, each from 1 to MAX_TOKENS."""
    counts = tuple(_int(part) for part in text.split(","))
    bad = [c for c in counts if not 1 <= c <= MAX_TOKENS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{text!r}: token counts must be from 1 to {MAX_TOKENS}; got {bad[0]}"
        )
    return counts


def shape(text: str) -> tuple[int, int]:
    """``bench --shape NxK``: N (vocab rows) from 1 to MAX_ROWS, K (hidden) to MAX_FEATURES."""
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NxK, e.g. 32000x4096")
    n, k = (_int(part) for part in parts)
    if not (1 <= n <= MAX_ROWS and 1 <= k <= MAX_FEATURES):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected 1 <= N <= {MAX_ROWS} and 1 <= K <= {MAX_FEATURES}"
        )
    return n, k


def budget(text: str) -> float:
    """``bench --budget``: seconds, finite, from 0 to MAX_BUDGET_S."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 <= value <= MAX_BUDGET_S):
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range: expected seconds from 0 to {MAX_BUDGET_S:g}"
        )
    return value


def block_size(text: str) -> tuple[int, int]:
    """``quantize --block-size RxC`` (or one number for a square block): rows and columns of
    a weight block, each from 1 to MAX_GROUP_SIZE."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: expected RxC, e.g. 128x128, or one number")
    rows, cols = (_int(parts[0]), _int(parts[-1]))
    if not (1 <= rows <= MAX_GROUP_SIZE and 1 <= cols <= MAX_GROUP_SIZE):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected block rows and columns from 1 to {MAX_GROUP_SIZE}"
        )
    return rows, cols


def _int(text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


TOKENS = bounded_int(1, MAX_TOKENS)
SEED = bounded_int(0, MAX_SEED)
BITS = bounded_int(1, MAX_BITS)
GROUP_SIZE = bounded_int(1, MAX_GROUP_SIZE, also=(-1,))

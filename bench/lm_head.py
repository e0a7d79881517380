"""Run ``quantreg bench`` and record the result in bench/RESULTS.md (a thin wrapper).

    python bench/lm_head.py                 # full run: both shapes, M = 1, 4, 16, 64
    python bench/lm_head.py --quick         # smoke run
Any other ``quantreg bench`` option is passed through (e.g. ``--json out.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from quantreg.cli import main

RESULTS = Path(__file__).with_name("RESULTS.md")

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--append-results" not in args and "--quick" not in args:
        args += ["--append-results", str(RESULTS)]
    sys.exit(main(["bench", *args]))

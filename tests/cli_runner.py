"""The ``quantreg`` command line, run in this process: what most CLI tests check is the
command's behaviour (exit code, stdout, stderr, files), not the process boundary; starting a
fresh interpreter (torch included) costs seconds per call. The few tests about the process
itself (logging set-up, tracebacks, torchrun) still start one."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

from quantreg.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``quantreg *args`` in-process: its exit code (argparse's too) and captured output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["quantreg", *args], code, out.getvalue(), err.getvalue())


_BATCH = """
import contextlib, importlib, io, json, sys, time
from quantreg.cli import main
for module in json.loads(sys.argv[2]):  # one-time imports, not timed
    importlib.import_module(module)
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "seconds": time.perf_counter() - start})
print(json.dumps(results))
"""


def run_cli_batch(
    argvs: list[list[str]], *, timeout: float, preload: tuple[str, ...] = ()
) -> list[dict]:
    """Every command line in one fresh interpreter, where pytest hides no traceback and a hang
    is a timeout rather than a stuck suite: ``{code, stdout, stderr, seconds}`` per line
    (``preload``: modules imported first, so that the timings leave out one-time imports)."""
    args = [sys.executable, "-c", _BATCH, json.dumps(argvs), json.dumps(list(preload))]
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)

"""The ``quantreg`` command line, run in this process: what most CLI tests check is the
command's behaviour (exit code, stdout, stderr, files), not the process boundary; starting a
fresh interpreter (torch included) costs seconds per call. The few tests about the process
itself (logging set-up, tracebacks, torchrun) still start one."""

from __future__ import annotations

import contextlib
import io
import subprocess

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

"""The ``quantreg`` command line: a thin argparse front end over the public API.

Exit codes:

- 0: success.
- 2: a usage error, found while parsing (``quantreg <cmd>: error: ...`` after the usage line):
  an unknown command or option, a missing argument, or a number that is malformed or outside
  its documented range (``--tokens`` 1..65536, ``--seed`` 0..2**64-1, ``--bits`` 1..16,
  ``--group-size`` -1 or 1..2**20, ``bench --m/--shape/--budget``; see ``quantreg.cli_args``).
- 1: an error of a well-formed command, as ``quantreg: error: <message>`` on stderr with no
  traceback. A QuantregError prints its message: a bad checkpoint, an unknown name (method,
  kernel, dtype, device, platform: checked by the library that owns them, as plugins can add
  names), a path the command refuses (``--out`` or DST that is not a regular file, or is a
  file the command reads; a FIFO or device given as an input). An OSError (no space left,
  permission denied, ...) or running out of memory (MemoryError, torch's allocation errors)
  prints ``quantreg: error: <what was being done>: <reason>``. Any other exception is a bug:
  ``quantreg: error: internal error while <what>: <type>: <message>`` asks for a report, and
  ``-v`` adds its traceback.
- 130: interrupted (Ctrl-C).

Every ``--json`` output is strict JSON (non-finite numbers as the strings ``"Infinity"``,
``"-Infinity"``, ``"NaN"``); a failed write to stdout is an error, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence

from quantreg.cli_commands import STDOUT
from quantreg.cli_parser import build_parser
from quantreg.errors import QuantregError

logger = logging.getLogger(__name__)

# torch reports a failed allocation as a RuntimeError (torch.OutOfMemoryError on a GPU)
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory|Cannot allocate memory", re.I)


@contextlib.contextmanager
def _process_group(args: argparse.Namespace) -> Iterator[int]:
    """Under torchrun (``WORLD_SIZE > 1``) initialize gloo (cpu) or NCCL (cuda) for ``run`` and
    ``compare``, destroy it at exit, and yield this process's rank (0 without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or args.command not in ("run", "compare"):
        yield 0
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        if args.device == "cuda":
            args.device = f"cuda:{local_rank}"
    dist.init_process_group(backend)
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    args.doing = f"running quantreg {args.command}"
    rank = 0
    try:
        with _process_group(args) as rank:
            args.rank = rank
            code = args.func(args)
            args.doing = STDOUT
            sys.stdout.flush()
            return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `quantreg methods --json | head`
        _silence_stdout()
        return 0
    except Exception as exc:  # the last resort: a one-line message, never a traceback
        where = f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        message = _describe(exc, args)
        print(f"quantreg: error{where}: {message}", file=sys.stderr)
        if getattr(args, "verbose", False) and message.startswith("internal error"):
            traceback.print_exception(exc, file=sys.stderr)
        _flush_or_silence_stdout()
        return 1


def _describe(exc: Exception, args: argparse.Namespace) -> str:
    """The one-line message of an error: a QuantregError's own; else what was being done."""
    if isinstance(exc, QuantregError):
        return str(exc)
    doing = args.doing
    if _out_of_memory(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"out of memory while {doing}: {first}"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        file = f": {exc.filename}" if exc.filename else ""
        return f"{doing}: {reason}{file}"
    if type(exc).__name__ == "SafetensorError":  # a file safetensors could not read or write
        return f"{doing}: {exc}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (
        f"internal error while {doing}: {type(exc).__name__}: {first} -- this is a bug in "
        "quantreg; please report it with the command line (-v shows the traceback)"
    )


def _out_of_memory(exc: Exception) -> bool:
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError):
        return True
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and bool(_OUT_OF_MEMORY.search(str(exc)))


def _flush_or_silence_stdout() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _silence_stdout()


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered cannot be written, and Python's
    flush at exit must not print an "Exception ignored" traceback about it."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

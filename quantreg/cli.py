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
from typing import Any

import quantreg
from quantreg import cli_args
from quantreg.cli_commands import (
    STDOUT,
    cmd_bench,
    cmd_demo,
    cmd_inspect,
    cmd_methods,
    cmd_quantize,
    cmd_resolve,
    cmd_run,
    cmd_warmup,
)
from quantreg.errors import QuantregError

logger = logging.getLogger(__name__)

# torch reports a failed allocation as a RuntimeError (torch.OutOfMemoryError on a GPU)
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory|Cannot allocate memory", re.I)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``quantreg`` command."""
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="show INFO log lines (what was decided and why), and the traceback of an "
        "internal error",
    )  # fmt: skip
    parser = argparse.ArgumentParser(
        prog="quantreg",
        description="Resolve, load and run quantized LLM lm_heads.",
        parents=[verbose],
    )
    parser.add_argument("--version", action="version", version=f"quantreg {quantreg.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        _add_methods,
        _add_resolve,
        _add_inspect,
        _add_run,
        _add_quantize,
        _add_bench,
        _add_demo,
        _add_warmup,
    ):
        add(sub, verbose)
    return parser


def _add_methods(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser("methods", parents=[verbose], help="list registered quantization methods")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_methods)


def _add_resolve(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "resolve", parents=[verbose], help="show which method a checkpoint's layer gets, and why"
    )
    p.add_argument("path", help="checkpoint folder or config.json")
    p.add_argument(
        "--platform", default=None,
        help="'cpu', 'cuda:9.0', 'cuda:9.0-notriton', ... (default: this machine)",
    )  # fmt: skip
    p.add_argument("--quantization", default=None, metavar="NAME", help="force a method")
    p.add_argument("--prefix", default="lm_head", help="layer name (default: lm_head)")
    p.add_argument(
        "--check", action="store_true",
        help="also check the head's tensors (names, shapes, dtypes; headers only) against the "
        "method, as run does: exit 1 with run's message when they disagree",
    )  # fmt: skip
    p.add_argument(
        "--dtype", default=None, help="with --check: the compute dtype, as run's --dtype"
    )
    p.add_argument("--json", action="store_true", help="print Resolution.to_dict() as JSON")
    p.set_defaults(func=cmd_resolve)


def _add_inspect(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect", parents=[verbose], help="show a checkpoint's tensors and its head's method"
    )
    p.add_argument("path", help="checkpoint folder")
    p.add_argument("--platform", default=None, help="platform to resolve for (default: this one)")
    p.add_argument("--prefix", default="lm_head", help="layer name (default: lm_head)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)


def _add_run(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[verbose], help="load a checkpoint's head and compute logits")
    p.add_argument("path", help="checkpoint folder")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--tokens", type=cli_args.TOKENS, default=4,
        help=f"rows of random hidden states, 1 to {cli_args.MAX_TOKENS} (default 4)",
    )  # fmt: skip
    source.add_argument(
        "--hidden", default=None, metavar="FILE",
        help="a safetensors file whose tensor 'x' holds [tokens, hidden]",
    )  # fmt: skip
    p.add_argument(
        "--out", default=None, metavar="FILE",
        help="write 'logits' to a safetensors file: a new file, or a regular file to replace "
        "(atomically); never a device, FIFO or folder, nor a file the run reads (checkpoint "
        "files, --hidden, links to them); its folder must exist",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: config)")
    p.add_argument("--quantization", default=None, metavar="NAME", help="force a method")
    p.add_argument(
        "--platform", default=None, help="platform to resolve for (default: the device's)"
    )
    p.add_argument("--prefix", default="lm_head", help="layer name (default: lm_head)")
    p.add_argument(
        "--seed", type=cli_args.SEED, default=0,
        help="seed of the random hidden states, 0 to 2**64-1 (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--kernel", default=None, metavar="NAME",
        help="force a kernel (reference, triton, cpu-avx512, ...; default: the fastest that fits)",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true", help="print {method, kernel, load_s, forward_s, ...}"
    )
    p.set_defaults(func=cmd_run)


def _add_quantize(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "quantize", parents=[verbose], help="quantize a checkpoint's head into a copy"
    )
    p.add_argument("src", help="checkpoint folder with a float head")
    p.add_argument("dst", help="new (or empty) folder to write; its parent must exist")
    p.add_argument("--method", required=True, help="awq, gptq or compressed-tensors")
    p.add_argument("--bits", type=cli_args.BITS, default=None, help="4 or 8")
    p.add_argument(
        "--group-size", type=cli_args.GROUP_SIZE, default=None,
        help="e.g. 32, 64, 128, or -1 (one group)",
    )  # fmt: skip
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric codes (default: the method's)")  # fmt: skip
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order groups")
    p.add_argument("--format", default=None, help="compressed-tensors format")
    p.add_argument("--prefix", default="lm_head", help="layer name (default: lm_head)")
    p.add_argument(
        "--force", action="store_true",
        help="replace an existing DST (a folder or file) whole: the copy is written beside it "
        "and swapped in; never SRC, a folder inside SRC or one holding it",
    )  # fmt: skip
    p.set_defaults(func=cmd_quantize)


def _add_bench(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[verbose], help="time every method against dense F.linear")
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    p.add_argument(
        "--shape", action="append", type=cli_args.shape, metavar="NxK",
        help=f"override the shapes (N up to {cli_args.MAX_ROWS}, K up to {cli_args.MAX_FEATURES})",
    )  # fmt: skip
    p.add_argument(
        "--m", type=cli_args.token_counts, default=None, metavar="M1,M2",
        help=f"token counts, each 1 to {cli_args.MAX_TOKENS} (default 1,4,16,64)",
    )  # fmt: skip
    p.add_argument(
        "--budget", type=cli_args.budget, default=None,
        help="seconds of timing per M, 0 to 3600 (default 2, quick 0.2)",
    )  # fmt: skip
    p.add_argument(
        "--methods", default=None, metavar="A,B",
        help="only these methods (torch = torch's ops); dense baselines always run",
    )  # fmt: skip
    p.add_argument("--json", default=None, metavar="PATH", help="write {machine, rows} as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="time vs M (needs matplotlib)")
    p.add_argument(
        "--append-results", default=None, metavar="MD",
        help="append a dated table to this Markdown file (e.g. bench/RESULTS.md)",
    )  # fmt: skip
    p.set_defaults(func=cmd_bench)


def _add_demo(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[verbose], help="the failures quantreg exists for, then every format run"
    )
    p.add_argument(
        "--seed", type=cli_args.SEED, default=0, help="seed of the example weights (0 to 2**64-1)"
    )
    p.add_argument("--keep", metavar="DIR", help="write the checkpoints into DIR (new or empty)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_demo)


def _add_warmup(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "warmup", parents=[verbose],
        help="build quantreg's CPU kernel ahead of its first use (or say why there is none)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print {ready, needed, reason, cache, ...}")
    p.set_defaults(func=cmd_warmup)


@contextlib.contextmanager
def _process_group(args: argparse.Namespace) -> Iterator[int]:
    """Under torchrun (``WORLD_SIZE > 1``) initialize gloo (cpu) or NCCL (cuda) for ``run``,
    destroy it at exit, and yield this process's rank (0 without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or args.command != "run":
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
        print(f"quantreg: error{where}: {_describe(exc, args)}", file=sys.stderr)
        if getattr(args, "verbose", False) and _describe(exc, args).startswith("internal error"):
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

"""The ``quantreg`` command line: a thin argparse front end over the public API.

Exit codes: 0 success, 1 a quantreg error (its message on stderr, no traceback),
2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import quantreg
from quantreg.errors import QuantregError

logger = logging.getLogger(__name__)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def cmd_methods(args: argparse.Namespace) -> int:
    """List every registered method: built-ins and plugins, broken ones with their error."""
    infos = quantreg.list_quant_methods()
    if args.json:
        _print_json([info.to_dict() for info in infos])
        return 0
    width = max(len(info.name) for info in infos)
    for info in infos:
        state = "broken" if info.error else ("loaded" if info.loaded else "available")
        aliases = f" (aliases: {', '.join(info.aliases)})" if info.aliases else ""
        print(f"{info.name:<{width}}  {state:<9}  {info.source}{aliases}")
        if info.error:
            print(f"{'':<{width}}  error: {info.error}")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    """Show which method a layer of a checkpoint gets on a platform, and why."""
    resolution = quantreg.resolve(
        args.path, platform=args.platform, requested=args.quantization, prefix=args.prefix
    )
    if args.json:
        _print_json(resolution.to_dict())
    else:
        print(resolution.explain())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job for now: show the registry (loading demos arrive with the loaders)."""
    print(f"quantreg {quantreg.__version__}: registered quantization methods")
    return cmd_methods(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``quantreg`` command."""
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="show INFO log lines (what was decided and why)",
    )  # fmt: skip
    parser = argparse.ArgumentParser(
        prog="quantreg",
        description="Resolve, load and run quantized LLM lm_heads.",
        parents=[verbose],
    )
    parser.add_argument("--version", action="version", version=f"quantreg {quantreg.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("methods", parents=[verbose], help="list registered quantization methods")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_methods)

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
    p.add_argument("--json", action="store_true", help="print Resolution.to_dict() as JSON")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("demo", parents=[verbose], help="the README's main job")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except QuantregError as exc:
        print(f"quantreg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

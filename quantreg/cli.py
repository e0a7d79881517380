"""The ``quantreg`` command line: a thin argparse front end over the public API.

Exit codes: 0 success, 1 a quantreg error (its message on stderr, no traceback),
2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import quantreg
from quantreg.errors import InputError, QuantregError

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


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a checkpoint's config, its head's method, and every tensor (headers only)."""
    from quantreg.report import inspect_checkpoint

    report = inspect_checkpoint(args.path, platform=args.platform, prefix=args.prefix)
    if args.json:
        _print_json(report)
        return 0
    quant = report["config"].get("quantization_config")
    print(f"{args.path}: {args.prefix} -> {report['method'] or 'unquantized'} ({report['rule']})")
    if isinstance(quant, dict):
        print(f"quantization_config: {json.dumps(quant, sort_keys=True)[:300]}")
    width = max((len(t["name"]) for t in report["tensors"]), default=4)
    for t in report["tensors"]:
        flag = "q" if t["quantized"] else " "
        print(
            f"  {flag} {t['name']:<{width}}  {t['dtype']:<7} {t['shape']!s:<16} "
            f"{t['bytes']:>12,d}  {t['file']}"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Load the head, compute logits for hidden states, print top-5 ids and timings."""
    import torch

    from quantreg.checkpoint import read_hidden_states
    from quantreg.loading import load_lm_head

    start = time.perf_counter()
    head = load_lm_head(
        args.path, device=args.device, dtype=args.dtype, requested=args.quantization,
        platform=args.platform, prefix=args.prefix, kernel=args.kernel,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    if args.hidden is not None:
        x = read_hidden_states(args.hidden)
        if x.shape[-1] != head.embedding_dim:
            raise InputError(
                f"{args.hidden}: tensor 'x' has {x.shape[-1]} features; the head expects "
                f"hidden size {head.embedding_dim}",
                field="hidden",
            )
    else:
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.tokens, head.embedding_dim, generator=generator)
    x = x.to(device=args.device, dtype=head.params_dtype)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = head.compute_logits(x)
    forward_s = time.perf_counter() - start
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.tolist()
    if args.rank != 0:
        return 0  # under torchrun every rank computed the full logits; rank 0 reports them
    if args.out is not None:
        from safetensors.torch import save_file

        save_file({"logits": logits.detach().cpu().contiguous()}, str(args.out))
    assert head.kernel is not None  # recorded by the loader
    result = {
        "method": head.resolution.method if head.resolution else None,
        "kernel": head.kernel.name,
        "kernel_reason": head.kernel.reason,
        "load_s": round(load_s, 6),
        "forward_s": round(forward_s, 6),
        "resident_bytes": head.resident_bytes(),
        "top5": top5,
    }
    if args.json:
        _print_json(result)
        return 0
    print(f"method: {result['method'] or 'unquantized'}  ({head.quant_reason})")
    print(f"kernel: {head.kernel.name}  ({head.kernel.reason})")
    print(f"load {load_s * 1e3:.1f} ms, forward {forward_s * 1e3:.2f} ms "
          f"({x.shape[0]} tokens), resident head {result['resident_bytes']:,d} bytes")  # fmt: skip
    for i, ids in enumerate(top5):
        print(f"  token {i}: top-5 ids {ids}")
    if args.out is not None:
        print(f"logits {list(logits.shape)} written to {args.out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize the head of a checkpoint into a copy."""
    from quantreg.writers import quantize_checkpoint

    params = {
        key: value
        for key, value in (
            ("bits", args.bits), ("group_size", args.group_size), ("sym", args.sym),
            ("desc_act", args.desc_act or None), ("format", args.format),
        )
        if value is not None
    }  # fmt: skip
    dst = quantize_checkpoint(args.src, args.dst, args.method, prefix=args.prefix, **params)
    qcfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    settings = {k: v for k, v in qcfg.items() if k not in ("modules_to_not_convert", "dynamic")}
    print(f"wrote {dst}: {args.prefix} quantized with {args.method} by round-to-nearest "
          "(no calibration data); every other module stays float")  # fmt: skip
    print(f"  quantization_config: {json.dumps(settings, sort_keys=True)}")
    for key in ("modules_to_not_convert", "dynamic"):
        if qcfg.get(key):
            print(
                f"  {key}: {json.dumps(qcfg[key])}  (the float modules, for vLLM and transformers)"
            )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Time every method against dense F.linear in one process; print the table."""
    from pathlib import Path

    from quantreg import bench, bench_report

    shapes = tuple(_shape(s) for s in args.shape) if args.shape else None
    ms = tuple(int(m) for m in args.m.split(",")) if args.m else bench.MS
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 2.0)
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    if methods:
        known = {m for fmt in bench.FORMATS for m in fmt.methods} | {"torch"}
        unknown = sorted(set(methods) - known)
        if unknown:
            raise InputError(
                f"--methods: unknown {', '.join(unknown)}; expected some of "
                f"{', '.join(sorted(known))}"
            )
    result = bench.run_bench(
        quick=args.quick, shapes=shapes, ms=ms, budget_s=budget, methods=methods,
        progress=lambda message: print(message, file=sys.stderr),
    )  # fmt: skip
    print(bench_report.format_table(result))
    if args.json:
        bench_report.write_json(result, Path(args.json))
    if args.append_results:
        bench_report.append_results(result, Path(args.append_results))
    if args.plot:
        bench_report.plot(result, Path(args.plot))
    return 0


def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(
            f"--shape {text!r}: expected NxK, e.g. 32000x4096", field="shape"
        ) from None
    return n, k


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: write example drafters, then resolve, load and run each."""
    from quantreg.demo import format_rows, run_demo

    rows = run_demo(seed=args.seed)
    if args.json:
        _print_json([row.to_dict() for row in rows])
    else:
        methods = ", ".join(info.name for info in quantreg.list_quant_methods())
        print(f"quantreg {quantreg.__version__} (methods: {methods})\n")
        print(format_rows(rows))
    return 0 if all(row.target_vocab_ok for row in rows) else 1


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
    for add in (
        _add_methods,
        _add_resolve,
        _add_inspect,
        _add_run,
        _add_quantize,
        _add_bench,
        _add_demo,
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
    source.add_argument("--tokens", type=int, default=4, help="random hidden states (default 4)")
    source.add_argument(
        "--hidden", default=None, metavar="FILE",
        help="a safetensors file whose tensor 'x' holds [tokens, hidden]",
    )  # fmt: skip
    p.add_argument(
        "--out", default=None, metavar="FILE", help="write 'logits' to a safetensors file"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: config)")
    p.add_argument("--quantization", default=None, metavar="NAME", help="force a method")
    p.add_argument(
        "--platform", default=None, help="platform to resolve for (default: the device's)"
    )
    p.add_argument("--prefix", default="lm_head", help="layer name (default: lm_head)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random hidden states")
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
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--method", required=True, help="awq, gptq or compressed-tensors")
    p.add_argument("--bits", type=int, default=None, help="4 or 8")
    p.add_argument("--group-size", type=int, default=None, help="e.g. 32, 64, 128, or -1")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric codes (default: the method's)")  # fmt: skip
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order groups")
    p.add_argument("--format", default=None, help="compressed-tensors format")
    p.add_argument("--prefix", default="lm_head", help="layer name (default: lm_head)")
    p.set_defaults(func=cmd_quantize)


def _add_bench(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[verbose], help="time every method against dense F.linear")
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    p.add_argument("--shape", action="append", metavar="NxK", help="override the shapes")
    p.add_argument("--m", default=None, metavar="M1,M2", help="token counts (default 1,4,16,64)")
    p.add_argument(
        "--budget", type=float, default=None, help="seconds of timing per M (default 2, quick 0.2)"
    )
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
        "demo", parents=[verbose], help="write example drafters, then resolve, load and run each"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the example weights")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_demo)


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
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    rank = 0
    try:
        with _process_group(args) as rank:
            args.rank = rank
            return args.func(args)
    except QuantregError as exc:
        where = f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"quantreg: error{where}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `quantreg methods --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

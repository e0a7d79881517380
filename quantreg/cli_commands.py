"""The ``quantreg`` subcommands: each takes the parsed arguments and returns an exit code.

Each sets ``args.doing`` before each step, so that an error the library did not turn into a
QuantregError (an OSError, running out of memory) is reported as what was being done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import quantreg
from quantreg.checkpoint import INDEX_NAME, weight_files
from quantreg.errors import InputError, QuantregError
from quantreg.files import regular_stat
from quantreg.output_files import FileId, file_ids, output_file, strict_json, write_file

STDOUT = "writing to standard output"


def print_json(args: argparse.Namespace, data: Any) -> None:
    """Strict JSON on stdout (see :func:`quantreg.output_files.strict_json`), flushed so a
    failed write is reported as such rather than lost at exit."""
    text = strict_json(data) + "\n"
    args.doing = STDOUT
    sys.stdout.write(text)
    sys.stdout.flush()


def checkpoint_files(path: str) -> list[Path]:
    """Every file of the checkpoint folder of ``path`` (a folder or its config.json) and the
    shards its index names: what a command reading the checkpoint must never write."""
    given = Path(path).expanduser()
    root = given if given.is_dir() else given.parent
    files = [given]
    with contextlib.suppress(OSError):
        files += [Path(entry.path) for entry in os.scandir(root)]
    if os.path.lexists(root / INDEX_NAME):
        with contextlib.suppress(QuantregError, OSError):  # a bad index: loading reports it
            files += weight_files(root)[0]
    return files


def cmd_methods(args: argparse.Namespace) -> int:
    """List every registered method: built-ins and plugins, broken ones with their error."""
    infos = quantreg.list_quant_methods()
    if args.json:
        print_json(args, [info.to_dict() for info in infos])
        return 0
    args.doing = STDOUT
    width = max(len(info.name) for info in infos)
    for info in infos:
        state = "broken" if info.error else ("loaded" if info.loaded else "available")
        aliases = f" (aliases: {', '.join(info.aliases)})" if info.aliases else ""
        print(f"{info.name:<{width}}  {state:<9}  {info.source}{aliases}")
        if info.error:
            print(f"{'':<{width}}  error: {info.error}")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    """Show which method a layer of a checkpoint gets on a platform, and why; with ``--check``
    also check the head's tensor headers as ``run`` would, before printing."""
    args.doing = f"resolving {args.prefix} of {args.path}"
    resolution = quantreg.resolve(
        args.path, platform=args.platform, requested=args.quantization, prefix=args.prefix
    )
    if args.check:
        args.doing = f"checking the tensors of {args.prefix} in {args.path}"
        quantreg.check_lm_head(resolution, dtype=args.dtype)
    if args.json:
        print_json(args, resolution.to_dict())
    else:
        args.doing = STDOUT
        print(resolution.explain())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a checkpoint's config, its head's method, and every tensor (headers only)."""
    from quantreg.report import inspect_checkpoint

    args.doing = f"inspecting {args.path}"
    report = inspect_checkpoint(args.path, platform=args.platform, prefix=args.prefix)
    if args.json:
        print_json(args, report)
        return 0
    args.doing = STDOUT
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

    from quantreg.loading import load_lm_head
    from quantreg.values import check_logits

    if args.hidden is not None:  # before the load: a bad --hidden fails fast
        regular_stat(Path(args.hidden), what="hidden states file")
    reads = file_ids([*checkpoint_files(args.path), *([args.hidden] if args.hidden else [])])
    if args.out is not None:  # every rank checks, so all fail alike before any collective
        output_file(args.out, reads=reads, what="--out")
    args.doing = f"loading {args.prefix} of {args.path}"
    start = time.perf_counter()
    head = load_lm_head(
        args.path, device=args.device, dtype=args.dtype, requested=args.quantization,
        platform=args.platform, prefix=args.prefix, kernel=args.kernel,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    x = _hidden_states(args, head.embedding_dim).to(device=args.device, dtype=head.params_dtype)
    args.doing = f"computing logits for {x.shape[0]} tokens"
    start = time.perf_counter()
    with torch.inference_mode():
        logits = head.compute_logits(x)
    forward_s = time.perf_counter() - start
    check_logits(logits, x, head, args.path, args.hidden)  # no exit 0 with NaN / inf logits
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.tolist()
    if args.rank != 0:
        return 0  # under torchrun every rank computed the full logits; rank 0 reports them
    if args.out is not None:
        _write_logits(args, logits, reads)
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
        print_json(args, result)
        return 0
    args.doing = STDOUT
    print(f"method: {result['method'] or 'unquantized'}  ({head.quant_reason})")
    print(f"kernel: {head.kernel.name}  ({head.kernel.reason})")
    print(f"load {load_s * 1e3:.1f} ms, forward {forward_s * 1e3:.2f} ms "
          f"({x.shape[0]} tokens), resident head {result['resident_bytes']:,d} bytes")  # fmt: skip
    for i, ids in enumerate(top5):
        print(f"  token {i}: top-5 ids {ids}")
    if args.out is not None:
        print(f"logits {list(logits.shape)} written to {args.out}")
    return 0


def _hidden_states(args: argparse.Namespace, hidden: int) -> Any:
    """``--hidden``'s tensor ``x`` (checked against the head's hidden size) or ``--tokens``
    random rows from ``--seed``.

    Raises:
        CheckpointError: an unreadable ``--hidden`` file (see ``read_hidden_states``).
        InputError: its ``x`` has another number of features than the head.
    """
    import torch

    from quantreg.checkpoint import read_hidden_states

    if args.hidden is None:
        args.doing = f"drawing {args.tokens} random hidden states of size {hidden}"
        return torch.randn(args.tokens, hidden, generator=torch.Generator().manual_seed(args.seed))
    args.doing = f"reading hidden states from {args.hidden}"
    x = read_hidden_states(args.hidden)
    if x.shape[-1] != hidden:
        raise InputError(
            f"{args.hidden}: tensor 'x' has {x.shape[-1]} features; the head expects "
            f"hidden size {hidden}",
            field="hidden",
        )
    return x


def _write_logits(args: argparse.Namespace, logits: Any, reads: dict[FileId, Path]) -> None:
    from quantreg.writers import save_tensors

    args.doing = f"writing logits to {args.out}"
    tensors = {"logits": logits.detach().cpu().contiguous()}
    write_file(Path(args.out), lambda tmp: save_tensors(tensors, tmp), reads=reads, what="--out")


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize the head of a checkpoint into a copy."""
    from quantreg.files import read_json
    from quantreg.writers import quantize_checkpoint

    params = {
        key: value
        for key, value in (
            ("bits", args.bits), ("group_size", args.group_size), ("sym", args.sym),
            ("desc_act", args.desc_act or None), ("format", args.format),
        )
        if value is not None
    }  # fmt: skip
    args.doing = f"quantizing {args.prefix} of {args.src} into {args.dst}"
    dst = quantize_checkpoint(
        args.src, args.dst, args.method, prefix=args.prefix, overwrite=args.force, **params
    )
    qcfg = read_json(dst / "config.json", what="written config")["quantization_config"]
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
    from quantreg import bench, bench_report

    outputs = {"--json": args.json, "--plot": args.plot, "--append-results": args.append_results}
    for what, path in outputs.items():
        if path is not None:
            output_file(path, what=what)
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
    args.doing = "timing the methods"
    result = bench.run_bench(
        quick=args.quick, shapes=tuple(args.shape) if args.shape else None,
        ms=args.m or bench.MS, budget_s=budget, methods=methods,
        progress=lambda message: print(message, file=sys.stderr),
    )  # fmt: skip
    print(bench_report.format_table(result))
    writers = (
        (args.json, bench_report.write_json),
        (args.append_results, bench_report.append_results),
        (args.plot, bench_report.plot),
    )
    for path, write in writers:
        if path is not None:
            args.doing = f"writing {path}"
            write(result, Path(path))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the failures quantreg exists for, then every format loaded and run."""
    from quantreg.demo_story import run_demo_command

    args.doing = "running the demo"
    ok = run_demo_command(
        args.keep, seed=args.seed, as_json=args.json, emit=lambda text: print(text, flush=True)
    )
    return 0 if ok else 1


def cmd_warmup(args: argparse.Namespace) -> int:
    """Build quantreg's CPU kernel now (or say why this machine has nothing to build)."""
    from quantreg.kernels.cpu import warmup

    args.doing = "building quantreg's CPU kernel"
    result = warmup()
    if args.json:
        print_json(args, result.to_dict())
    else:
        args.doing = STDOUT
        print(result.summary())
    return 0 if result.ready or not result.needed else 1

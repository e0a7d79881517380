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
import textwrap
from pathlib import Path
from typing import Any

import quantreg
from quantreg.checkpoint import INDEX_NAME, weight_files
from quantreg.errors import InputError, QuantregError
from quantreg.output_files import output_file, strict_json

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
    """List every registered method: built-ins and plugins, broken ones with their error, and
    whether each runs its intended kernels on this machine (and why not)."""
    from quantreg.report import methods_here

    args.doing = "probing this machine"
    rows = methods_here()
    if args.json:
        print_json(args, rows)
        return 0
    args.doing = STDOUT
    width = max(len(row["name"]) for row in rows)
    origins = [
        row["source"] + (f" (aliases: {', '.join(row['aliases'])})" if row["aliases"] else "")
        for row in rows
    ]
    column = max(map(len, origins))
    for row, origin in zip(rows, origins, strict=True):
        state = "broken" if row["error"] else ("loaded" if row["loaded"] else "available")
        here = {True: "yes", False: "no", None: "?"}[row["runs_here"]]
        print(f"{row['name']:<{width}}  {state:<9}  {origin:<{column}}  here: {here}")
        if row["error"]:
            print(f"{'':<{width}}  error: {row['error']}")
        elif row["platform_reason"]:
            print(f"{'':<{width}}  not here: {row['platform_reason']}")
    if any(row["runs_here"] is False for row in rows):
        print(
            "here: no -- resolution picks another method on this machine; forced "
            "(--quantization), the method runs its CPU path"
        )
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
    """Show a checkpoint's config, its head's method, drafter facts, and every tensor
    (headers only)."""
    from quantreg.report import inspect_checkpoint

    args.doing = f"inspecting {args.path}"
    report = inspect_checkpoint(args.path, platform=args.platform, prefix=args.prefix)
    if args.json:
        print_json(args, report)
        return 0
    args.doing = STDOUT
    quant = report["config"].get("quantization_config")
    print(f"{args.path}: {args.prefix} -> {report['method'] or 'unquantized'} ({report['rule']})")
    if quant is not None:
        text = " " + strict_json(quant, indent=None)
        if len(text) > 80:  # whole, one key per line: never cut inside a structure
            text = "\n" + textwrap.indent(strict_json(quant, indent=2), "  ")
        print(f"quantization_config:{text}")
    if report["drafter"] is not None:
        print(f"drafter: {_drafter_line(report['drafter'])}")
    width = max((len(t["name"]) for t in report["tensors"]), default=4)
    for t in report["tensors"]:
        flag = "q" if t["quantized"] else " "
        print(
            f"  {flag} {t['name']:<{width}}  {t['dtype']:<7} {t['shape']!s:<16} "
            f"{t['bytes']:>12,d}  {t['file']}"
        )
    if any(t["quantized"] for t in report["tensors"]):
        print("  (q: a tensor of a quantized layer's layout)")
    return 0


def _drafter_line(facts: dict[str, Any]) -> str:
    """One line of drafter facts: layout, vocab sizes, and whether d2t is present and valid."""
    if "error" in facts:
        return f"invalid drafter config: {facts['error']}"
    draft, target = facts["draft_vocab_size"], facts["target_vocab_size"]
    d2t = facts["d2t"]
    if not d2t["present"]:
        state = "absent" + (" (same vocab: none needed)" if draft == target else
                            " -- to_target_vocab cannot map draft ids to target ids")  # fmt: skip
    elif d2t["valid"]:
        state = f"present, valid ({draft} draft ids map one-to-one into the target vocab)"
    else:
        state = f"present, INVALID: {d2t['error']}"
    arch = ", ".join(facts["architectures"]) or "no architectures"
    return (
        f"{facts['layout']} ({arch}), hidden {facts['hidden_size']}, draft vocab {draft} -> "
        f"target vocab {target}; d2t {state}"
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize the head of a checkpoint into a copy; print the settings used and the head's
    bytes on disk before and after."""
    from quantreg.files import read_json
    from quantreg.report import head_bytes
    from quantreg.writers import quantize_checkpoint, writer_params

    if args.desc_act and args.actorder not in (None, "group"):
        raise InputError(
            f"--desc-act is --actorder group; it contradicts --actorder {args.actorder}",
            field="actorder",
        )
    given = {
        key: value
        for key, value in (
            ("format", args.format), ("bits", args.bits), ("group_size", args.group_size),
            ("sym", args.sym), ("actorder", "group" if args.desc_act else args.actorder),
            ("block_size", args.block_size), ("strategy", args.strategy),
        )
        if value is not None
    }  # fmt: skip
    params = writer_params(args.method, **given)
    args.doing = f"quantizing {args.prefix} of {args.src} into {args.dst}"
    dst = quantize_checkpoint(
        args.src, args.dst, args.method, prefix=args.prefix, overwrite=args.force, **params
    )
    args.doing = f"reading the headers of {args.src} and {dst}"
    before, after = head_bytes(args.src, args.prefix), head_bytes(dst, args.prefix)
    qcfg = read_json(dst / "config.json", what="written config")["quantization_config"]
    settings = {k: v for k, v in qcfg.items() if k not in ("modules_to_not_convert", "dynamic")}
    args.doing = STDOUT
    print(f"wrote {dst}: {args.prefix} quantized with {args.method} by round-to-nearest "
          "(no calibration data); every other module stays float")  # fmt: skip
    print(f"  settings: {_settings(args.method, given)}")
    print(f"  quantization_config: {json.dumps(settings, sort_keys=True)}")
    old, new = sum(before.values()), sum(after.values())
    print(
        f"  {args.prefix} on disk: {old:,d} bytes ({_names(before, args.prefix)}) -> {new:,d} "
        f"bytes ({_names(after, args.prefix)}): {new / max(old, 1):.2f}x"
    )
    for key in ("modules_to_not_convert", "dynamic"):
        if qcfg.get(key):
            print(
                f"  {key}: {json.dumps(qcfg[key])}  (the float modules, for vLLM and transformers)"
            )
    return 0


def _settings(method: str, given: dict[str, Any]) -> str:
    """Every writer option with the value used: given, or the writer's default."""
    parts = []
    for option in quantreg.get_quant_config_cls(method).writer_options():
        value = given.get(option.name, option.default)
        shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
        if option.name in given:
            parts.append(f"{option.name} {shown}")
        elif value is None:
            unset = (
                "off" if option.name == "actorder" else "set by the format (quantization_config)"
            )
            parts.append(f"{option.name} {unset}")
        else:
            parts.append(f"{option.name} {shown} (default)")
    return ", ".join(parts)


def _names(sizes: dict[str, int], prefix: str) -> str:
    return ", ".join(name.removeprefix(f"{prefix}.") for name in sizes)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time every method against dense F.linear in one process; print the table."""
    from quantreg import bench, bench_peers, bench_report

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
    formats = tuple(f.strip() for f in args.formats.split(",")) if args.formats else None
    if formats:
        labels = [fmt.label for fmt in bench.FORMATS]
        unknown = sorted(set(formats) - set(labels))
        if unknown:
            raise InputError(
                f"--formats: unknown {', '.join(map(repr, unknown))}; expected some of "
                f"{', '.join(map(repr, labels))}"
            )
    if args.peers:
        args.doing = "--peers vllm"
        bench_peers.require_vllm()
    args.doing = "timing the methods"
    result = bench.run_bench(
        quick=args.quick, shapes=tuple(args.shape) if args.shape else None,
        ms=args.m or bench.MS, budget_s=budget, methods=methods, formats=formats,
        peers=tuple(args.peers or ()), progress=lambda message: print(message, file=sys.stderr),
        activation_dtypes=tuple(dict.fromkeys(args.activation_dtype or ())),
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
    """Build quantreg's CPU kernels now -- the int4 / int8 one, the float8 one, the AVX2 and
    AVX512-VNNI builds of the other int4 / int8 one, then the AVX512-BF16 float8 one (or say
    why this machine has nothing to build for one)."""
    from quantreg.kernels import cpu, cpu_avx2, cpu_float8, cpu_float8_avx512, cpu_vnni

    args.doing = "building quantreg's CPU kernel"
    result = cpu.warmup()
    args.doing = "building quantreg's float8 CPU kernel"
    float8 = cpu_float8.warmup()
    args.doing = "building quantreg's AVX2 int4 / int8 CPU kernel"
    avx2 = cpu_avx2.warmup()
    args.doing = "building quantreg's AVX512-VNNI int4 / int8 CPU kernel"
    vnni = cpu_vnni.warmup()
    args.doing = "building quantreg's AVX512-BF16 float8 CPU kernel"
    float8_512 = cpu_float8_avx512.warmup()
    parts = {"float8": float8, "avx2": avx2, "vnni": vnni, "float8_avx512": float8_512}
    if args.json:
        print_json(args, {**result.to_dict(), **{k: r.to_dict() for k, r in parts.items()}})
    else:
        args.doing = STDOUT
        print(result.summary())
        print(float8.summary("quantreg's float8 CPU kernel", "the reference kernel"))
        print(avx2.summary("quantreg's AVX2 int4 / int8 CPU kernel"))
        print(vnni.summary("quantreg's AVX512-VNNI int4 / int8 CPU kernel", "another kernel"))
        instead = "cpu-avx2-float8 or the reference kernel"
        print(float8_512.summary("quantreg's AVX512-BF16 float8 CPU kernel", instead))
    return 0 if all(r.ready or not r.needed for r in (result, *parts.values())) else 1

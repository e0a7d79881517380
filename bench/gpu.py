"""GPU check of the Triton kernels: smoke, correctness, checkpoints, TP, then timings, in one
process.

    python bench/gpu.py --json out.json [--append-results bench/RESULTS.md]
        [--save-tuned quantreg/kernels/triton_tuned.json] [--budget-s 420]
    TRITON_INTERPRET=1 python bench/gpu.py --cpu-smoke     # the script's own logic, no GPU
    python bench/gpu_aot.py --arch 80,90                   # every config compiled, no GPU

On the device machine, ``bench/gpu_device.sh`` installs the wheels it lacks and runs this.

1. Smoke (about 30 s): import triton and quantreg, compile and run the kernels once per bits
   (int4, int8, float8 bytes, packed e2m1).
2. Correctness on fresh random inputs, fp16 and bf16 activations, vocab 1000 and 4000 (not
   tile-aligned): int4 g128 with zero points (awq_marlin layout), int4 g128 act-order, int8
   per-channel (compressed-tensors), fp8 per-channel, fp8 128 x 128 blocks (DeepSeek /
   compressed-tensors ``block``), NVFP4 (e2m1 in groups of 16, rounded to bf16 last), M in
   1..64 -- against a float32 matmul with the dequantized weight (built here, independently of
   quantreg's reference kernel).
3. Checkpoints: every producer fixture with a quantized head (awq_marlin, gptq_marlin with
   act-order, gptq, compressed-tensors int4 / int8 / fp8, ModelOpt fp8 / NVFP4, AutoRound)
   loaded by ``load_lm_head(..., device="cuda")``, against the producer's dequantized weight;
   each row names the kernel the library chose.
4. Tensor parallelism: two heads sharded over two gloo ranks on the one card.
5. Copy bandwidth: a 1 GiB device-to-device copy (bytes read and written / time).
6. Timings side by side: bf16 cuBLAS ``F.linear``, torch's ``_weight_int4pack_mm`` and
   quantreg's kernels (``triton`` for int4 / int8, ``triton-float8`` for fp8 channel, fp8 block
   and NVFP4), N in {32000, 128256}, K = 4096, M in {1, 4, 16, 64}; the L2 cache is flushed (a
   256 MiB write) before every timed call, CUDA events time the call alone; medians with their
   spread (fastest, slowest), ratios (bf16 time / case time) and effective GB/s (the head's
   bytes / median time, and its fraction of the copy bandwidth). No new shape or M is started
   after ``--budget-s`` seconds, so the results come back inside the device call's limit.

The JSON (``--json``) is written after every section: a run cut off keeps what it did.
``--save-tuned`` merges the configurations the run chose into the tuned table for this card.

On the device machine (no pydantic there) carry the wheels quantreg needs: see the device
README, e.g. ``pydantic``, ``pydantic-core``, ``annotated-types``, ``typing-inspection``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_checks beside this script

from gpu_checks import (
    FLOAT8_CASES,
    checkpoints,
    correctness,
    make_float8,
    make_weights,
    quantreg_fn,
    say,
    tensor_parallel,
)

from quantreg.output_files import strict_json, write_file

FULL = {"shapes": [(32000, 4096), (128256, 4096)], "ms": [1, 4, 16, 64], "reps": 50}
CPU_SMOKE = {"shapes": [(96, 256)], "ms": [1, 17], "reps": 2}


def smoke(device: str) -> None:
    t0 = time.perf_counter()
    import triton

    import quantreg

    say(f"triton {triton.__version__}, quantreg {quantreg.__version__}, torch {torch.__version__}")
    for bits in (4, 8):
        weights, _ = make_weights(bits, 64, 256, 128 if bits == 4 else 256, torch.float16, device)
        x = torch.randn(2, 256, dtype=torch.float16, device=device)
        quantreg_fn(weights, torch.float16)(x)
    for kind in ("fp8 block", "nvfp4"):  # the float8 bytes and the packed e2m1 codes
        layout, _ = make_float8(kind, 64, 256, torch.float16, device)
        quantreg_fn(layout, torch.float16, "triton-float8")(x)
    if device == "cuda":
        torch.cuda.synchronize()
    say(f"smoke: import + compile + run in {time.perf_counter() - t0:.1f} s")


def copy_bandwidth(device: str) -> float:
    """GB/s of a device-to-device copy of 1 GiB (8 MiB on a CPU), bytes read and written."""
    size = 2**30 if device == "cuda" else 2**23
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * size / statistics.median(times[2:]) / 1e9


def heads(n: int, k: int, device: str) -> dict[str, tuple]:  # type: ignore[type-arg]
    """Each timed case of an ``n x k`` head: ``name -> (fn(x), bytes it reads)``, its layout
    built once, as at load time; the first is the baseline."""
    w16 = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
    cases = {"bf16 cuBLAS": (lambda xx: F.linear(xx, w16), w16.nbytes)}
    int4op = _torch_int4(n, k, device)
    if int4op is not None:
        cases["torch int4 op"] = (int4op, _int4_op_bytes(n, k))
    kernels = {
        "quantreg int4 g128": quantreg_fn(
            make_weights(4, n, k, 128, torch.bfloat16, device, dense=False)[0], torch.bfloat16
        ),
        "quantreg int8 channel": quantreg_fn(
            make_weights(8, n, k, k, torch.bfloat16, device, dense=False)[0], torch.bfloat16
        ),
    }
    for kind in FLOAT8_CASES:
        layout = make_float8(kind, n, k, torch.bfloat16, device, dense=False)[0]
        kernels[f"quantreg {kind}"] = quantreg_fn(layout, torch.bfloat16, "triton-float8")
    for name, kernel in kernels.items():
        cases[name] = (kernel, sum(t.nbytes for t in kernel.tensors().values()))
    return cases


def timed(call, reps: int, flush: torch.Tensor, device: str) -> list[float]:  # type: ignore[no-untyped-def]
    """``call()``'s times in ms after 3 untimed calls, the L2 flushed before each: CUDA events
    around the call alone on a GPU, the wall clock on a CPU."""
    for _ in range(3):
        call()
    times = []
    for _ in range(reps):
        flush.zero_()
        if device == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def graphed(fn, x: torch.Tensor):  # type: ignore[no-untyped-def]
    """``fn(x)`` captured in a CUDA graph, as vLLM captures decoding: its replay. The calls
    before capture run on a side stream (they choose the configuration, timing it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return graph.replay


def timings(device: str, plan: dict, deadline: float) -> list[dict]:  # type: ignore[type-arg]
    """Every case at every shape and M: eager (each call launched from Python), and on CUDA
    replayed from a CUDA graph too (``row["graph"]``: the kernels alone, no Python between)."""
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device)
    rows = []
    for n, k in plan["shapes"]:
        cases = heads(n, k, device)
        for m in plan["ms"]:
            if time.monotonic() > deadline:
                say(f"budget spent: N={n} M={m} and after are not timed")
                return rows
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            line: dict = {"N": n, "K": k, "M": m}  # type: ignore[type-arg]
            graph: dict = {}  # type: ignore[type-arg]
            for name, (fn, nbytes) in cases.items():
                times = timed(functools.partial(fn, x), plan["reps"], flush, device)
                line.update(_stats(name, times, nbytes))
                if device == "cuda":
                    try:
                        replay = graphed(fn, x)
                        graph.update(_stats(name, timed(replay, plan["reps"], flush, device),
                                            nbytes))  # fmt: skip
                    except Exception as exc:  # a cell, not the end of the run
                        graph[f"{name} error"] = f"{type(exc).__name__}: {exc}"
            if graph:
                line["graph"] = {"N": n, "K": k, "M": m, **graph}
            rows.append(line)
            say("time " + ", ".join(f"{key} {value:.4g}" for key, value in line.items()
                                    if key.endswith(" ms")) + f" (N={n}, M={m})")  # fmt: skip
    return rows


def _stats(name: str, times: list[float], nbytes: int) -> dict:  # type: ignore[type-arg]
    med = statistics.median(times)
    return {f"{name} ms": med, f"{name} spread": [min(times), max(times)],
            f"{name} GB/s": nbytes / med / 1e6}  # fmt: skip


def _torch_int4(n: int, k: int, device: str):  # type: ignore[no-untyped-def]
    """torch's own int4 weight-only matmul (CUDA), or None where this torch lacks it."""
    if device != "cuda" or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return None
    try:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
        packed = torch.ops.aten._convert_weight_to_int4pack(
            (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8
        )
        sz = torch.rand(k // 128, n, 2, device=device).to(torch.bfloat16)
        fn = lambda xx: torch.ops.aten._weight_int4pack_mm(xx, packed, 128, sz)  # noqa: E731
        fn(torch.randn(1, k, device=device).to(torch.bfloat16))
        return fn
    except Exception as exc:  # report, keep timing the rest
        say(f"torch int4 op unavailable: {type(exc).__name__}: {exc}")
        return None


def _int4_op_bytes(n: int, k: int) -> int:
    return n * k // 2 + (k // 128) * n * 2 * 2  # codes, then bf16 scales and zeros


def tables(rows: list[dict], copy_gbps: float) -> str:  # type: ignore[type-arg]
    """The eager table, then the CUDA graph one where the run has it."""
    if not rows:
        return "(no timings)"
    keys = list(dict.fromkeys(key[:-3] for row in rows for key in row if key.endswith(" ms")))
    text = "Each call launched from Python (eager):\n\n" + table(rows, copy_gbps, keys)
    replays = [row["graph"] for row in rows if "graph" in row]
    if replays:
        text += "\n\nReplayed from a CUDA graph (the kernels alone):\n\n"
        text += table(replays, copy_gbps, keys)
    return text


def table(rows: list[dict], copy_gbps: float, keys: list[str]) -> str:  # type: ignore[type-arg]
    """Each case of ``keys``: median ms (fastest-slowest), ratio to the first case, GB/s and
    % of the copy; n/a where a row lacks the case (it failed)."""
    names = ["N", "K", "M", *(f"{key} ms" for key in keys), *(f"{key} ×" for key in keys[1:]),
             *(f"{key} GB/s (% copy)" for key in keys)]  # fmt: skip
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        base = row.get(f"{keys[0]} ms")
        cells, ratios, rates = [], [], []
        for key in keys:
            if f"{key} ms" not in row:
                cells.append("n/a")
                ratios.append("n/a")
                rates.append("n/a")
                continue
            ms, (lo, hi), gbps = row[f"{key} ms"], row[f"{key} spread"], row[f"{key} GB/s"]
            cells.append(f"{ms:.4f} ({lo:.4f}–{hi:.4f})")
            ratios.append(f"{base / ms:.2f}" if base else "n/a")
            rates.append(f"{gbps:.0f} ({100 * gbps / copy_gbps:.0f} %)")
        cells += ratios[1:] + rates
        lines.append(f"| {row['N']} | {row['K']} | {row['M']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SECTIONS = ("correctness", "checkpoints", "tp", "timings")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")  # fmt: skip
    ap.add_argument("--json", default=None, help="write {machine, correctness, timings}")
    ap.add_argument("--append-results", default=None, help="append a section to this file")
    ap.add_argument("--save-tuned", default=None,
                    help="merge the configurations chosen into this tuned table")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no timing after this many seconds (default 420)")  # fmt: skip
    ap.add_argument("--skip", action="append", default=[], choices=SECTIONS,
                    help="leave a section out (repeatable): a short rerun after a fix")  # fmt: skip
    ap.add_argument("--n", type=int, nargs="+", default=None,
                    help="time these vocab sizes only (default 32000 128256)")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    start = time.monotonic()
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--cpu-smoke runs the kernels on the interpreter: set TRITON_INTERPRET=1")
        device, plan = "cpu", CPU_SMOKE
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: use --cpu-smoke with TRITON_INTERPRET=1 for a dry run")
    else:
        device, plan = "cuda", FULL
    if args.n:
        plan = {**plan, "shapes": [(n, k) for n in args.n for k in {k for _, k in plan["shapes"]}]}
    import triton

    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    machine = {"card": card, "torch": torch.__version__, "triton": triton.__version__,
               "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               "command": " ".join(["python bench/gpu.py", *(argv or sys.argv[1:])])}  # fmt: skip
    result: dict = {"machine": machine, "correctness": [], "timings": []}  # type: ignore[type-arg]

    def save() -> None:  # after every section, renamed into place: a cut-off run keeps valid JSON
        if args.json:
            text = strict_json(result, indent=1)
            write_file(Path(args.json), lambda tmp: tmp.write_text(text), what="--json")

    smoke(device)
    dtypes = [torch.float16] if args.cpu_smoke else [torch.float16, torch.bfloat16]
    checks = {"correctness": lambda: correctness(device, args.cpu_smoke),
              "checkpoints": lambda: checkpoints(device, dtypes),
              "tp": lambda: tensor_parallel(device, torch.float16)}  # fmt: skip
    for name, section in checks.items():
        if name not in args.skip:
            result["correctness"] += section()
            save()
    machine["copy GB/s"] = copy_bandwidth(device)
    if "timings" not in args.skip:
        result["timings"] = timings(device, plan, start + args.budget_s)
    machine["seconds"] = round(time.monotonic() - start, 1)
    if args.save_tuned:
        result["tuned"] = _save_tuned(Path(args.save_tuned), machine)
    save()
    text = tables(result["timings"], machine["copy GB/s"])
    print(text)
    if args.append_results:
        with open(args.append_results, "a") as out:
            out.write(section_text(result, text))
    bad = [c for c in result["correctness"] if not c["ok"]]
    if bad:
        say(f"FAILED correctness: {bad}")
        return 1
    return 0


def _save_tuned(path: Path, machine: dict) -> int:  # type: ignore[type-arg]
    """Merge this process's chosen configurations into the tuned table: how many."""
    from quantreg.kernels.triton_launch import save_tuned, tuned_in_process

    configs = tuned_in_process()
    save_tuned(path, machine["card"], machine["triton"], machine["date"], configs)
    say(f"tuned table: {len(configs)} configurations for {machine['card']} -> {path}")
    return len(configs)


def section_text(result: dict, text: str) -> str:  # type: ignore[type-arg]
    """A bench/RESULTS.md section (a dated ``###`` heading, as the file's): the card, the
    command, correctness, the kernels chosen, timings."""
    machine, checks = result["machine"], result["correctness"]
    worst = max((c["max_rel_err"] for c in checks), default=0.0)
    failed = [f"{c['case']} {c['dtype']} M={c['M']}" for c in checks if not c["ok"]]
    loaded = [c for c in checks if c.get("kernel") and c["case"].startswith("checkpoint")]
    chosen = sorted({f"{c['case'].removeprefix('checkpoint ')} → {c['kernel']}" for c in loaded})
    return (
        f"\n### {machine['date']} — {machine['card']}, torch {machine['torch']}, triton "
        f"{machine['triton']} (bench/gpu.py)\n\n`{machine['command']}`; copy bandwidth "
        f"{machine['copy GB/s']:.0f} GB/s; {machine['seconds']} s.\n\nCorrectness: worst "
        f"relative error {worst:.1e} over {len(checks)} checks; failed: "
        f"{', '.join(failed) or 'none'}.\n\nKernels chosen: {'; '.join(chosen) or 'n/a'}."
        f"\n\n{text}\n"
    )


if __name__ == "__main__":
    sys.exit(main())

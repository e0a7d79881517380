"""GPU check of the Triton kernels: smoke, correctness, then timings, in one process.

    python bench/gpu.py --json out.json [--append-results bench/RESULTS.md]
    TRITON_INTERPRET=1 python bench/gpu.py --cpu-smoke     # the script's own logic, no GPU

1. Smoke (about 30 s): import triton and quantreg, compile and run the kernel once per bits.
2. Correctness on fresh random inputs, fp16 and bf16 activations: int4 g128 with zero points
   (awq_marlin layout), int4 g128 act-order, int8 per-channel (compressed-tensors), odd N,
   M in 1..64 -- against a float32 matmul with the dequantized weight.
3. Timings side by side: bf16 cuBLAS ``F.linear``, torch's ``_weight_int4pack_mm`` and
   quantreg's kernels, N in {32000, 128256}, K = 4096, M in {1, 4, 16, 64}; the L2 cache is
   flushed (a 256 MiB write) before every timed call, CUDA events time the call alone, medians
   are reported. Ratios are bf16 time / case time.

On the device machine (no pydantic there) carry the wheels quantreg needs: see the device
README, e.g. ``pydantic``, ``pydantic-core``, ``typing-extensions``, ``annotated-types``,
``typing-inspection``, ``safetensors``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

FULL = {"shapes": [(32000, 4096), (128256, 4096)], "ms": [1, 4, 16, 64], "reps": 50}
CPU_SMOKE = {"shapes": [(96, 256)], "ms": [1, 17], "reps": 2}


def say(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def make_weights(bits: int, n: int, k: int, group: int, dtype: torch.dtype, device: str,
                 act_order: bool = False, seed: int = 0):  # fmt: skip
    """Random codes as ``quantreg.IntWeights`` and the float32 ``W.T`` ``[K, N]`` they mean
    (rounded to the scale dtype, as the producers store it); with ``act_order`` the rows'
    groups are scattered (a random ``g_idx``)."""
    from quantreg import IntWeights

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    groups = -(-k // group)
    scales = (torch.rand(groups, n, generator=gen) * 0.004 + 0.001).to(dtype)
    if bits == 8:
        zeros = torch.full((groups, n), 128, dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 16, (groups, n), generator=gen).to(torch.uint8)
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    weight = ((codes - zeros[g_idx].int()).float() * scales[g_idx].float()).to(dtype).float()
    codes, scales, zeros, g_idx = (t.to(device) for t in (codes, scales, zeros, g_idx))
    weights = IntWeights.create(bits=bits, k=k, codes=lambda c0, c1: codes[:, c0:c1],
                                scales=scales, zeros=zeros, g_idx=g_idx)  # fmt: skip
    return weights, weight.to(device)


def quantreg_fn(weights, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """quantreg's Triton kernel for ``weights``, chosen through the public selection."""
    import quantreg

    kernel = quantreg.select_kernel(weights, dtype=dtype, requested="triton")
    assert kernel.name == "triton", kernel
    return kernel


def smoke(device: str) -> None:
    t0 = time.perf_counter()
    import triton

    import quantreg

    say(f"triton {triton.__version__}, quantreg {quantreg.__version__}, torch {torch.__version__}")
    for bits in (4, 8):
        weights, _ = make_weights(bits, 64, 256, 128 if bits == 4 else 256, torch.float16, device)
        x = torch.randn(2, 256, dtype=torch.float16, device=device)
        quantreg_fn(weights, torch.float16)(x)
    if device == "cuda":
        torch.cuda.synchronize()
    say(f"smoke: import + compile + run in {time.perf_counter() - t0:.1f} s")


def correctness(device: str, cpu_smoke: bool) -> list[dict]:
    dtypes = [torch.float16] if cpu_smoke else [torch.float16, torch.bfloat16]
    cases = [("int4 g128", 4, 128, False), ("int4 g128 act-order", 4, 128, True),
             ("int8 channel", 8, None, False)]  # fmt: skip
    n, k = (1000, 256) if cpu_smoke else (4000, 4096)  # odd N: 1000 / 4000 are not tile-aligned
    rows = []
    for label, bits, group, act in cases:
        for dtype in dtypes:
            weights, w = make_weights(bits, n, k, group or k, dtype, device, act, seed=7)
            fn = quantreg_fn(weights, dtype)
            for m in (1, 5, 16, 64):
                x = torch.randn(m, k, device=device).to(dtype)
                ref = x.float() @ w
                err = float((fn(x).float() - ref).abs().max() / ref.abs().max())
                rows.append({"case": label, "dtype": str(dtype)[6:], "M": m, "max_rel_err": err,
                             "ok": err < 1e-2})  # fmt: skip
                say(f"correct {label} {dtype} M={m}: {err:.2e}")
    return rows


def timings(device: str, shapes, ms, reps: int) -> list[dict]:  # type: ignore[no-untyped-def]
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device)

    def timed(fn, x) -> float:  # type: ignore[no-untyped-def]
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(reps):
            flush.zero_()
            if device == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn(x)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    rows = []
    for n, k in shapes:
        w16 = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        heads = {  # each kernel's layout is built once per shape, as at load time
            "quantreg int4 g128": quantreg_fn(
                make_weights(4, n, k, 128, torch.bfloat16, device)[0], torch.bfloat16
            ),
            "quantreg int8 channel": quantreg_fn(
                make_weights(8, n, k, k, torch.bfloat16, device)[0], torch.bfloat16
            ),
        }
        int4op = _torch_int4(n, k, device)
        for m in ms:
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            base = timed(lambda xx, w=w16: F.linear(xx, w), x)
            line = {"N": n, "K": k, "M": m, "bf16 cuBLAS ms": base}
            if int4op is not None:
                line["torch int4 op ms"] = timed(int4op, x)
            for name, kernel in heads.items():
                line[f"{name} ms"] = timed(kernel, x)
            rows.append(line)
            say("time " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else
                                    f"{key} {value}" for key, value in line.items()))  # fmt: skip
    return rows


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


def table(rows: list[dict]) -> str:
    keys = [key for key in rows[0] if key.endswith(" ms")]
    head = (
        "| N | K | M | "
        + " | ".join(keys)
        + " | "
        + " | ".join(f"{key[:-3]} ×" for key in keys[1:])
        + " |"
    )
    lines = [head, "|" + "---|" * (3 + 2 * len(keys) - 1)]
    for row in rows:
        base = row[keys[0]]
        cells = [f"{row.get(key, float('nan')):.4f}" for key in keys]
        ratios = [f"{base / row[key]:.2f}" if key in row else "n/a" for key in keys[1:]]
        lines.append(
            f"| {row['N']} | {row['K']} | {row['M']} | " + " | ".join(cells + ratios) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")  # fmt: skip
    parser.add_argument("--json", default=None, help="write {machine, correctness, timings}")
    parser.add_argument("--append-results", default=None, help="append a table to this file")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--cpu-smoke runs the kernels on the interpreter: set TRITON_INTERPRET=1")
        device, plan = "cpu", CPU_SMOKE
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu-smoke with TRITON_INTERPRET=1 for a dry run")
    else:
        device, plan = "cuda", FULL
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    smoke(device)
    checks = correctness(device, args.cpu_smoke)
    rows = timings(device, plan["shapes"], plan["ms"], plan["reps"])
    import triton

    machine = {"card": card, "torch": torch.__version__, "triton": triton.__version__,
               "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    text = table(rows)
    print(text)
    bad = [c for c in checks if not c["ok"]]
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "correctness": checks, "timings": rows}, indent=1))  # fmt: skip
    if args.append_results:
        worst = max(c["max_rel_err"] for c in checks)
        with open(args.append_results, "a") as out:
            out.write(f"\n## {machine['date']} — {card}, torch {machine['torch']}, triton "
                      f"{machine['triton']} (bench/gpu.py)\n\nCorrectness: worst relative error "
                      f"{worst:.1e} over {len(checks)} checks.\n\n{text}\n")  # fmt: skip
    if bad:
        say(f"FAILED correctness: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check of the Triton kernels: smoke, correctness, then timings, in one process.

    python bench/gpu.py --json out.json [--append-results bench/RESULTS.md]
    TRITON_INTERPRET=1 python bench/gpu.py --cpu-smoke     # the script's own logic, no GPU

1. Smoke (about 30 s): import triton and quantreg, compile and run the kernels once per bits
   (int4, int8, float8 bytes, packed e2m1).
2. Correctness on fresh random inputs, fp16 and bf16 activations: int4 g128 with zero points
   (awq_marlin layout), int4 g128 act-order, int8 per-channel (compressed-tensors), fp8
   per-channel, fp8 128 x 128 blocks (DeepSeek / compressed-tensors ``block``), NVFP4 (e2m1 in
   groups of 16, rounded to bf16 last), odd N, M in 1..64 -- against a float32 matmul with the
   dequantized weight (built here, independently of quantreg's reference kernel).
3. Timings side by side: bf16 cuBLAS ``F.linear``, torch's ``_weight_int4pack_mm`` and
   quantreg's kernels (``triton`` for int4 / int8, ``triton-float8`` for fp8 channel, fp8 block
   and NVFP4), N in {32000, 128256}, K = 4096, M in {1, 4, 16, 64}; the L2 cache is
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


FLOAT8_CASES = ("fp8 channel", "fp8 block", "nvfp4")
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def make_float8(kind: str, n: int, k: int, dtype: torch.dtype, device: str, seed: int = 0,
                dense: bool = True):  # type: ignore[no-untyped-def]  # fmt: skip
    """Random float8 weights of ``kind`` (one of ``FLOAT8_CASES``), drawn on ``device``, as a
    ``quantreg.kernels.Float8Layout`` and (``dense``) the float32 ``W.T`` ``[K, N]`` they mean:
    per-channel scales in ``dtype``; 128 x 128 float32 block scales (each row's block row, as
    the fp8 methods expand them); NVFP4: e2m1 values, float32 group-of-16 scales, bf16 last."""
    from quantreg.kernels import Float8Layout

    gen = torch.Generator(device=device).manual_seed(seed)
    draw = {"generator": gen, "device": device}
    round_to, g_idx = None, None
    if kind == "nvfp4":
        e2m1 = torch.tensor([*E2M1, *(-v for v in E2M1)], device=device)
        values = e2m1[torch.randint(0, 16, (n, k), **draw)]
        g_idx, round_to = torch.arange(k, device=device) // 16, torch.bfloat16
        scales = torch.rand(k // 16, n, **draw) * 0.004 + 0.0005
    else:
        values = (torch.randn(n, k, **draw) * 64).clamp(-448, 448)
        if kind == "fp8 channel":
            scales = (torch.rand(1, n, **draw) * 1e-4 + 1e-5).to(dtype)
        else:
            blocks = torch.rand(-(-n // 128), -(-k // 128), **draw) * 1e-4 + 1e-5
            rows = torch.arange(n, device=device) // 128
            scales, g_idx = blocks[rows].T.contiguous(), torch.arange(k, device=device) // 128
    values = values.to(torch.float8_e4m3fn)
    layout = Float8Layout.build(values, scales, None, g_idx, round_to=round_to)
    if not dense:
        return layout, None
    cols = torch.zeros(k, dtype=torch.long, device=device) if g_idx is None else g_idx
    weight = (values.float() * scales.float()[cols].T).to(scales.dtype)
    return layout, (weight if round_to is None else weight.to(round_to)).float().T.contiguous()


def quantreg_fn(weights, dtype: torch.dtype, name: str = "triton"):  # type: ignore[no-untyped-def]
    """quantreg's Triton kernel ``name`` for ``weights``, chosen through the public selection."""
    import quantreg

    kernel = quantreg.select_kernel(weights, dtype=dtype, requested=name)
    assert kernel.name == name, kernel
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
    for kind in ("fp8 block", "nvfp4"):  # the float8 bytes and the packed e2m1 codes
        layout, _ = make_float8(kind, 64, 256, torch.float16, device)
        quantreg_fn(layout, torch.float16, "triton-float8")(x)
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
            rows += check(label, quantreg_fn(weights, dtype), w, dtype, device)
    for label in FLOAT8_CASES:
        for dtype in dtypes:
            layout, w = make_float8(label, n, k, dtype, device, seed=7)
            fn = quantreg_fn(layout, dtype, "triton-float8")
            assert fn.layout.value_bits == (4 if label == "nvfp4" else 8), fn.layout  # packed?
            rows += check(label, fn, w, dtype, device)
    return rows


def check(label: str, fn, w: torch.Tensor, dtype: torch.dtype, device: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """``fn(x)`` against ``x @ w`` in float32 for M in 1, 5, 16, 64 (relative to the largest
    logit: within 1e-2)."""
    rows = []
    for m in (1, 5, 16, 64):
        x = torch.randn(m, w.shape[0], device=device).to(dtype)
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
        for kind in FLOAT8_CASES:
            layout = make_float8(kind, n, k, torch.bfloat16, device, dense=False)[0]
            heads[f"quantreg {kind}"] = quantreg_fn(layout, torch.bfloat16, "triton-float8")
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

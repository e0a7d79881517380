"""What ``bench/gpu.py`` checks before it times anything: every GPU path against an exact
product, the producers' checkpoints loaded through ``load_lm_head`` on the device, and a head
sharded over two ranks. Each check returns rows ``{"case", "dtype", "M", "max_rel_err", "ok"}``
(relative to the largest logit; within 1e-2 in half precision); a failure is a row, not an
exception, so one broken path does not hide the rest of the run.
"""

from __future__ import annotations

import datetime
import functools
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "producers"
# TP: act-order GPTQ (vocab 1024) and a compressed-tensors group head (vocab 1000: padded to
# 1024, rank 1 holds 488 rows and 24 of padding)
SHARDED = ("gptq_gptqmodel_lmhead_desc_act", "ct_w4a16_group_lmhead")
TOL = 1e-2
LOGITS = lambda head, x: head.compute_logits(x)  # noqa: E731 - a check's call for a loaded head


def say(*args: object) -> None:
    import sys

    print(*args, file=sys.stderr, flush=True)


def make_weights(bits: int, n: int, k: int, group: int, dtype: torch.dtype, device: str,
                 act_order: bool = False, seed: int = 0, dense: bool = True):  # fmt: skip
    """Random codes, drawn on ``device``, as ``quantreg.IntWeights`` and (``dense``) the
    float32 ``W.T`` ``[K, N]`` they mean (rounded to the scale dtype, as the producers store
    it); with ``act_order`` the rows' groups are scattered (a random ``g_idx``). The timed
    heads skip the dense weight: 2 GiB of float32 at N = 128256."""
    from quantreg import IntWeights

    gen = torch.Generator(device=device).manual_seed(seed)
    draw = {"generator": gen, "device": device}
    codes = torch.randint(0, 1 << bits, (k, n), dtype=torch.int32, **draw)
    groups = -(-k // group)
    scales = (torch.rand(groups, n, **draw) * 0.004 + 0.001).to(dtype)
    if bits == 8:
        zeros = torch.full((groups, n), 128, dtype=torch.uint8, device=device)
    else:
        zeros = torch.randint(0, 16, (groups, n), **draw).to(torch.uint8)
    g_idx = torch.arange(k, device=device) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, **draw)]
    weights = IntWeights.create(bits=bits, k=k, codes=lambda c0, c1: codes[:, c0:c1],
                                scales=scales, zeros=zeros, g_idx=g_idx)  # fmt: skip
    if not dense:
        return weights, None
    weight = ((codes - zeros[g_idx].int()).float() * scales[g_idx].float()).to(dtype).float()
    return weights, weight


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


def correctness(device: str, cpu_smoke: bool) -> list[dict]:
    """Every Triton path on random weights, vocab 1000 and 4000 (neither tile-aligned)."""
    dtypes = [torch.float16] if cpu_smoke else [torch.float16, torch.bfloat16]
    cases = [("int4 g128", 4, 128, False), ("int4 g128 act-order", 4, 128, True),
             ("int8 channel", 8, None, False)]  # fmt: skip
    shapes = [(1000, 256)] if cpu_smoke else [(1000, 4096), (4000, 4096)]
    rows = []
    for n, k in shapes:
        for label, bits, group, act in cases:
            for dtype in dtypes:
                weights, w = make_weights(bits, n, k, group or k, dtype, device, act, seed=7)
                make = functools.partial(quantreg_fn, weights, dtype)
                rows += check(f"{label} N={n}", make, w, dtype)
        for label in FLOAT8_CASES:
            for dtype in dtypes:
                layout, w = make_float8(label, n, k, dtype, device, seed=7)
                make = functools.partial(float8_fn, layout, dtype, label)
                rows += check(f"{label} N={n}", make, w, dtype)
    return rows


def float8_fn(layout, dtype: torch.dtype, label: str):  # type: ignore[no-untyped-def]
    fn = quantreg_fn(layout, dtype, "triton-float8")
    assert fn.layout.value_bits == (4 if label == "nvfp4" else 8), fn.layout  # packed?
    return fn


def check(label: str, make, w: torch.Tensor, dtype: torch.dtype,
          ms: tuple[int, ...] = (1, 5, 16, 64), *, call=None, about=None) -> list[dict]:  # type: ignore[no-untyped-def]  # fmt: skip
    """What ``make()`` builds, once, against ``x @ w`` (``w``: ``W.T`` in float32) for each M:
    ``call(built, x)`` (default ``built(x)``), ``x`` seeded by M (the same on every rank);
    ``about(built)`` adds fields to each row. A failure to build or run is a failed row."""
    try:
        built = make()
        extra = about(built) if about else {}
    except Exception as exc:  # rows, so that the run goes on
        return [failed(label, dtype, m, exc) for m in ms]
    rows = []
    for m in ms:
        x = torch.randn(m, w.shape[0], generator=torch.Generator().manual_seed(m))
        x = x.to(device=w.device, dtype=dtype)
        try:
            err = rel_err(call(built, x) if call else built(x), x.float() @ w)
            row = {"case": label, "dtype": _name(dtype), "M": m, "max_rel_err": err,
                   "ok": err < TOL, **extra}  # fmt: skip
        except Exception as exc:
            row = {**failed(label, dtype, m, exc), **extra}
        rows.append(row)
        say(f"correct {label} {dtype} M={m}: {row['max_rel_err']:.2e} {row.get('error', '')}")
    return rows


def failed(label: str, dtype: torch.dtype, m: int, exc: Exception) -> dict:  # type: ignore[type-arg]
    """A check's row for a build or run that raised ``exc``."""
    return {"case": label, "dtype": _name(dtype), "M": m, "max_rel_err": float("inf"),
            "ok": False, "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest difference relative to the largest reference value (inf if not finite)."""
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    return float(err) if torch.isfinite(err) else float("inf")


def checkpoints(device: str, dtypes: list[torch.dtype]) -> list[dict]:
    """Every producer fixture with a quantized head (tests/fixtures/producers) loaded by
    ``load_lm_head(..., device=device)``, its logits against the producer's own dequantized
    weight. On the interpreter the Triton kernels are asked for by name (a CPU would pick its
    own); on CUDA the choice is the library's, and each row names the kernel it made."""
    rows = []
    for folder in sorted(p for p in FIXTURES.iterdir() if (p / "reference.safetensors").exists()):
        ref = load_file(str(folder / "reference.safetensors")).get("lm_head.weight_dequant")
        if ref is None:  # the head is float: nothing quantized to check
            continue
        w = ref.float().T.contiguous().to(device)
        for dtype in dtypes:
            make = functools.partial(load_head, folder, device, dtype)
            rows += check(f"checkpoint {folder.name}", make, w, dtype, ms=(1, 7), call=LOGITS,
                          about=lambda head: {"kernel": head.kernel.name})  # fmt: skip
    return rows


def load_head(folder: Path, device: str, dtype: torch.dtype, **kwargs):  # type: ignore[no-untyped-def]
    """``load_lm_head`` on ``device``. On a CPU (the interpreter) it stands in for CUDA: the
    method CUDA resolves to is requested, with a Triton kernel named where the method runs one
    (else its own: ``gptq`` on an asymmetric head runs the exact kernel on CUDA too)."""
    import quantreg

    if device != "cpu":
        return quantreg.load_lm_head(folder, device=device, dtype=dtype, **kwargs)
    method = quantreg.resolve(folder, platform="cuda:9.0").method
    for kernel in ("triton", "triton-float8"):  # integer heads, then float8 / fp4 ones
        try:
            return quantreg.load_lm_head(folder, dtype=dtype, requested=method, kernel=kernel,
                                         **kwargs)  # fmt: skip
        except quantreg.InputError as exc:
            if "was requested, but" not in str(exc) and "cannot run this layer" not in str(exc):
                raise
    return quantreg.load_lm_head(folder, dtype=dtype, requested=method, **kwargs)


def tensor_parallel(device: str, dtype: torch.dtype) -> list[dict]:
    """``SHARDED`` heads loaded by two gloo ranks on ``device`` (both on the one card): the
    gathered logits against the producer's dequantized weight, and each rank's kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        try:
            mp.spawn(_rank, args=(device, dtype, init, tmp), nprocs=2, join=True)
        except Exception as exc:  # the spawn itself failed: one failed row per head
            return [failed(f"tp=2 {name}", dtype, 5, exc) for name in SHARDED]
        return json.loads((Path(tmp) / "rows.json").read_text())


def _shard(head) -> dict:  # type: ignore[no-untyped-def, type-arg]
    return {"kernel": head.kernel.name, "rows_per_rank": head.num_embeddings_per_partition}


def _rank(rank: int, device: str, dtype: torch.dtype, init: str, tmp: str) -> None:
    """One rank of :func:`tensor_parallel`: rank 0 writes the rows."""
    # a bounded wait: a collective that never completes raises instead of eating the budget
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        rows = []
        for name in SHARDED:
            ref = load_file(str(FIXTURES / name / "reference.safetensors"))
            w = ref["lm_head.weight_dequant"].float().T.contiguous().to(device)
            make = functools.partial(load_head, FIXTURES / name, device, dtype)
            rows += check(f"tp=2 {name}", make, w, dtype, ms=(5,), call=LOGITS, about=_shard)
        if rank == 0:
            (Path(tmp) / "rows.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()

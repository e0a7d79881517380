"""Triton weight-only int4 / int8 matmul over the ``KPackedLayout`` (the ``gpu`` extra).

Reads ``KPackedLayout.codes`` -- int32 ``[ceil(K / pf), N]`` with ``pf = 32 // bits`` codes per
word along K (code ``j`` at bits ``j * bits``) -- with scales ``[G, N]`` in the checkpoint's
dtype and uint8 zero points ``[G, N]``, rows in group order (act-order through the load-time
permutation of ``x``): the layout of every AWQ, GPTQ and compressed-tensors integer head.

Each program multiplies a ``BLOCK_M x BLOCK_N`` tile over one slice of K (split-K for small M:
the partial sums are added in float32 afterwards). Weights are dequantized in registers,
``(q - z) * s`` in float32 rounded to the scale dtype (the producers' weights), then cast to
the activation dtype, and fed to ``tl.dot`` with float32
accumulation. ``tl.dot`` needs at least 16 rows, so M is padded by masking. On CUDA the
configuration for an (M bucket, N, K, group, bits, dtype) comes from the card's tuned table, else
a small set is timed once and cached (``triton_launch``); under the interpreter
(``TRITON_INTERPRET=1``, set before this module is imported) the one with the fewest programs
runs.
"""

from __future__ import annotations

import logging

import torch

from quantreg.errors import InputError
from quantreg.kernels.layouts import TRITON_GROUP_MULTIPLE, KPackedLayout
from quantreg.kernels.triton_launch import (
    Config,
    Launch,
    interpreting,
    m_bucket,
    remembered,
    shape_key,
    tuned_config,
    warps_for,
)

logger = logging.getLogger(__name__)

try:  # the gpu extra
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def triton_ready(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: triton, and CUDA >= 8.0 or the interpreter."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and interpreting()


if triton is not None:

    @triton.jit
    def _wna16_kernel(
        x_ptr, wq_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr,
        M, N, K, stride_xm, stride_om, group_size, k_per_split,
        BITS: tl.constexpr, PER_ROW_GROUPS: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        PF: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_stop
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )  # fmt: skip
            mask_w = mask_k[:, None] & mask_n[None, :]
            # each int32 word once: [BLOCK_K / PF, BLOCK_N], unpacked to [BLOCK_K, BLOCK_N]
            offs_kw = k0 // PF + tl.arange(0, BLOCK_K // PF)
            words = tl.load(wq_ptr + offs_kw[:, None] * N + offs_n[None, :],
                            mask=(offs_kw[:, None] < (K + PF - 1) // PF) & mask_n[None, :],
                            other=0)  # fmt: skip
            shifts = tl.arange(0, PF) * BITS
            q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))
            if PER_ROW_GROUPS:  # irregular groups: every row names its own
                g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
                sz = g[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + sz, mask=mask_w, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + sz, mask=mask_w, other=0).to(tl.float32)
            else:  # BLOCK_K divides the group size: one group per step
                g0 = k0 // group_size
                s = tl.load(s_ptr + g0 * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                z = tl.load(z_ptr + g0 * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
            # rounded to the scale dtype first: the producers' weights, then the activation dtype
            w = ((q.to(tl.float32) - z) * s).to(s_ptr.dtype.element_ty).to(a.dtype)
            if FP32_DOT:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        out = out_ptr + pid_k * M * stride_om + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


def _block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def candidates(m: int, n: int, k: int, group: int) -> list[Config]:
    """The configurations worth timing for this shape (the first is the heuristic pick)."""
    bm = _block_m(m)
    blocks_k = [b for b in (128, 64, 32, 16) if group % b == 0] or [16]
    splits = (4, 8, 1) if m <= 16 else ((2, 1) if m <= 64 else (1,))
    configs = []
    for split in splits:
        for bk in blocks_k[:2]:
            for bn in (64, 128):
                if k >= split * bk:
                    stages = 3 if bm <= 32 else 4
                    configs.append(Config(bm, bn, bk, split, warps_for(bn, bk), stages))
    return configs or [Config(bm, 64, blocks_k[-1], 1)]


def wna16_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    bits: int,
    group: int | None,
    gidx: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W`` with W's codes in the k-packed layout (``KPackedLayout.codes``): float32
    ``[M, N]``.

    ``group`` is the regular group size (rows ``k // group``), or None with ``gidx`` int32 ``[K]``
    naming every row's group. ``config`` overrides the tuned choice.
    """
    if triton is None:
        raise RuntimeError("the Triton kernels need the gpu extra: pip install 'quantreg[gpu]'")
    k = x.shape[1]
    per_row = group is None
    group_size = k if per_row else group
    if per_row and gidx is None:
        raise InputError("irregular groups need gidx (the group of every row)", field="gidx")
    if not per_row and group_size % 16:
        per_row, gidx = True, (torch.arange(k, device=x.device) // group_size).to(torch.int32)
    x = x.contiguous()
    cfg = config or _choose(x, wq, scales, zeros, bits, group_size, gidx, per_row)
    return _launch(x, wq, scales, zeros, bits, group_size, gidx, per_row, cfg)


def _launch(x, wq, scales, zeros, bits, group_size, gidx, per_row, cfg: Config) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return launch_spec(x, wq, scales, zeros, bits, group_size, gidx, per_row, cfg).run()


def launch_spec(x, wq, scales, zeros, bits, group_size, gidx, per_row, cfg: Config) -> Launch:  # type: ignore[no-untyped-def]
    """The launch that multiplies ``x`` by these codes with ``cfg`` (its output allocated)."""
    m, k = x.shape
    n = wq.shape[1]
    block_k = cfg.block_k if not per_row else min(cfg.block_k, 64)
    if not per_row and group_size % block_k:
        block_k = 16
    k_per_split = -(-k // (cfg.split_k * block_k)) * block_k
    splits = -(-k // k_per_split)
    out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    args = (x, wq, scales, zeros, gidx if gidx is not None else zeros, out,
            m, n, k, x.stride(0), n, group_size, k_per_split)  # fmt: skip
    constexprs = {"BITS": bits, "PER_ROW_GROUPS": per_row, "FP32_DOT": x.dtype == torch.float32,
                  "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": block_k}  # fmt: skip
    grid = (-(-m // cfg.block_m), -(-n // cfg.block_n), splits)
    return Launch(_wna16_kernel, grid, args, constexprs, cfg, out)


def _choose(x, wq, scales, zeros, bits, group_size, gidx, per_row) -> Config:  # type: ignore[no-untyped-def]
    """The tuned configuration (see ``triton_launch.tuned_config``)."""
    m, k = x.shape
    n = wq.shape[1]

    def choose() -> Config:
        key = shape_key("wna16", m, n=n, k=k, group=group_size, bits=bits,
                        groups="per-row" if per_row else "regular", dtype=x.dtype)  # fmt: skip
        return tuned_config(
            x, candidates(m, n, k, group_size), key,
            lambda cfg: _launch(x, wq, scales, zeros, bits, group_size, gidx, per_row, cfg),
        )  # fmt: skip

    fields = ("wna16", m_bucket(m), n, k, group_size, bits, per_row, x.dtype, x.device)
    return remembered(fields, choose)


def triton_matmul(x: torch.Tensor, layout: KPackedLayout) -> torch.Tensor:
    """``x [M, K]`` (features in the layout's row order) ``@ W.T``: float32 ``[M, N]``."""
    group = layout.group_size
    if group is not None and group % TRITON_GROUP_MULTIPLE == 0:
        return wna16_matmul(x, layout.codes, layout.scales, layout.zeros, bits=layout.bits,
                            group=group)  # fmt: skip
    return wna16_matmul(x, layout.codes, layout.scales, layout.zeros, bits=layout.bits,
                        group=None, gidx=layout.row_groups)  # fmt: skip

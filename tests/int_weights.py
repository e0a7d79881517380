"""Random integer weights (``quantreg.IntWeights``) for the kernel tests: codes, scales, zero
points and groups as a checkpoint would give them, from one seeded generator."""

from __future__ import annotations

import torch

from quantreg import IntWeights


def random_int_weights(
    bits: int, n: int, k: int, group: int | None, *, sym: bool = False, act_order: bool = False,
    uneven: bool = False, scale_dtype: torch.dtype = torch.float16, seed: int = 0,
) -> IntWeights:  # fmt: skip
    """Random codes, scales and zero points; ``group`` None: one group (channel-wise);
    ``sym``: the zero point is the middle code; ``uneven``: the last group takes one row more;
    ``act_order``: every row's group scattered."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    size = k if group is None else group
    groups = -(-k // size)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 0.001).to(scale_dtype)
    if sym:
        zeros = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen, dtype=torch.int32)
    g_idx = torch.arange(k) // size
    if uneven:
        g_idx = torch.cat([g_idx[1:], g_idx[-1:]])
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return IntWeights.create(bits=bits, k=k, codes=lambda c0, c1: codes[:, c0:c1],
                             scales=scales, zeros=zeros, g_idx=g_idx)  # fmt: skip


def constant_int_weights(bits: int, n: int, k: int, code: int, zero: int) -> IntWeights:
    """Every code ``code``, one group of scale 0.01 and zero point ``zero``: the extremes of
    the kernels' integer sums (each output is ``sum(x) * (code - zero) * 0.01``)."""
    codes = torch.full((k, n), code, dtype=torch.int32)
    return IntWeights.create(
        bits=bits, k=k, codes=lambda c0, c1: codes[:, c0:c1], g_idx=torch.zeros(k, dtype=torch.int32),
        scales=torch.full((1, n), 0.01), zeros=torch.full((1, n), zero, dtype=torch.int32),
    )  # fmt: skip


def unrounded_t(w: IntWeights) -> torch.Tensor:
    """``W.T`` ``[K, N]`` in float64, rows in checkpoint order, no weight rounded."""
    g = torch.bucketize(torch.arange(w.k), torch.tensor(w.bounds[1:]), right=True)
    deq = (w.sorted_codes(0, w.n) - w.zeros[g].to(torch.int32)).double() * w.scales[g].double()
    out = torch.empty_like(deq)
    out[w.perm if w.perm is not None else torch.arange(w.k)] = deq
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())

"""What a checkpoint's integer weight means, before any kernel layout: ``IntWeights``.

A method decodes its own tensors (AWQ, GPTQ, compressed-tensors, a plugin's format) into one
``IntWeights``; every kernel layout is built from that, straight from the checkpoint's tensors,
so no intermediate layout is materialized that the chosen kernel does not read.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantreg.errors import CheckpointError, InputError

if TYPE_CHECKING:
    import torch

KERNEL_BITS = (4, 8)


@dataclass(frozen=True, eq=False)
class IntWeights:
    """An integer weight-only quantized ``[N, K]`` weight (N outputs, K inputs) as stored.

    ``W[o, i] = (code(i, o) - zeros[g(i), o]) * scales[g(i), o]``, computed exactly in float32
    and rounded once to ``scales.dtype`` -- what AutoAWQ, GPTQModel and compressed-tensors
    compute in that dtype. Build it with :meth:`create`, which checks ``g_idx``.

    Attributes:
        bits: code width, 4 or 8.
        k: input size (rows of ``W.T``); n: output size (columns; the vocab of a head).
        codes: ``codes(c0, c1)`` returns the unsigned codes of output columns ``c0:c1`` as
            int32 ``[K, c1 - c0]`` in the checkpoint's row order. A function, so that layouts
            are built a column chunk at a time and nothing ever holds every code unpacked.
        scales: ``[G, N]`` in the checkpoint's scale dtype.
        zeros: ``[G, N]`` unsigned zero points (integers, in any dtype).
        perm: int64 ``[K]``: the rows in group order (act-order); None when they already are.
        bounds: the first row of every group in that order, then ``K``.
        k_packed: the codes already packed along K as :class:`KPackedLayout` stores them
            (int32 ``[ceil(K / pf), N]``, code ``j`` of a word at bits ``j * bits``, rows in
            checkpoint order) -- GPTQ's ``qweight``, compressed-tensors' ``weight_packed``
            transposed -- or None; with rows already in group order it is used as it is.
        n_packed: 4-bit codes packed along N as AWQ's GEMM ``qweight`` holds them (int32
            ``[K, N / 8]``, slot ``s`` of word ``j`` the code of output ``8j + n_order[s]``),
            or None: layouts that pack along K transpose them in place, never unpacking.
        n_order: the output of every slot of ``n_packed`` words (AWQ: ``0 2 4 6 1 3 5 7``).
    """

    bits: int
    k: int
    n: int
    codes: Callable[[int, int], torch.Tensor]
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    bounds: tuple[int, ...]
    k_packed: torch.Tensor | None = None
    n_packed: torch.Tensor | None = None
    n_order: tuple[int, ...] | None = None

    @classmethod
    def create(
        cls,
        *,
        bits: int,
        k: int,
        codes: Callable[[int, int], torch.Tensor],
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor | None = None,
        names: tuple[str, str] = ("g_idx", "scales"),
        k_packed: torch.Tensor | None = None,
        n_packed: tuple[torch.Tensor, tuple[int, ...]] | None = None,
    ) -> IntWeights:
        """Describe a weight; ``g_idx`` names the group of every row (None: rows in order,
        ``ceil(K / G)`` per group). ``names`` are the checkpoint names of ``g_idx`` and the
        scales, used in errors. ``k_packed``: see the class doc; ``n_packed``: the class's
        ``n_packed`` and ``n_order``, taken when 4-bit and ``[K, N / 8]``.

        Raises:
            InputError: unsupported bits, or scales and zeros of different shapes.
            CheckpointError: a ``g_idx`` entry outside the groups, naming ``names[0]``.
        """
        import torch

        if bits not in KERNEL_BITS:
            raise InputError(f"IntWeights takes 4- or 8-bit codes, got {bits}", field="bits")
        if scales.dim() != 2 or tuple(zeros.shape) != tuple(scales.shape):
            raise InputError(
                f"scales and zeros must both be [G, N]; got {list(scales.shape)} and "
                f"{list(zeros.shape)}",
                field="scales",
            )
        groups = scales.shape[0]
        if g_idx is None:
            size = -(-k // groups)
            g_idx = torch.arange(k, device=scales.device) // size
        elif tuple(g_idx.shape) != (k,):
            raise CheckpointError(
                f"{names[0]} has shape {list(g_idx.shape)}; expected [{k}] (one group per row)",
                tensor=names[0],
            )
        order, bounds = group_order(g_idx, groups, names[0], names[1])
        monotone = bool((g_idx[1:] >= g_idx[:-1]).all()) if k > 1 else True
        return cls(
            bits=bits,
            k=k,
            n=scales.shape[1],
            codes=codes,
            scales=scales,
            zeros=zeros,
            perm=None if monotone else order,
            bounds=tuple(bounds),
            k_packed=k_packed,
            **_n_packed(n_packed, bits, k, scales.shape[1]),
        )

    @property
    def device(self) -> torch.device:
        """Where the weight is (its scales' device)."""
        return self.scales.device

    @property
    def groups(self) -> int:
        """Number of groups ``G``."""
        return len(self.bounds) - 1

    @property
    def group_size(self) -> int | None:
        """The group size when every group but the last has the same number of rows (and the
        last no more), else None (act-order groups of unequal sizes)."""
        return regular_group_size(self.bounds)

    def sorted_codes(self, c0: int, c1: int) -> torch.Tensor:
        """``codes(c0, c1)`` with the rows in group order: int32 ``[K, c1 - c0]``."""
        block = self.codes(c0, c1)
        return block if self.perm is None else block[self.perm]


def _n_packed(
    given: tuple[torch.Tensor, tuple[int, ...]] | None, bits: int, k: int, n: int
) -> dict[str, object]:
    """``n_packed`` and ``n_order`` when ``given`` fits a ``[K, N]`` 4-bit weight, else none
    (layouts then pack from ``codes``)."""
    if given is None or bits != 4 or n % 8 or tuple(given[0].shape) != (k, n // 8):
        return {}
    if sorted(given[1]) != list(range(8)):
        raise InputError(f"n_packed order {list(given[1])} is not a permutation of 0..7",
                         field="n_packed")  # fmt: skip
    return {"n_packed": given[0], "n_order": tuple(given[1])}


def regular_group_size(bounds: tuple[int, ...] | list[int]) -> int | None:
    """The common size of groups that start at ``bounds[:-1]`` (the last may be shorter)."""
    sizes = {b - a for a, b in itertools.pairwise(bounds[:-1])} or {bounds[-1]}
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    return size if bounds[-1] - bounds[-2] <= size else None


def group_order(
    g_idx: torch.Tensor, groups: int, name: str, scales: str = "its scales"
) -> tuple[torch.Tensor, list[int]]:
    """Rows sorted by group (stable) and the first row of every group, after checking that
    every entry of ``g_idx`` names one of ``groups`` groups.

    Raises:
        CheckpointError: an entry outside ``[0, groups)``, naming ``name`` and the index.
    """
    import torch

    g = g_idx.to(torch.int64)
    bad = ((g < 0) | (g >= groups)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise CheckpointError(
            f"{name}[{i}] = {int(g[i])} is outside the {groups} groups of {scales}; "
            f"{bad.numel()} such entries",
            tensor=name,
        )
    bounds = [0, *torch.bincount(g, minlength=groups).cumsum(0).tolist()]
    return torch.argsort(g, stable=True), bounds

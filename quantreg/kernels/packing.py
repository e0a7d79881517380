"""Bit packing of integer codes into int32 words, as the checkpoint formats store them.

``pack_codes`` / ``unpack_codes`` pack ``32 // bits`` codes per word along one dim, code ``k``
of a word at bits ``k*bits`` (little-endian inside the word), optionally interleaved: with
``order``, slot ``k`` of a word holds element ``order[k]`` of its group (AWQ's GEMM layout
interleaves ``0 2 4 6 1 3 5 7``). GPTQ packs along the input dim, AWQ and compressed-tensors
zero points along the output dim, compressed-tensors weights along the input dim, and the
``KPackedLayout`` along the input dim -- all with these two functions. ``transpose_nibbles``
turns 4-bit words packed along one dim into words along the other without unpacking them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from quantreg.errors import InputError

if TYPE_CHECKING:
    import torch

PACKABLE_BITS = (2, 4, 8)


def pack_factor(bits: int) -> int:
    """Codes per int32 word.

    Raises:
        InputError: a width that does not divide 32 evenly into whole codes.
    """
    if bits not in PACKABLE_BITS:
        raise InputError(
            f"cannot pack {bits}-bit codes into int32 words; supported: 2, 4, 8", field="bits"
        )
    return 32 // bits


def _order(order: Sequence[int] | None, pf: int) -> list[int]:
    if order is None:
        return list(range(pf))
    if sorted(order) != list(range(pf)):
        raise InputError(
            f"interleave order {list(order)} is not a permutation of 0..{pf - 1}", field="order"
        )
    return list(order)


def pack_codes(
    codes: torch.Tensor, bits: int, *, dim: int = -1, order: Sequence[int] | None = None
) -> torch.Tensor:
    """Pack unsigned ``codes`` (values in ``[0, 2**bits)``) along ``dim`` into int32 words.

    A length that is not a multiple of ``32 // bits`` is zero-padded. Computed in int32 (a
    code shifted into bit 31 wraps to the word's two's complement value, as stored).

    Raises:
        InputError: unsupported width, a bad ``order``, or a code out of range.
    """
    import torch

    pf = pack_factor(bits)
    slots = _order(order, pf)
    axis = dim % codes.dim()
    if codes.numel():
        low, high = torch.aminmax(codes)
        if int(low) < 0 or int(high) >= 1 << bits:
            raise InputError(
                f"codes must lie in [0, {1 << bits}) to pack as {bits}-bit", field="codes"
            )
    pad = -codes.shape[axis] % pf
    if pad:
        shape = list(codes.shape)
        shape[axis] = pad
        codes = torch.cat([codes, codes.new_zeros(shape)], dim=axis)
    # [..., words * pf, ...] -> [..., words, pf, ...] in place: slot k of every word is one
    # slice, read along the other dims' own strides (no transposing copy)
    x = codes.unflatten(axis, (-1, pf))
    words = x.select(axis + 1, slots[0]).to(torch.int32, copy=True)  # never OR into the codes
    for k in range(1, pf):
        words |= x.select(axis + 1, slots[k]).to(torch.int32) << (bits * k)
    return words.contiguous()


def unpack_codes(
    words: torch.Tensor,
    bits: int,
    *,
    dim: int = -1,
    count: int | None = None,
    order: Sequence[int] | None = None,
) -> torch.Tensor:
    """Unpack int32 ``words`` along ``dim`` into unsigned codes (int32), trimmed to ``count``.

    Raises:
        InputError: unsupported width or a bad ``order``.
    """
    import torch

    pf = pack_factor(bits)
    slots = _order(order, pf)
    # codes go next to their word along the packed dim: [..., words, pf, ...] -> [..., codes, ...];
    # one broadcast shift by each slot's offset, then the mask (an arithmetic shift fills with
    # the sign bit; the mask keeps only the code)
    axis = dim % words.dim()
    w = words.to(torch.int32).unsqueeze(axis + 1)
    offsets = [0] * pf
    for k, target in enumerate(slots):
        offsets[target] = bits * k
    shape = [1] * w.dim()
    shape[axis + 1] = pf
    shifts = torch.tensor(offsets, dtype=torch.int32, device=w.device).view(shape)
    out = torch.bitwise_right_shift(w, shifts).bitwise_and_((1 << bits) - 1)
    out = out.flatten(axis, axis + 1)
    if count is not None:
        out = out.narrow(axis, 0, count)
    return out


# (nibbles swapped, mask) of the three stages of an 8 x 8 transpose of 4-bit codes
NIBBLE_STAGES = ((4, 0x0000FFFF), (2, 0x00FF00FF), (1, 0x0F0F0F0F))


def transpose_nibbles(words: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """4-bit codes packed along N into words along K, in place and without unpacking: int32
    ``[U, 8, J]`` (word ``j`` of row ``8u + r`` holds 8 outputs' codes, slot ``s`` at bits
    ``4s``) becomes ``[u, s, j]``: the codes of rows ``8u .. 8u + 7`` (row ``8u + r`` at bits
    ``4r``) of the output in slot ``s`` of word ``j``. Three stages of masked swaps, each an
    XOR of whole slices: the 8 x 8 nibble matrix of every ``(u, j)`` transposed as a
    bit-matrix transpose does, 16, then 8, then 4 bits at a time. ``scratch``: int32 of
    ``[U, 4, J]`` elements or more, reused (None: allocated)."""
    import torch

    u, _, j = words.shape
    if scratch is None:
        scratch = torch.empty((u, 4, j), dtype=torch.int32)
    for d, mask in NIBBLE_STAGES:
        pairs = words.view(u, 4 // d, 2, d, j)
        low, high = pairs[:, :, 0], pairs[:, :, 1]  # rows r and r + d of each pair of blocks
        swap = scratch.view(-1)[: low.numel()].view(low.shape)
        torch.bitwise_right_shift(low, 4 * d, out=swap)
        swap.bitwise_xor_(high).bitwise_and_(mask)
        high.bitwise_xor_(swap)
        low.bitwise_xor_(swap.bitwise_left_shift_(4 * d))
    return words

"""Bit packing: round trips, the AWQ nibble order, GPTQ's stored zero points."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantreg import InputError, pack_codes, unpack_codes

AWQ_ORDER = (
    0,
    2,
    4,
    6,
    1,
    3,
    5,
    7,
)  # AutoAWQ GEMM: nibble k of a word holds column 8c + AWQ_ORDER[k]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    rows=st.integers(1, 5),
    length=st.integers(1, 70),
    dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(bits, rows, length, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, length), generator=gen, dtype=torch.int32)
    if dim == 0:
        codes = codes.T.contiguous()
    words = pack_codes(codes, bits, dim=dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == -(-length // (32 // bits))
    assert torch.equal(unpack_codes(words, bits, dim=dim, count=length), codes)


@settings(max_examples=30, deadline=None)
@given(words=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_awq_order_round_trip(words, seed):
    codes = torch.randint(
        0, 16, (3, 8 * words), generator=torch.Generator().manual_seed(seed), dtype=torch.int32
    )
    packed = pack_codes(codes, 4, order=AWQ_ORDER)
    assert torch.equal(unpack_codes(packed, 4, order=AWQ_ORDER), codes)


def test_awq_nibble_k_holds_column_order_k():
    word = (
        int(pack_codes(torch.arange(8, dtype=torch.int32)[None], 4, order=AWQ_ORDER)[0, 0])
        & 0xFFFFFFFF
    )
    assert [(word >> (4 * k)) & 0xF for k in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_sequential_packing_is_little_endian_inside_the_word():
    word = (
        int(pack_codes(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.int32), 4)[0, 0])
        & 0xFFFFFFFF
    )
    assert word == 0xF7654321


@pytest.mark.parametrize(
    ("bits", "word"), [(4, 0x77777777), (8, 0x7F7F7F7F)], ids=["4-bit", "8-bit"]
)
def test_symmetric_gptq_v1_zero_points_pack_as_the_known_words(bits, word):
    stored = torch.full((1, 32 // bits), (1 << (bits - 1)) - 1, dtype=torch.int32)  # zero - 1
    assert int(pack_codes(stored, bits)[0, 0]) & 0xFFFFFFFF == word


def test_high_codes_wrap_into_negative_int32():
    assert int(pack_codes(torch.full((1, 8), 15, dtype=torch.int32), 4)[0, 0]) == -1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pack_codes(torch.zeros(1, 8, dtype=torch.int32), 3), r"cannot pack 3-bit codes into int32 words; supported: 2, 4, 8"),
        (lambda: pack_codes(torch.full((1, 8), 16, dtype=torch.int32), 4), r"codes must lie in \[0, 16\) to pack as 4-bit"),
        (lambda: pack_codes(torch.full((1, 8), -1, dtype=torch.int32), 4), r"codes must lie in \[0, 16\)"),
        (lambda: pack_codes(torch.zeros(1, 8, dtype=torch.int32), 4, order=(0, 1, 2)), r"interleave order \[0, 1, 2\] is not a permutation of 0..7"),
        (lambda: unpack_codes(torch.zeros(1, 1, dtype=torch.int32), 5), r"cannot pack 5-bit codes"),
    ],
    ids=["3-bit", "code-too-big", "negative-code", "bad-order", "unpack-5-bit"],
)  # fmt: skip
def test_packing_errors(call, message):
    with pytest.raises(InputError, match=message):
        call()

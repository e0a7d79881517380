"""The load path's vectorized conversions give the same bytes as the formulations they replaced.

Loading converts a checkpoint's words straight into the chosen kernel's layout (issue 23: load
at I/O speed). Each fast conversion is pinned here to the plain one it replaced: the per-slot
``unpack_codes``, torch's own ``_convert_weight_to_int4pack_for_cpu`` on int32 codes,
``(codes - 128).to(int8).T`` for torch's int8 op, NVFP4's float32 decoding, and NVFP4's float8
values, which its packed codes now skip.
"""

from __future__ import annotations

import pytest
import torch

from quantreg import InputError, IntWeights
from quantreg.kernels import Float8Layout, ScaleFactor, cpu_float8, torch_ops
from quantreg.kernels.cpu_float8 import CPUFloat8Layout
from quantreg.kernels.layouts import E2M1_ROWS, e2m1_float8
from quantreg.kernels.packing import pack_codes, unpack_codes
from quantreg.methods import _e2m1

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_per_slot(words: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """The per-slot unpacking ``unpack_codes`` replaced: one strided copy per code slot."""
    pf = 32 // bits
    slots = list(order) if order is not None else list(range(pf))
    axis = dim % words.dim()
    w = words.to(torch.int32).unsqueeze(axis + 1)
    shape = list(w.shape)
    shape[axis + 1] = pf
    out = torch.empty(shape, dtype=torch.int32)
    for k, target in enumerate(slots):
        out.narrow(axis + 1, target, 1).copy_((w >> (bits * k)) & ((1 << bits) - 1))
    return out.flatten(axis, axis + 1)


def words(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random int32 words over the whole range (the sign bit included)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32)


# id -> (bits, dim, interleave order)
UNPACK = {
    "int4-along-k-gptq": (4, 0, None),
    "int4-along-n-awq-interleaved": (4, -1, AWQ_ORDER),
    "int8-along-k": (8, 0, None),
    "int8-along-n": (8, 1, None),
    "int2-along-k": (2, 0, None),
}


@pytest.mark.parametrize(("bits", "dim", "order"), list(UNPACK.values()), ids=list(UNPACK))
def test_unpacking_gives_the_per_slot_codes(bits, dim, order):
    w = words((12, 40))
    assert torch.equal(unpack_codes(w, bits, dim=dim, order=order), unpack_per_slot(w, bits, dim, order))  # fmt: skip


def test_unpacking_a_strided_column_slice_trims_to_count():
    w = words((7, 64))[:, 8:24]
    assert torch.equal(unpack_codes(w, 4, dim=0, count=50), unpack_per_slot(w, 4, 0)[:50])


def int_weights(bits: int, n: int, k: int, *, act_order: bool = False, k_packed: str | None = None,
                seed: int = 0) -> IntWeights:  # fmt: skip
    """Random codes; ``k_packed``: None, "contiguous" (GPTQ's qweight) or "transposed" (the view
    of compressed-tensors' weight_packed)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    groups = max(1, k // 128)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 0.001).half()
    zeros = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32)
    g_idx = torch.arange(k) // -(-k // groups)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    packed = None
    if k_packed == "contiguous":
        packed = pack_codes(codes, bits, dim=0)
    elif k_packed == "transposed":
        packed = pack_codes(codes.T.contiguous(), bits, dim=1).T
    return IntWeights.create(bits=bits, k=k, codes=lambda c0, c1: codes[:, c0:c1],
                             scales=scales, zeros=zeros, g_idx=g_idx, k_packed=packed)  # fmt: skip


def op_int4(w: IntWeights) -> torch.Tensor:
    """torch's own conversion of the codes, rows in group order."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.sorted_codes(0, w.n).T.contiguous(), 1)  # fmt: skip


INT4 = {
    "two-chunks-of-outputs": dict(n=1088, k=256),
    "act-order": dict(n=128, k=512, act_order=True),
    "gptq-words": dict(n=192, k=256, k_packed="contiguous"),
}


@pytest.mark.skipif(not torch_ops.has_op(torch_ops.INT4_OP), reason="no int4 CPU op in this torch")
@pytest.mark.parametrize("layout", ["direct", "op"], ids=["built-directly", "built-by-the-op"])
@pytest.mark.parametrize("case", list(INT4), ids=list(INT4))
def test_torch_int4_layout_is_the_ops_own(monkeypatch, case, layout):
    if layout == "op":
        monkeypatch.setattr(torch_ops, "int4_block", lambda: None)
    w = int_weights(4, **INT4[case])
    built = torch_ops.TorchInt4Layout.build(w, torch.bfloat16)
    assert torch.equal(built.weight, op_int4(w))


@pytest.mark.skipif(not torch_ops.has_op(torch_ops.INT4_OP), reason="no int4 CPU op in this torch")
def test_this_torchs_int4_layout_is_recognized():
    """On x86 torch's int4 CPU layout is one of the two block layouts (AVX2: 32, AVX-512: 64)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the block layouts are torch's x86 ones")
    assert torch_ops.int4_block() in (32, 64)


# id -> (k, k_packed)
INT8 = {
    "ct-weight-packed-view": (256, "transposed"),
    "gptq-qweight": (256, "contiguous"),
    "k-not-a-multiple-of-4": (250, "transposed"),
    "codes-only": (256, None),
}


@pytest.mark.parametrize(("k", "k_packed"), list(INT8.values()), ids=list(INT8))
def test_torch_int8_layout_is_the_codes_minus_128(k, k_packed):
    w = int_weights(8, 1100, k, k_packed=k_packed)
    built = torch_ops.TorchInt8Layout.build(w, torch.bfloat16)
    assert built.weight.is_contiguous()
    assert torch.equal(built.weight, (w.sorted_codes(0, w.n) - 128).to(torch.int8).T)


@pytest.mark.parametrize("half", [64, 6], ids=["words-of-8-codes", "odd-width"])
def test_nvfp4_decodes_to_the_same_float8_values(half):
    """Every byte (two e2m1 codes) decodes to the float8 of its float32 values, signed zero
    included, over more rows than one decoding step (``Float8Layout.values`` of NVFP4 codes)."""
    rows = E2M1_ROWS + 3
    packed = (torch.arange(rows * half) % 256).to(torch.uint8).view(rows, half)
    want = _e2m1.unpack(packed).to(torch.float8_e4m3fn)
    got = e2m1_float8(packed)
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def pack_per_slot(codes: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """The packing ``pack_codes`` replaced: the packed dim moved last, then one OR per slot."""
    pf = 32 // bits
    slots = list(order) if order is not None else list(range(pf))
    x = codes.movedim(dim, -1)
    x = torch.nn.functional.pad(x, (0, -x.shape[-1] % pf))
    x = x.reshape(*x.shape[:-1], -1, pf)
    words = x[..., slots[0]].to(torch.int32, copy=True)
    for k in range(1, pf):
        words |= x[..., slots[k]].to(torch.int32) << (bits * k)
    return words.movedim(-1, dim).contiguous()


# id -> (bits, shape, dim, interleave order)
PACK = {
    "int4-along-k-gptq": (4, (256, 40), 0, None),
    "int4-along-n-awq-interleaved": (4, (24, 64), -1, AWQ_ORDER),
    "int4-padded-along-k": (4, (250, 8), 0, None),
    "int8-padded-along-n": (8, (6, 37), 1, None),
    "int2-3d-middle-dim": (2, (3, 50, 5), 1, None),
}


@pytest.mark.parametrize(("bits", "shape", "dim", "order"), list(PACK.values()), ids=list(PACK))
def test_packing_gives_the_per_slot_words(bits, shape, dim, order):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int32)
    got = pack_codes(codes, bits, dim=dim, order=order)
    assert got.is_contiguous()
    assert torch.equal(got, pack_per_slot(codes, bits, dim, order))


@pytest.mark.parametrize("bad", [-1, 16], ids=["negative", "too-large"])
def test_packing_an_out_of_range_code_keeps_its_message(bad):
    codes = torch.zeros(16, 8, dtype=torch.int32)
    codes[9, 3] = bad
    with pytest.raises(InputError, match=r"^codes must lie in \[0, 16\) to pack as 4-bit$"):
        pack_codes(codes, 4, dim=0)


# id -> (vocab rows, bytes of codes a row): K = 2 x bytes
NVFP4 = {
    "a-block-and-a-partial-one": (25, 48),
    "k-not-a-multiple-of-16": (37, 2050),
    "rows-of-one-block": (16, 8),
}


def nvfp4_layouts(n: int, half: int, divide: bool = True) -> tuple[Float8Layout, Float8Layout]:
    """The same random NVFP4 head as it used to be decoded (float8 values, float32 effective
    scales ``[G, N]``) and as the loaders now keep it: its packed e2m1 codes, its float8 group
    scales ``[N, G]`` (seen transposed) and the global scale (compressed-tensors divides by
    it, ModelOpt multiplies)."""
    gen = torch.Generator().manual_seed(n)
    packed = torch.randint(0, 256, (n, half), generator=gen, dtype=torch.uint8)
    codes = (torch.rand(n, -(-2 * half // 16), generator=gen) * 400 - 200).to(torch.float8_e4m3fn)
    factor = ScaleFactor(-3.7e4 if divide else 2.5e-5, divide)
    wide = codes.to(torch.float32)
    effective = (wide / factor.value if divide else wide * factor.value).T.contiguous()
    values = _e2m1.unpack(packed).to(torch.float8_e4m3fn)
    return Float8Layout.build(values, effective), Float8Layout.from_e2m1(
        packed, codes.T, None, factor
    )


@pytest.mark.parametrize("divide", [True, False], ids=["ct-divides", "modelopt-multiplies"])
@pytest.mark.parametrize(("n", "half"), list(NVFP4.values()), ids=list(NVFP4))
def test_nvfp4_codes_pack_into_the_cpu_layout_their_float8_values_made(n, half, divide):
    """Straight from the checkpoint's codes and scale codes (no float8 values, no float32
    scales between), the CPU float8 layout is byte for byte the one the float8 values and
    effective scales gave: codes, scale codes, multiplier."""
    if cpu_float8.extension() is None:
        pytest.skip(f"cpu-avx2-float8 unavailable: {cpu_float8.unavailable_reason()}")
    from_values, from_codes = nvfp4_layouts(n, half, divide)
    assert from_codes.bounds == from_values.bounds and from_codes.perm is None
    want, got = CPUFloat8Layout.build(from_values), CPUFloat8Layout.build(from_codes)
    assert got.fp4 and (got.scale_mult, got.group_size) == (want.scale_mult, want.group_size)
    for name, tensor in want.tensors().items():
        assert torch.equal(getattr(got, name), tensor), name


@pytest.mark.parametrize(("n", "half"), list(NVFP4.values()), ids=list(NVFP4))
def test_nvfp4_codes_decode_to_their_float8_values_whole_and_in_blocks(n, half):
    """What the reference kernel reads: every block (odd edges too) and the whole, values and
    effective scales alike, and the largest scale the checks find on the scale codes."""
    from_values, from_codes = nvfp4_layouts(n, half)
    assert from_codes.e2m1 is not None and from_values.e2m1 is None
    assert torch.equal(from_codes.values.view(torch.uint8), from_values.values.view(torch.uint8))
    assert torch.equal(from_codes.scales, from_values.scales) and from_codes.scales.is_contiguous()
    k = 2 * half
    for r0, r1, c0, c1 in [(0, n, 0, k), (3, n - 1, 1, k - 3), (1, 2, 16, 33)]:
        got = from_codes.value_block(r0, r1, c0, c1).view(torch.uint8)
        assert torch.equal(got, from_values.value_block(r0, r1, c0, c1).view(torch.uint8))
        g0, g1 = c0 // 16, -(-c1 // 16)
        assert torch.equal(from_codes.scale_block(g0, g1, r0, r1), from_values.scale_block(g0, g1, r0, r1))  # fmt: skip
    peak = from_codes.scale_factor.peak(from_codes.group_scales, chunk=64)
    assert peak == float(from_values.scales.abs().max())

"""quantreg's int4 / int8 kernel built for AVX512-VNNI (``cpu-vnni-wna16``, ``cpu-vnni-a8``): the
AVX2 int kernel's source and layout, its integer inner loop in 512-bit registers.

Specified here: the int16 path (bf16 / fp16 rows) gives the AVX2 build's result bit for bit --
the same integer sums, flushed to float32 with the same operations -- for every layout case and
every row count (passes of 8 rows and every remainder); the int8-activation path is within 1e-5
of its float64 model (tests/test_cpu_a8.py), and its int32 sums of unsigned codes do not
overflow; heads choose it before ``cpu-avx512-bf16`` and ``cpu-avx2-*`` where the CPU has
AVX512-VNNI, and it declines, saying why, where it has not.
"""

from __future__ import annotations

import pytest
import torch
from int_weights import constant_int_weights, rel_err, unrounded_t
from int_weights import random_int_weights as int_weights

import quantreg
from quantreg import IntWeights, Platform
from quantreg.kernels import choose, cpu_avx2, cpu_vnni
from quantreg.kernels.cpu_avx2 import AVX2IntLayout, avx2_int_matmul, quantize_rows
from quantreg.kernels.cpu_vnni import vnni_a8_matmul, vnni_int_matmul

BF16 = torch.bfloat16
VNNI_FLAGS = frozenset(cpu_vnni.FLAGS)
AVX2 = Platform("cpu", cpu_isa=frozenset({"avx2", "fma", "f16c"}))


@pytest.fixture(scope="module")
def kernel():
    """Both builds, or a skip that says why this machine has not the VNNI one."""
    if cpu_vnni.extension() is None:
        pytest.skip(f"cpu-vnni-wna16 unavailable: {cpu_vnni.unavailable_reason()}")
    if cpu_avx2.extension() is None:
        pytest.skip(f"cpu-avx2-wna16 unavailable: {cpu_avx2.unavailable_reason()}")


# id -> (bits, N, K, group (None: channel), zero points, act-order, scale dtype)
CASES = {
    "int4-g128": (4, 128, 256, 128, True, False, torch.float16),
    "int4-g32-symmetric-bf16-scales": (4, 64, 256, 32, False, False, BF16),
    "int4-g64-odd-n-50": (4, 50, 192, 64, True, False, torch.float16),
    "int4-channel-odd-k-45": (4, 40, 45, None, True, False, torch.float32),
    "int4-g32-act-order": (4, 64, 256, 32, True, True, torch.float16),
    "int4-channel-k-4096-two-chunks": (4, 32, 4096, None, True, False, BF16),
    "int8-channel-symmetric": (8, 48, 256, None, False, False, BF16),
    "int8-channel-zero-points-odd-k-3": (8, 17, 3, None, True, False, torch.float16),
    "int8-g64-k-130": (8, 33, 130, 64, True, False, torch.float16),
    "int8-g128-act-order": (8, 1000, 256, 128, True, True, BF16),
    "int8-channel-k-1100-five-chunks": (8, 24, 1100, None, True, False, torch.float32),
}
# rows alone (1 .. 7), one pass of 8, a pass and every remainder, many passes
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 70)


def case_weights(case: str) -> IntWeights:
    bits, n, k, group, zero_points, act_order, scale_dtype = CASES[case]
    return int_weights(bits, n, k, group, sym=not zero_points, act_order=act_order,
                       scale_dtype=scale_dtype)  # fmt: skip


def in_layout_order(x: torch.Tensor, w: IntWeights) -> torch.Tensor:
    return x if w.perm is None else x[:, w.perm]


@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_int16_path_is_the_avx2_builds_bit_for_bit(kernel, case, dtype):
    w = case_weights(case)
    layout = AVX2IntLayout.build(w)
    for m in ROWS:
        x = torch.randn(m, w.k, generator=torch.Generator().manual_seed(m)).to(dtype)
        xs = in_layout_order(x, w).contiguous()
        assert torch.equal(vnni_int_matmul(xs, layout), avx2_int_matmul(xs, layout)), (case, m)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_int8_path_is_its_model_to_1e_5(kernel, case):
    w = case_weights(case)
    layout = AVX2IntLayout.build(w)
    for m in ROWS:
        x = torch.randn(m, w.k, generator=torch.Generator().manual_seed(m))
        q, scale = quantize_rows(x)
        want = scale.double() * (q.double() @ unrounded_t(w))
        got = vnni_a8_matmul(in_layout_order(x, w).contiguous(), layout)
        assert rel_err(got, want) < 1e-5, (case, m)


# The largest int32 sums: unsigned codes (255 for int8: the AVX2 build multiplies code - 128)
# times +-127 over chunks as long as the kernel takes them (int8: 16384 units, 65536 rows)
EXTREMES = {  # bits, code, zero point, sign of x, K
    "int8-255-times-plus-127-k-70000": (8, 255, 0, 1.0, 70000),
    "int8-255-times-minus-127-k-70000": (8, 255, 0, -1.0, 70000),
    "int8-0-times-minus-127-zero-point-128": (8, 0, 128, -1.0, 4096),
    "int4-15-times-minus-127-k-70000": (4, 15, 0, -1.0, 70000),
}  # fmt: skip


@pytest.mark.parametrize(("bits", "code", "zero", "sign", "k"), EXTREMES.values(), ids=EXTREMES.keys())  # fmt: skip
def test_the_int8_paths_largest_sums_do_not_overflow(kernel, bits, code, zero, sign, k):
    layout = AVX2IntLayout.build(constant_int_weights(bits, 16, k, code, zero))
    got = vnni_a8_matmul(torch.full((2, k), sign), layout)
    torch.testing.assert_close(got, torch.full((2, 16), sign * k * (code - zero) * 0.01))


@pytest.mark.parametrize("matmul", [vnni_int_matmul, vnni_a8_matmul], ids=["int16", "a8"])
def test_a_call_without_the_extension_says_why(monkeypatch, matmul):
    """Selection declines the kernel first; a direct call still names the reason."""
    monkeypatch.setattr(cpu_vnni.UNIT, "state", {"reason": "this CPU lacks avx512_vnni", "module": None})  # fmt: skip
    layout = AVX2IntLayout.build(case_weights("int4-g128"))
    with pytest.raises(RuntimeError, match=r"^quantreg's AVX512-VNNI int4 / int8 kernel is unavailable: this CPU lacks avx512_vnni$"):  # fmt: skip
        matmul(torch.zeros(1, 256, dtype=BF16), layout)


# -- choice -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["int4-g128", "int8-channel-symmetric"])
def test_half_heads_choose_it_before_the_bf16_and_avx2_kernels(kernel, case):
    choice = choose(case_weights(case), dtype=BF16, device="cpu")
    assert choice.name == "cpu-vnni-wna16"
    declined = dict(choice.declined)
    for later in ("cpu-avx512-bf16", "cpu-avx2-wna16", "torch-int4pack", "reference"):
        assert declined[later] == "cpu-vnni-wna16 fits and comes first"
    a8 = choose(case_weights(case), dtype=BF16, device="cpu", activation_dtype="int8")
    assert a8.name == "cpu-vnni-a8"
    assert dict(a8.declined)["cpu-avx2-a8"] == "cpu-vnni-a8 fits and comes first"


def test_a_loaded_head_runs_it_and_gives_what_the_avx2_build_gives(kernel, tmp_path):
    weight = (torch.randn(1000, 256, generator=torch.Generator().manual_seed(1)) * 0.05).half()
    quantreg.write_checkpoint(tmp_path, weight, "gptq", bits=4, group_size=128, sym=True)
    head = quantreg.load_lm_head(tmp_path, dtype=BF16)
    avx2 = quantreg.load_lm_head(tmp_path, dtype=BF16, kernel="cpu-avx2-wna16")
    assert head.kernel.name == "cpu-vnni-wna16"
    x = torch.randn(3, 256).to(BF16)
    assert torch.equal(head.compute_logits(x), avx2.compute_logits(x))


AVX512_NO_VNNI = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"})
DECLINES = {
    "avx2-only": (AVX2, BF16, None, "this CPU lacks avx512f/avx512bw/avx512vl/avx512_vnni"),
    "avx512-without-vnni": (Platform("cpu", cpu_isa=AVX512_NO_VNNI), BF16, None, "this CPU lacks avx512_vnni"),
    "float32-activations": (Platform("cpu", cpu_isa=VNNI_FLAGS), torch.float32, None, "takes bf16 / fp16 activations (it does not round the weights to the scale dtype); float32 heads get the producers' exact weights"),
    "a8-on-avx2": (AVX2, BF16, "int8", "this CPU lacks avx512f/avx512bw/avx512vl/avx512_vnni"),
}  # fmt: skip


@pytest.mark.parametrize(("platform", "dtype", "act", "why"), DECLINES.values(), ids=DECLINES.keys())  # fmt: skip
def test_it_declines_saying_why(platform, dtype, act, why):
    choice = choose(case_weights("int4-g128"), dtype=dtype, device="cpu", platform=platform,
                    activation_dtype=act)  # fmt: skip
    assert dict(choice.declined)["cpu-vnni-a8" if act else "cpu-vnni-wna16"] == why

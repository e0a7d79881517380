"""quantreg's int4 / int8 CPU kernel for AVX2 + FMA (``cpu-avx2-wna16``): when it is chosen and
why it declines, its layout, and its results against the exact reference kernel.

Precision, as specified here: with float32 activations the kernel is within 1e-5 (relative to
the largest logit) of ``x @ ((q - z) * s).T`` in float64 -- every weight unrounded. The
reference rounds every weight to the scale dtype as the producers do and the kernel does not,
so against the reference, in bf16 / fp16, it is within 1e-2 (the precision contract's bound).
bf16 / fp16 rows are multiplied in int16 fixed point (per row, ``max|x| / 32767`` steps) when
that rounding is no more than the dtype's own at the row's RMS (``max|x| <= 256 x RMS`` in bf16,
``32 x RMS`` in fp16), else on the float path: the int16 path is within 1e-5 of its float64
model and 1e-4 of the unrounded product.
"""

from __future__ import annotations

import pytest
import torch
from dispatched_ops import ALLOCATE, DispatchedOps, check_row_tiles
from int_kernels import build_here
from int_weights import constant_int_weights, rel_err, unrounded_t
from int_weights import random_int_weights as int_weights

import quantreg
from quantreg import IntWeights, Platform
from quantreg.errors import InputError
from quantreg.kernels import Float8Layout, KPackedLayout, choose, cpu_avx2
from quantreg.kernels.catalog import KERNELS, Target
from quantreg.kernels.cpu_avx2 import AVX2IntLayout, avx2_a8_matmul, avx2_int_matmul
from quantreg.kernels.packing import pack_codes
from quantreg.kernels.reference import reference_matmul

BF16 = torch.bfloat16
AVX2 = Platform("cpu", cpu_isa=frozenset({"avx2", "fma", "f16c"}))


@pytest.fixture(scope="module")
def kernel():
    """The compiled extension, or a skip that says why this machine has none."""
    if cpu_avx2.extension() is None:
        pytest.skip(f"cpu-avx2-wna16 unavailable: {cpu_avx2.unavailable_reason()}")


def run(x: torch.Tensor, w: IntWeights, layout: AVX2IntLayout) -> torch.Tensor:
    """The kernel on ``x`` in checkpoint feature order (the layout's rows are in group order)."""
    return avx2_int_matmul(x if w.perm is None else x[:, w.perm], layout)


# id -> (bits, N, K, group (None: channel), zero points, act-order, scale dtype)
CASES = {
    "int4-g128": (4, 128, 256, 128, True, False, torch.float16),
    "int4-g32-symmetric-bf16-scales": (4, 64, 256, 32, False, False, BF16),
    "int4-g64-odd-n-50": (4, 50, 192, 64, True, False, torch.float16),
    "int4-channel-odd-k-45": (4, 40, 45, None, True, False, torch.float32),
    "int4-g32-k-100-last-group-short": (4, 33, 100, 32, True, False, BF16),
    "int4-g32-act-order": (4, 64, 256, 32, True, True, torch.float16),
    "int8-channel-symmetric": (8, 48, 256, None, False, False, BF16),
    "int8-channel-zero-points-odd-k-3": (8, 17, 3, None, True, False, torch.float16),
    "int8-g64-k-130": (8, 33, 130, 64, True, False, torch.float16),
    "int8-g128-act-order": (8, 1000, 256, 128, True, True, BF16),
}
# every code path: 1, 2, 3 rows alone; passes of 4 rows, and 4 + 1, 2 or 3; many rows
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 70)


def case_weights(case: str) -> IntWeights:
    bits, n, k, group, zero_points, act_order, scale_dtype = CASES[case]
    return int_weights(bits, n, k, group, sym=not zero_points, act_order=act_order,
                       scale_dtype=scale_dtype)  # fmt: skip


# -- choice ------------------------------------------------------------------------------------

DECLINES = {
    "float32-activations": (lambda: case_weights("int4-g128"), torch.float32, "cpu", AVX2, "takes bf16 / fp16 activations (it does not round the weights to the scale dtype); float32 heads get the producers' exact weights"),
    "no-avx2": (lambda: case_weights("int4-g128"), BF16, "cpu", Platform("cpu", cpu_isa=frozenset({"f16c"})), "this CPU lacks avx2/fma"),
    "no-f16c": (lambda: case_weights("int4-g128"), BF16, "cpu", Platform("cpu", cpu_isa=frozenset({"avx2", "fma"})), "this CPU lacks f16c"),
    "on-cuda": (lambda: case_weights("int4-g128"), BF16, "cuda", Platform("cuda", (7, 5)), "runs on the CPU; the layer is on cuda"),
    "group-of-4-int4": (lambda: int_weights(4, 64, 64, 4), BF16, "cpu", AVX2, "needs a group size that is a multiple of 8 for 4-bit codes (or one group); it is 4"),
    "group-of-2-int8": (lambda: int_weights(8, 64, 64, 2), BF16, "cpu", AVX2, "needs a group size that is a multiple of 4 for 8-bit codes (or one group); it is 2"),
    "unequal-act-order-groups": (lambda: int_weights(4, 64, 256, 32, act_order=True, uneven=True), BF16, "cpu", AVX2, "needs groups of equal size; these act-order groups differ"),
}  # fmt: skip


@pytest.mark.parametrize(("make", "dtype", "device", "platform", "reason"), DECLINES.values(), ids=DECLINES.keys())  # fmt: skip
def test_the_kernel_declines_with_its_reason(make, dtype, device, platform, reason):
    choice = choose(make(), dtype=dtype, device=device, platform=platform)
    assert choice.name != "cpu-avx2-wna16"
    assert dict(choice.declined)["cpu-avx2-wna16"] == reason


def test_float8_weights_are_not_its_business():
    values = torch.zeros(64, 32).to(torch.float8_e4m3fn)
    target = Target(Float8Layout.build(values, torch.ones(1, 64)), BF16, torch.device("cpu"), AVX2, None)  # fmt: skip
    assert KERNELS["cpu-avx2-wna16"].decline(target) == "runs integer (int4 / int8) weights only"


def test_the_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv("QUANTREG_NO_CPU_KERNELS", "1")
    choice = choose(case_weights("int4-g128"), dtype=BF16, device="cpu", platform=AVX2)
    assert dict(choice.declined)["cpu-avx2-wna16"] == "QUANTREG_NO_CPU_KERNELS is set"


def test_a_failed_build_is_the_reason(monkeypatch):
    from quantreg.kernels import cpu_build

    def no_compiler(kernel: str) -> None:
        raise OSError("no c++ here")

    monkeypatch.setattr(cpu_avx2.UNIT, "state", {})
    monkeypatch.setattr(cpu_build, "build", no_compiler)
    choice = choose(case_weights("int4-g128"), dtype=BF16, device="cpu", platform=AVX2)
    assert dict(choice.declined)["cpu-avx2-wna16"] == (
        "building the C++ AVX2 int4 / int8 kernel failed: OSError: no c++ here"
    )


@pytest.mark.parametrize("matmul", [avx2_int_matmul, avx2_a8_matmul], ids=["int16", "a8"])
def test_a_call_without_the_extension_says_why(monkeypatch, matmul):
    """Selection declines the kernel first; a direct call still names the reason."""
    monkeypatch.setattr(cpu_avx2.UNIT, "state", {"reason": "no c++ here", "module": None})
    layout = AVX2IntLayout.build(case_weights("int4-g128"))
    with pytest.raises(RuntimeError, match=r"^quantreg's AVX2 int4 / int8 kernel is unavailable: no c\+\+ here$"):  # fmt: skip
        matmul(torch.zeros(1, 256, dtype=BF16), layout)


@pytest.mark.parametrize("case", ["int4-g128", "int8-channel-symmetric"])
def test_half_heads_choose_it_before_torchs_ops(kernel, case):
    choice = choose(case_weights(case), dtype=BF16, device="cpu", platform=AVX2)
    assert choice.name == "cpu-avx2-wna16"
    declined = dict(choice.declined)
    for later in ("torch-int4pack", "torch-int8pack", "reference"):
        assert declined[later] == "cpu-avx2-wna16 fits and comes first"


# -- layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_a_checkpoints_k_packed_words_are_taken_as_they_are(bits):
    """GPTQ's qweight order is the layout's: the words packed from the codes equal the
    k-packed layout's, and a head that brings them builds the same layout from them."""
    w = int_weights(bits, 40, 64, 32)
    packed = KPackedLayout.build(w).codes
    assert torch.equal(pack_codes(w.codes(0, w.n), bits, dim=0), packed)
    with_words = IntWeights.create(bits=bits, k=w.k, codes=w.codes, scales=w.scales,
                                   zeros=w.zeros, k_packed=packed)  # fmt: skip
    assert torch.equal(AVX2IntLayout.build(with_words).codes, AVX2IntLayout.build(w).codes)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# id -> (bits, n, k, the checkpoint's words): every source gives the layout its codes give
WORDS = {
    "gptq-qweight-odd-n": (8, 37, 64, "k_packed"),
    "ct-weight-packed-transposed": (4, 50, 96, "k_packed_t"),
    "ct-int8-transposed-odd-n": (8, 37, 64, "k_packed_t"),
    "awq-qweight-half-block": (4, 40, 64, "n_packed"),
    "awq-k-not-a-multiple-of-8": (4, 48, 100, "n_packed"),
    "awq-two-steps-of-k": (4, 32, 8 * (cpu_avx2.SERIAL_ELEMENTS // (8 * 4)) + 8, "n_packed"),
}


@pytest.mark.parametrize(("bits", "n", "k", "source"), list(WORDS.values()), ids=list(WORDS))
def test_every_checkpoint_word_order_builds_the_layout_of_its_codes(bits, n, k, source):
    """Loads convert the checkpoint's own words (GPTQ's and compressed-tensors' along K, AWQ's
    along N, transposed in place) straight into the layout: byte for byte what packing the
    unpacked codes gives, scales ``s`` (their own dtype) and zero points ``z`` included."""
    w = int_weights(bits, n, k, None)
    codes = w.codes(0, n)
    words = {"k_packed": lambda: pack_codes(codes, bits, dim=0),
             "k_packed_t": lambda: pack_codes(codes.T.contiguous(), bits, dim=1).T,
             "n_packed": lambda: (pack_codes(codes, bits, dim=1, order=AWQ_ORDER), AWQ_ORDER)}  # fmt: skip
    fast = IntWeights.create(bits=bits, k=k, codes=w.codes, scales=w.scales, zeros=w.zeros,
                             **{source.removesuffix("_t"): words[source]()})  # fmt: skip
    assert (fast.k_packed is None) == (source == "n_packed") != (fast.n_packed is None)
    want, got = AVX2IntLayout.build(w), AVX2IntLayout.build(fast)
    assert torch.equal(got.codes, want.codes)
    for name, source in (("scales", w.scales), ("zeros", w.zeros.to(torch.uint8))):
        padded = torch.nn.functional.pad(source, (0, -n % 16))
        assert torch.equal(getattr(got, name), padded.reshape(w.groups, -1, 16).transpose(0, 1))


def test_n_packed_words_whose_order_is_not_a_permutation_are_refused():
    codes = torch.zeros(16, 8, dtype=torch.int32)
    order = (0, 0, 2, 3, 4, 5, 6, 7)
    with pytest.raises(InputError, match=r"^n_packed order \[0, 0, 2, 3, 4, 5, 6, 7\] is not a permutation of 0\.\.7$"):  # fmt: skip
        IntWeights.create(bits=4, k=16, codes=lambda c0, c1: codes[:, c0:c1], scales=torch.ones(1, 8),
                          zeros=torch.zeros(1, 8, dtype=torch.int32), n_packed=(codes[:, :1], order))  # fmt: skip


@pytest.mark.parametrize(("bits", "k", "units"), [(4, 45, 6), (4, 256, 32), (8, 3, 1), (8, 130, 33)])  # fmt: skip
def test_the_layout_holds_the_codes_and_nothing_more(bits, k, units):
    w = int_weights(bits, 50, k, None)
    layout = AVX2IntLayout.build(w)
    assert layout.codes.shape == (4, units, 16)  # 50 outputs in 4 blocks of 16
    assert layout.scales.shape == layout.zeros.shape == (4, 1, 16)
    assert layout.group_size == units * 32 // bits


# scale dtype -> the layout's: the checkpoint's, exactly (3 bytes an output and group in all
# with uint8 zero points, where float32 s and s * z took 8)
@pytest.mark.parametrize("dtype", [torch.float16, BF16, torch.float32], ids=["fp16", "bf16", "f32"])
def test_scales_keep_their_dtype_and_zero_points_are_bytes(dtype):
    w = int_weights(4, 40, 256, 128, scale_dtype=dtype)
    layout = AVX2IntLayout.build(w)
    assert (layout.scales.dtype, layout.zeros.dtype) == (dtype, torch.uint8)
    assert torch.equal(layout.scales[0, :, :16], w.scales[:, :16])
    assert torch.equal(layout.zeros[2, :, :8].int(), w.zeros[:, 32:])


def with_zeros(w: IntWeights, zeros: torch.Tensor) -> IntWeights:
    return IntWeights.create(bits=w.bits, k=w.k, codes=w.codes, scales=w.scales, zeros=zeros)


# zero points (integers, in any dtype) -> bits, edit, the layout's dtype for them: bytes when
# every one fits, else float32; every path gives the unrounded product either way
ZERO_POINTS = {
    "gptq-v1-int8-zero-256": (8, lambda z: z.index_fill(1, torch.tensor([3]), 256), torch.float32),
    "negative": (4, lambda z: z.index_fill(1, torch.tensor([0, 17]), -1), torch.float32),
    "integers-in-a-float-dtype": (4, lambda z: z.float(), torch.uint8),
}  # fmt: skip


@pytest.mark.parametrize(("bits", "edit", "dtype"), ZERO_POINTS.values(), ids=ZERO_POINTS.keys())
def test_zero_points_a_byte_cannot_hold_stay_float32_and_exact(kernel, bits, edit, dtype):
    base = int_weights(bits, 40, 256, 64)
    w = with_zeros(base, edit(base.zeros))
    layout = AVX2IntLayout.build(w)
    assert layout.zeros.dtype == dtype
    x = torch.randn(3, w.k, generator=torch.Generator().manual_seed(1))
    want = x.double() @ unrounded_t(w)
    assert rel_err(run(x, w, layout), want) < 1e-5  # the float path
    int16 = torch.empty(3, w.n)
    cpu_avx2.extension().wxa_avx2_gemm(x, int16, layout.codes, layout.scales, layout.zeros, bits, 64, 16, 0.0)  # fmt: skip
    assert rel_err(int16, want) < 1e-4


# -- results -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_float32_activations_give_the_unrounded_product(kernel, case):
    w = case_weights(case)
    layout, want_t = AVX2IntLayout.build(w), unrounded_t(w)
    for m in ROWS:
        x = torch.randn(m, w.k)
        got = run(x, w, layout)
        assert got.shape == (m, w.n)
        assert rel_err(got, x.double() @ want_t) < 1e-5, m


@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_half_activations_match_the_exact_reference(kernel, case, dtype):
    w = case_weights(case)
    layout, exact = AVX2IntLayout.build(w), KPackedLayout.build(w)
    for m in (1, 6, 65):
        x = torch.randn(m, w.k).to(dtype)
        xs = x if w.perm is None else x[:, w.perm]
        got = run(x, w, layout)
        assert got.dtype == dtype
        assert rel_err(got, reference_matmul(xs.float(), exact)) < 1e-2, m


def test_tensor_parallel_shards_of_a_1000_vocab(kernel):
    """Vocab 1000 padded to 1024 on two ranks: rows 0..511 and 512..999 (+ 24 zero rows)."""
    w = case_weights("int8-g128-act-order")
    codes = w.codes(0, w.n)
    x = torch.randn(5, w.k).to(BF16)
    g_idx = torch.empty(w.k, dtype=torch.int64)
    g_idx[w.perm] = torch.bucketize(torch.arange(w.k), torch.tensor(w.bounds[1:]), right=True)
    parts = []
    for rows in (slice(0, 512), slice(512, 1000)):
        pad = 512 - (rows.stop - rows.start)
        c = torch.nn.functional.pad(codes[:, rows], (0, pad))
        shard = IntWeights.create(
            bits=8, k=w.k, codes=lambda c0, c1, c=c: c[:, c0:c1], g_idx=g_idx,
            scales=torch.nn.functional.pad(w.scales[:, rows], (0, pad)),
            zeros=torch.nn.functional.pad(w.zeros[:, rows], (0, pad)),
        )  # fmt: skip
        parts.append(run(x, shard, AVX2IntLayout.build(shard))[:, : 512 - pad])
    want = x.double() @ unrounded_t(w)
    assert rel_err(torch.cat(parts, dim=1), want) < 1e-2


@pytest.mark.parametrize(("bits", "group"), [(4, 128), (8, -1)], ids=["int4-g128", "int8-channel"])
def test_a_loaded_gptq_head_runs_it_in_bf16(kernel, tmp_path, bits, group):
    weight = (torch.randn(1000, 256, generator=torch.Generator().manual_seed(1)) * 0.05).half()
    quantreg.write_checkpoint(tmp_path, weight, "gptq", bits=bits, group_size=group, sym=True)
    head = quantreg.load_lm_head(tmp_path, dtype=BF16)
    exact = quantreg.load_lm_head(tmp_path, dtype=torch.float32)
    assert head.kernel.name == build_here()
    assert build_here() in head.kernel.explain()
    assert exact.kernel.name != build_here()
    x = torch.randn(3, 256)
    got = head.compute_logits(x.to(BF16))
    assert got.dtype == BF16
    assert rel_err(got, exact.compute_logits(x)) < 1e-2


# -- bf16 / fp16 rows in int16 fixed point -----------------------------------------------------


def int16_model(x: torch.Tensor, w: IntWeights) -> torch.Tensor:
    """The int16 path, in float64: each row rounded to ``max|x| / 32767`` steps."""
    q, scale = cpu_avx2.quantize_rows(x, bits=16)
    return scale.double() * (q.double() @ unrounded_t(w))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_int16_path_is_its_model_to_1e_5(kernel, case):
    w = case_weights(case)
    layout = AVX2IntLayout.build(w)
    module = cpu_avx2.extension()
    for m in ROWS:
        x = torch.randn(m, w.k, generator=torch.Generator().manual_seed(m))
        xs = x if w.perm is None else x[:, w.perm]
        out = torch.empty(m, w.n)
        module.wxa_avx2_gemm(xs.contiguous(), out, layout.codes, layout.scales, layout.zeros,
                             w.bits, layout.group_size, 16, 256.0)  # fmt: skip
        assert rel_err(out, int16_model(x, w)) < 1e-5, (case, m)
        # the int16 rounding is far below a bf16 activation's: 1e-4 of the unrounded product
        assert rel_err(out, x.double() @ unrounded_t(w)) < 1e-4, (case, m)


@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["int4-g128", "int4-channel-odd-k-45", "int8-g64-k-130"])
def test_half_rows_are_taken_as_they_are_and_give_what_their_float32_copy_gives(kernel, case, dtype):  # fmt: skip
    """Both paths convert bf16 / fp16 rows themselves (no torch op per call for it), exactly."""
    w = case_weights(case)
    layout = AVX2IntLayout.build(w)
    module = cpu_avx2.extension()
    x = torch.randn(5, w.k, generator=torch.Generator().manual_seed(2)).to(dtype)
    args = (layout.codes, layout.scales, layout.zeros, w.bits, layout.group_size)
    for run_path in (lambda xs, out: module.wna16_avx2_gemm(xs, out, *args),
                     lambda xs, out: module.wxa_avx2_gemm(xs, out, *args, 16, 256.0),
                     lambda xs, out: module.wxa_avx2_gemm(xs, out, *args, 8, 0.0)):  # fmt: skip
        got, want = torch.empty(5, w.n), torch.empty(5, w.n)
        run_path(x, got)
        run_path(x.float(), want)
        assert torch.equal(got, want)


def test_rows_of_another_dtype_are_refused():
    layout = AVX2IntLayout.build(case_weights("int4-g128"))
    x, out = torch.zeros(2, 256, dtype=torch.float64), torch.empty(2, 128)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 / bfloat16 / float16 \\[M, K\\] matrix"):  # fmt: skip
        cpu_avx2.extension().wna16_avx2_gemm(x, out, layout.codes, layout.scales, layout.zeros, 4, 128)  # fmt: skip


# what the extension is handed instead of the layout's scales / zero points -> its refusal
BAD_SCALES = {
    "float64-scales": (lambda L: (L.scales.double(), L.zeros), r"scales: float32 / bfloat16 / float16 \[N/16, G, 16\]"),
    "scales-of-another-n": (lambda L: (L.scales[:-1].contiguous(), L.zeros), r"scales: float32 / bfloat16 / float16 \[N/16, G, 16\]"),
    "int32-zeros": (lambda L: (L.scales, L.zeros.int()), r"zeros: uint8 / float32, the scales' shape"),
    "zeros-of-another-shape": (lambda L: (L.scales, L.zeros[:, :, :8].contiguous()), r"zeros: uint8 / float32, the scales' shape"),
}  # fmt: skip


@pytest.mark.parametrize(("swap", "message"), BAD_SCALES.values(), ids=BAD_SCALES.keys())
def test_scales_and_zero_points_the_layout_does_not_hold_are_refused(kernel, swap, message):
    layout = AVX2IntLayout.build(case_weights("int4-g128"))
    scales, zeros = swap(layout)
    x, out = torch.zeros(2, 256), torch.empty(2, 128)
    module = cpu_avx2.extension()
    with pytest.raises(RuntimeError, match=message):
        module.wna16_avx2_gemm(x, out, layout.codes, scales, zeros, 4, 128)
    with pytest.raises(RuntimeError, match=message):
        module.wxa_avx2_gemm(x, out, layout.codes, scales, zeros, 4, 128, 16, 256.0)


@pytest.mark.parametrize("path", [avx2_int_matmul, avx2_a8_matmul], ids=["int16", "a8"])
@pytest.mark.parametrize(
    ("m", "tile_rows", "tiles"), [(3, 8, 1), (8, 8, 1), (9, 4, 3), (70, 16, 5)]
)
def test_rows_go_to_the_kernel_in_tiles_and_one_tile_runs_no_op_but_the_output(kernel, monkeypatch, path, m, tile_rows, tiles):  # fmt: skip
    """At most ``X_TILE_BYTES`` of float32 rows a kernel call (the kernel's copy of them), tiled
    in C++; ``x`` itself when it fits one tile: the call runs one torch op, the output's
    allocation -- no conversion, no slice (each costs tens of µs in a decode step)."""
    w = case_weights("int4-g128")
    layout = AVX2IntLayout.build(w)
    x = torch.randn(m, w.k).to(BF16)
    check_row_tiles(monkeypatch, lambda xs: path(xs, layout), x, w.n, tile_rows, tiles)


# what the call entry point is handed -> its refusal
BAD_CALLS = {
    "rows-not-a-matrix": (lambda x: x[None], 16, r"x must be an \[M, K\] matrix"),
    "an-activation-width-it-has-no-path-for": (lambda x: x, 4, r"act must be 0 \(the float path\), 8 or 16"),
}  # fmt: skip


@pytest.mark.parametrize(("edit", "act", "message"), BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_the_call_entry_point_refuses_what_it_has_no_path_for(kernel, edit, act, message):
    layout = AVX2IntLayout.build(case_weights("int4-g128"))
    x = torch.zeros(2, 256, dtype=BF16)
    args = (layout.codes, layout.scales, layout.zeros, 4, 128, act, 256.0, 1 << 20)
    with pytest.raises(RuntimeError, match=message):
        cpu_avx2.extension().avx2_int_mm(edit(x), layout.n, *args)


def test_a_decode_step_of_an_unpadded_head_runs_one_torch_op(kernel, tmp_path):
    """``compute_logits`` at M = 1 through the registry, the head and the kernel's Python side:
    the output's allocation is the only op (vocab 1024: no padding to slice off)."""
    weight = (torch.randn(1024, 256, generator=torch.Generator().manual_seed(1)) * 0.05).half()
    quantreg.write_checkpoint(tmp_path, weight, "gptq", bits=4, group_size=128, sym=True)
    head = quantreg.load_lm_head(tmp_path, dtype=BF16)
    assert head.kernel.name == build_here()
    x = torch.randn(1, 256).to(BF16)
    with DispatchedOps() as seen:
        logits = head.compute_logits(x)
    assert seen.ops == [ALLOCATE] and logits.shape == (1, 1024)


# The largest int32 sums of the int16 path: every code at its extreme times x at +-32767 over a
# whole chunk of rows (2048 for int4, 256 for int8) and more (K = 4096: 2 and 16 chunks)
INT16_EXTREMES = {  # bits, code, zero point, sign of x
    "int4-all-15-times-plus": (4, 15, 0, 1.0),
    "int4-all-15-times-minus": (4, 15, 0, -1.0),
    "int8-all-255-times-plus": (8, 255, 0, 1.0),
    "int8-all-255-times-minus": (8, 255, 0, -1.0),
    "int8-all-255-zero-point-128": (8, 255, 128, -1.0),
}  # fmt: skip


@pytest.mark.parametrize(("bits", "code", "zero", "sign"), INT16_EXTREMES.values(), ids=INT16_EXTREMES.keys())  # fmt: skip
def test_the_int16_paths_largest_sums_do_not_overflow(kernel, bits, code, zero, sign):
    n, k = 16, 4096
    layout = AVX2IntLayout.build(constant_int_weights(bits, n, k, code, zero))
    x, out = torch.full((2, k), sign), torch.empty(2, n)
    args = (layout.codes, layout.scales, layout.zeros, bits, layout.group_size)
    cpu_avx2.extension().wxa_avx2_gemm(x, out, *args, 16, 256.0)
    torch.testing.assert_close(out, torch.full((2, n), sign * k * (code - zero) * 0.01))


def spike(times: float):
    """The row with its first feature set to ``times`` x the RMS of the others."""
    return lambda r: torch.cat([r[:1] * 0 + times * r[1:].square().mean().sqrt(), r[1:]])


# A row's largest magnitude is at most sqrt(K) x its RMS (all its energy in one feature), so in
# bf16 (limit 256) only rows of more than 65536 features can leave the int16 path; in fp16
# (limit 32) an outlier does at K = 4096.
# row kind -> (K, the row, its path in bf16, its path in fp16)
ROW_KINDS = {
    "gaussian": (4096, lambda r: r, "int16", "int16"),
    "outlier-20x": (4096, spike(20), "int16", "int16"),
    "outlier-1000x": (4096, spike(1000), "int16", "float"),
    "all-zero": (4096, lambda r: r * 0, "int16", "int16"),
    "one-inf": (4096, spike(float("inf")), "float", "float"),
    "outlier-1000x-in-131072": (131072, spike(1000), "float", "float"),
}


@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", list(ROW_KINDS), ids=list(ROW_KINDS))
def test_a_half_row_takes_int16_only_within_the_limit_else_the_float_path(kernel, kind, dtype):
    k, make, in_bf16, in_fp16 = ROW_KINDS[kind]
    w = int_weights(4, 32, k, 128)
    layout = AVX2IntLayout.build(w)
    module = cpu_avx2.extension()
    base = torch.randn(2, k, generator=torch.Generator().manual_seed(3))
    x = torch.stack([base[0], make(base[1])]).to(dtype)  # a Gaussian row, then the row
    got = avx2_int_matmul(x, layout)
    int16, float_path = torch.empty_like(got), torch.empty_like(got)
    args = (layout.codes, layout.scales, layout.zeros, 4, 128)
    module.wxa_avx2_gemm(x.float(), int16, *args, 16, 0.0)
    module.wna16_avx2_gemm(x.float(), float_path, *args)
    want = int16 if (in_bf16 if dtype == BF16 else in_fp16) == "int16" else float_path
    assert torch.equal(got[0], int16[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)


def test_rows_left_to_the_float_path_among_int16_rows_each_get_their_own_result(kernel):
    """fp16 rows 1, 3 and 4 leave the int16 path (an outlier, an inf): they are computed by
    the float path together and put back in their places."""
    w = int_weights(4, 40, 4096, 128)
    layout = AVX2IntLayout.build(w)
    module = cpu_avx2.extension()
    base = torch.randn(5, 4096, generator=torch.Generator().manual_seed(5))
    makes = [lambda r: r, spike(1000), lambda r: r, spike(float("inf")), spike(500)]
    x = torch.stack([make(base[i]) for i, make in enumerate(makes)]).half()
    got = avx2_int_matmul(x, layout)
    int16, float_path = torch.empty_like(got), torch.empty_like(got)
    args = (layout.codes, layout.scales, layout.zeros, 4, 128)
    module.wxa_avx2_gemm(x.float(), int16, *args, 16, 0.0)
    module.wna16_avx2_gemm(x.float(), float_path, *args)
    for i, want in enumerate([int16, float_path, int16, float_path, float_path]):
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=0, equal_nan=True, msg=f"row {i}")

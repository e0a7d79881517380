"""Opt-in int8 activations (``activation_dtype="int8"``, kernel ``cpu-avx2-a8``): how they are
quantized, what the kernel computes, when it is chosen, and how the loader, ``quantreg run``
and ``quantreg bench`` offer it.

Specified here: each row of ``x`` becomes ``q = round(x * 127 / max|x|)`` (half to even, in
float32) with scale ``max|x| / 127`` -- dynamic, symmetric, per row, as vLLM's W8A8 / W4A8
kernels quantize -- and the kernel is then within 1e-5 (relative to the largest logit) of
``scale * (q @ ((c - z) * s).T)`` in float64: the integer sums are exact, nothing saturates.
Against the exact weight-only head the logit error is that of the activation rounding (under
3e-2 relative to the largest logit here; the README gives measured figures).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from int_kernels import build_here
from int_weights import constant_int_weights, rel_err, unrounded_t
from int_weights import random_int_weights as int_weights

import quantreg
from quantreg import IntWeights, Platform
from quantreg.errors import InputError
from quantreg.kernels import Float8Layout, choose, cpu_avx2, kernel_names
from quantreg.kernels.cpu_avx2 import AVX2IntLayout, avx2_a8_matmul, quantize_rows

BF16 = torch.bfloat16
AVX2 = Platform("cpu", cpu_isa=frozenset({"avx2", "fma", "f16c"}))
A8 = "cpu-avx2-a8"
VNNI_A8 = "cpu-vnni-a8"  # the same kernel built for AVX512-VNNI (tests/test_cpu_vnni.py)


@pytest.fixture(scope="module")
def kernel():
    """The compiled extension, or a skip that says why this machine has none."""
    if cpu_avx2.extension() is None:
        pytest.skip(f"{A8} unavailable: {cpu_avx2.unavailable_reason()}")


def modelled(x: torch.Tensor, w: IntWeights) -> torch.Tensor:
    """What the kernel computes, in float64: the per-row int8 activations times the weights."""
    q, scale = quantize_rows(x)
    return scale.double() * (q.double() @ unrounded_t(w))


def run(x: torch.Tensor, w: IntWeights, layout: AVX2IntLayout) -> torch.Tensor:
    """The kernel on ``x`` in checkpoint feature order (the layout's rows are in group order)."""
    return avx2_a8_matmul(x if w.perm is None else x[:, w.perm], layout)


# -- quantizing the activations -------------------------------------------------------------

ROWS_IN_OUT = {
    "largest-becomes-127": ([0.5, -1.0, 0.25, 0.0], [64, -127, 32, 0], 1 / 127),
    "halves-round-to-even": ([127.0, 0.5, 1.5, -2.5], [127, 0, 2, -2], 1.0),
    "a-zero-row-stays-zero": ([0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], 0.0),
    "nan-gives-a-nan-scale": ([1.0, float("nan"), 2.0, 0.0], [0, 0, 0, 0], float("nan")),
    "inf-gives-a-nan-scale": ([1.0, float("inf"), 2.0, 0.0], [0, 0, 0, 0], float("nan")),
    # 127 / max|x| correctly rounded, as the kernels divide: x * it is 28.499998 (torch's
    # 127 / tensor, a reciprocal times 127, made it 28.500002: 29)
    "a-product-just-under-a-half-rounds-down": ([0.8366015553474426, -3.7280139923095703], [28, -127], 3.7280139923095703 / 127),
}  # fmt: skip


@pytest.mark.parametrize(("row", "q", "scale"), ROWS_IN_OUT.values(), ids=ROWS_IN_OUT.keys())
def test_each_row_is_quantized_by_its_own_largest_magnitude(row, q, scale):
    got_q, got_scale = quantize_rows(torch.tensor([row]))
    assert got_q.dtype == torch.int8 and got_q.tolist() == [q]
    torch.testing.assert_close(got_scale, torch.tensor([[scale]]), equal_nan=True)


# -- what the kernel computes --------------------------------------------------------------

# id -> (bits, N, K, group (None: channel), zero points, act-order)
CASES = {
    "int4-g128-zero-points": (4, 128, 256, 128, True, False),
    "int4-g32-symmetric": (4, 64, 256, 32, False, False),
    "int4-g8-odd-n-50": (4, 50, 64, 8, True, False),
    "int4-channel-k-250-padded": (4, 40, 250, None, False, False),
    "int4-g32-act-order": (4, 64, 256, 32, True, True),
    "int8-channel-symmetric": (8, 48, 260, None, False, False),
    "int8-g32-zero-points": (8, 33, 128, 32, True, False),
    "int8-channel-zero-points-odd-k-3": (8, 17, 3, None, True, False),
    "int8-g128-act-order": (8, 1000, 256, 128, True, True),
}
# every code path: 1, 2, 3 rows alone; passes of 4 rows, and 4 + 1, 2 or 3; many rows
ROWS = (1, 2, 3, 4, 5, 6, 7, 9, 70)


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_the_kernel_is_the_int8_model_to_1e_5(kernel, case):
    bits, n, k, group, zero_points, act_order = CASES[case]
    w = int_weights(bits, n, k, group, sym=not zero_points, act_order=act_order)
    layout = AVX2IntLayout.build(w)
    for m in ROWS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        assert rel_err(run(x, w, layout), modelled(x, w)) < 1e-5, (case, m)


EXTREMES = {  # codes, zero point, activations: the largest products, every sign
    "int4-all-15-times-127": (4, 15, 8, 1.0),
    "int4-all-0-times-minus-127": (4, 0, 8, -1.0),
    "int8-code-0-is-minus-128": (8, 0, 128, -1.0),
    "int8-code-0-times-plus-127": (8, 0, 128, 1.0),
    "int8-code-255-times-minus-127": (8, 255, 128, -1.0),
}  # fmt: skip


@pytest.mark.parametrize(("bits", "code", "zero", "sign"), EXTREMES.values(), ids=EXTREMES.keys())
def test_the_largest_products_do_not_saturate(kernel, bits, code, zero, sign):
    n, k = 16, 512
    w = constant_int_weights(bits, n, k, code, zero)
    x = torch.full((2, k), sign)
    want = sign * k * (code - zero) * 0.01
    torch.testing.assert_close(run(x, w, AVX2IntLayout.build(w)), torch.full((2, n), want))


def test_a_row_with_a_non_finite_value_gives_nan_and_the_other_rows_are_untouched(kernel):
    w = int_weights(4, 32, 128, 32)
    x = torch.randn(3, 128)
    x[1, 5] = float("inf")
    got = run(x, w, AVX2IntLayout.build(w))
    assert got[1].isnan().all() and torch.isfinite(got[[0, 2]]).all()
    assert rel_err(got[[0, 2]], modelled(x[[0, 2]], w)) < 1e-5


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32], ids=str)
def test_the_result_is_in_the_activations_dtype(kernel, dtype):
    w = int_weights(8, 48, 64, None, sym=True)
    x = torch.randn(2, 64)
    got = run(x.to(dtype), w, AVX2IntLayout.build(w))
    assert got.dtype == dtype
    assert rel_err(got, modelled(x.to(dtype).float(), w)) < 1e-2


# -- choice: opt-in only -------------------------------------------------------------------


def test_without_the_opt_in_the_kernel_declines_and_says_how_to_opt_in():
    choice = choose(int_weights(4, 64, 128, 32), dtype=BF16, device="cpu", platform=AVX2)
    assert choice.name != A8
    assert dict(choice.declined)[A8] == (
        "multiplies int8 activations (quantized per row); opt in with activation_dtype='int8'"
    )


def test_with_the_opt_in_every_weight_only_kernel_declines_saying_so(kernel):
    choice = choose(
        int_weights(4, 64, 128, 32), dtype=BF16, device="cpu", platform=AVX2,
        activation_dtype="int8",
    )  # fmt: skip
    assert choice.name == A8
    reasons = dict(choice.declined)
    assert set(reasons) == set(kernel_names()) - {A8}
    assert reasons.pop(VNNI_A8) == "this CPU lacks avx512f/avx512bw/avx512vl/avx512_vnni"
    assert all("keeps the activations in float (weight-only)" in reasons[n] for n in reasons)


REFUSED = {
    "fp8-weights": (lambda: Float8Layout.build(torch.zeros(64, 32).to(torch.float8_e4m3fn), torch.ones(1, 64)), "cpu", AVX2, f"{VNNI_A8}: runs integer \\(int4 / int8\\) weights only; {A8}: runs integer \\(int4 / int8\\) weights only"),
    "on-cuda": (lambda: int_weights(4, 64, 128, 32), "cuda", Platform("cuda", (9, 0), triton=True), f"{VNNI_A8}: runs on the CPU; the layer is on cuda; {A8}: runs on the CPU; the layer is on cuda"),
    "no-avx2": (lambda: int_weights(4, 64, 128, 32), "cpu", Platform("cpu", cpu_isa=frozenset({"f16c"})), f"{VNNI_A8}: this CPU lacks avx2/fma/avx512f/avx512bw/avx512vl/avx512_vnni; {A8}: this CPU lacks avx2/fma"),
    "unequal-act-order-groups": (lambda: int_weights(4, 64, 256, 32, act_order=True, uneven=True), "cpu", AVX2, f"{VNNI_A8}: needs groups of equal size; these act-order groups differ; {A8}: needs groups of equal size"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("make", "device", "platform", "why"), REFUSED.values(), ids=REFUSED.keys()
)
def test_a_layer_no_int8_kernel_runs_is_refused_not_run_weight_only(make, device, platform, why):
    with pytest.raises(InputError, match=r"activation_dtype='int8': no kernel with int8 activations can run this layer .*every other kernel keeps the activations float\. Declined: " + why):  # fmt: skip
        choose(make(), dtype=BF16, device=device, platform=platform, activation_dtype="int8")


@pytest.mark.parametrize("value", ["fp8", "int4", torch.int8], ids=str)
def test_an_unknown_activation_dtype_is_refused(value):
    with pytest.raises(InputError, match=r"activation_dtype .* is not supported; use None \(float activations, weight-only kernels\) or one of 'int8'"):  # fmt: skip
        choose(int_weights(4, 64, 128, 32), dtype=BF16, device="cpu", activation_dtype=value)


def test_requesting_the_kernel_by_name_without_the_opt_in_is_refused():
    with pytest.raises(InputError, match=rf"kernel '{A8}' cannot run this layer: multiplies int8 activations .* opt in with activation_dtype='int8'"):  # fmt: skip
        choose(int_weights(4, 64, 128, 32), dtype=BF16, device="cpu", platform=AVX2, requested=A8)


# -- the loader, run and bench ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptq")
    weight = (torch.randn(1000, 256, generator=torch.Generator().manual_seed(1)) * 0.05).half()
    quantreg.write_checkpoint(folder, weight, "gptq", bits=4, group_size=128, sym=True)
    return folder


def test_load_lm_head_opts_in_and_records_the_kernel(kernel, gptq_folder):
    head = quantreg.load_lm_head(gptq_folder, dtype=BF16, activation_dtype="int8")
    exact = quantreg.load_lm_head(gptq_folder, dtype=torch.float32)
    assert head.kernel.name == build_here("int8") and head.activation_dtype == "int8"
    assert head.kernel.activation_dtype == "int8" and head.kernel.to_dict()["activation_dtype"] == "int8"  # fmt: skip
    assert exact.kernel.activation_dtype is None
    assert "opt in" not in head.kernel.explain() and "weight-only" in head.kernel.explain()
    x = torch.randn(3, 256)
    got = head.compute_logits(x.to(BF16))
    assert got.dtype == BF16
    assert 0 < rel_err(got, exact.compute_logits(x)) < 3e-2


CHECKED = {  # kernel the layer ended with, activations asked for -> the refusal (None: fine)
    "nothing-asked": (lambda: quantreg.Kernel.record("dense", "F.linear"), None, None),
    "a8-asked-int8": (lambda: quantreg.Kernel(A8, "opted in", activation_dtype="int8"), "int8", None),
    "dense-asked-int8": (lambda: quantreg.Kernel.record("dense", "F.linear"), "int8", r"activation_dtype='int8' was asked for, but the head runs dense \(F\.linear\), which keeps its activations in float"),
    "no-kernel-asked-int8": (lambda: None, "int8", r"activation_dtype='int8' was asked for, but the head runs no quantreg kernel, which keeps its activations in float"),
}  # fmt: skip


@pytest.mark.parametrize(("make", "asked", "refusal"), CHECKED.values(), ids=CHECKED.keys())
def test_a_layer_that_ended_without_the_activations_asked_for_is_refused(make, asked, refusal):
    from quantreg.kernels import check_kernel_activations

    if refusal is None:
        check_kernel_activations(make(), asked, "the head")
    else:
        with pytest.raises(InputError, match=refusal):
            check_kernel_activations(make(), asked, "the head")


def test_load_lm_head_refuses_int8_activations_for_a_float_head(tmp_path):
    quantreg.write_checkpoint(tmp_path, torch.randn(64, 32).half(), None)
    with pytest.raises(InputError, match=r"activation_dtype='int8' was asked for, but 'lm_head' resolved as unquantized runs dense .* which keeps its activations in float"):  # fmt: skip
        quantreg.load_lm_head(tmp_path, activation_dtype="int8")


def test_load_lm_head_refuses_an_unknown_activation_dtype(gptq_folder):
    with pytest.raises(InputError, match=r"activation_dtype 'fp8' is not supported"):
        quantreg.load_lm_head(gptq_folder, activation_dtype="fp8")


def test_quantreg_run_opts_in_and_says_so(kernel, gptq_folder):
    def run_cli(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "quantreg", "run", str(gptq_folder), "--dtype", "bfloat16"]
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, check=False)

    data = json.loads(run_cli("--activation-dtype", "int8", "--json").stdout)
    assert (data["kernel"], data["activation_dtype"]) == (build_here("int8"), "int8")
    text = run_cli("--activation-dtype", "int8").stdout
    assert "activations: int8, quantized per row (opted in)" in text
    bad = run_cli("--activation-dtype", "fp8")
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr


def test_bench_times_an_a8_row_beside_each_weight_only_row(kernel):
    from quantreg.bench import run_bench

    result = run_bench(
        shapes=((256, 128),), ms=(1, 5), budget_s=0.0, methods=("cpu_wna16",),
        formats=("gptq int4 g128", "gptq int8 channel"), activation_dtypes=("int8",),
    )  # fmt: skip
    rows = {(r["method"], r["format"], r["M"]): r for r in result["rows"]}
    a8_kernel, w16_kernel = build_here("int8"), build_here()  # what this machine chooses
    for fmt in ("gptq int4 g128", "gptq int8 channel"):
        for m in (1, 5):
            a8, w16 = rows[("cpu_wna16 a8", fmt, m)], rows[("cpu_wna16", fmt, m)]
            assert a8["kernel"] == a8_kernel and w16["kernel"] == w16_kernel
            assert "int8 activations" in a8["computes"] and "weight-only" in w16["computes"]
            assert a8["max_rel_err"] < 3e-2

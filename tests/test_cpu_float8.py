"""quantreg's float8 CPU kernels, ``cpu-avx2-float8`` and ``cpu-avx512-float8`` (one layout,
two builds): when each is chosen and why it declines, their results against the exact reference
kernel, the 4-bit layout of e2m1 (NVFP4) values, and the reference kernel's bounded memory.

Precision, as specified here: with float32 activations the kernel is within 1e-5 (relative to
the largest logit) of ``x @ (value * scale).T`` in float64 -- the float8 values decoded exactly,
the scales in float32, no rounding of the weights. The reference rounds every weight to the
scale dtype (compressed-tensors' NVFP4: to bfloat16) and the kernel does not, so against the
reference, in bf16, it is within 1e-2 (the precision contract's bf16 bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import torch
from dispatched_ops import check_row_tiles

import quantreg
from quantreg.bench import peak_transient_bytes
from quantreg.kernels import Float8Layout, choose, cpu_float8, cpu_float8_avx512, layouts, reference
from quantreg.kernels.cpu_float8 import CPUFloat8Layout, float8_cpu_matmul
from quantreg.kernels.cpu_float8_avx512 import avx512_float8_matmul
from quantreg.platform import Platform

BF16 = torch.bfloat16
AVX2 = Platform("cpu", cpu_isa=frozenset({"avx2", "fma", "f16c"}))
E2M1 = torch.tensor(layouts.E2M1)


@dataclass(frozen=True)
class Build:
    """One build of the float8 kernel: its module, the matmul a head calls, the extension's
    entry points (one gemm into ``out``, one call that tiles rows) and the kernel's name."""

    module: ModuleType
    matmul: Callable[[torch.Tensor, CPUFloat8Layout], torch.Tensor]
    gemm: str
    mm: str
    name: str

    def extension(self) -> Any:
        return self.module.extension()


BUILDS = {
    "avx2": Build(cpu_float8, float8_cpu_matmul, "float8_gemm", "float8_mm", "cpu-avx2-float8"),
    "avx512-bf16": Build(
        cpu_float8_avx512, avx512_float8_matmul, "float8_512_gemm", "float8_512_mm",
        "cpu-avx512-float8",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def kernel():
    """The AVX2 build's extension (it packs the layout), or a skip that says why this machine
    has none."""
    if cpu_float8.extension() is None:
        pytest.skip(f"cpu-avx2-float8 unavailable: {cpu_float8.unavailable_reason()}")


@pytest.fixture(scope="module", params=list(BUILDS), ids=list(BUILDS))
def build(request, kernel) -> Build:
    """Each build whose extension this machine has (a skip that says why for the others)."""
    chosen = BUILDS[request.param]
    if chosen.extension() is None:
        pytest.skip(f"{chosen.name} unavailable: {chosen.module.unavailable_reason()}")
    return chosen


def float8_here() -> str:
    """The float8 kernel a bf16 head gets on this machine: the AVX512-BF16 build where the CPU
    has it, else the AVX2 one."""
    return "cpu-avx512-float8" if cpu_float8_avx512.extension() is not None else "cpu-avx2-float8"


def fp8_values(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random float8 codes over the whole finite range (subnormals included)."""
    codes = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x42  # no NaN: the loaders refuse them
    return codes.view(torch.float8_e4m3fn)


def e2m1_values(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    magnitude = E2M1[torch.randint(0, 8, (n, k), generator=gen)]
    sign = torch.randint(0, 2, (n, k), generator=gen) * 2 - 1
    return (magnitude * sign).to(torch.float8_e4m3fn)


def every_code(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each row a shuffle of the 254 finite codes."""
    finite = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    rows = [finite[torch.randperm(254, generator=gen)][:k] for _ in range(n)]
    return torch.stack(rows).view(torch.float8_e4m3fn)


VALUES = {"fp8": fp8_values, "e2m1": e2m1_values, "every-code": every_code}

# id -> (N, K, columns per group (None: one group), values, scale dtype, round_to)
CASES = {
    "fp8-channel-odd-n-1001": (1001, 96, None, "fp8", BF16, None),
    "fp8-channel-fp16-scales": (48, 64, None, "fp8", torch.float16, None),
    "fp8-block-128-k-200": (300, 200, 128, "fp8", torch.float32, None),
    "fp8-group-48-k-300-crosses-a-256-chunk": (33, 300, 48, "fp8", BF16, None),
    "fp8-every-code": (40, 254, None, "every-code", torch.float32, None),
    "nvfp4-g16-round-to-bf16": (1000, 48, 16, "e2m1", torch.float32, BF16),
    "nvfp4-g16-k-272-n-17": (17, 272, 16, "e2m1", torch.float32, BF16),
    "nvfp4-e4m3-scales-over-a-global": (40, 96, 16, "e2m1", "e4m3/global", BF16),
    "e2m1-channel-odd-k-45": (24, 45, None, "e2m1", BF16, None),
    "e2m1-groups-of-5": (40, 23, 5, "e2m1", torch.float16, None),
}


def layout_of(case: str, seed: int = 0) -> Float8Layout:
    n, k, group, kind, scale_dtype, round_to = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    values = VALUES[kind](n, k, gen)
    groups = 1 if group is None else -(-k // group)
    if scale_dtype == "e4m3/global":  # as NVFP4 producers store them: e4m3 codes / a global
        return nvfp4_layout(values, torch.rand(groups, n, generator=gen) * 448, group)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 1e-4).to(scale_dtype)
    g_idx = None if group is None else torch.arange(k) // group
    return Float8Layout.build(values, scales, None, g_idx, round_to=round_to)


def nvfp4_layout(values: torch.Tensor, group_scales: torch.Tensor, group: int) -> Float8Layout:
    """NVFP4 scales: e4m3 codes divided by one float32 global scale (448 * 6 / amax)."""
    effective = group_scales.to(torch.float8_e4m3fn).float() / (448 * 6 / 3.7)
    g_idx = torch.arange(values.shape[1]) // group
    return Float8Layout.build(values, effective, None, g_idx, round_to=BF16)


def unrounded(x: torch.Tensor, layout: Float8Layout) -> torch.Tensor:
    """``x @ (value * scale).T`` in float64, no weight rounded."""
    g_idx = torch.bucketize(torch.arange(layout.k), torch.tensor(layout.bounds[1:]), right=True)
    w = layout.values.double() * layout.scales.double()[g_idx].T
    return x.double() @ w.T


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


# -- choice ------------------------------------------------------------------------------------


def zero_pointed() -> Float8Layout:
    layout = layout_of("fp8-channel-fp16-scales")
    return Float8Layout.build(layout.values, layout.scales, torch.ones_like(layout.scales))


# id -> (weights, activation dtype, device, platform, kernel, its reason)
LACKS_512 = "this CPU lacks avx512f/avx512bw/avx512vl/avx512vbmi/avx512_bf16"
DECLINES = {
    "float32-activations": (lambda: layout_of("fp8-channel-fp16-scales"), torch.float32, "cpu", AVX2, "cpu-avx2-float8", "takes bf16 / fp16 activations; float32 heads take the exact reference kernel"),
    "float32-activations-avx512": (lambda: layout_of("fp8-channel-fp16-scales"), torch.float32, "cpu", AVX2, "cpu-avx512-float8", "takes bf16 / fp16 activations; float32 heads take the exact reference kernel"),
    "zero-points": (zero_pointed, BF16, "cpu", AVX2, "cpu-avx2-float8", "takes symmetric float8 weights; these have zero points"),
    "zero-points-avx512": (zero_pointed, BF16, "cpu", AVX2, "cpu-avx512-float8", "takes symmetric float8 weights; these have zero points"),
    "no-avx2": (lambda: layout_of("fp8-channel-fp16-scales"), BF16, "cpu", Platform("cpu", cpu_isa=frozenset({"f16c"})), "cpu-avx2-float8", "this CPU lacks avx2/fma"),
    "no-avx512-bf16": (lambda: layout_of("fp8-channel-fp16-scales"), BF16, "cpu", Platform("cpu", cpu_isa=frozenset({"f16c"})), "cpu-avx512-float8", "this CPU lacks avx2/fma/avx512f/avx512bw/avx512vl/avx512vbmi/avx512_bf16"),
    "on-cuda": (lambda: layout_of("fp8-channel-fp16-scales"), BF16, "cuda", Platform("cuda", (9, 0)), "cpu-avx2-float8", "runs on the CPU; the layer is on cuda"),
    "on-cuda-avx512": (lambda: layout_of("fp8-channel-fp16-scales"), BF16, "cuda", Platform("cuda", (9, 0)), "cpu-avx512-float8", "runs on the CPU; the layer is on cuda"),
}  # fmt: skip


@pytest.mark.parametrize(("make", "dtype", "device", "platform", "name", "reason"), DECLINES.values(), ids=DECLINES.keys())  # fmt: skip
def test_the_kernel_declines_with_its_reason(make, dtype, device, platform, name, reason):
    choice = choose(make(), dtype=dtype, device=device, platform=platform)
    assert choice.name == "reference"
    assert dict(choice.declined)[name] == reason


@pytest.mark.parametrize("name", ["cpu-avx2-float8", "cpu-avx512-float8"])
def test_the_environment_variable_turns_it_off(monkeypatch, name):
    monkeypatch.setenv("QUANTREG_NO_CPU_KERNELS", "1")
    choice = choose(layout_of("fp8-channel-fp16-scales"), dtype=BF16, device="cpu")
    assert dict(choice.declined)[name] == "QUANTREG_NO_CPU_KERNELS is set"


@pytest.mark.parametrize("name", ["cpu-avx2-float8", "cpu-avx512-float8"])
def test_integer_weights_are_not_its_business(name):
    from quantreg.kernels.catalog import KERNELS, Target

    target = Target(quantreg.IntWeights.__new__(quantreg.IntWeights), BF16, torch.device("cpu"), AVX2, None)  # fmt: skip
    assert KERNELS[name].decline(target) == "runs float8 (fp8 / nvfp4) weights only"


def test_bf16_float8_heads_choose_it_before_the_reference(kernel):
    """The AVX512-BF16 build where the CPU has it, before the AVX2 one."""
    choice = choose(layout_of("fp8-block-128-k-200"), dtype=BF16, device="cpu")
    here = float8_here()
    assert choice.name == here
    assert dict(choice.declined)["reference"] == f"{here} fits and comes first"
    if here == "cpu-avx512-float8":
        assert dict(choice.declined)["cpu-avx2-float8"] == "cpu-avx512-float8 fits and comes first"


def test_an_avx2_cpu_chooses_the_avx2_build(kernel):
    choice = choose(layout_of("fp8-block-128-k-200"), dtype=BF16, device="cpu", platform=AVX2)
    assert choice.name == "cpu-avx2-float8"
    assert dict(choice.declined)["cpu-avx512-float8"] == LACKS_512


# -- results -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_float32_activations_give_the_unrounded_product(build, case):
    layout = layout_of(case)
    fast = CPUFloat8Layout.build(layout)
    for m in (1, 2, 7):
        x = torch.randn(m, layout.k)
        assert rel_err(build.matmul(x, fast), unrounded(x, layout)) < 1e-5, m


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bf16_activations_match_the_exact_reference(build, case):
    layout = layout_of(case)
    fast = CPUFloat8Layout.build(layout)
    for m in (1, 6, 65):
        x = torch.randn(m, layout.k).to(BF16)
        got = build.matmul(x, fast)
        assert got.dtype == BF16 and got.shape == (m, layout.n)
        assert rel_err(got, reference.float8_matmul(x, layout)) < 1e-2, m


@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["fp8-block-128-k-200", "e2m1-channel-odd-k-45"])
def test_half_rows_are_taken_as_they_are_and_give_what_their_float32_copy_gives(build, case, dtype):  # fmt: skip
    """The extension converts bf16 / fp16 rows itself (no torch op per call for it), exactly:
    the AVX2 build to float32, the AVX512-BF16 one to bf16 parts whose sum is the value."""
    fast = CPUFloat8Layout.build(layout_of(case))
    x = torch.randn(3, fast.k).to(dtype)
    args = (fast.codes, fast.scales, fast.group_size, fast.fp4, fast.scale_mult)
    got, want = torch.empty(3, fast.n), torch.empty(3, fast.n)
    gemm = getattr(build.extension(), build.gemm)
    gemm(x, got, *args)
    gemm(x.float(), want, *args)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["fp8-block-128-k-200", "e2m1-channel-odd-k-45"])
@pytest.mark.parametrize(("m", "tile_rows", "tiles"), [(3, 8, 1), (9, 4, 3), (70, 16, 5)])
def test_rows_go_to_the_kernel_in_tiles_and_one_tile_runs_no_op_but_the_output(build, monkeypatch, case, m, tile_rows, tiles):  # fmt: skip
    """At most ``X_TILE_BYTES`` of float32 rows a kernel call, tiled in C++; ``x`` itself when
    it fits one tile: the call runs one torch op, the output's allocation."""
    fast = CPUFloat8Layout.build(layout_of(case))
    x = torch.randn(m, fast.k).to(BF16)
    check_row_tiles(monkeypatch, lambda xs: build.matmul(xs, fast), x, fast.n, tile_rows, tiles)


def tiny_logits() -> Float8Layout:
    """fp8 per channel with scales so small that most logits are float32 denormals."""
    layout = layout_of("fp8-channel-fp16-scales")
    return Float8Layout.build(layout.values, layout.scales.float() * 1e-38)


# id -> (weights, activation scale, what the float32 logits must hold)
OUTPUTS = {
    "fp8-some-overflow-fp16": (lambda: layout_of("fp8-channel-odd-n-1001"), 1e7, lambda o: o.half().isinf().any()),
    "nvfp4-some-overflow-fp16": (lambda: layout_of("nvfp4-g16-round-to-bf16"), 1e7, lambda o: o.half().isinf().any()),
    "denormal-logits": (tiny_logits, 1.0, lambda o: ((o != 0) & (o.abs() < 2.0**-126)).sum() > 50),
}  # fmt: skip


@pytest.mark.parametrize(("make", "scale", "holds"), OUTPUTS.values(), ids=OUTPUTS.keys())
def test_half_outputs_are_the_float32_ones_rounded_as_torch_rounds(build, make, scale, holds):
    """The output is written 16 values at a time (vectorized rounding): bf16 / fp16 outputs are
    the float32 ones as ``Tensor.to`` rounds them, bit for bit -- infinities where fp16
    overflows, bf16 denormals kept (not flushed to zero)."""
    fast = CPUFloat8Layout.build(make())
    x = (torch.randn(7, fast.k) * scale).to(BF16)
    args = (fast.codes, fast.scales, fast.group_size, fast.fp4, fast.scale_mult)
    gemm = getattr(build.extension(), build.gemm)
    outs = {dtype: torch.empty(7, fast.n, dtype=dtype) for dtype in (torch.float32, BF16, torch.float16)}  # fmt: skip
    for out in outs.values():
        gemm(x, out, *args)
    assert holds(outs[torch.float32])
    for dtype in (BF16, torch.float16):
        assert torch.equal(outs[dtype], outs[torch.float32].to(dtype)), dtype


@pytest.fixture(scope="module")
def avx512(kernel):
    """The AVX512-BF16 build, or a skip that says why this machine has none."""
    if cpu_float8_avx512.extension() is None:
        pytest.skip(f"cpu-avx512-float8 unavailable: {cpu_float8_avx512.unavailable_reason()}")


@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16], ids=["fp32", "bf16", "fp16"])  # fmt: skip
@pytest.mark.parametrize("case", ["fp8-block-128-k-200", "fp8-group-48-k-300-crosses-a-256-chunk", "nvfp4-g16-k-272-n-17", "e2m1-groups-of-5"])  # fmt: skip
def test_the_avx512_build_gives_a_row_the_same_bits_whichever_rows_share_its_call(avx512, case, dtype):  # fmt: skip
    """Batch invariance: every path of cpu-avx512-float8 (4 rows or fewer decode in registers,
    more go through a buffer in passes of 4 or 6) sums a row's products in the same order, so a
    row's logits do not depend on the call's other rows. (The AVX2 build's do, in float32.)"""
    fast = CPUFloat8Layout.build(layout_of(case))
    x = torch.randn(65, fast.k).to(dtype)
    alone = torch.cat([avx512_float8_matmul(x[i : i + 1], fast) for i in range(65)])
    for m in (2, 3, 4, 5, 7, 9, 13, 65):
        assert torch.equal(avx512_float8_matmul(x[:m], fast), alone[:m]), m


@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
def test_an_infinite_activation_gives_the_logits_both_builds_give(avx512, dtype):
    """+-inf in a row makes its logits +-inf (NaN where infinities of both signs meet or one
    meets a zero weight) in both builds: the AVX512-BF16 build's bf16 parts after an infinite
    one are zeros, not inf - inf."""
    fast = CPUFloat8Layout.build(layout_of("fp8-block-128-k-200"))
    x = torch.randn(3, fast.k).to(dtype)
    x[0, 5], x[1, 7], x[1, 9], x[2, 11] = float("inf"), float("inf"), float("-inf"), float("-inf")
    got, want = avx512_float8_matmul(x, fast), float8_cpu_matmul(x, fast)
    assert torch.isinf(want).any() and torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()], want[want.isinf()])  # fmt: skip


# build id -> what a call without its extension says (the reason follows)
MISSING = {
    "avx2": "quantreg's float8 kernel is unavailable: ",
    "avx512-bf16": "quantreg's AVX512-BF16 float8 kernel is unavailable: ",
}


@pytest.mark.parametrize("name", list(BUILDS), ids=list(BUILDS))
def test_a_call_without_the_extension_says_why(kernel, monkeypatch, name):
    """Selection declines the kernel first; a direct call still names the reason."""
    chosen = BUILDS[name]
    monkeypatch.setattr(chosen.module.UNIT, "state", {"reason": "no c++ here", "module": None})
    fast = CPUFloat8Layout.build(layout_of("fp8-block-128-k-200"))
    with pytest.raises(RuntimeError, match=rf"^{MISSING[name]}no c\+\+ here$"):
        chosen.matmul(torch.zeros(1, fast.k, dtype=BF16), fast)


def test_the_call_entry_point_refuses_rows_that_are_not_a_matrix(build):
    fast = CPUFloat8Layout.build(layout_of("fp8-block-128-k-200"))
    x = torch.zeros(1, 2, fast.k, dtype=BF16)
    args = (fast.codes, fast.scales, fast.group_size, fast.fp4, fast.scale_mult, 1 << 20)
    with pytest.raises(RuntimeError, match=r"x must be an \[M, K\] matrix"):
        getattr(build.extension(), build.mm)(x, fast.n, *args)


def test_nvfp4_bf16_rounding_is_not_reproduced(build):
    """The reference rounds each dequantized NVFP4 weight to bf16; the kernel keeps the float32
    product: the two differ, by less than bf16's half ulp per weight."""
    layout = layout_of("nvfp4-g16-round-to-bf16")
    x = torch.randn(4, layout.k)
    got = build.matmul(x, CPUFloat8Layout.build(layout))
    exact = reference.float8_matmul(x, layout)
    assert not torch.equal(got, exact)
    assert rel_err(got, exact) < 2**-8


def test_fp16_activations_come_back_in_fp16(build):
    layout = layout_of("fp8-channel-odd-n-1001")
    x = torch.randn(3, layout.k).half()
    got = build.matmul(x, CPUFloat8Layout.build(layout))
    assert got.dtype == torch.float16
    assert rel_err(got, reference.float8_matmul(x, layout)) < 1e-2


def test_tensor_parallel_shards_of_a_1000_vocab(build):
    """Vocab 1000 padded to 1024 on two ranks: rows 0..511 and 512..999 (+ 24 zero rows)."""
    layout = layout_of("nvfp4-g16-round-to-bf16")
    x = torch.randn(5, layout.k).to(BF16)
    parts = []
    for rows in (slice(0, 512), slice(512, 1000)):
        values = layout.values[rows]
        scales = layout.scales[:, rows]
        pad = 512 - values.shape[0]
        values = torch.cat([values, torch.zeros(pad, layout.k).to(torch.float8_e4m3fn)])
        scales = torch.nn.functional.pad(scales, (0, pad))
        shard = Float8Layout.build(values, scales, None, torch.arange(layout.k) // 16)
        parts.append(build.matmul(x, CPUFloat8Layout.build(shard))[:, : 512 - pad])
    assert rel_err(torch.cat(parts, dim=1), reference.float8_matmul(x, layout)) < 1e-2


# id -> (case, fp4 codes, code bytes a weight, scale dtype in the layout)
LAYOUTS = {
    "e2m1-values-take-4-bits": ("nvfp4-g16-round-to-bf16", True, 0.5, torch.float32),
    "nvfp4-scales-take-a-byte": ("nvfp4-e4m3-scales-over-a-global", True, 0.5, torch.uint8),
    "float8-values-take-a-byte": ("fp8-every-code", False, 1.0, torch.float32),
    "e2m1-with-k-not-a-multiple-of-4": ("e2m1-channel-odd-k-45", False, 1.0, torch.float32),
    "e2m1-with-groups-of-5": ("e2m1-groups-of-5", False, 1.0, torch.float32),
}


@pytest.mark.parametrize(("case", "fp4", "bytes_per_weight", "scale_dtype"), LAYOUTS.values(), ids=LAYOUTS.keys())  # fmt: skip
def test_the_layout_packs_e2m1_values_in_4_bits(case, fp4, bytes_per_weight, scale_dtype):
    layout = layout_of(case)
    fast = CPUFloat8Layout.build(layout)
    assert fast.fp4 is fp4
    assert fast.codes.numel() == -(-layout.n // 16) * 16 * layout.k * bytes_per_weight
    assert fast.scales.dtype == scale_dtype
    assert fast.scales.shape == (-(-layout.n // 16), len(layout.bounds) - 1, 16)


@pytest.mark.parametrize("top", [448.0, 320.0, 30.0, 0.5], ids=lambda t: f"largest-code-{t:g}")
def test_scale_codes_give_back_every_scale(top):
    """A tensor-parallel shard's largest scale need not be 448: any e4m3 value will do."""
    from quantreg.kernels.cpu_float8 import SCALE_TOLERANCE, scale_codes

    gen = torch.Generator().manual_seed(3)
    codes = (torch.rand(64, 100, generator=gen) * top).to(torch.float8_e4m3fn)
    codes[0, 0] = top
    scales = codes.float() / 726.4865
    found = scale_codes(scales)
    assert found is not None
    back = found[0].view(torch.float8_e4m3fn).double() * found[1]
    assert ((back - scales.double()).abs() <= scales.double().abs() * SCALE_TOLERANCE).all()


def test_scales_that_are_no_e4m3_codes_stay_float32():
    from quantreg.kernels.cpu_float8 import scale_codes

    scales = torch.rand(8, 100, generator=torch.Generator().manual_seed(4)) + 0.01
    assert scale_codes(scales) is None
    assert scale_codes(torch.zeros(2, 3)) is None


def test_a_tensor_parallel_nvfp4_shard_keeps_its_scale_codes(build):
    layout = layout_of("nvfp4-e4m3-scales-over-a-global")
    scales = layout.scales[:, :16] * 0.25  # a shard whose largest scale code is ~112
    shard = Float8Layout.build(layout.values[:16], scales, None, torch.arange(96) // 16, round_to=BF16)  # fmt: skip
    fast = CPUFloat8Layout.build(shard)
    assert fast.scales.dtype == torch.uint8
    x = torch.randn(3, 96)
    assert rel_err(build.matmul(x, fast), unrounded(x, shard)) < 1e-5


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_extension_packs_the_same_bytes_as_torch(kernel, case):
    """The one-pass C++ packing (load time) is pinned to the torch formulation."""
    values = layout_of(case).values
    try_fp4 = values.shape[1] % cpu_float8.FP4_STEP == 0
    codes, fp4 = cpu_float8._pack(values, try_fp4)
    want, want_fp4 = cpu_float8._pack_torch(values, try_fp4)
    assert fp4 is want_fp4
    assert torch.equal(codes, want)


@pytest.mark.parametrize(("n", "k"), [(20, 36), (16, 4)], ids=["k-36-tail-n-20", "k-4-one-step"])
def test_the_extension_packs_e2m1_row_tails_as_torch(kernel, n, k):
    values = e2m1_values(n, k, torch.Generator().manual_seed(3))
    codes, fp4 = cpu_float8._pack(values, True)
    want, want_fp4 = cpu_float8._pack_torch(values, True)
    assert fp4 and want_fp4
    assert torch.equal(codes, want)


@pytest.mark.parametrize("row", [0, 999], ids=["first-block", "last-partial-block"])
def test_the_extension_falls_back_to_bytes_on_one_off_grid_value(kernel, row):
    values = layout_of("nvfp4-g16-round-to-bf16").values.clone()
    values[row, 47] = 0.75
    codes, fp4 = cpu_float8._pack(values, True)
    want, want_fp4 = cpu_float8._pack_torch(values, True)
    assert (fp4, want_fp4) == (False, False)
    assert torch.equal(codes, want)


def test_one_value_off_the_e2m1_grid_keeps_a_byte_per_weight():
    layout = layout_of("nvfp4-g16-round-to-bf16")
    values = layout.values.clone()
    values[999, 47] = 0.75
    fast = CPUFloat8Layout.build(Float8Layout.build(values, layout.scales, None, torch.arange(48) // 16))  # fmt: skip
    assert fast.fp4 is False


def test_a_loaded_nvfp4_head_runs_it_in_bf16(kernel, tmp_path):
    from ct_library import compress_head

    weight = (torch.randn(1000, 64, generator=torch.Generator().manual_seed(1)) * 0.05).to(BF16)
    decompressed = compress_head(tmp_path, weight, {"preset": "NVFP4A16", "targets": ["lm_head"]})
    head = quantreg.load_lm_head(tmp_path, dtype=BF16)
    assert head.kernel.name == float8_here()
    assert float8_here() in head.kernel.explain()
    x = torch.randn(3, 64).to(BF16)
    assert rel_err(head.compute_logits(x), x.float() @ decompressed.float().T) < 1e-2


# -- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 17])
def test_the_reference_tiles_columns_bit_for_bit(monkeypatch, m):
    """Columns 256 at a time (the smallest step) give every logit exactly as one block of all
    1000 columns does."""
    layout = layout_of("nvfp4-g16-round-to-bf16")
    x = torch.randn(m, layout.k)
    whole = reference.float8_matmul(x, layout)
    monkeypatch.setattr(reference, "FLOAT8_TRANSIENT_BYTES", 1)
    assert reference.float8_columns(layout.n, m) == 256
    assert torch.equal(reference.float8_matmul(x, layout), whole)


@pytest.mark.parametrize("m", [1, 64])
def test_transient_memory_stays_under_32_mib_at_a_128256_vocab(build, m):
    """Beyond the result, neither kernel holds more than 32 MiB (the reference used to hold
    128 rows x vocab in float32 several times over)."""
    n, k = 128256, 128
    values = e2m1_values(n, k, torch.Generator().manual_seed(0))
    layout = Float8Layout.build(values, torch.rand(1, n), round_to=BF16)
    x = torch.randn(m, k).to(BF16)
    result = m * n * 4
    assert peak_transient_bytes(lambda: reference.float8_matmul(x, layout)) - result <= 32 * 2**20
    fast = CPUFloat8Layout.build(layout)
    assert peak_transient_bytes(lambda: build.matmul(x, fast)) - m * n * 2 <= 32 * 2**20

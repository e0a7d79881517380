"""quantreg's CPU kernel: every path against a float64 reference, and its use by the heads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from int_kernels import build_here

from quantreg.kernels import cpu_vnni
from quantreg.kernels.catalog import cpu_path
from quantreg.kernels.cpu import (
    amx_ready,
    block_columns,
    cpu_supports_avx512,
    extension,
    to_blocked,
)
from quantreg.platform import probe_cpu_isa

pytestmark = pytest.mark.skipif(not cpu_supports_avx512(), reason="needs AVX-512")


def kernels():
    """The compiled extension (built once per test run, cached on disk)."""
    return extension()


def bf16_paths() -> tuple[bool, bool]:
    """(vdpbf16ps, AMX) available to this process."""
    isa = probe_cpu_isa()
    dot = "avx512_bf16" in isa
    return dot, dot and {"amx_tile", "amx_bf16"} <= isa and amx_ready()


MODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
FLOAT32, DOT, AMX = 0, 1, 2


def case(bits: int, n: int, k: int, group: int, scale_dtype: torch.dtype, seed: int = 0):
    """Random codes, scales and zeros in the kernel's layout, and the weights they mean.

    Returns (codes, scales, zeros, rounded, raw): ``rounded`` is ``(q - z) * s`` rounded to the
    scale dtype (what the producers store), ``raw`` the same in float64 without rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    groups = 1 if group == -1 else -(-k // group)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 0.001).to(scale_dtype)
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen).to(torch.uint8)
    g = torch.arange(k) // (k if group == -1 else group)
    raw = (codes.double() - zeros[g].double()) * scales[g].double()  # [K, N]
    return (
        to_blocked(codes, bits),
        block_columns(scales),
        block_columns(zeros),
        raw.to(scale_dtype),
        raw,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def needs(path: int) -> None:
    dot, amx = bf16_paths()
    if path == DOT and not dot:
        pytest.skip("this CPU has no AVX512-BF16")
    if path == AMX and not amx:
        pytest.skip("this CPU or OS gives no AMX")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize(
    "scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize("m", [1, 5, 13])
def test_float32_path_reproduces_rounded_weights(bits, group, scale_dtype, m):
    n, k = 64, 256
    codes, scales, zeros, rounded, _ = case(bits, n, k, group, scale_dtype)
    x = torch.randn(m, k)
    mode = MODES[scale_dtype]
    out = kernels().wna16_gemm(x, codes, scales, zeros, bits, group, mode, FLOAT32)
    assert rel_err(out, x.double() @ rounded.double()) < 1e-5
    eye = kernels().wna16_gemm(torch.eye(k), codes, scales, zeros, bits, group, mode, FLOAT32)
    assert torch.equal(eye, rounded.float())  # one-hot rows read each weight back exactly


# (n, k): odd block counts (an unpaired last block), K padded to 32, several groups
SHAPES = [(64, 256), (48, 200), (16, 96), (80, 1024)]


@pytest.mark.parametrize("path", [DOT, AMX], ids=["vdpbf16ps", "amx"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 17, 40])
def test_bf16_paths_stay_within_1e_3_of_float64(path, bits, group, shape, m):
    needs(path)
    n, k = shape
    if group > 0 and k < group:
        group = 32
    codes, scales, zeros, _, raw = case(bits, n, k, group, torch.bfloat16, seed=m)
    x = torch.randn(m, k).to(torch.bfloat16)
    out = kernels().wna16_gemm(x, codes, scales, zeros, bits, group, 2, path)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert rel_err(out, x.double() @ raw) < 1e-3


@pytest.mark.parametrize("path", [DOT, AMX], ids=["vdpbf16ps", "amx"])
def test_bf16_paths_agree_on_one_hot_rows(path):
    """Unit rows read each weight back: exact up to the float32 scale-and-shift of a group."""
    needs(path)
    codes, scales, zeros, _, raw = case(4, 32, 64, 32, torch.bfloat16)
    eye = torch.eye(64, dtype=torch.bfloat16)
    out = kernels().wna16_gemm(eye, codes, scales, zeros, 4, 32, 2, path)
    torch.testing.assert_close(out.double(), raw, rtol=1e-6, atol=1e-7)


def test_bad_geometry_is_refused():
    codes, scales, zeros, _, _ = case(4, 64, 256, 32, torch.float16)
    k = kernels()
    with pytest.raises(RuntimeError, match=r"scales and zeros must be \[N/16, ceil\(K / group"):
        k.wna16_gemm(torch.randn(2, 128), codes, scales, zeros, 4, 32, 1, FLOAT32)
    with pytest.raises(RuntimeError, match="codes size does not match N, K, bits"):
        k.wna16_gemm(torch.randn(2, 256), codes[:2], scales, zeros, 4, 32, 1, FLOAT32)
    with pytest.raises(RuntimeError, match="paths 1 and 2 take bfloat16 x"):
        k.wna16_gemm(torch.randn(2, 256), codes, scales, zeros, 4, 32, 1, DOT)
    with pytest.raises(RuntimeError, match="path 0 takes float32 x"):
        k.wna16_gemm(torch.randn(2, 256).bfloat16(), codes, scales, zeros, 4, 32, 1, FLOAT32)
    with pytest.raises(RuntimeError, match="group_size a multiple of 32"):
        k.wna16_gemm(torch.randn(2, 256), codes, scales, zeros, 4, 48, 1, FLOAT32)


@pytest.mark.parametrize(
    ("kernel", "dtype", "rows", "expected"),
    [
        ("cpu-avx512", torch.float32, 1, FLOAT32),
        ("cpu-amx", torch.float32, 64, FLOAT32),
        ("cpu-amx", torch.bfloat16, 1, DOT),
        ("cpu-amx", torch.float16, 1, DOT),
        ("cpu-amx", torch.bfloat16, 2, AMX),
        ("cpu-amx", torch.bfloat16, 64, AMX),
        ("cpu-avx512-bf16", torch.bfloat16, 64, DOT),
        ("cpu-avx512", torch.bfloat16, 64, FLOAT32),
    ],
    ids=["fp32-1", "fp32-64", "bf16-1", "fp16-1", "bf16-2", "bf16-64", "no-amx-64", "no-bf16-64"],
)
def test_the_path_is_chosen_by_kernel_dtype_and_rows(kernel, dtype, rows, expected):
    assert cpu_path(kernel, dtype, rows) == expected


def test_without_the_kernel_a_reason_is_logged_once():
    code = (
        "import logging, torch, quantreg; logging.basicConfig(level=logging.WARNING); "
        "from quantreg.kernels.cpu import extension; print(extension(), extension())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "QUANTREG_NO_CPU_KERNELS": "1"})  # fmt: skip
    assert out.stdout.strip() == "None None"
    assert (
        out.stderr.count("quantreg CPU kernels unavailable (QUANTREG_NO_CPU_KERNELS is set)") == 1
    )


HEADS = [
    ("awq", {"group_size": 64}),
    ("awq", {"group_size": 128}),
    ("gptq", {"bits": 8, "group_size": 32, "desc_act": True}),
    ("gptq", {"bits": 4, "group_size": 32, "desc_act": True}),
    ("gptq", {"bits": 8, "group_size": -1}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("family", "params"), HEADS, ids=["awq-g64", "awq-g128", "gptq8-actorder", "gptq4-actorder",
                                      "gptq8-channel"],
)  # fmt: skip
@pytest.mark.parametrize("m", [1, 9])
def test_cpu_wna16_runs_the_kernel(tmp_path, dtype, family, params, m):
    import quantreg

    weight = (torch.randn(1000, 256) * 0.05).half()
    quantreg.write_checkpoint(tmp_path, weight, family, **params)
    dot, amx = bf16_paths()
    if dtype != torch.float32 and not dot:
        pytest.skip("this CPU has no AVX512-BF16: half-precision heads take torch's ops")
    expected = "cpu-avx512" if dtype == torch.float32 else ("cpu-amx" if amx else "cpu-avx512-bf16")
    chosen = quantreg.load_lm_head(tmp_path, dtype=dtype).kernel.name
    # where AVX512-VNNI comes without AMX, half heads choose cpu-vnni-wna16 first
    vnni = not amx and dtype != torch.float32 and cpu_vnni.extension() is not None
    assert chosen == ("cpu-vnni-wna16" if vnni else expected)
    fast = quantreg.load_lm_head(tmp_path, dtype=dtype, kernel=expected)
    exact = quantreg.load_lm_head(tmp_path, dtype=torch.float32, requested=family)
    assert fast.kernel.name == expected
    x = torch.randn(m, 256)
    ref = exact.compute_logits(x).double()
    got = fast.compute_logits(x.to(dtype))
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got, ref) < tol
    bits = params.get("bits", 4)
    assert fast.resident_bytes() < (0.35 if bits == 4 else 0.65) * 1000 * 256 * 2


@pytest.mark.parametrize("bits", [4, 8])
def test_without_bf16_paths_half_heads_use_the_avx2_kernel_then_torch_ops(tmp_path, monkeypatch, bits):  # fmt: skip
    """Without AVX512-BF16 a bf16 head runs quantreg's AVX2 int kernel (every AVX-512 CPU has
    AVX2), or its AVX512-VNNI build; with quantreg's CPU kernels switched off, torch's ops."""
    import quantreg
    from quantreg.kernels import cpu_avx2

    monkeypatch.setenv("QUANTREG_NO_BF16", "1")
    params = {"bits": bits, "group_size": 128 if bits == 4 else -1, "sym": True}
    quantreg.write_checkpoint(tmp_path, (torch.randn(256, 256) * 0.05).half(), "gptq", **params)
    head = quantreg.load_lm_head(tmp_path, dtype=torch.bfloat16)
    if cpu_avx2.unavailable_reason() is None:
        assert head.kernel.name == build_here()  # its AVX512-VNNI build where the CPU has it
    monkeypatch.setenv("QUANTREG_NO_CPU_KERNELS", "1")
    head = quantreg.load_lm_head(tmp_path, dtype=torch.bfloat16)
    assert head.kernel.name == ("torch-int4pack" if bits == 4 else "torch-int8pack")

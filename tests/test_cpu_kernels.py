"""The AVX-512 weight-only kernel: exact and fast modes against a float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from quantreg.methods._cpu_kernels import cpu_supports_avx512, kernels, to_blocked

pytestmark = pytest.mark.skipif(not cpu_supports_avx512(), reason="needs AVX-512")


def case(bits: int, n: int, k: int, group: int, scale_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    groups = 1 if group == -1 else -(-k // group)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 0.001).to(scale_dtype)
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen).to(torch.uint8)
    size = k if group == -1 else group
    g = torch.arange(k) // size
    exact = ((codes.double() - zeros[g].double()) * scales[g].double()).to(scale_dtype)  # [K, N]
    return to_blocked(codes, bits), scales, zeros, exact


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize(
    "scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize("m", [1, 5, 6, 13])
def test_exact_mode_reproduces_rounded_weights(bits, group, scale_dtype, m):
    n, k = 64, 256
    blocked, scales, zeros, exact = case(bits, n, k, group, scale_dtype)
    x = torch.randn(m, k)
    mode = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}[scale_dtype]
    out = kernels().wna16_gemm(x, blocked, scales, zeros, bits, group, mode)
    ref = x.double() @ exact.double()
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    eye = kernels().wna16_gemm(torch.eye(k), blocked, scales, zeros, bits, group, mode)
    assert torch.equal(eye, exact.float())  # one-hot rows read each weight back exactly


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [64, -1])
def test_fast_mode_stays_within_1e_3(bits, group):
    blocked, scales, zeros, exact = case(bits, 128, 512, group, torch.float32)
    x = torch.randn(7, 512).to(torch.bfloat16).float()
    out = kernels().wna16_gemm(x, blocked, scales, zeros, bits, group, 0)
    ref = x.double() @ exact.double()
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-3


def test_bad_geometry_is_refused():
    blocked, scales, zeros, _ = case(4, 64, 256, 32, torch.float16)
    with pytest.raises(
        RuntimeError, match=r"scales and zeros must be \[ceil\(K / group_size\), N\]"
    ):
        kernels().wna16_gemm(torch.randn(2, 128), blocked, scales, zeros, 4, 32, 1)
    with pytest.raises(RuntimeError, match="blocked size does not match N, K, bits"):
        kernels().wna16_gemm(torch.randn(2, 256), blocked[:2], scales, zeros, 4, 32, 1)


def test_without_the_kernel_a_reason_is_logged_once(caplog):
    code = (
        "import logging, torch, quantreg; logging.basicConfig(level=logging.WARNING); "
        "from quantreg.methods._cpu_kernels import kernels; print(kernels(), kernels())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "QUANTREG_NO_CPU_KERNELS": "1"})  # fmt: skip
    assert out.stdout.strip() == "None None"
    assert (
        out.stderr.count("quantreg CPU kernels unavailable (QUANTREG_NO_CPU_KERNELS is set)") == 1
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("family", "params"), [("awq", {"group_size": 64}), ("gptq", {"bits": 8, "group_size": 32, "desc_act": True}), ("gptq", {"bits": 8, "group_size": -1})])  # fmt: skip
def test_cpu_wna16_runs_the_kernel(tmp_path, dtype, family, params):
    import quantreg

    weight = (torch.randn(1000, 256) * 0.05).half()
    quantreg.write_checkpoint(tmp_path, weight, family, **params)
    fast = quantreg.load_lm_head(tmp_path, dtype=dtype)
    exact = quantreg.load_lm_head(tmp_path, dtype=torch.float32, requested=family)
    torch_op_fits = dtype != torch.float32 and (family == "awq" or params["group_size"] == -1)
    assert fast.cpu_kernel == ("int4" if family == "awq" else "int8") if torch_op_fits else "avx512"
    x = torch.randn(9, 256)
    ref = exact.compute_logits(x).double()
    got = fast.compute_logits(x.to(dtype)).double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got - ref).abs().max() / ref.abs().max()) < tol
    bits = params.get("bits", 4)
    assert fast.resident_bytes() < (0.35 if bits == 4 else 0.65) * 1000 * 256 * 2

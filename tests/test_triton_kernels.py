"""The Triton kernels under the interpreter (no GPU in CI): fp16 / fp32 against exact dequant.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before any kernel module is imported when
no CUDA device is present. The interpreter computes bf16 wrongly, so bf16 is left to the GPU
check (``bench/gpu.py``).
"""

from __future__ import annotations

import pytest
import torch
from ckpt import load_regions
from safetensors.torch import load_file

import quantreg
from quantreg import ParallelLMHead
from quantreg.distributed import TPGroup

triton = pytest.importorskip("triton")

from quantreg.kernels import triton_wna16 as tk  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or tk.interpreting()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).abs().max() / ref.abs().max())


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-3


# writer, options: int4 groups, act-order (4 and 8 bits), int8 per-channel
SHARED = [
    ("awq", {"group_size": 128}),
    ("awq", {"group_size": 32}),
    ("gptq", {"bits": 4, "group_size": 32, "desc_act": True}),
    ("gptq", {"bits": 8, "group_size": 32, "desc_act": True}),
    ("gptq", {"bits": 8, "group_size": -1}),
]
SHARED_IDS = ["awq-g128", "awq-g32", "gptq4-actorder", "gptq8-actorder", "gptq8-channel"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize(("writer", "params"), SHARED, ids=SHARED_IDS)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_the_triton_kernel_matches_the_exact_kernel(tmp_path, dtype, writer, params, m):
    """Odd vocab (1000 rows, padded to 1024), K = 256: the k-packed layout of awq/gptq_marlin."""
    weight = (torch.randn(1000, 256) * 0.05).half()
    quantreg.write_checkpoint(tmp_path, weight, writer, **params)
    method = f"{writer}_marlin"
    head = quantreg.load_lm_head(tmp_path, dtype=dtype, requested=method, kernel="triton")
    exact = quantreg.load_lm_head(tmp_path, dtype=dtype, requested=method, kernel="reference")
    assert head.kernel.name == "triton" and head.kernel.requested
    x = torch.randn(m, 256).to(dtype)
    out = head.forward(x)
    assert out.dtype == dtype and out.shape == (m, head.output_size_per_partition)
    assert rel_err(out, exact.forward(x)) < tol(dtype)


def shard(folder, rank: int, size: int, method: str, kernel: str) -> ParallelLMHead:
    """Rank ``rank`` of ``size`` of the head, loaded region by region as the loader does."""
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(file)
    config = quantreg.resolve(folder, requested=method).config
    vocab, hidden = tensors["lm_head.scales"].shape[1], tensors["lm_head.qweight"].shape[0] * 8
    head = ParallelLMHead(vocab, hidden, params_dtype=torch.float16, quant_config=config,
                          prefix="lm_head", tp=TPGroup(None, rank, size))  # fmt: skip
    return load_regions(head, tensors, kernel)


def test_a_tensor_parallel_shard_matches_its_slice(tmp_path):
    weight = (torch.randn(1000, 128) * 0.05).half()
    quantreg.write_checkpoint(tmp_path, weight, "gptq", bits=4, group_size=32, desc_act=True)
    whole = quantreg.load_lm_head(tmp_path, dtype=torch.float16, requested="gptq_marlin")
    assert whole.kernel.name == "reference"  # on a CPU without request
    x = torch.randn(3, 128).half()
    full = whole.forward(x)
    for rank in (0, 1):
        head = shard(tmp_path, rank, 2, "gptq_marlin", "triton")
        assert head.kernel.name == "triton"
        out = head.forward(x)
        rows = head.num_embeddings_per_partition
        assert rel_err(out, full[:, rank * rows : (rank + 1) * rows]) < 2e-3


CT_SCHEMES = [
    {"format": "pack-quantized", "bits": 4, "group_size": 32},
    {"format": "pack-quantized", "bits": 4, "group_size": 64, "sym": False},
    {"format": "pack-quantized", "bits": 8, "strategy": "channel"},
    {"format": "int-quantized", "bits": 8, "strategy": "channel"},
    {"format": "pack-quantized", "bits": 4, "group_size": 32, "actorder": "group"},
]
CT_IDS = ["int4-g32", "int4-g64-asym", "int8-channel", "int8-unpacked", "int4-actorder"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("scheme", CT_SCHEMES, ids=CT_IDS)
def test_compressed_tensors_heads_match_the_reference(tmp_path, dtype, scheme):
    weight = (torch.randn(520, 192) * 0.05).half()
    quantreg.write_checkpoint(tmp_path, weight, "compressed-tensors", **scheme)
    reference = quantreg.load_lm_head(tmp_path, dtype=dtype, kernel="reference")
    head = quantreg.load_lm_head(tmp_path, dtype=dtype, kernel="triton")
    assert head.kernel.name == "triton" and not hasattr(head, "weight_packed")
    x = torch.randn(7, 192).to(dtype)
    assert rel_err(head.compute_logits(x), reference.compute_logits(x)) < tol(dtype)


def random_layout(bits: int, k: int, n: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    groups = -(-k // group)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen).to(torch.uint8)
    rows = torch.arange(k) // group
    weight = ((codes - zeros[rows].int()).double() * scales[rows].double()).half()  # [K, N]
    return quantreg.pack_codes(codes, bits, dim=0), scales, zeros, weight


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [8, 24, 128], ids=["g8", "g24", "g128"])
def test_group_sizes_off_the_block_grid_take_the_per_row_path(bits, group):
    wq, scales, zeros, weight = random_layout(bits, 200, 48, group)
    x = torch.randn(4, 200).half()
    out = tk.wna16_matmul(x, wq, scales, zeros, bits=bits, group=group)
    assert rel_err(out, x.double() @ weight.double()) < 2e-3


def test_a_head_with_groups_off_the_grid_reads_them_per_row(tmp_path):
    """compressed-tensors allows any group size; g8 is below tl.dot's K block of 16."""
    weight = (torch.randn(100, 64) * 0.05).half()
    quantreg.write_checkpoint(tmp_path, weight, "compressed-tensors", bits=4, group_size=8)
    reference = quantreg.load_lm_head(tmp_path, dtype=torch.float16, kernel="reference")
    head = quantreg.load_lm_head(tmp_path, dtype=torch.float16, kernel="triton")
    x = torch.randn(3, 64).half()
    assert rel_err(head.compute_logits(x), reference.compute_logits(x)) < 2e-3
    layout = head.kernel.layout
    assert layout.group_size == 8 and layout.row_groups.tolist() == [row // 8 for row in range(64)]


def test_irregular_groups_name_every_row():
    wq, scales, zeros, weight = random_layout(4, 96, 32, 32)
    bounds = [0, 20, 64, 96]  # uneven groups: each row's group comes from gidx
    gidx = torch.bucketize(torch.arange(96), torch.tensor(bounds[1:]), right=True).int()
    weight = ((quantreg.unpack_codes(wq, 4, dim=0) - zeros[gidx].int()).double()
              * scales[gidx].double()).half()  # fmt: skip
    x = torch.randn(2, 96).half()
    out = tk.wna16_matmul(x, wq, scales, zeros, bits=4, group=None, gidx=gidx)
    assert rel_err(out, x.double() @ weight.double()) < 2e-3
    with pytest.raises(ValueError, match="irregular groups need gidx"):
        tk.wna16_matmul(x, wq, scales, zeros, bits=4, group=None)


@pytest.mark.parametrize("m", [1, 16, 40, 100])
def test_every_candidate_configuration_gives_the_same_result(m):
    wq, scales, zeros, weight = random_layout(4, 256, 128, 64)
    x = torch.randn(m, 256).half()
    ref = x.double() @ weight.double()
    configs = tk.candidates(m, 128, 256, 64)
    assert configs and configs[0].block_m == (16 if m <= 16 else 32 if m <= 32 else 64)
    for cfg in configs:
        assert rel_err(tk.wna16_matmul(x, wq, scales, zeros, bits=4, group=64, config=cfg),
                       ref) < 2e-3, cfg  # fmt: skip


def test_on_the_cpu_the_methods_keep_the_exact_path(tmp_path, monkeypatch):
    """Triton runs CUDA heads; on a CPU only when requested (under the interpreter)."""
    quantreg.write_checkpoint(tmp_path, (torch.randn(64, 64) * 0.05).half(), "awq", group_size=32)
    head = quantreg.load_lm_head(tmp_path, dtype=torch.float16, requested="awq_marlin")
    assert head.kernel.name == "reference"
    assert dict(head.kernel.declined)["triton"].startswith("runs on CUDA")
    called = []
    monkeypatch.setattr(tk, "triton_matmul", lambda *a, **k: called.append(1))
    head.compute_logits(torch.randn(2, 64).half())
    assert not called


def test_without_triton_the_error_names_the_extra(monkeypatch):
    monkeypatch.setattr(tk, "triton", None)
    assert not tk.triton_ready(torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"pip install 'quantreg\[gpu\]'"):
        tk.wna16_matmul(torch.randn(1, 8), torch.zeros(1, 8, dtype=torch.int32),
                        torch.ones(1, 8), torch.zeros(1, 8, dtype=torch.uint8), bits=4, group=8)  # fmt: skip


@pytest.mark.slow
def test_the_gpu_bench_script_runs_its_cpu_smoke(tmp_path, monkeypatch, capsys):
    """``bench/gpu.py`` is prepared for the GPU machine; its logic runs here on the interpreter
    (in this process: TRITON_INTERPRET=1 is already set, see conftest)."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("quantreg_gpu_check", script)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu.main(["--cpu-smoke", "--json", str(tmp_path / "g.json"),
                     "--append-results", str(tmp_path / "R.md"),
                     "--save-tuned", str(tmp_path / "tuned.json")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["machine"]["card"] == "CPU (Triton interpreter)"
    assert result["machine"]["copy GB/s"] > 0
    checks = result["correctness"]
    assert checks and all(c["ok"] for c in checks)
    cases = {c["case"].split(" N=")[0] for c in checks}
    assert {"int4 g128", "int4 g128 act-order", "int8 channel"} <= cases
    assert {"fp8 channel", "fp8 block", "nvfp4"} <= cases
    assert {c["case"].split(" N=")[1] for c in checks if " N=" in c["case"]} == {"1000"}
    fixtures = Path(__file__).parent / "fixtures" / "producers"
    quantized = {p.parent.name for p in fixtures.glob("*/reference.safetensors")
                 if "lm_head.weight_dequant" in load_file(p)}  # fmt: skip
    loaded = {
        c["case"].removeprefix("checkpoint ") for c in checks if c["case"][:10] == "checkpoint"
    }
    assert len(quantized) >= 18 and loaded == quantized
    kernels = {c["case"]: c["kernel"] for c in checks if "kernel" in c}
    assert kernels["checkpoint gptq_gptqmodel_lmhead_desc_act"] == "triton"
    assert kernels["checkpoint modelopt_nvfp4_lmhead"] == "triton-float8"
    sharded = [c for c in checks if c["case"].startswith("tp=2")]
    assert len(sharded) == 2 and {c["rows_per_rank"] for c in sharded} == {512}
    assert all(f"quantreg {kind} ms" in row and f"quantreg {kind} GB/s" in row
               for row in result["timings"] for kind in ("fp8 channel", "fp8 block", "nvfp4"))  # fmt: skip
    assert all(lo <= row["bf16 cuBLAS ms"] <= hi for row in result["timings"]
               for lo, hi in [row["bf16 cuBLAS spread"]])  # fmt: skip
    assert {row["M"] for row in result["timings"]} == {1, 17}
    section = (tmp_path / "R.md").read_text()
    assert "| N | K | M | bf16 cuBLAS ms |" in section and "failed: none" in section
    assert "Each call launched from Python (eager)" in section and "CUDA graph" not in section
    assert "`python bench/gpu.py --cpu-smoke --json" in section
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    assert tuned["cards"]["CPU (Triton interpreter)"]["configs"] == {}  # nothing timed on a CPU
    skip_all = [arg for name in gpu.SECTIONS for arg in ("--skip", name)]
    assert gpu.main(["--cpu-smoke", *skip_all, "--json", str(tmp_path / "none.json")]) == 0
    nothing = json.loads((tmp_path / "none.json").read_text())
    assert nothing["correctness"] == [] and nothing["timings"] == []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as refused:
        gpu.main(["--cpu-smoke"])
    assert refused.value.code == 2 and "set TRITON_INTERPRET=1" in capsys.readouterr().err

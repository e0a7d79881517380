"""One kernel choice per head, made once at load and recorded: the decision table (on any
machine: the CPU's features and the kernel's build are faked), the layouts, and what a head,
``run --json`` and the bench report."""

from __future__ import annotations

import json

import pytest
import torch
from int_weights import random_int_weights

import quantreg
from quantreg import CheckpointError, InputError, IntWeights, Platform
from quantreg.kernels import cpu, cpu_avx2, kernel_names
from quantreg.kernels.cpu import from_blocked, to_blocked
from quantreg.kernels.layouts import Float8Layout, KPackedLayout
from quantreg.kernels.reference import reference_matmul
from quantreg.kernels.selection import choose, select

BASE = frozenset(cpu.BASE_FLAGS)
BF16 = BASE | set(cpu.BF16_FLAGS)
AMX = BF16 | set(cpu.AMX_FLAGS)
AVX2 = frozenset(cpu_avx2.FLAGS)


def weights(
    bits: int = 4, n: int = 128, k: int = 256, group: int = 128, act_order: bool = False,
    uneven: bool = False, sym: bool = False, seed: int = 0,
) -> IntWeights:  # fmt: skip
    return random_int_weights(bits, n, k, group, sym=sym, act_order=act_order, uneven=uneven,
                              seed=seed)  # fmt: skip


def dense_weight_t(w: IntWeights) -> torch.Tensor:
    """``W.T`` ``[K, N]`` as the producers store it (rounded to the scale dtype)."""
    g = torch.bucketize(torch.arange(w.k), torch.tensor(w.bounds[1:]), right=True)
    rows = w.sorted_codes(0, w.n)
    deq = (rows - w.zeros[g].to(torch.int32)).float() * w.scales[g].float()
    out = torch.empty_like(deq)
    order = w.perm if w.perm is not None else torch.arange(w.k)
    out[order] = deq.to(w.scales.dtype).float()
    return out


@pytest.fixture
def cpu_kernel_builds(monkeypatch):
    """Pretend quantreg's CPU kernels built and the OS grants AMX (the decision only)."""
    monkeypatch.setattr(cpu, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpu_avx2, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpu, "amx_ready", lambda: True)


BF = torch.bfloat16
F32 = torch.float32

# (weights, dtype, device, platform, expected kernel, a declined kernel and its reason)
DECISIONS = {
    "fp32-takes-the-exact-fma-path": (weights(), F32, "cpu", Platform("cpu", cpu_isa=AMX), "cpu-avx512", ("torch-int4pack", "serves bf16 / fp16 heads only")),
    "bf16-amx": (weights(), BF, "cpu", Platform("cpu", cpu_isa=AMX), "cpu-amx", ("reference", "cpu-amx fits and comes first")),
    "bf16-without-amx": (weights(), BF, "cpu", Platform("cpu", cpu_isa=BF16), "cpu-avx512-bf16", ("cpu-amx", "this CPU lacks amx_tile/amx_bf16")),
    "bf16-without-bf16-int4": (weights(), BF, "cpu", Platform("cpu", cpu_isa=BASE), "torch-int4pack", ("cpu-avx512-bf16", "this CPU lacks avx512_bf16")),
    "bf16-without-bf16-int8-channel": (weights(8, group=256, sym=True), BF, "cpu", Platform("cpu", cpu_isa=BASE), "torch-int8pack", ("torch-int4pack", "takes 4-bit codes; these are 8-bit")),
    "bf16-without-bf16-odd-n": (weights(n=48, group=32), BF, "cpu", Platform("cpu", cpu_isa=BASE), "cpu-avx512", ("torch-int4pack", "needs the output size to be a multiple of 64; it is 48")),
    "bf16-int8-asym-without-bf16": (weights(8, group=256), BF, "cpu", Platform("cpu", cpu_isa=BASE), "cpu-avx512", ("torch-int8pack", "takes symmetric codes (zero point 128)")),
    "bf16-avx2-int4": (weights(), BF, "cpu", Platform("cpu", cpu_isa=AVX2), "cpu-avx2-wna16", ("torch-int4pack", "cpu-avx2-wna16 fits and comes first")),
    "bf16-avx2-int8-zero-points": (weights(8, group=256), BF, "cpu", Platform("cpu", cpu_isa=AVX2), "cpu-avx2-wna16", ("cpu-avx512-bf16", "this CPU lacks avx512f")),
    "bf16-avx2-group-16": (weights(group=16), BF, "cpu", Platform("cpu", cpu_isa=AVX2), "cpu-avx2-wna16", ("cpu-amx", "a multiple of 32 (or one group); it is 16")),
    "fp32-avx2-takes-the-reference": (weights(), F32, "cpu", Platform("cpu", cpu_isa=AVX2), "reference", ("cpu-avx2-wna16", "float32 heads get the producers' exact weights")),
    "bf16-act-order-unequal-groups": (weights(act_order=True, uneven=True), BF, "cpu", Platform("cpu", cpu_isa=AMX), "reference", ("cpu-amx", "needs groups of equal size")),
    "group-16-off-the-32-grid": (weights(group=16), BF, "cpu", Platform("cpu", cpu_isa=AMX), "reference", ("cpu-amx", "a multiple of 32 (or one group); it is 16")),
    "cuda-9.0": (weights(), BF, "cuda", Platform("cuda", (9, 0), triton=True), "triton", ("cpu-amx", "runs on the CPU; the layer is on cuda")),
    "cuda-7.5": (weights(), BF, "cuda", Platform("cuda", (7, 5), triton=True), "reference", ("triton", "needs CUDA compute capability >= 8.0")),
    "cuda-without-triton": (weights(), BF, "cuda", Platform("cuda", (9, 0), triton=False), "reference", ("triton", "triton is not installed")),
    "cpu-never-picks-triton": (weights(), F32, "cpu", Platform("cpu", cpu_isa=frozenset()), "reference", ("triton", "runs on CUDA (on a CPU only through TRITON_INTERPRET=1, when requested)")),
    "fp8-runs-exact": (Float8Layout.build(torch.zeros(64, 32).to(torch.float8_e4m3fn), torch.ones(1, 64).half()), BF, "cpu", Platform("cpu", cpu_isa=AMX), "reference", ("cpu-amx", "runs integer (int4 / int8) weights only")),
}  # fmt: skip


@pytest.mark.parametrize(
    ("w", "dtype", "device", "platform", "expected", "declined"),
    list(DECISIONS.values()),
    ids=list(DECISIONS),
)
def test_the_first_kernel_that_fits_wins(cpu_kernel_builds, w, dtype, device, platform, expected, declined):  # fmt: skip
    choice = choose(w, dtype=dtype, device=device, platform=platform)
    assert choice.name == expected and not choice.requested
    reasons = dict(choice.declined)
    assert set(reasons) == set(kernel_names()) - {expected}
    name, why = declined
    assert why in reasons[name]


@pytest.mark.parametrize(
    ("env", "expected", "reason"),
    [
        ("QUANTREG_NO_AMX", "cpu-avx512-bf16", "QUANTREG_NO_AMX is set"),
        ("QUANTREG_NO_BF16", "torch-int4pack", "QUANTREG_NO_BF16 is set"),
        ("QUANTREG_NO_CPU_KERNELS", "torch-int4pack", "QUANTREG_NO_CPU_KERNELS is set"),
    ],
    ids=["no-amx", "no-bf16", "no-cpu-kernels"],
)
def test_environment_switches_decline_with_their_name(cpu_kernel_builds, monkeypatch, env, expected, reason):  # fmt: skip
    monkeypatch.setenv(env, "1")
    choice = choose(weights(), dtype=BF, device="cpu", platform=Platform("cpu", cpu_isa=AMX))
    assert choice.name == expected and dict(choice.declined)["cpu-amx"] == reason


def test_an_os_without_amx_tile_state_is_named(cpu_kernel_builds, monkeypatch):
    monkeypatch.setattr(cpu, "amx_ready", lambda: False)
    choice = choose(weights(), dtype=BF, device="cpu", platform=Platform("cpu", cpu_isa=AMX))
    assert choice.name == "cpu-avx512-bf16"
    assert dict(choice.declined)["cpu-amx"] == "the OS refused this process the AMX tile state"


def test_a_method_restricts_the_kernels_and_says_so(cpu_kernel_builds):
    choice = choose(weights(), dtype=BF, device="cpu", platform=Platform("cpu", cpu_isa=AMX),
                    allowed=("triton", "reference"))  # fmt: skip
    assert choice.name == "reference"
    assert dict(choice.declined)["cpu-amx"] == "not among this method's kernels (triton, reference)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requested": "fastest"}, r"unknown kernel 'fastest'; quantreg's kernels: cpu-amx, "),
        ({"allowed": ("reference", "magic")}, r"unknown kernel 'magic'"),
        ({"requested": "cpu-amx", "allowed": ("reference",)}, r"kernel 'cpu-amx' was requested, but this method runs only reference"),
        ({"requested": "torch-int4pack"}, r"kernel 'torch-int4pack' cannot run this layer: serves bf16 / fp16 heads only"),
    ],
    ids=["unknown", "unknown-allowed", "not-allowed", "cannot-run"],
)  # fmt: skip
def test_bad_kernel_requests_are_input_errors(kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        choose(weights(), dtype=F32, device="cpu", platform=Platform("cpu", cpu_isa=frozenset()),
               **kwargs)  # fmt: skip
    assert info.value.field == "kernel"


def test_a_requested_kernel_is_recorded_as_requested():
    kernel = select(weights(), dtype=F32, device="cpu", requested="reference", what="lm_head")
    assert kernel.name == "reference" and kernel.requested
    assert kernel.reason.startswith("requested; exact block-wise dequantization")
    assert set(dict(kernel.declined).values()) == {"not requested"}


def test_kernel_reports_are_json_safe_and_name_every_decline():
    kernel = select(weights(), dtype=F32, device="cpu", allowed=("reference",))
    data = json.loads(json.dumps(kernel.to_dict()))
    assert data["name"] == "reference" and data["layout"] == "KPackedLayout"
    assert set(data["declined"]) == set(kernel_names()) - {"reference"}
    text = kernel.explain()
    assert text.startswith("  kernel: reference (") and "    - triton: not among" in text
    assert set(kernel.tensors()) == {"codes", "scales", "zeros", "row_groups"} - (
        set() if kernel.layout.row_groups is not None else {"row_groups"}
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [256, 200, 32], ids=["k256", "k200-padded", "k32"])
def test_the_cpu_layout_is_a_lossless_reordering_of_the_codes(bits, k):
    codes = torch.randint(0, 1 << bits, (k, 48), dtype=torch.int32)
    blocked = to_blocked(codes, bits)
    assert blocked.dtype == torch.uint8 and blocked.shape[0] == 48 // 16
    assert torch.equal(from_blocked(blocked, bits, k), codes)


@pytest.mark.parametrize(
    ("w", "group_size"),
    [(weights(), 128), (weights(8, group=256), 256), (weights(act_order=True), 128),
     (weights(act_order=True, uneven=True), None), (weights(group=8), 8)],
    ids=["int4-g128", "int8-channel", "act-order", "act-order-uneven", "g8"],
)  # fmt: skip
def test_the_k_packed_layout_reproduces_the_producers_weights(w, group_size):
    layout = KPackedLayout.build(w)
    assert layout.group_size == group_size and layout.k == w.k and layout.n == w.n
    eye = torch.eye(w.k)
    x = eye if layout.perm is None else eye.index_select(-1, layout.perm)
    assert torch.equal(reference_matmul(x, layout), dense_weight_t(w))


def test_int_weights_check_what_they_are_given():
    with pytest.raises(InputError, match=r"IntWeights takes 4- or 8-bit codes, got 3"):
        IntWeights.create(bits=3, k=8, codes=lambda a, b: None, scales=torch.ones(1, 8),
                          zeros=torch.zeros(1, 8))  # fmt: skip
    with pytest.raises(InputError, match=r"scales and zeros must both be \[G, N\]"):
        IntWeights.create(bits=4, k=8, codes=lambda a, b: None, scales=torch.ones(1, 8),
                          zeros=torch.zeros(2, 8))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"lm_head.g_idx\[2\] = 5 is outside the 2 groups of lm_head.scales") as info:  # fmt: skip
        IntWeights.create(bits=4, k=4, codes=lambda a, b: None, scales=torch.ones(2, 8),
                          zeros=torch.zeros(2, 8), g_idx=torch.tensor([0, 1, 5, 1]),
                          names=("lm_head.g_idx", "lm_head.scales"))  # fmt: skip
    assert info.value.tensor == "lm_head.g_idx"


# -- heads record their kernel ------------------------------------------------------------------


def test_a_loaded_head_records_its_kernel_and_explains_it(tmp_path, caplog):
    quantreg.write_checkpoint(tmp_path, (torch.randn(128, 64) * 0.05).half(), "awq", group_size=32)
    with caplog.at_level("INFO", logger="quantreg"):
        head = quantreg.load_lm_head(tmp_path, dtype=torch.float32, requested="awq")
    assert head.kernel.name == "reference"
    assert "kernel: reference (" in head.explain() and "method: awq" in head.explain()
    assert head.report()["kernel"]["name"] == "reference"
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert any(line.startswith("lm_head: kernel reference (") for line in lines)
    assert any("method awq, kernel reference" in line for line in lines)


def test_a_platform_of_another_device_kind_is_refused(tmp_path):
    quantreg.write_checkpoint(tmp_path, (torch.randn(128, 64) * 0.05).half(), "awq", group_size=32)
    with pytest.raises(InputError, match=r"platform 'cuda:9.0' describes a cuda device, but the head is loaded on 'cpu'") as info:  # fmt: skip
        quantreg.load_lm_head(tmp_path, platform="cuda:9.0", device="cpu")
    assert info.value.field == "platform"
    assert quantreg.load_lm_head(tmp_path, platform="cpu").resolution.platform == Platform("cpu")


def test_a_forced_kernel_the_method_does_not_run_is_refused(tmp_path):
    quantreg.write_checkpoint(tmp_path, (torch.randn(128, 64) * 0.05).half(), None)
    with pytest.raises(InputError, match=r"kernel 'reference' was requested, but 'lm_head' resolved as unquantized runs dense"):  # fmt: skip
        quantreg.load_lm_head(tmp_path, kernel="reference")
    quantreg.write_checkpoint(tmp_path / "awq", (torch.randn(128, 64) * 0.05).half(), "awq", group_size=32)  # fmt: skip
    with pytest.raises(InputError, match=r"kernel 'triton' was requested, but this method runs only reference"):  # fmt: skip
        quantreg.load_lm_head(tmp_path / "awq", requested="awq", kernel="triton")


class FakeExtension:
    """quantreg's C++ kernel, emulated from its documented layout (any machine can check that
    ``CPUBlockedLayout`` and the call hand the kernel what it expects)."""

    def wna16_gemm(self, x, codes, scales, zeros, bits, group, rounding, path):  # type: ignore[no-untyped-def]
        k, n = x.shape[1], codes.shape[0] * 16
        q = from_blocked(codes, bits, k)
        s = scales.permute(1, 0, 2).reshape(-1, n)
        z = zeros.permute(1, 0, 2).reshape(-1, n)
        g = torch.arange(k) // group
        w = (q - z[g].to(torch.int32)).float() * s[g].float()
        if rounding in (cpu.ScaleRounding.FP16, cpu.ScaleRounding.BF16):
            w = w.to(torch.float16 if rounding == cpu.ScaleRounding.FP16 else BF).float()
        assert x.dtype == (F32 if path == cpu.CPUPath.FMA else BF) and x.is_contiguous()
        return x.float() @ w


@pytest.mark.parametrize("w", [weights(), weights(8, group=256), weights(act_order=True, group=64)],
                         ids=["int4-g128", "int8-channel", "act-order"])  # fmt: skip
@pytest.mark.parametrize("kernel", ["cpu-avx512", "cpu-amx"])
def test_the_cpu_kernel_is_handed_its_documented_layout(cpu_kernel_builds, monkeypatch, w, kernel):
    monkeypatch.setattr(cpu, "extension", lambda: FakeExtension())
    exact = select(w, dtype=F32, device="cpu", requested="reference")
    fast = select(w, dtype=F32 if kernel == "cpu-avx512" else BF, device="cpu", requested=kernel,
                  platform=Platform("cpu", cpu_isa=AMX))  # fmt: skip
    assert fast.layout.rounding == cpu.ScaleRounding.FP16
    x = torch.randn(5, w.k)
    ref = exact(x).double()
    out = fast(x if kernel == "cpu-avx512" else x.to(BF)).double()
    tol = 1e-5 if kernel == "cpu-avx512" else 1e-2
    assert float((out - ref).abs().max() / ref.abs().max()) < tol


def test_run_names_and_forces_the_kernel(tmp_path):
    from cli_runner import run_cli

    quantreg.write_checkpoint(tmp_path, (torch.randn(128, 64) * 0.05).half(), "gptq", group_size=32)  # fmt: skip
    out = run_cli("run", str(tmp_path), "--dtype", "float32", "--kernel", "reference", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["method"], data["kernel"]) == ("cpu_wna16", "reference")
    text = run_cli("run", str(tmp_path), "--dtype", "float32")
    assert "\nkernel: " in text.stdout and "method: cpu_wna16" in text.stdout
    bad = run_cli("run", str(tmp_path), "--kernel", "fastest")
    assert bad.returncode == 1 and "unknown kernel 'fastest'" in bad.stderr


def test_methods_read_an_engine_layers_geometry_from_its_vllm_attributes():
    """Inside vLLM a method serves vLLM's own ParallelLMHead: quantreg reads its attributes."""
    from types import SimpleNamespace

    layer = torch.nn.Module()
    layer.prefix, layer.params_dtype = "lm_head", torch.bfloat16
    layer.input_size_per_partition, layer.output_size_per_partition = 64, 512
    layer.org_vocab_size, layer.tp_rank, layer.tp_size = 1000, 1, 2
    layer.shard_indices = SimpleNamespace(org_vocab_start_index=512)
    geometry = quantreg.layer_geometry(layer)
    assert geometry == quantreg.LayerGeometry("lm_head", 64, 1000, 512, 512, torch.bfloat16, 1, 2)
    assert geometry.output_stop == 1000
    with pytest.raises(quantreg.MethodDefinitionError, match="carries no LayerGeometry"):
        quantreg.layer_geometry(torch.nn.Module())

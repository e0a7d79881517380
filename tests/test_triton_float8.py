"""The Triton float8 / NVFP4 kernel (``triton-float8``) under the interpreter, against the exact
reference ``float8_matmul``.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` when no CUDA device is present; on a CPU the
kernel runs only when requested by name. Tolerances (largest error over the largest logit,
on the kernel's float32 output): 1e-5 for float32 activations (no rounding but the producers'),
1e-3 for float16 and 5e-3 for bfloat16 (the weight is rounded once more, to the activation
dtype, for ``tl.dot``).
"""

from __future__ import annotations

import pytest
import torch
from ckpt import load_regions
from safetensors.torch import load_file

import quantreg
from quantreg import ParallelLMHead
from quantreg.distributed import TPGroup
from quantreg.kernels import Float8Layout, IntWeights, choose
from quantreg.kernels.reference import float8_matmul
from quantreg.platform import Platform

triton = pytest.importorskip("triton")

from quantreg.kernels import triton_float8 as tf  # noqa: E402
from quantreg.kernels.triton_wna16 import interpreting  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).abs().max() / ref.abs().max())


def layout(n: int, k: int, group: int | None, *, scale_dtype=torch.float32, e2m1=False,
           zeros=False, g_idx=None, round_to=None, seed=0) -> Float8Layout:  # fmt: skip
    """Random float8 values (or e2m1 values stored as float8) with ``[G, N]`` scales; ``group``
    None: one group (per-tensor / per-channel)."""
    gen = torch.Generator().manual_seed(seed)
    if e2m1:
        sign = torch.randint(0, 2, (n, k), generator=gen) * 2 - 1
        values = E2M1[torch.randint(0, 8, (n, k), generator=gen)] * sign
    else:
        values = (torch.randn(n, k, generator=gen) * 64).clamp(-448, 448)
    if g_idx is None and group is not None:
        g_idx = torch.arange(k) // group
    groups = 1 if g_idx is None else int(g_idx.max()) + 1
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 0.001).to(scale_dtype)
    zero = torch.randn(groups, n, generator=gen) * 4 if zeros else None
    return Float8Layout.build(values.to(torch.float8_e4m3fn).to(DEVICE), scales.to(DEVICE),
                              None if zero is None else zero.to(DEVICE),
                              None if g_idx is None else g_idx.to(DEVICE), round_to=round_to)  # fmt: skip


# id: (N, K, group, options, value bits the kernel reads, how it reads the groups)
CASES = {
    "per-tensor": (300, 256, None, {}, 8, "whole"),
    "per-channel-bf16-scales": (300, 192, None, {"scale_dtype": torch.bfloat16}, 8, "whole"),
    "block128-ragged": (300, 200, 128, {}, 8, "g128"),
    "nvfp4-g16-round-to-bf16": (300, 256, 16, {"e2m1": True, "round_to": torch.bfloat16}, 4, "g16"),
    "g8-fp16-scales": (100, 64, 8, {"scale_dtype": torch.float16}, 8, "g8"),
    "g24-fp16-scales-zeros": (200, 96, 24, {"scale_dtype": torch.float16, "zeros": True}, 8, "columns"),
}  # fmt: skip


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_the_kernel_matches_the_reference(case, dtype, m):
    n, k, group, options, bits, reads = CASES[case]
    exact = layout(n, k, group, **options)
    fast = tf.TritonFloat8Layout.build(exact)
    assert fast.value_bits == bits and (fast.col_groups is not None) == (reads == "columns")
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = tf.triton_float8_matmul(x, fast)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert tf.triton_float8_matmul(x[:0], fast).shape == (0, n)
    assert rel_err(out, float8_matmul(x, exact)) < TOL[dtype]


def test_every_float8_byte_and_e2m1_code_decodes_exactly():
    """``x = I`` in float32 gives the weights themselves: every finite e4m3 byte (subnormals,
    -0, 448) times its scale, rounded to the bfloat16 scale dtype, bit for bit; the same for
    the 16 e2m1 codes, packed two a byte."""
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    rows = torch.stack([finite.roll(r)[:240] for r in range(24)]).view(torch.float8_e4m3fn)
    codes = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    e2m1 = torch.stack([codes.roll(r).repeat(15) for r in range(24)]).to(torch.float8_e4m3fn)
    scales = torch.rand(1, 24, generator=torch.Generator().manual_seed(1)).bfloat16() + 0.5
    for values, bits in ((rows, 8), (e2m1, 4)):
        exact = Float8Layout.build(values.to(DEVICE), scales.to(DEVICE))
        fast = tf.TritonFloat8Layout.build(exact)
        assert fast.value_bits == bits
        eye = torch.eye(240, device=DEVICE)
        assert torch.equal(tf.triton_float8_matmul(eye, fast), float8_matmul(eye, exact))


@pytest.mark.parametrize(
    ("values", "packed"),
    [
        ([[0.5, -6.0, -0.0, 3.0]], [[0xF1, 0x58]]),  # code 2j in the low nibble, 2j + 1 high
        ([[0.5, -6.0, 0.25, 3.0]], None),  # 0.25 is no e2m1 number: the fp8 bytes stay
        ([[0.5, -6.0, 3.0]], None),  # odd K: no whole bytes
    ],
    ids=["e2m1", "not-e2m1", "odd-k"],
)
def test_e2m1_values_are_packed_as_compressed_tensors_packs_them(values, packed):
    raw = torch.tensor(values).to(torch.float8_e4m3fn).view(torch.uint8)
    got = tf.pack_e2m1(raw)
    assert (got is None and packed is None) or got.tolist() == packed


@pytest.mark.parametrize(
    ("group", "block_k", "read"),
    [
        (tf.WHOLE, 128, tf.GroupRead.WIDE),
        (128, 64, tf.GroupRead.WIDE),
        (48, 16, tf.GroupRead.WIDE),
        (16, 128, tf.GroupRead.NARROW),
        (48, 64, tf.GroupRead.COLUMN),
        (None, 64, tf.GroupRead.COLUMN),
    ],
    ids=["whole", "g128-k64", "g48-k16", "g16-k128", "g48-k64", "irregular"],
)
def test_the_group_size_decides_how_a_k_block_reads_scales(group, block_k, read):
    assert tf.group_read(group, block_k) is read


@pytest.mark.parametrize("case", ["block128-ragged", "nvfp4-g16-round-to-bf16"])
def test_every_candidate_configuration_gives_the_same_result(case):
    """The tuned choice never changes the numbers: every candidate, and a K block off the
    groups' grid (read a column at a time), within the float16 tolerance."""
    n, k, group, options, _, _ = CASES[case]
    exact = layout(n, k, group, **options, seed=3)
    fast = tf.TritonFloat8Layout.build(exact)
    x = torch.randn(3, k, device=DEVICE).half()
    ref = float8_matmul(x, exact)
    configs = tf.candidates(3, k, group)
    assert configs[0].block_m == 16 and len({c.block_k for c in configs}) == 2
    for cfg in [*configs, tf.Config(16, 64, 32 if group == 128 else 16, 2)]:
        assert rel_err(tf.triton_float8_matmul(x, fast, cfg), ref) < TOL[torch.float16], cfg


def test_irregular_and_act_order_groups_name_every_column():
    """Unequal groups read a group per column; act-order columns come sorted (``perm``) and
    ``x`` is permuted by the caller, as for every kernel."""
    uneven = torch.bucketize(torch.arange(96), torch.tensor([20, 64]), right=True)
    scattered = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 96, device=DEVICE).half()
    for g_idx in (uneven, scattered):
        exact = layout(100, 96, None, g_idx=g_idx)
        fast = tf.TritonFloat8Layout.build(exact)
        assert fast.col_groups is not None and fast.perm is exact.perm
        assert rel_err(tf.triton_float8_matmul(x, fast), float8_matmul(x, exact)) < 1e-3


FP8 = layout(64, 64, None)
CUDA = Platform("cuda", (9, 0), triton=True)
# id: (weights, dtype, device, platform, requested, chosen, (kernel, reason it declined))
SELECTION = {
    "cuda-fp8": (FP8, torch.bfloat16, "cuda", CUDA, None, "triton-float8", ("triton", "runs integer (int4 / int8) weights only")),
    "cuda-7.5": (FP8, torch.bfloat16, "cuda", Platform("cuda", (7, 5), triton=True), None, "reference", ("triton-float8", "needs CUDA compute capability >= 8.0")),
    "cuda-without-triton": (FP8, torch.float16, "cuda", Platform("cuda", (9, 0)), None, "reference", ("triton-float8", "triton is not installed")),
    "cuda-int4": (IntWeights.create(bits=4, k=32, codes=lambda c0, c1: torch.zeros(32, c1 - c0, dtype=torch.int32), scales=torch.ones(1, 8), zeros=torch.zeros(1, 8, dtype=torch.uint8)), torch.bfloat16, "cuda", Platform("cuda", (7, 5), triton=True), None, "reference", ("triton-float8", "runs float8 / fp4 (Float8Layout) weights only")),
    "cpu-unrequested": (FP8, torch.float32, "cpu", Platform("cpu", cpu_isa=frozenset()), None, "reference", ("triton-float8", "runs on CUDA (on a CPU only through TRITON_INTERPRET=1, when requested)")),
    "float64-activations": (FP8, torch.float64, "cuda", CUDA, None, "reference", ("triton-float8", "takes float16, bfloat16 or float32 activations, not torch.float64")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SELECTION))
def test_float8_heads_on_cuda_choose_the_triton_kernel(case):
    weights, dtype, device, platform, requested, chosen, (name, why) = SELECTION[case]
    choice = choose(weights, dtype=dtype, device=device, platform=platform, requested=requested)
    assert choice.name == chosen
    assert dict(choice.declined)[name].startswith(why)


def test_a_float8_head_on_the_cpu_runs_the_interpreter_only_when_requested(monkeypatch):
    assert choose(FP8, dtype=torch.float16, device="cpu", requested="triton-float8").requested
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"'triton-float8' cannot run this layer: on a CPU it needs TRITON_INTERPRET=1"):  # fmt: skip
        choose(FP8, dtype=torch.float16, device="cpu", requested="triton-float8")


def shard(folder, rank: int, size: int) -> ParallelLMHead:
    """Rank ``rank`` of ``size`` of an ``fp8`` head on the Triton kernel, loaded region by
    region as the loader does (the block scale is replicated; rows start at an offset)."""
    tensors = load_file(next(folder.glob("*.safetensors")))
    vocab, hidden = tensors["lm_head.weight"].shape
    head = ParallelLMHead(vocab, hidden, params_dtype=torch.bfloat16,
                          quant_config=quantreg.resolve(folder).config, prefix="lm_head",
                          tp=TPGroup(None, rank, size))  # fmt: skip
    return load_regions(head, tensors, "triton-float8")


def test_an_fp8_block_head_and_its_tensor_parallel_shards(tmp_path):
    """Vocab 1000 in 96 x 128 blocks (ragged at both edges), whole and as two ranks whose
    boundary (row 512 of the padded vocab) cuts a block: each rank's logits are its slice."""
    weight = torch.randn(1000, 200, generator=torch.Generator().manual_seed(4)) * 0.05
    quantreg.write_checkpoint(tmp_path, weight, "fp8", dtype=torch.bfloat16, block_size=(96, 128))
    exact = quantreg.load_lm_head(tmp_path, dtype=torch.float32, kernel="reference")
    head = quantreg.load_lm_head(tmp_path, dtype=torch.float32, kernel="triton-float8")
    assert head.kernel.name == "triton-float8" and head.kernel.layout.value_bits == 8
    x = torch.randn(3, 200)
    full = exact.forward(x)  # the padded vocab, as the ranks hold it
    assert rel_err(head.forward(x), full) < TOL[torch.float32]
    for rank in (0, 1):
        part = shard(tmp_path, rank, 2)
        assert part.kernel.name == "triton-float8"
        rows = part.num_embeddings_per_partition
        got = part.forward(x.bfloat16()).float()
        assert rel_err(got, full[:, rank * rows : (rank + 1) * rows]) < 1e-2


def test_a_compressed_tensors_nvfp4_head_reads_packed_codes(tmp_path):
    """The library's own NVFP4 checkpoint (vocab 1000): the kernel reads the library's own
    packed bytes again (repacked from the float8 values bit for bit), and gives the reference's
    numbers in float32 and bfloat16."""
    from ct_library import compress_head

    weight = torch.randn(1000, 128, generator=torch.Generator().manual_seed(5)) * 0.05
    compress_head(tmp_path, weight.bfloat16(), {"preset": "NVFP4A16", "targets": ["lm_head"]})
    stored = load_file(tmp_path / "model.safetensors")["lm_head.weight_packed"]
    x = torch.randn(3, 128)
    for dtype in (torch.float32, torch.bfloat16):
        exact = quantreg.load_lm_head(tmp_path, dtype=dtype, kernel="reference")
        head = quantreg.load_lm_head(tmp_path, dtype=dtype, kernel="triton-float8")
        packed = head.kernel.layout
        assert packed.value_bits == 4 and packed.values.shape == (1024, 64)  # padded vocab
        assert torch.equal(packed.values[:1000].cpu(), stored)
        got = head.compute_logits(x.to(dtype))
        assert rel_err(got, exact.compute_logits(x.to(dtype))) < 1e-2

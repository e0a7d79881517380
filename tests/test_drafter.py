"""Eagle3 drafters: both config layouts, the d2t map, tied and shared heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckpt import llama_config, write_checkpoint

import quantreg
from quantreg import (
    CheckpointError,
    ConfigError,
    DrafterConfig,
    InputError,
    ParallelLMHead,
    has_own_lm_head,
    load_lm_head,
    share_lm_head,
)
from quantreg.demo import eagle3_config, run_demo, speculators_config

HIDDEN, DRAFT, TARGET = 256, 1000, 4000


def d2t_for(targets: torch.Tensor) -> torch.Tensor:
    return targets - torch.arange(targets.numel())


def drafter(
    tmp_path: Path,
    *,
    d2t: torch.Tensor | None = None,
    config: dict | None = None,
    tensors: dict | None = None,
    seed: int = 0,
) -> tuple[Path, dict]:
    gen = torch.Generator().manual_seed(seed)
    if tensors is None:
        tensors = {"lm_head.weight": torch.randn(DRAFT, HIDDEN, generator=gen).half()}
        tensors["d2t"] = (
            d2t
            if d2t is not None
            else d2t_for(torch.randperm(TARGET, generator=gen)[:DRAFT].sort().values)
        )
    write_checkpoint(tmp_path, config=config or eagle3_config(), tensors=tensors)
    return tmp_path, tensors


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (eagle3_config(), {"hidden_size": 256, "vocab_size": 4000, "head_vocab_size": 1000, "layout": "eagle3", "tie_word_embeddings": False}),
        (eagle3_config(target_hidden_size=512), {"target_hidden_size": 512}),
        (speculators_config(), {"hidden_size": 256, "vocab_size": 1000, "head_vocab_size": 1000, "layout": "speculators"}),
        (speculators_config(tie_word_embeddings=True), {"tie_word_embeddings": True}),
        (llama_config(), {"head_vocab_size": 1000, "layout": "plain", "draft_vocab_size": None}),
    ],
    ids=["eagle", "eagle-target-hidden", "speculators", "speculators-tied", "plain-llama"],
)  # fmt: skip
def test_drafter_config_layouts(config, expected):
    drafter_config = DrafterConfig.from_config(config)
    assert {k: getattr(drafter_config, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"vocab_size": 10}, r"invalid drafter config in x.json: field 'hidden_size' is required"),
        ({**eagle3_config(), "draft_vocab_size": 0}, r"field 'draft_vocab_size' = 0: Input should be greater than 0"),
        ({**eagle3_config(), "hidden_size": "256"}, r"field 'hidden_size' = '256': Input should be a valid integer"),
        ({**eagle3_config(), "tie_word_embeddings": "yes"}, r"field 'tie_word_embeddings' = 'yes'"),
    ],
    ids=["no-hidden-size", "zero-draft-vocab", "hidden-size-string", "tie-string"],
)  # fmt: skip
def test_drafter_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        DrafterConfig.from_config(config, source="x.json")


def test_drafter_config_from_checkpoint(tmp_path):
    path, _ = drafter(tmp_path)
    assert DrafterConfig.from_checkpoint(path).head_vocab_size == DRAFT


def test_d2t_is_loaded_and_to_target_vocab_scatters(tmp_path):
    path, tensors = drafter(tmp_path)
    head = load_lm_head(path, dtype=torch.float32)
    assert (head.num_embeddings, head.target_vocab_size) == (DRAFT, TARGET)
    targets = torch.arange(DRAFT) + tensors["d2t"]
    assert torch.equal(head.draft_to_target, targets)
    x = torch.randn(3, HIDDEN)
    logits = head.compute_logits(x)
    full = head.to_target_vocab(logits)
    assert full.shape == (3, TARGET)
    assert torch.equal(full[:, targets], logits)
    others = torch.ones(TARGET, dtype=torch.bool)
    others[targets] = False
    assert torch.isneginf(full[:, others]).all()


@pytest.mark.parametrize(
    ("d2t", "message"),
    [
        (torch.full((DRAFT,), -1, dtype=torch.int64), r"tensor 'd2t' maps draft id 0 to target id -1 \(d2t\[0\] = -1\), outside \[0, 4000\) of vocab_size; 1 such entries"),
        (torch.cat([torch.zeros(DRAFT - 1, dtype=torch.int64), torch.tensor([TARGET])]), r"maps draft id 999 to target id 4999 .*outside \[0, 4000\)"),
        (torch.zeros(DRAFT - 1, dtype=torch.int64), r"tensor 'd2t' has shape \[999\]; expected \[1000\] \(draft_vocab_size\)"),
        (torch.zeros(DRAFT, dtype=torch.float32), r"tensor 'd2t' has dtype torch.float32; expected int64"),
        (torch.cat([torch.zeros(1, dtype=torch.int64), torch.full((DRAFT - 1,), -1, dtype=torch.int64)]), r"maps several draft ids to the same target id"),
    ],
    ids=["negative", "past-the-vocab", "wrong-length", "float", "not-one-to-one"],
)  # fmt: skip
def test_bad_d2t_is_refused_naming_it(tmp_path, d2t, message):
    path, _ = drafter(tmp_path, d2t=d2t)
    with pytest.raises(CheckpointError, match=message) as info:
        load_lm_head(path, dtype=torch.float32)
    assert info.value.tensor == "d2t" and "model.safetensors" in str(info.value)


def test_d2t_without_a_target_vocab_size(tmp_path):
    config = eagle3_config()
    del config["vocab_size"]
    path, _ = drafter(tmp_path, config=config)
    with pytest.raises(
        ConfigError,
        match=r"has a d2t map but field 'vocab_size' = None is not the target vocab size",
    ):
        load_lm_head(path, dtype=torch.float32)


def test_to_target_vocab_without_d2t():
    same = ParallelLMHead(100, 8)
    logits = torch.randn(2, 100)
    assert same.to_target_vocab(logits) is logits
    with pytest.raises(InputError, match=r"logits have 99 columns; expected num_embeddings=100"):
        same.to_target_vocab(torch.randn(2, 99))
    smaller = ParallelLMHead(100, 8)
    smaller.target_vocab_size = 200
    with pytest.raises(
        InputError,
        match=r"lm_head has no d2t map to scatter 100 draft ids into the 200-token target vocab",
    ):
        smaller.to_target_vocab(logits)


@pytest.mark.parametrize("embedding", ["embed_tokens.weight", "model.embed_tokens.weight"])
def test_tied_drafter_loads_its_head_from_the_embedding(tmp_path, embedding):
    weight = torch.randn(DRAFT, HIDDEN).half()
    config = speculators_config(tie_word_embeddings=True)
    path, _ = drafter(tmp_path, config=config, tensors={embedding: weight})
    assert not has_own_lm_head(path)
    head = load_lm_head(path, dtype=torch.float32)
    assert head.resolution.rule.startswith(f"tie_word_embeddings: true → {embedding}")
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(0))
    logits = head.compute_logits(x)
    # the embedding's weights, as F.linear computes them in float32 ...
    torch.testing.assert_close(logits, torch.nn.functional.linear(x, weight.float()))
    # ... within the README's 1e-5 (relative to the largest logit) of float64
    reference = x.double() @ weight.double().T
    assert float((logits.double() - reference).abs().max() / reference.abs().max()) < 1e-5


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        (speculators_config(), {"embed_tokens.weight": torch.zeros(DRAFT, HIDDEN)}, r"has no lm_head.\* tensors \(tie_word_embeddings: absent, embedding embed_tokens.weight\); .*quantreg.share_lm_head\(None, target_head\)"),
        (speculators_config(tie_word_embeddings=True), {"fc.weight": torch.zeros(2, 2)}, r"has no lm_head.\* tensors \(tie_word_embeddings: true, no embedding\)"),
    ],
    ids=["not-tied", "tied-without-embedding"],
)  # fmt: skip
def test_a_drafter_without_a_head_points_to_share_lm_head(tmp_path, config, tensors, message):
    path, _ = drafter(tmp_path, config=config, tensors=tensors)
    with pytest.raises(CheckpointError, match=message):
        load_lm_head(path, dtype=torch.float32)


def test_tied_embedding_of_the_wrong_size_is_named(tmp_path):
    config = speculators_config(tie_word_embeddings=True)
    path, _ = drafter(
        tmp_path, config=config, tensors={"embed_tokens.weight": torch.zeros(DRAFT, 128)}
    )
    with pytest.raises(
        CheckpointError,
        match=r"lm_head.weight: expected shape F32 \[1000, 256\], found F32 \[1000, 128\] in model.safetensors \(tied: embed_tokens.weight\)",
    ):
        load_lm_head(path, dtype=torch.float32)


def test_has_own_lm_head(tmp_path):
    path, _ = drafter(tmp_path / "own")
    assert has_own_lm_head(path)
    with pytest.raises(CheckpointError, match="has no safetensors weights"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(eagle3_config()))
        has_own_lm_head(tmp_path / "empty")


# -- head sharing ---------------------------------------------------------------------------


def plain_head(
    seed: int = 0, n: int = 100, k: int = 16, dtype: torch.dtype = torch.float32
) -> ParallelLMHead:
    head = ParallelLMHead(n, k, params_dtype=dtype)
    head.load_weight(
        head.weight, torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    )
    return head


class Packed(quantreg.LinearMethod):
    """A quantized-looking head whose ``.weight`` must never be read."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype, **extra):  # fmt: skip
        n = sum(output_partition_sizes)
        layer.register_parameter("qweight", quantreg.set_weight_attrs(torch.nn.Parameter(torch.zeros(input_size_per_partition, n // 8, dtype=torch.int32), requires_grad=False), output_dim=1, packed_dim=1, pack_factor=8))  # fmt: skip

    def apply(self, layer, x, bias=None):
        raise NotImplementedError


class PackedConfig(quantreg.QuantConfig):
    linear_method = Packed
    supports_lm_head = True


class NoWeight(ParallelLMHead):
    @property
    def weight(self):  # a quantized head has no float weight to compare
        raise AssertionError("share_lm_head read .weight of a quantized head")


def packed_head(fill: int) -> ParallelLMHead:
    head = NoWeight(100, 16, quant_config=PackedConfig())
    head.qweight.data.fill_(fill)
    return head


@pytest.mark.parametrize(
    ("make_drafter", "make_target", "shares"),
    [
        (lambda: None, lambda: plain_head(0), True),
        (lambda: plain_head(0), lambda: plain_head(0), True),
        (lambda: plain_head(1), lambda: plain_head(0), False),
        (lambda: plain_head(0, n=99), lambda: plain_head(0), False),
        (lambda: plain_head(0, dtype=torch.float16), lambda: plain_head(0), False),
        (lambda: packed_head(3), lambda: packed_head(3), True),
        (lambda: packed_head(3), lambda: packed_head(4), False),
        (lambda: packed_head(0), lambda: plain_head(0), False),
    ],
    ids=["drafter-has-none", "identical-plain", "different-weights", "different-vocab", "different-dtype",
         "identical-quantized", "different-quantized", "quantized-vs-plain"],
)  # fmt: skip
def test_share_lm_head(make_drafter, make_target, shares):
    drafter_head, target_head = make_drafter(), make_target()
    chosen = share_lm_head(drafter_head, target_head)
    assert chosen is (target_head if shares else drafter_head)


@pytest.mark.parametrize("method", ["gptq", "cpu_wna16", "compressed-tensors"])
def test_loaded_quantized_heads_are_compared_by_their_kernel_layouts(tmp_path, method):
    """After loading, a quantized head's checkpoint tensors live in its kernel's layout: two
    heads of the same geometry share only when those tensors are identical too."""
    writer = "compressed-tensors" if method == "compressed-tensors" else "gptq"
    weights = [torch.randn(128, 64, generator=torch.Generator().manual_seed(s)).half() for s in (0, 0, 1)]  # fmt: skip
    heads = []
    for i, weight in enumerate(weights):
        quantreg.write_checkpoint(tmp_path / str(i), weight, writer, group_size=32)
        requested = None if writer == "compressed-tensors" else method
        heads.append(quantreg.load_lm_head(tmp_path / str(i), dtype=torch.float32, requested=requested))  # fmt: skip
    assert not dict(heads[0].named_parameters()) and heads[0].kernel.tensors()
    assert share_lm_head(heads[0], heads[1]) is heads[1]
    assert share_lm_head(heads[0], heads[2]) is heads[0]


def test_a_drafter_with_a_subset_vocab_map_keeps_its_head():
    drafter_head, target_head = plain_head(0), plain_head(0)
    drafter_head.set_vocab_map(torch.arange(100).flip(0), 100)
    assert share_lm_head(drafter_head, target_head) is drafter_head


# -- the demo -----------------------------------------------------------------------------


def test_demo_rows(tmp_path):
    rows = run_demo(tmp_path)
    assert [(r.name, r.method) for r in rows] == [
        ("eagle3 unquantized", "unquantized"),
        ("speculators tied", "unquantized"),
        ("awq int4 g128", "awq"),
        ("awq int4 g128", "awq_marlin"),
        ("awq int4 g128", "cpu_wna16"),
        ("gptq int4 g128 act-order", "gptq"),
        ("gptq int4 g128 act-order", "gptq_marlin"),
        ("gptq int4 g128 act-order", "cpu_wna16"),
        ("gptq int8 g64 asym", "cpu_wna16"),
        ("ct w8a16 int8 per-channel", "compressed-tensors"),
        ("ct w4a16 g128 asym", "compressed-tensors"),
        ("ct w8a8 int8 (weight-only)", "compressed-tensors"),
        ("ct fp8 per-channel", "compressed-tensors"),
        ("ct nvfp4 g16", "compressed-tensors"),
        ("fp8 block 128x128", "fp8"),
        ("fp8 per-tensor", "fp8"),
        ("modelopt nvfp4 g16", "modelopt"),
    ]
    assert all(r.target_vocab_ok for r in rows)
    assert rows[0].max_abs_error < 1e-5 and rows[1].max_abs_error < 1e-5
    assert rows[1].rule.startswith("tie_word_embeddings: true")
    # every method computes the same float32 logits from the same checkpoint
    for first in (2, 5):
        errors = [r.max_abs_error for r in rows[first : first + 3]]
        assert max(errors) - min(errors) < 1e-5
    for row in rows[2:8]:
        assert row.vs_bf16 <= 0.3, "a 4-bit g128 head is at most 0.3x its bf16 size"
    assert (tmp_path / "eagle3_unquantized" / "config.json").exists()


# -- quantized drafters in both layouts -----------------------------------------------------

QN, QK, QTARGET = 256, 128, 1024  # draft vocab, hidden, target vocab
# A quantized body with a float head: AutoAWQ (no lm_head key), and an fp8 body
# (DeepSeek-V3's block-wise config, no exclusion key: the head stays float).
FLOAT_HEAD_CONFIGS = {
    "awq-body": {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
    "fp8-body": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]},
}  # fmt: skip


def layout_config(layout: str, qcfg: dict, hidden: int) -> dict:
    """An Eagle3 drafter config.json carrying ``qcfg`` where ``layout`` puts it."""
    if layout == "eagle3":
        return {**eagle3_config(), "hidden_size": hidden, "vocab_size": QTARGET,
                "draft_vocab_size": QN, "quantization_config": qcfg}  # fmt: skip
    layer = {"model_type": "llama", "hidden_size": hidden, "vocab_size": QTARGET, "torch_dtype": "float16"}  # fmt: skip
    config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
              "draft_vocab_size": QN, "transformer_layer_config": layer}  # fmt: skip
    if layout == "speculators-nested":
        layer["quantization_config"] = qcfg
    else:
        config["quantization_config"] = qcfg
    return config


def quantized_drafter(folder: Path, layout: str, head: str) -> tuple[Path, torch.Tensor]:
    """A drafter written by quantreg's writer, its config moved into ``layout``."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(QN, QK, generator=gen) * 0.05).half()
    d2t = d2t_for(torch.randperm(QTARGET, generator=gen)[:QN].sort().values)
    method = head if head in ("awq", "gptq") else None
    quantreg.write_checkpoint(folder, weight, method, d2t=d2t, vocab_size=QTARGET, group_size=64)
    written = json.loads((folder / "config.json").read_text())
    qcfg = written.get("quantization_config") or FLOAT_HEAD_CONFIGS[head]
    (folder / "config.json").write_text(json.dumps(layout_config(layout, qcfg, QK)))
    return folder, weight


@pytest.mark.parametrize("layout", ["eagle3", "speculators-nested", "speculators-top"])
@pytest.mark.parametrize(
    ("head", "method", "rule"),
    [
        ("awq", "cpu_wna16", "lm_head: true"),
        ("gptq", "cpu_wna16", "lm_head: true"),
        ("awq-body", None, "lm_head: false (absent)"),
        ("fp8-body", None, "quant_method 'fp8': no lm_head"),
    ],
    ids=["awq-head", "gptq-head", "awq-body-float-head", "fp8-body-float-head"],
)
def test_quantized_drafters_resolve_from_their_own_config(tmp_path, layout, head, method, rule):
    path, weight = quantized_drafter(tmp_path, layout, head)
    drafter = DrafterConfig.from_checkpoint(path)
    assert (drafter.layout, drafter.head_vocab_size, drafter.vocab_size) == (
        "eagle3" if layout == "eagle3" else "speculators", QN, QTARGET,
    )  # fmt: skip
    res = quantreg.resolve(path, platform="cpu")
    assert (res.method, res.quantized) == (method, method is not None)
    assert res.rule.startswith(rule), res.rule
    nested = layout == "speculators-nested"
    assert ("transformer_layer_config.quantization_config" in res.view.quant.where) is nested
    loaded = load_lm_head(path, dtype=torch.float32)
    x = torch.randn(4, QK, generator=torch.Generator().manual_seed(1))
    logits, reference = loaded.compute_logits(x), x @ weight.float().T
    if method is None:
        torch.testing.assert_close(logits, reference)
    else:  # int4 groups of 64: a few percent of the logits' scale
        assert (logits - reference).norm() / reference.norm() < 0.1
    target = loaded.to_target_vocab(logits)
    assert target.shape == (4, QTARGET) and torch.isfinite(target).sum() == 4 * QN

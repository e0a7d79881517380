"""Conformance with checkpoints written by the real producers (tests/fixtures/producers).

Every method that reads a fixture must reproduce the producer's own dequantized weight bit
for bit (after rounding to the scale dtype) in float32, and its logits within the contract.
Regenerating the fixtures is a manual step: ``python3 tools/make_fixtures.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from two_ranks import run_two_ranks

from quantreg import load_lm_head, resolve

FIXTURES = Path(__file__).parent / "fixtures" / "producers"

# fixture -> methods that must reproduce its quantized lm_head exactly in float32
QUANTIZED_HEADS = {
    "awq_autoawq_g64": ["awq", "awq_marlin", "cpu_wna16"],
    "awq_gptqmodel_lmhead_rtn": ["awq", "awq_marlin", "cpu_wna16"],
    "gptq_gptqmodel_lmhead_desc_act": ["gptq", "gptq_marlin", "cpu_wna16"],
    "gptq_gptqmodel_lmhead_default": ["gptq", "gptq_marlin", "cpu_wna16"],
    "gptq_gptqmodel_dynamic_w8g64": ["gptq", "gptq_marlin", "cpu_wna16"],
    "gptq_gptqmodel_asym": ["gptq", "cpu_wna16"],
    "ct_w8a16_lmhead": ["compressed-tensors"],
    "ct_w4a16_group_lmhead": ["compressed-tensors"],
    "ct_w4a16_asym_lmhead": ["compressed-tensors"],
    "ct_int8_w8a8_lmhead": ["compressed-tensors"],
    "ct_fp8_lmhead": ["compressed-tensors"],
    "autoround_gptq_lmhead": ["gptq", "gptq_marlin", "cpu_wna16"],
    "autoround_gptq_lmhead_w8": ["gptq", "gptq_marlin", "cpu_wna16"],
    "autoround_awq_lmhead": ["awq", "awq_marlin", "cpu_wna16"],
}
# fixture -> (method chosen on cpu by default, on cuda:9.0, deciding rule prefix)
RESOLUTIONS = {
    "awq_autoawq_g64": ("cpu_wna16", "awq_marlin", "tensors: lm_head.qweight, qzeros and scales are AWQ-packed"),
    "awq_autoawq_plain": (None, None, "lm_head: false (absent)"),
    "awq_gptqmodel_nolmhead": (None, None, "lm_head: false"),
    "awq_gptqmodel_lmhead_rtn": ("cpu_wna16", "awq_marlin", "lm_head: true"),
    "gptq_gptqmodel_lmhead_desc_act": ("cpu_wna16", "gptq_marlin", "dynamic '+:lm_head' → bits=4, group_size=32, sym=true, desc_act=true"),
    "gptq_gptqmodel_lmhead_default": ("cpu_wna16", "gptq_marlin", "dynamic 'lm_head' → bits=8, group_size=32, sym=true, desc_act=false"),
    "gptq_gptqmodel_dynamic_w8g64": ("cpu_wna16", "gptq_marlin", "dynamic '+:lm_head' → bits=8, group_size=64"),
    "gptq_gptqmodel_dynamic_exclude": (None, None, "dynamic '-:lm_head'"),
    "gptq_gptqmodel_asym": ("cpu_wna16", "gptq", "dynamic '+:lm_head' → bits=4, group_size=64, sym=false"),
    "ct_ignore_lmhead": (None, None, "ignore 'lm_head'"),
    "ct_w8a16_lmhead": ("compressed-tensors", "compressed-tensors", "targets 're:.*lm_head' (group_0)"),
    "ct_w4a16_group_lmhead": ("compressed-tensors", "compressed-tensors", "targets 'Linear' (group_0)"),
    "ct_w4a16_asym_lmhead": ("compressed-tensors", "compressed-tensors", "targets 'lm_head' (group_0)"),
    "ct_int8_w8a8_lmhead": ("compressed-tensors", "compressed-tensors", "targets 'lm_head' (group_0)"),
    "ct_fp8_lmhead": ("compressed-tensors", "compressed-tensors", "targets 'lm_head' (group_0)"),
    "autoround_gptq_lmhead": ("cpu_wna16", "gptq_marlin", "extra_config 'lm_head' → bits=4, group_size=32, sym=true (packing_format 'auto_round:auto_gptq')"),
    "autoround_gptq_lmhead_w8": ("cpu_wna16", "gptq_marlin", "extra_config 'lm_head' → bits=8, group_size=64, sym=true (packing_format 'auto_round:auto_gptq')"),
    "autoround_awq_lmhead": ("cpu_wna16", "awq_marlin", "extra_config 'lm_head' → bits=4, group_size=32, sym=false (packing_format 'auto_round:auto_awq')"),
    "autoround_gptq_lmhead_dense": (None, None, "tensors: lm_head.weight is float (AutoRound's low-memory export writes a quantized layer dense"),
}  # fmt: skip
UNQUANTIZED_HEADS = [name for name, (cpu, _, _) in RESOLUTIONS.items() if cpu is None]


def reference(name: str) -> torch.Tensor:
    return load_file(str(FIXTURES / name / "reference.safetensors"))["lm_head.weight_dequant"]


@pytest.mark.parametrize("name", sorted(RESOLUTIONS))
@pytest.mark.parametrize("platform", ["cpu", "cuda:9.0"])
def test_real_checkpoints_resolve(name, platform):
    cpu, cuda, rule = RESOLUTIONS[name]
    res = resolve(FIXTURES / name, platform=platform)
    assert res.method == (cpu if platform == "cpu" else cuda)
    assert res.quantized is (res.method is not None)
    assert res.rule.startswith(rule)
    assert res.tensors_agree is True


@pytest.mark.parametrize(
    ("name", "method"), [(n, m) for n, ms in QUANTIZED_HEADS.items() for m in ms]
)
def test_dequantized_weight_equals_the_producers_bit_for_bit(name, method):
    head = load_lm_head(FIXTURES / name, dtype=torch.float32, requested=method)
    weight_t = head.compute_logits(torch.eye(head.embedding_dim))
    ref = reference(name)
    assert torch.equal(weight_t.T.to(ref.dtype), ref) and torch.equal(weight_t, ref.float().T)


@pytest.mark.parametrize(
    ("name", "method"), [(n, m) for n, ms in QUANTIZED_HEADS.items() for m in ms]
)
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)], ids=["fp32", "bf16", "fp16"])  # fmt: skip
def test_logits_match_the_producers_weight(name, method, dtype, rtol):
    head = load_lm_head(FIXTURES / name, dtype=dtype, requested=method)
    x = torch.randn(7, head.embedding_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = x.double() @ reference(name).double().T
    got = head.compute_logits(x).double()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < rtol


@pytest.mark.parametrize("name", UNQUANTIZED_HEADS)
def test_unquantized_heads_load_as_float(name):
    head = load_lm_head(FIXTURES / name, dtype=torch.float32)
    weight = load_file(str(FIXTURES / name / "model.safetensors"))["lm_head.weight"]
    assert head.resolution.method is None
    assert torch.equal(head.compute_logits(torch.eye(head.embedding_dim)), weight.float().T)


TWO_RANK_FIXTURES = [
    "awq_autoawq_g64",
    "gptq_gptqmodel_lmhead_desc_act",
    "gptq_gptqmodel_dynamic_w8g64",
    "ct_w8a16_lmhead",
    "ct_w4a16_asym_lmhead",
    "autoround_gptq_lmhead",
    "autoround_gptq_lmhead_w8",
    "autoround_awq_lmhead",
]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Every fixture loaded on two ranks with the default method, in one spawn."""
    jobs = {name: (str(FIXTURES / name), {}) for name in TWO_RANK_FIXTURES}
    return run_two_ranks(tmp_path_factory.mktemp("two_ranks"), jobs)


@pytest.mark.parametrize("name", TWO_RANK_FIXTURES)
def test_two_ranks_default_cpu_method(two_rank_runs, name):
    x = torch.randn(
        6,
        load_lm_head(FIXTURES / name, dtype=torch.float32).embedding_dim,
        generator=torch.Generator().manual_seed(0),
    )
    expected = x.double() @ reference(name).double().T
    for run in two_rank_runs[name]:
        got = run["logits"].double()
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5

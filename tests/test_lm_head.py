"""ParallelLMHead: vocab padding, per-rank shards, vocab on dim 0 or 1, packed vocab dims."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from quantreg import (
    InputError,
    LinearMethod,
    MethodDefinitionError,
    ParallelLMHead,
    QuantConfig,
    set_weight_attrs,
)
from quantreg.distributed import TPGroup


@pytest.mark.parametrize(
    ("vocab", "tp_size", "padding", "padded", "per_rank"),
    [
        (1000, 1, 64, 1024, 1024),
        (1024, 1, 64, 1024, 1024),
        (1000, 2, 64, 1024, 512),
        (1000, 3, 64, 1152, 384),
        (32000, 4, 64, 32000, 8000),
        (128256, 2, 64, 128256, 64128),
        (10, 1, 1, 10, 10),
    ],
    ids=["1000-tp1", "exact-tp1", "1000-tp2", "1000-tp3", "32000-tp4", "llama3-tp2", "no-padding"],
)
def test_vocab_padding_and_shards(vocab, tp_size, padding, padded, per_rank):
    heads = [
        ParallelLMHead(vocab, 16, padding_size=padding, tp=TPGroup(None, rank, tp_size))
        for rank in range(tp_size)
    ]
    for rank, head in enumerate(heads):
        assert head.num_embeddings_padded == padded and head.output_size == padded
        assert head.num_embeddings_per_partition == per_rank == head.output_size_per_partition
        assert head.output_partition_sizes == [per_rank]
        assert (head.shard_start, head.shard_end) == (rank * per_rank, (rank + 1) * per_rank)
        assert (head.tp_rank, head.tp_size) == (rank, tp_size)
        assert head.input_size == head.input_size_per_partition == head.embedding_dim == 16
        assert head.weight.shape == (per_rank, 16)
        assert per_rank % padding == 0


def test_geometry_attributes_and_defaults():
    head = ParallelLMHead(1000, 64, bias=True, params_dtype=torch.bfloat16)
    assert (head.num_embeddings, head.org_num_embeddings, head.has_bias) == (1000, 1000, True)
    assert head.params_dtype == torch.bfloat16 and head.bias.shape == (1024,)
    assert head.quant_reason == "no quantization_config" and not head.quantized
    assert ParallelLMHead(10, 4).params_dtype == torch.get_default_dtype()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_embeddings": 0}, r"num_embeddings must be a positive integer, got 0"),
        ({"embedding_dim": -1}, r"embedding_dim must be a positive integer, got -1"),
        ({"padding_size": 0}, r"padding_size must be a positive integer"),
        (
            {"org_num_embeddings": 2000},
            r"org_num_embeddings=2000 must be between 1 and num_embeddings=1000",
        ),
        ({"tp": 2}, r"tp=2: an integer tp must be 1"),
        ({"tp": "world"}, r"tp must be None, 1 or a torch.distributed ProcessGroup; got 'world'"),
    ],
    ids=["zero-vocab", "negative-hidden", "zero-padding", "org-too-big", "tp-int", "tp-string"],
)
def test_bad_geometry(kwargs, message):
    args = {"num_embeddings": 1000, "embedding_dim": 64, **kwargs}
    with pytest.raises(InputError, match=message):
        ParallelLMHead(args.pop("num_embeddings"), args.pop("embedding_dim"), **args)


class VocabOnDim1(LinearMethod):
    """AWQ-shaped parameters: vocab on dim 1, packed 8 per int32 word in ``qweight``."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype, **extra):  # fmt: skip
        n, k = sum(output_partition_sizes), input_size_per_partition
        for name, shape, dtype, attrs in [
            ("qweight", (k, n // 8), torch.int32, {"output_dim": 1, "input_dim": 0, "packed_dim": 1, "pack_factor": 8}),
            ("scales", (2, n), torch.float16, {"output_dim": 1}),
            ("g_idx", (k,), torch.int32, {"input_dim": 0}),
        ]:  # fmt: skip
            param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, set_weight_attrs(param, **attrs))

    def apply(self, layer, x, bias=None):
        raise NotImplementedError


class Dim1Config(QuantConfig):
    linear_method = VocabOnDim1
    supports_lm_head = True


def test_a_quant_config_supplies_the_method():
    head = ParallelLMHead(1000, 16, quant_config=Dim1Config())
    assert isinstance(head.quant_method, VocabOnDim1) and head.quantized
    assert not hasattr(head, "weight")
    assert head.quant_reason == "supports_lm_head: true (the config has no lm_head key)"


def test_a_config_that_keeps_the_head_unquantized_says_why():
    class NoHead(QuantConfig):
        linear_method = VocabOnDim1

    head = ParallelLMHead(1000, 16, quant_config=NoHead())
    assert not head.quantized and "NoHead: supports_lm_head: false" in head.quant_reason


@pytest.mark.parametrize(
    ("rank", "name", "shape", "region"),
    [
        (0, "qweight", (16, 125), (1, 0, 64)),
        (1, "qweight", (16, 125), (1, 64, 125)),
        (0, "scales", (2, 1000), (1, 0, 512)),
        (1, "scales", (2, 1000), (1, 512, 1000)),
        (1, "g_idx", (16,), None),
    ],
    ids=["packed-rank0", "packed-rank1", "dim1-rank0", "dim1-rank1", "replicated"],
)
def test_checkpoint_shapes_and_regions_follow_output_dim_and_packing(rank, name, shape, region):
    head = ParallelLMHead(1000, 16, quant_config=Dim1Config(), tp=TPGroup(None, rank, 2))
    param = getattr(head, name)
    assert head.checkpoint_shape(param) == shape
    assert head.checkpoint_region(param) == region


def test_load_weight_copies_the_region_and_zero_fills_padding():
    head = ParallelLMHead(1000, 16, quant_config=Dim1Config(), tp=TPGroup(None, 1, 2))
    full = torch.arange(2 * 1000, dtype=torch.float16).reshape(2, 1000)
    head.scales.data.fill_(7)
    dim, start, stop = head.checkpoint_region(head.scales)
    head.load_weight(head.scales, full.narrow(dim, start, stop - start))
    assert torch.equal(head.scales[:, :488], full[:, 512:])
    assert torch.count_nonzero(head.scales[:, 488:]) == 0


def test_load_weight_rejects_a_misfit():
    head = ParallelLMHead(1000, 16)
    with pytest.raises(
        Exception, match=r"cannot load a \(10, 16\) slice into a \(1000, 16\) region"
    ):
        head.load_weight(head.weight, torch.zeros(10, 16))


def test_unquantized_forward_and_compute_logits():
    torch.manual_seed(0)
    head = ParallelLMHead(1000, 64, bias=True, params_dtype=torch.float32)
    w, b = torch.randn(1000, 64), torch.randn(1000)
    head.load_weight(head.weight, w)
    head.load_weight(head.bias, b)
    x = torch.randn(3, 64)
    assert head(x).shape == (3, 1024)
    logits = head.compute_logits(x)
    assert logits.shape == (3, 1000)
    torch.testing.assert_close(
        logits.double(), x.double() @ w.double().T + b.double(), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(
        InputError, match=r"hidden states have 63 features; lm_head expects embedding_dim=64"
    ):
        head.compute_logits(torch.randn(3, 63))


def test_resident_bytes_counts_parameters():
    assert ParallelLMHead(1000, 64, params_dtype=torch.float16).resident_bytes() == 1024 * 64 * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_dim": 2}, r"output_dim=2 is not a dim of a 2-d parameter"),
        ({"packed_dim": 1}, r"packed_dim=1 and pack_factor=1 must be given together"),
        ({"pack_factor": 8}, r"packed_dim=None and pack_factor=8 must be given together"),
        ({"packed_dim": 0, "pack_factor": 0}, r"pack_factor must be a positive integer, got 0"),
    ],
    ids=["dim-out-of-range", "packed-without-factor", "factor-without-dim", "zero-factor"],
)
def test_set_weight_attrs_validates(kwargs, message):
    with pytest.raises(MethodDefinitionError, match=message):
        set_weight_attrs(torch.zeros(2, 2), **kwargs)


def test_unknown_extra_kwargs_reach_the_method():
    seen: dict[str, Any] = {}

    class Spy(VocabOnDim1):
        def create_weights(self, layer, *args, **extra):
            seen.update(args=args)
            super().create_weights(layer, *args, **extra)

    class SpyConfig(QuantConfig):
        linear_method = Spy
        supports_lm_head = True

    ParallelLMHead(
        1000, 16, params_dtype=torch.float16, quant_config=SpyConfig(), tp=TPGroup(None, 0, 2)
    )
    assert seen["args"] == (16, [512], 16, 1024, torch.float16)

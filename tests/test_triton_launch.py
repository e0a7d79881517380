"""Choosing a Triton configuration: timed once per process and shape, or read from the table
tuned on the card (``triton_tuned.json``), which ``bench/gpu.py --save-tuned`` writes."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from quantreg import ConfigError, InputError
from quantreg.kernels import triton_launch as tl

triton = pytest.importorskip("triton")

OPTIONS = [tl.Config(16, 64, 64, 1), tl.Config(16, 128, 64, 1), tl.Config(16, 64, 128, 2)]
SPEED = {OPTIONS[0]: 3.0, OPTIONS[1]: 1.0}  # the third one fails to launch
CUDA = SimpleNamespace(device=SimpleNamespace(type="cuda", index=0))


@pytest.fixture
def timing(monkeypatch, tmp_path):
    """CUDA faked: the timing is all that runs; the shipped table is ``tmp_path``'s."""
    import triton.testing

    timed: list[tl.Config] = []

    def launch(cfg):
        timed.append(cfg)
        if cfg not in SPEED:
            raise RuntimeError("out of shared memory")
        return SPEED[cfg]

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn())
    monkeypatch.setattr(tl, "_tuned", {})
    monkeypatch.setattr(tl, "TUNED_TABLE", tmp_path / "triton_tuned.json")
    monkeypatch.setattr(tl, "card_name", lambda device: "NVIDIA H200")
    tl.shipped_configs.cache_clear()
    yield SimpleNamespace(timed=timed, launch=launch, table=tmp_path / "triton_tuned.json")
    tl.shipped_configs.cache_clear()


def test_tuning_times_each_candidate_once_per_key_and_keeps_the_fastest(timing):
    """Both Triton kernels time every candidate once per key, skip one that fails, and reuse
    the winner for the same key."""
    assert tl.tuned_config(CUDA, OPTIONS, "test m=1", timing.launch) == OPTIONS[1]
    assert tl.tuned_config(CUDA, OPTIONS, "test m=1", timing.launch) == OPTIONS[1]
    assert timing.timed == OPTIONS  # once each, the second call answered from the cache
    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"))  # the interpreter: fewest programs
    assert tl.tuned_config(cpu, OPTIONS, "test m=2", timing.launch) == OPTIONS[1]
    assert tl.tuned_in_process() == {"test m=1": OPTIONS[1]}


def test_a_card_in_the_shipped_table_is_not_timed(timing):
    tl.save_tuned(timing.table, "NVIDIA H200", triton.__version__, "2026-12-01",
                  {"test m=1": OPTIONS[0]})  # fmt: skip
    assert tl.tuned_config(CUDA, OPTIONS, "test m=1", timing.launch) == OPTIONS[0]
    assert timing.timed == []


@pytest.mark.parametrize(
    ("card", "shipped"),
    [
        ("NVIDIA H100 80GB HBM3", OPTIONS[0]),  # another card's row
        ("NVIDIA H200", tl.Config(32, 64, 64, 1)),  # no longer a candidate
    ],
    ids=["another-card", "stale-config"],
)
def test_a_shipped_choice_that_does_not_fit_is_timed_again(timing, card, shipped):
    tl.save_tuned(timing.table, card, "3.6.0", "2026-12-01", {"test m=1": shipped})
    assert tl.tuned_config(CUDA, OPTIONS, "test m=1", timing.launch) == OPTIONS[1]
    assert timing.timed == OPTIONS


def test_saving_merges_into_the_cards_row(tmp_path):
    path = tmp_path / "t.json"
    tl.save_tuned(path, "A", "3.6.0", "d1", {"k1": OPTIONS[0], "k2": OPTIONS[0]})
    tl.save_tuned(path, "B", "3.6.0", "d1", {"k1": OPTIONS[2]})
    table = tl.save_tuned(path, "A", "3.6.0", "d2", {"k2": OPTIONS[1]})
    assert {key: c.block_n for key, c in table.cards["A"].configs.items()} == {"k1": 64, "k2": 128}
    assert table.cards["A"].date == "d2" and table.cards["B"].configs["k1"].split_k == 2
    assert tl.read_tuned_table(path) == table
    newer = tl.save_tuned(path, "A", "3.7.0", "d3", {"k3": OPTIONS[0]})  # another Triton
    assert list(newer.cards["A"].configs) == ["k3"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{oops", r"t\.json is not valid JSON"),
        ('{"cards": {"A": {"triton": "3.6.0", "date": "d", "configs": {"k": {"block_m": 8}}}}}',
         r"t\.json: field 'cards\.A\.configs\.k\.block_m': Input should be greater than or "
         r"equal to 16 \(a table of tuned Triton configurations"),
        ('{"cards": {"A": {"triton": "3.6.0", "date": "d", "configs": {}, "gpu": 1}}}',
         r"field 'cards\.A\.gpu': Extra inputs are not permitted"),
        ('{"cards": {"A": {"triton": "3.6.0", "date": "d", "configs": {"k": {"block_m": "16", '
         '"block_n": 64, "block_k": 64, "split_k": 1, "num_warps": 4, "num_stages": 3}}}}}',
         r"field 'cards\.A\.configs\.k\.block_m': Input should be a valid integer"),
        ('{"cards": {}, "cards": {}}', r"t\.json: duplicate key 'cards'"),
        ('{"cards": {"A": {"triton": "3.6.0", "date": NaN, "configs": {}}}}',
         r"t\.json: NaN is not a JSON value"),
    ],
    ids=["not-json", "block-m-8", "unknown-field", "string-number", "duplicate-key", "nan"],
)  # fmt: skip
def test_a_bad_table_names_the_file_and_field(tmp_path, text, error):
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error) as raised:
        tl.read_tuned_table(path)
    assert raised.value.path == path


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_table_that_is_no_regular_file_is_refused_not_waited_on(tmp_path, kind):
    path = tmp_path / "t.json"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(
        ConfigError, match=r"tuned Triton table .*t\.json is a .*not a regular file"
    ):
        tl.read_tuned_table(path)
    with pytest.raises(ConfigError, match=r"not a regular file"):
        tl.save_tuned(path, "A", "3.6.0", "d", {"k": OPTIONS[0]})


def test_saving_never_writes_through_a_dangling_link(tmp_path):
    (tmp_path / "t.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(InputError, match=r"--save-tuned .*t\.json is a link to .*nowhere\.json, "
                       r"which does not exist; not writing through it"):  # fmt: skip
        tl.save_tuned(tmp_path / "t.json", "A", "3.6.0", "d", {"k": OPTIONS[0]})
    assert not (tmp_path / "nowhere.json").exists()


def test_the_shipped_table_reads():
    assert tl.TUNED_TABLE.exists()  # package data: installed beside the kernels
    table = tl.read_tuned_table(tl.TUNED_TABLE)
    for card in table.cards.values():
        assert all(key.split()[0] in ("wna16", "float8") for key in card.configs)


@pytest.mark.parametrize(
    ("m", "bucket"), [(1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (64, 64)], ids=str
)
def test_a_shape_key_names_the_kernel_the_m_bucket_and_each_field(m, bucket):
    key = tl.shape_key("wna16", m, n=32000, k=4096, group=128, dtype=torch.bfloat16)
    assert key == f"wna16 m={bucket} n=32000 k=4096 group=128 dtype=bfloat16"
    assert json.loads(json.dumps({key: 1})) == {key: 1}


def test_a_call_asks_for_its_configuration_once_per_shape_and_device(monkeypatch):
    """The candidates and the table's key are built on a shape's first call only."""
    monkeypatch.setattr(tl, "_remembered", {})
    asked: list[str] = []

    def choose(name):
        return lambda: asked.append(name) or OPTIONS[len(asked) - 1]

    first = ("wna16", 1, 32000, 4096, 128, 4, False, torch.bfloat16, torch.device("cpu"))
    other_m = ("wna16", 2, *first[2:])
    assert tl.remembered(first, choose("first")) == OPTIONS[0]
    assert tl.remembered(first, choose("again")) == OPTIONS[0]
    assert tl.remembered(other_m, choose("other M")) == OPTIONS[1]
    assert asked == ["first", "other M"]
    assert [tl.m_bucket(m) for m in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize(
    ("fixture", "method", "kernel"),
    [
        ("awq_autoawq_g64", "awq_marlin", "triton"),
        ("gptq_gptqmodel_lmhead_desc_act", "gptq_marlin", "triton"),
        ("ct_w4a16_asym_lmhead", "compressed-tensors", "triton"),
        ("modelopt_nvfp4_lmhead", "modelopt", "triton-float8"),
        ("ct_fp8_lmhead", "compressed-tensors", "triton-float8"),
    ],
    ids=["awq", "gptq-act-order", "ct-int4-asym", "modelopt-nvfp4", "ct-fp8"],
)
def test_a_triton_call_never_waits_for_the_device(monkeypatch, fixture, method, kernel):
    """No host synchronisation between a head's input and its logits (no ``.item()``, no
    ``bool(tensor)``): on CUDA the call only enqueues work, so it can be captured in a CUDA
    graph, as vLLM captures decoding. The launch is left out (the interpreter runs it)."""
    from pathlib import Path

    from torch.utils._python_dispatch import TorchDispatchMode

    import quantreg

    syncs = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in syncs:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    folder = Path(__file__).parent / "fixtures" / "producers" / fixture
    head = quantreg.load_lm_head(folder, dtype=torch.float16, requested=method, kernel=kernel)
    monkeypatch.setattr(tl.Launch, "run", lambda self: self.out.sum(0))
    x = torch.randn(3, head.embedding_dim).half()
    head.compute_logits(x)  # the configuration chosen, outside the mode
    with Syncs() as mode:
        logits = head.compute_logits(x)
    assert mode.seen == [] and logits.shape == (3, head.num_embeddings)

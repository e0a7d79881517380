"""Threads: registry lookups and registrations, and heads loaded from one checkpoint at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import quantreg
from quantreg.view import clear_cache


@pytest.mark.parametrize(
    ("method", "params"),
    [(None, {}), ("gptq", {"group_size": 32, "desc_act": True}), ("awq", {"group_size": 64}),
     ("compressed-tensors", {"format": "pack-quantized", "bits": 8, "strategy": "channel"})],
    ids=["unquantized", "gptq", "awq", "compressed-tensors"],
)  # fmt: skip
def test_four_threads_loading_one_checkpoint_match_a_serial_load(tmp_path, method, params):
    weight = (torch.randn(1000, 128, generator=torch.Generator().manual_seed(0)) * 0.05).half()
    d2t = torch.zeros(1000, dtype=torch.int64)  # identity: target id = draft id
    quantreg.write_checkpoint(tmp_path, weight, method, d2t=d2t, vocab_size=1000, **params)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))

    def load_and_run(_: int) -> torch.Tensor:
        head = quantreg.load_lm_head(tmp_path, dtype=torch.float32)
        return head.to_target_vocab(head.compute_logits(x))

    serial = load_and_run(0)
    clear_cache()  # the threads race on an empty resolution cache
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(load_and_run, range(8)))
    assert all(torch.equal(result, serial) for result in results)


def test_concurrent_resolution_of_many_checkpoints(tmp_path):
    folders = []
    for i, method in enumerate(["gptq", "awq", None, "compressed-tensors"] * 2):
        folder = tmp_path / f"c{i}"
        params = {} if method is None else {"group_size": 32}
        quantreg.write_checkpoint(folder, torch.randn(64, 64).half(), method, **params)
        folders.append(folder)
    serial = [quantreg.resolve(f, platform="cpu").to_dict() for f in folders]
    clear_cache()
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda f: quantreg.resolve(f, platform="cpu").to_dict(), folders))
    assert parallel == serial

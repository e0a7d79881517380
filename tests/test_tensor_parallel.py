"""Two gloo processes: each loads only its vocab shard; every rank gets the full logits."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from ckpt import llama_config, write_checkpoint
from safetensors.torch import load_file
from tp_worker import load_and_compute

import quantreg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_two_ranks_match_one_process_exactly(tmp_path, bias):
    gen = torch.Generator().manual_seed(1)
    tensors = {"lm_head.weight": torch.randn(1000, 64, generator=gen, dtype=torch.float32)}
    if bias:
        tensors["lm_head.bias"] = torch.randn(1000, generator=gen)
    write_checkpoint(tmp_path / "ckpt", config=llama_config(), tensors=tensors)
    mp.spawn(
        load_and_compute,
        args=(2, free_port(), str(tmp_path / "ckpt"), str(tmp_path), {}),
        nprocs=2,
        join=True,
    )

    single = quantreg.load_lm_head(tmp_path / "ckpt", dtype=torch.float32)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    expected = single.compute_logits(x)
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert got["logits"].shape == (6, 1000)
        torch.testing.assert_close(got["logits"], expected, rtol=0, atol=0)
        # each rank holds only its half of the padded vocab; rank 1 ends in zero padding
        shard = got["param.weight"]
        assert shard.shape == (512, 64)
        rows = tensors["lm_head.weight"][rank * 512 : rank * 512 + 512]
        torch.testing.assert_close(shard[: rows.shape[0]], rows, rtol=0, atol=0)
        assert torch.count_nonzero(shard[rows.shape[0] :]) == 0

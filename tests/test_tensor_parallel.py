"""Two gloo processes: each loads only its vocab shard; every rank gets the full logits."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.multiprocessing as mp
from ckpt import llama_config, write_checkpoint
from safetensors.torch import load_file, save_file
from tp_worker import load_per_rank
from two_ranks import rendezvous, run_two_ranks

import quantreg


def plain_head_tensors(bias: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tensors = {"lm_head.weight": torch.randn(1000, 64, generator=gen, dtype=torch.float32)}
    if bias:
        tensors["lm_head.bias"] = torch.randn(1000, generator=gen)
    return tensors


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """A float head with and without bias on two ranks, in one spawn."""
    root = tmp_path_factory.mktemp("plain")
    jobs = {}
    for bias in (False, True):
        name = "bias" if bias else "no-bias"
        write_checkpoint(root / name, config=llama_config(), tensors=plain_head_tensors(bias))
        jobs[name] = (str(root / name), {})
    return root, run_two_ranks(root, jobs)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_two_ranks_match_one_process_exactly(plain_runs, bias):
    root, runs = plain_runs
    name = "bias" if bias else "no-bias"
    tensors = plain_head_tensors(bias)
    single = quantreg.load_lm_head(root / name, dtype=torch.float32)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    expected = single.compute_logits(x)
    for rank, got in enumerate(runs[name]):
        assert got["logits"].shape == (6, 1000)
        torch.testing.assert_close(got["logits"], expected, rtol=0, atol=0)
        # each rank holds only its half of the padded vocab; rank 1 ends in zero padding
        shard = got["param.weight"]
        assert shard.shape == (512, 64)
        rows = tensors["lm_head.weight"][rank * 512 : rank * 512 + 512]
        torch.testing.assert_close(shard[: rows.shape[0]], rows, rtol=0, atol=0)
        assert torch.count_nonzero(shard[rows.shape[0] :]) == 0


def eagle_drafter(folder, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randperm(4000, generator=gen)[:1000].sort().values
    tensors = {
        "lm_head.weight": torch.randn(1000, 64, generator=gen),
        "d2t": targets - torch.arange(1000),
    }
    config = llama_config(
        architectures=["LlamaForCausalLMEagle3"], vocab_size=4000, draft_vocab_size=1000
    )
    return write_checkpoint(folder, config=config, tensors=tensors)


def run_ranks(tmp_path, ckpts: list[str]) -> list[dict]:
    mp.spawn(
        load_per_rank, args=(2, rendezvous(tmp_path), ckpts, str(tmp_path)), nprocs=2, join=True
    )
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_load_a_drafter_with_d2t(tmp_path):
    ckpt = str(eagle_drafter(tmp_path / "ckpt"))
    outcomes = run_ranks(tmp_path, [ckpt, ckpt])
    assert all(o["ok"] and o["finite"] == 2 * 1000 for o in outcomes)


def bad_d2t_drafter(folder):
    """An Eagle3 drafter whose ``d2t`` maps a draft id past the target vocab: fails to load."""
    bad = eagle_drafter(folder)
    d2t = torch.zeros(1000, dtype=torch.int64)
    d2t[5] = 4000  # out of range
    save_file({"lm_head.weight": torch.zeros(1000, 64), "d2t": d2t}, str(bad / "model.safetensors"))
    return bad


@pytest.mark.slow
def test_a_rank_that_fails_to_load_fails_every_rank_promptly(tmp_path):
    """Rank 0 learns of rank 1's failure from the collective both make after loading: it
    raises DistributedError. A rank left waiting would instead hit the group's collective
    timeout (``tp_worker.COLLECTIVE_TIMEOUT``) and report gloo's error, not this one -- no
    wall clock is read by the test."""
    good = eagle_drafter(tmp_path / "good")
    bad = bad_d2t_drafter(tmp_path / "bad")  # on rank 1 only
    rank0, rank1 = run_ranks(tmp_path, [str(good), str(bad)])
    outcomes = f"rank 0: {rank0}; rank 1: {rank1}"
    assert rank1["ok"] is False and rank1["type"] == "CheckpointError", outcomes
    assert "'d2t'" in rank1["message"], outcomes
    assert rank0["ok"] is False and rank0["type"] == "DistributedError", outcomes
    assert "failed on rank(s) [1] of 2" in rank0["message"], outcomes


def test_a_failed_load_frees_its_group_when_the_error_is_dropped(tmp_path):
    """The failing rank's error must not keep the group alive through a reference cycle.

    load_lm_head once kept the exception in a local and raised it later: exception ->
    traceback -> frame -> exception. The frame's ``group`` (the ProcessGroup) then outlived
    destroy_process_group until the cyclic GC ran, maybe at interpreter exit, where gloo's
    worker thread took the GIL and the rank died with SIGABRT (the flake of the test above).
    The cyclic GC is off here so that only reference counting can free it.
    """
    bad = bad_d2t_drafter(tmp_path / "bad")
    gc.collect()
    gc.disable()
    try:
        try:
            quantreg.load_lm_head(bad)
        except quantreg.CheckpointError as exc:
            error = weakref.ref(exc)
            # from the frame below this one: reading this running frame's f_locals would store
            # a snapshot holding ``exc`` in it, a cycle of the test's own making
            frames, tb = [], exc.__traceback__.tb_next
            while tb is not None:
                frames.append(tb.tb_frame)
                tb = tb.tb_next
            groups = [weakref.ref(f.f_locals["group"]) for f in frames if "group" in f.f_locals]
            del frames
        else:
            pytest.fail("the bad drafter loaded")
        assert groups, "no frame of the traceback holds the group"
        assert error() is None and all(g() is None for g in groups)
    finally:
        gc.enable()


@pytest.mark.slow
def test_torchrun_cli_prints_once_and_matches_one_process(tmp_path):
    ckpt = eagle_drafter(tmp_path / "ckpt")
    x = torch.randn(3, 64)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "quantreg", "run", str(ckpt), "--hidden", str(tmp_path / "x.safetensors"),
           "--out", str(tmp_path / "o.safetensors"), "--dtype", "float32", "--json",
           "--reference", str(ckpt)]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # exactly one JSON document: only rank 0 printed
    single = quantreg.load_lm_head(ckpt, dtype=torch.float32)
    expected = single.compute_logits(x)
    torch.testing.assert_close(
        load_file(str(tmp_path / "o.safetensors"))["logits"], expected, rtol=0, atol=0
    )
    assert data["top5"] == expected.topk(5).indices.tolist()
    assert data["tp_size"] == 2 and data["resident_bytes_per_rank"] is True
    reference = data["reference"]  # the same head, sharded alike: nothing lost
    assert (reference["rel_err"], reference["top1"], reference["kl"]) == (0.0, 1.0, 0.0)


@pytest.mark.slow
def test_torchrun_cli_failure_exits_1_on_every_rank(tmp_path):
    ckpt = eagle_drafter(tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{not json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "quantreg", "run", str(ckpt)]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert out.returncode != 0
    assert (
        "quantreg: error (rank 0): config file" in out.stderr and "is not valid JSON" in out.stderr
    )
    ours = out.stderr.split("torch/distributed/elastic")[
        0
    ]  # what follows is the launcher's own report
    assert "Traceback" not in ours and "quantreg: error (rank 1)" in ours

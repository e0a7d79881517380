"""The demo's tensor-parallel screen: one head on two gloo ranks, each reading only its slice.

:func:`shard_plan` shows what each rank reads -- the head's own geometry on the ``meta``
device, exactly the regions the loader narrows to -- and :func:`run_two_ranks` runs it: two
processes (``torch.multiprocessing``, gloo over a file store in a fresh folder) each load
their shard with ``load_lm_head`` and all-gather the logits, which must equal the
one-process logits bit for bit. The library never initializes a process group; these two
processes are the demo's own, like the ones ``torchrun`` would start.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from quantreg.distributed import TPGroup
from quantreg.lm_head import ParallelLMHead
from quantreg.resolution import Resolution

logger = logging.getLogger(__name__)

RANKS = 2
TIMEOUT = timedelta(seconds=60)  # a rank that waits longer raises instead of hanging


@dataclass(frozen=True)
class RankShard:
    """What one rank holds and reads.

    Attributes:
        rank: the rank.
        start, stop: its rows of the padded vocab.
        real: how many of them are real vocab ids (the rest is zero padding).
        reads: checkpoint tensor -> ``(dim, start, stop)`` of the slice this rank reads.
    """

    rank: int
    start: int
    stop: int
    real: int
    reads: dict[str, tuple[int, int, int]]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "reads": {k: list(v) for k, v in self.reads.items()}}


def shard_plan(resolution: Resolution, vocab: int, hidden: int) -> list[RankShard]:
    """Each rank's rows and checkpoint slices for a head of ``resolution`` (nothing is read)."""
    plan = []
    for rank in range(RANKS):
        with torch.device("meta"):
            head = ParallelLMHead(
                vocab, hidden, quant_config=resolution.config, prefix=resolution.prefix,
                params_dtype=torch.float32, tp=TPGroup(None, rank, RANKS),
            )  # fmt: skip
        reads = {}
        for name, param in head.named_parameters():
            region = head.checkpoint_region(param)
            if region is not None:
                reads[f"{resolution.prefix}.{name}"] = region
        real = max(0, min(head.shard_end, vocab) - head.shard_start)
        plan.append(RankShard(rank, head.shard_start, head.shard_end, real, reads))
    return plan


@dataclass(frozen=True)
class TwoRanks:
    """The outcome of :func:`run_two_ranks`: whether every rank's logits equal the
    one-process logits, each rank's kernel and resident bytes, and how long it took."""

    equal: bool
    seconds: float
    ranks: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_two_ranks(path: Path, x: torch.Tensor, expected: torch.Tensor) -> TwoRanks:
    """Load ``path`` on two gloo ranks, compute ``x``'s logits on each and compare them with
    ``expected`` (the one-process logits); a failed rank is reported, not raised."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantreg-demo-tp-") as tmp:
        folder = Path(tmp)
        save_file({"x": x.contiguous()}, str(folder / "x.safetensors"))
        init = f"file://{folder / 'store'}"
        try:
            mp.spawn(_rank, args=(init, str(path), str(folder)), nprocs=RANKS, join=True)
        except Exception as exc:  # a rank failed: its error, not a traceback of the spawn
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            return TwoRanks(False, time.perf_counter() - start, error=message)
        ranks, equal = [], True
        for rank in range(RANKS):
            logits = load_file(str(folder / f"rank{rank}.safetensors"))["logits"]
            equal = equal and torch.equal(logits, expected)
            ranks.append(json.loads((folder / f"rank{rank}.json").read_text()))
    return TwoRanks(equal, time.perf_counter() - start, ranks)


def _rank(rank: int, init: str, path: str, folder: str) -> None:
    """One spawned rank: join the group, load this rank's shard, all-gather the logits."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from quantreg.loading import load_lm_head

    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=RANKS, timeout=TIMEOUT)
    try:
        head = load_lm_head(path, dtype=torch.float32)  # tp=None: the default group
        x = load_file(str(Path(folder) / "x.safetensors"))["x"]
        with torch.inference_mode():
            logits = head.compute_logits(x)
        save_file({"logits": logits.contiguous()}, str(Path(folder) / f"rank{rank}.safetensors"))
        assert head.kernel is not None  # recorded by the loader
        report = {
            "rank": rank, "rows": [head.shard_start, head.shard_end], "kernel": head.kernel.name,
            "resident_bytes": head.resident_bytes(),
        }  # fmt: skip
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def format_tp(plan: list[RankShard], vocab: int, ran: TwoRanks, single_bytes: int) -> list[str]:
    """The screen's lines after its title (``single_bytes``: the one-process head's)."""
    padded = plan[-1].stop
    lines = [
        f"   {vocab} rows padded to {padded} = {RANKS} ranks x {padded // RANKS} (each slice a "
        "multiple of 64, so no packed word straddles two ranks);",
        "   AWQ keeps the vocab on dim 1, 8 ids per int32 word: a loader that narrows dim 0 "
        "reads the wrong slice",
    ]
    for shard in plan:
        pad = shard.stop - shard.start - shard.real
        rows = f"rows [{shard.start}, {shard.start + shard.real})"
        rows += f" + {pad} padding" if pad else ""
        reads = "  ".join(
            f"{name.rpartition('.')[2]}[{':, ' * dim}{a}:{b}]"
            for name, (dim, a, b) in shard.reads.items()
        )
        lines.append(f"     rank {shard.rank}: {rows:<30} reads {reads}")
    if ran.error is not None:
        lines.append(f"   ran on {RANKS} gloo processes: FAILED: {ran.error}")
    else:
        verdict = "yes" if ran.equal else "NO"
        lines.append(
            f"   ran on {RANKS} gloo processes ({ran.seconds:.1f} s): every rank's "
            f"compute_logits equals the one-process logits bit for bit: {verdict}"
        )
        held = " + ".join(f"{r['resident_bytes']:,d}" for r in ran.ranks)
        lines.append(
            f"   each rank holds its slice only: {held} bytes (one process: {single_bytes:,d})"
        )
    return lines

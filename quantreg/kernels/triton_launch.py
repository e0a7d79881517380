"""What the Triton kernels share: a launch configuration, a launch as data, and the choice of a
configuration per shape -- timed once per process, or read from the table tuned on that card.

A :class:`Launch` is the kernel, grid, arguments, constexprs and options of one call, built
before it runs: it runs on a GPU or the interpreter, and ``triton_aot`` compiles the same launch
for a named card on a machine without one.

Choosing a configuration (:func:`tuned_config`) on CUDA: the process's own cache, else the
card's row of the tuned table shipped with quantreg (``triton_tuned.json``, written by
``bench/gpu.py --save-tuned`` on that card, so that a first call does not time every candidate),
else each candidate timed once. Under the interpreter the one with the fewest programs runs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantreg.errors import ConfigError
from quantreg.files import read_json
from quantreg.output_files import write_file
from quantreg.validation_messages import first_field

logger = logging.getLogger(__name__)

TUNED_TABLE = Path(__file__).with_name("triton_tuned.json")


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Config:
    """One launch configuration of a kernel."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def warps_for(block_n: int, block_k: int) -> int:
    """Warps for a tile whose weights are dequantized in registers: 8 from a 128 x 128 weight
    tile on, where 4 spill (bench/gpu_aot.py, sm_80 and sm_90: up to 788 bytes a thread at 4
    warps, none at 8), else 4."""
    return 8 if block_n * block_k >= 128 * 128 else 4


@dataclass(frozen=True)
class Launch:
    """One kernel launch as data: ``kernel[grid](*args, **constexprs, num_warps, num_stages)``
    writes float32 partial sums ``[splits, M, N]`` into ``out`` (one of ``args``)."""

    kernel: Any
    grid: tuple[int, int, int]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(hash=False)
    config: Config
    out: torch.Tensor = field(hash=False)

    def run(self) -> torch.Tensor:
        """Launch, then add the split-K partial sums: float32 ``[M, N]``."""
        self.kernel[self.grid](
            *self.args, **self.constexprs,
            num_warps=self.config.num_warps, num_stages=self.config.num_stages,
        )  # fmt: skip
        return self.out[0] if self.out.shape[0] == 1 else self.out.sum(0)


class TunedConfig(BaseModel):
    """One tuned configuration, as the table stores it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    block_m: int = Field(ge=16, le=256)
    block_n: int = Field(ge=16, le=512)
    block_k: int = Field(ge=16, le=512)
    split_k: int = Field(ge=1, le=64)
    num_warps: int = Field(ge=1, le=32)
    num_stages: int = Field(ge=1, le=8)


class TunedCard(BaseModel):
    """The configurations tuned on one card (named as ``torch.cuda.get_device_name`` names it):
    the Triton version and date they were timed with, and one per shape key."""

    model_config = ConfigDict(extra="forbid")
    triton: str
    date: str
    configs: dict[str, TunedConfig]


class TunedTable(BaseModel):
    """``triton_tuned.json``: the tuned configurations of every card they were timed on."""

    model_config = ConfigDict(extra="forbid")
    cards: dict[str, TunedCard] = {}


def read_tuned_table(path: Path) -> TunedTable:
    """The tuned table at ``path`` (an empty one where the file does not exist), read by
    quantreg's one JSON reader (``files.read_json``: a regular file, bounded, strict JSON).

    Raises:
        ConfigError: the file is not a readable regular file, not JSON or not a table; the
            message names the file and, for a bad table, the field.
    """
    if not path.exists():
        return TunedTable()
    data = read_json(path, what="tuned Triton table")
    try:
        return TunedTable.model_validate(data)
    except ValidationError as exc:
        bad = first_field(exc)
        msg = exc.errors(include_url=False)[0]["msg"]
        raise ConfigError(
            f"{path}: field {bad!r}: {msg} (a table of tuned Triton configurations, as "
            "bench/gpu.py --save-tuned writes it)",
            path=path,
            field=bad,
        ) from None


@functools.cache
def shipped_configs(card: str) -> dict[str, Config]:
    """The configurations tuned on ``card`` that quantreg ships (empty for an untuned card)."""
    row = read_tuned_table(TUNED_TABLE).cards.get(card)
    return {} if row is None else {key: Config(**c.model_dump()) for key, c in row.configs.items()}


def card_name(device: torch.device) -> str:
    """The card's name as ``torch.cuda.get_device_name`` gives it (the tuned table's key)."""
    return torch.cuda.get_device_name(device)


def m_bucket(m: int) -> int:
    """The bucket of M a configuration is chosen for: the next power of two."""
    return 1 << max(0, (m - 1).bit_length())


def shape_key(kernel: str, m: int, **fields: object) -> str:
    """A shape's key in the tuned table: the kernel, M's bucket (the next power of two) and
    the fields that decide the launch, e.g. ``wna16 m=16 n=32000 k=4096 group=128 bits=4
    groups=regular dtype=bfloat16``."""
    text = {name: str(v).removeprefix("torch.") for name, v in fields.items()}
    return " ".join([kernel, f"m={m_bucket(m)}", *(f"{name}={v}" for name, v in text.items())])


_remembered: dict[tuple[Any, ...], Config] = {}


def remembered(key: tuple[Any, ...], choose: Callable[[], Config]) -> Config:
    """``choose()``'s configuration for ``key`` (a tuple of the kernel, M's bucket, the fields
    that decide the launch and the device), asked once per process: a call then skips building
    the candidates and the table's key, most of the Python it spent around the launch
    (bench/triton_overhead.py)."""
    cfg = _remembered.get(key)
    if cfg is None:
        cfg = _remembered[key] = choose()
    return cfg


_tuned: dict[tuple[str, int | None], Config] = {}
_tune_lock = threading.Lock()


def tuned_config(
    x: torch.Tensor, options: list[Config], key: str, launch: Callable[[Config], Any]
) -> Config:
    """The best of ``options`` for the shape ``key`` (see the module's docstring): on CUDA the
    process's cache, else the card's shipped choice when it is one of ``options``, else each
    option timed once (``launch`` runs one); on the interpreter the one with the fewest
    programs (its cost is per program; every candidate has its own test)."""
    if x.device.type != "cuda":
        return min(options, key=lambda c: (c.split_k, -c.block_n, -c.block_k))
    if len(options) == 1:
        return options[0]
    cache_key = (key, x.device.index)
    with _tune_lock:
        if cache_key in _tuned:
            return _tuned[cache_key]
    shipped = shipped_configs(card_name(x.device)).get(key)
    if shipped in options:
        best = shipped
    else:
        if shipped is not None:  # a table from before the candidates changed
            logger.info("tuned table: %s -> %s is no longer a candidate; timing", key, shipped)
        best = _fastest(options, launch)
        logger.info("tuned %s -> %s", key, best)
    with _tune_lock:
        _tuned[cache_key] = best
    return best


def _fastest(options: list[Config], launch: Callable[[Config], Any]) -> Config:
    from triton.testing import do_bench

    times = []
    for cfg in options:
        try:
            times.append((do_bench(functools.partial(launch, cfg), warmup=5, rep=20), cfg))
        except Exception as exc:  # e.g. out of shared memory on a small GPU
            logger.debug("config %s failed: %s", cfg, exc)
    return min(times, key=lambda t: t[0])[1] if times else options[0]


def tuned_in_process(device: torch.device | None = None) -> dict[str, Config]:
    """The configurations this process has chosen on ``device`` (default: every CUDA device
    it used), by shape key: what ``bench/gpu.py --save-tuned`` records."""
    with _tune_lock:
        items = list(_tuned.items())
    index = None if device is None else torch.device(device).index
    return {key: cfg for (key, dev), cfg in items if index is None or dev == index}


def save_tuned(path: Path, card: str, triton_version: str, date: str,
               configs: dict[str, Config]) -> TunedTable:  # fmt: skip
    """Merge ``configs`` into the table at ``path`` as ``card``'s row, write it and return it:
    the keys it names are replaced, the row's other keys kept where they were timed with the
    same Triton version (dropped otherwise), the other cards' rows kept. Written as quantreg
    writes every output (``output_files.write_file``: beside, then renamed into place).

    Raises:
        ConfigError: the file there is not a table (see :func:`read_tuned_table`).
        InputError: ``path`` cannot be written (a link to nothing, a read-only file, ...).
    """
    table = read_tuned_table(path)
    old = table.cards.get(card)
    merged = dict(old.configs) if old is not None and old.triton == triton_version else {}
    merged.update({key: TunedConfig(**asdict(cfg)) for key, cfg in sorted(configs.items())})
    table.cards[card] = TunedCard(triton=triton_version, date=date, configs=merged)
    text = json.dumps(table.model_dump(), indent=1, sort_keys=True) + "\n"
    write_file(path, lambda tmp: tmp.write_text(text), what="--save-tuned")
    return table

"""The story ``quantreg demo`` tells, one screen at a time.

1. An Eagle3 drafter whose lm_head is AWQ-packed: what a loader that builds the head from the
   target's (float) config gets -- missing ``weight``, unconsumed ``qweight``/``qzeros``/
   ``scales``, garbage logits -- and what quantreg resolves, with its ``explain()``.
2. An AutoAWQ config that never mentions ``lm_head`` over packed head tensors: the tensors win.
3. A vocab that is not a multiple of 64 on two tensor-parallel ranks (:mod:`quantreg.demo_tp`).
4. Every format: method, kernel, resident bytes vs bf16, logit error, top-1, timings
   (:mod:`quantreg.demo`).

:func:`screens` yields each screen when it is computed, so the command line prints it at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from quantreg._version import __version__
from quantreg.decision import resolve
from quantreg.demo import (
    CHECKPOINTS,
    DRAFT_VOCAB,
    HIDDEN,
    TOKENS,
    DemoRow,
    format_rows,
    hidden_states,
    logit_error,
    run_demo,
    write_demo_checkpoints,
)
from quantreg.demo_tp import format_tp, run_two_ranks, shard_plan
from quantreg.errors import InputError
from quantreg.lm_head import ParallelLMHead
from quantreg.loading import load_lm_head
from quantreg.output_files import strict_json
from quantreg.registry import list_quant_methods

DRAFTER = "awq_int4_g128"  # screens 1 and 3
FLOAT = "eagle3_unquantized"  # the float head every quantized one was made from
AUTOAWQ = "autoawq_no_lm_head_key"  # screen 2


@dataclass(frozen=True)
class Screen:
    """One screen of the demo: its data (``to_dict``), its text, and whether what it shows
    held (a failed check makes the demo exit 1)."""

    key: str
    title: str
    lines: tuple[str, ...]
    data: Any
    ok: bool

    def text(self) -> str:
        return "\n".join([self.title, *self.lines])


def run_demo_command(
    keep: str | os.PathLike[str] | None, *, seed: int, as_json: bool, emit: Callable[[str], None]
) -> bool:
    """``quantreg demo``: ``emit`` each screen's text as it is computed (or, ``as_json``, one
    JSON document at the end), then what to try next; returns whether every check held.

    Raises:
        InputError: a bad ``keep`` folder (see :func:`demo_folder`).
    """
    data: dict[str, Any] = {}
    ok = True
    with demo_folder(keep) as folder:
        if not as_json:
            methods = ", ".join(info.name for info in list_quant_methods())
            emit(f"quantreg {__version__} (methods: {methods})\n")
        for screen in screens(folder, seed=seed):
            ok = ok and screen.ok
            data[screen.key] = screen.data
            if not as_json:
                emit(f"{screen.text()}\n")
    kept = str(folder) if keep is not None else None
    if as_json:
        result = {"version": __version__, "checkpoints": kept, "ok": ok, **data}
        emit(strict_json(result))
    else:
        emit(next_steps(kept))
    return ok


@contextlib.contextmanager
def demo_folder(keep: str | os.PathLike[str] | None) -> Iterator[Path]:
    """The folder the demo writes into: ``keep`` (new or empty; it stays), else a temporary
    folder removed afterwards.

    Raises:
        InputError: ``keep`` is a file or a folder that is not empty (nothing is overwritten).
    """
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="quantreg-demo-") as tmp:
            yield Path(tmp)
        return
    folder = Path(keep)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--keep {folder}: is a file; pass a new or empty folder", field="keep")
    if folder.is_dir() and any(folder.iterdir()):
        raise InputError(
            f"--keep {folder}: the folder is not empty; the demo writes its {len(CHECKPOINTS)} "
            "checkpoints into a new or empty folder and never overwrites anything",
            field="keep",
        )
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


def screens(folder: Path, *, seed: int = 0) -> Iterator[Screen]:
    """Write the demo checkpoints into ``folder``, then yield each screen as it is computed."""
    written = write_demo_checkpoints(folder, seed=seed)
    x = hidden_states(seed)
    path, weight = written[DRAFTER]
    reference = x.double() @ weight.double().T
    head = load_lm_head(path, dtype=torch.float32)
    with torch.inference_mode():
        logits = head.compute_logits(x)
    yield drafter_screen(path, head, logits, x, reference, seed)
    yield tensors_win_screen(written[AUTOAWQ][0])
    yield tp_screen(path, head, x, logits)
    yield table_screen(run_demo(written=written, seed=seed))


def naive_load(path: Path, x: torch.Tensor, seed: int) -> tuple[str, list[str], list[str], Any]:
    """What a loader that builds the head from the target's float config does: a float
    ``nn.Linear`` given the checkpoint's ``lm_head.*`` tensors. Returns the strict load's
    error, the lenient load's missing and unexpected keys, and the lenient head's logits."""
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = {
            k.removeprefix("lm_head."): f.get_tensor(k)
            for k in f.keys()  # noqa: SIM118 (safe_open is no dict)
            if k.startswith("lm_head.")
        }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(HIDDEN, DRAFT_VOCAB, bias=False)
    try:
        linear.load_state_dict(state)
        strict = "loaded"
    except RuntimeError as exc:
        strict = " ".join(line.strip() for line in str(exc).splitlines()[1:])
    missing, unexpected = linear.load_state_dict(state, strict=False)
    with torch.inference_mode():
        return strict, list(missing), list(unexpected), linear(x)


def _agreement(logits: torch.Tensor, reference: torch.Tensor) -> tuple[str, dict[str, float]]:
    rel, top1 = logit_error(logits, reference)
    agree = round(top1 * len(reference))
    text = (
        f"logits vs the float head: relative error {rel:.1e}, top-1 agreement {top1:.0%} "
        f"({agree}/{len(reference)} tokens)"
    )
    return text, {"rel_error": rel, "top1": top1}


def drafter_screen(
    path: Path,
    head: ParallelLMHead,
    logits: torch.Tensor,
    x: torch.Tensor,
    reference: torch.Tensor,
    seed: int,
) -> Screen:
    """Screen 1: the naive float head against quantreg's."""
    resolution = head.resolution
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = ", ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in resolution.tensor_infos)
    strict, missing, unexpected, naive = naive_load(path, x, seed)
    naive_text, naive_data = _agreement(naive, reference)
    ours_text, ours_data = _agreement(logits, reference)
    explain = head.explain().splitlines()
    lines = (
        f"   {path}", f"   quantization_config: {json.dumps(qcfg)}", f"   head tensors: {tensors}",
        "", f"   A loader that builds the head from the target's float config "
        f"(nn.Linear({HIDDEN}, {DRAFT_VOCAB}, bias=False)) and loads the lm_head.* tensors:",
        f"     strict: {strict}",
        f"     lenient (strict=False: unknown names skipped): missing {missing}, "
        f"unconsumed {unexpected}; the head keeps its random init",
        f"     {naive_text}", "", "   quantreg.load_lm_head(path) -> head.explain():",
        *(f"     {line}" for line in explain), f"     {ours_text}",
    )  # fmt: skip
    data = {
        "checkpoint": str(path), "naive": {"strict": strict, "missing": missing,
        "unexpected": unexpected, **naive_data}, "quantreg": {"method": resolution.method,
        "kernel": head.kernel.name, "explain": head.explain(), **ours_data},
    }  # fmt: skip
    return Screen(
        "drafter",
        f"1. An Eagle3 drafter whose lm_head is AWQ int4 ({TOKENS} random hidden states)",
        lines, data, ok=resolution.quantized and "weight" in missing,
    )  # fmt: skip


def tensors_win_screen(path: Path) -> Screen:
    """Screen 2: a config that keeps the head float, over packed tensors."""
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    resolution = resolve(path)
    names = [t.name for t in resolution.tensor_infos]
    lines = (
        f"   {path}", f"   quantization_config: {json.dumps(qcfg)}",
        "   read literally, lm_head stays float -- but the checkpoint has no lm_head.weight, "
        f"only {', '.join(names)}",
        "   quantreg.resolve(path): the tensors win",
        f"     method: {resolution.method or 'unquantized'}", f"     rule: {resolution.rule}",
        *(f"     note: {note}" for note in resolution.notes),
    )  # fmt: skip
    data = {
        "checkpoint": str(path), "method": resolution.method, "rule": resolution.rule,
        "notes": list(resolution.notes), "tensors": names,
    }  # fmt: skip
    return Screen(
        "tensors_win", "2. An AutoAWQ config that never mentions lm_head, over a packed head",
        lines, data, ok=resolution.quantized,
    )  # fmt: skip


def tp_screen(path: Path, head: ParallelLMHead, x: torch.Tensor, logits: torch.Tensor) -> Screen:
    """Screen 3: the same drafter on two tensor-parallel ranks."""
    plan = shard_plan(head.resolution, head.num_embeddings, head.embedding_dim)
    ran = run_two_ranks(path, x, logits)
    title = (
        f"3. A {head.num_embeddings}-token vocab (not a multiple of 64) on two "
        "tensor-parallel ranks"
    )
    data = {"checkpoint": str(path), "shards": [s.to_dict() for s in plan], "run": ran.to_dict()}
    lines = (f"   {path}", *format_tp(plan, head.num_embeddings, ran, head.resident_bytes()))
    return Screen("tensor_parallel", title, lines, data, ok=ran.equal)


def table_screen(rows: list[DemoRow]) -> Screen:
    """Screen 4: every format, loaded and run."""
    title = (
        f"4. Every format, loaded and run in float32 ({TOKENS} tokens; error and top-1 against "
        f"the float head ({FLOAT}, the source of every quantized one) in float64; resident "
        "bytes against that head in bf16)"
    )
    return Screen(
        "rows", title, tuple(format_rows(rows).splitlines()),
        [r.to_dict() for r in rows], ok=all(r.target_vocab_ok for r in rows),
    )  # fmt: skip


def next_steps(folder: str | None) -> str:
    """What to try after the demo, on the kept checkpoints (or how to keep them)."""
    where = folder if folder is not None else "DIR"
    lines = ["next, try:"]
    if folder is None:
        lines.append("  quantreg demo --keep DIR      (keeps the checkpoints; this run's are gone)")
    lines += [
        f"  quantreg resolve {where}/{AUTOAWQ}",
        f"  quantreg inspect {where}/gptq_int4_g128_act_order",
        f"  quantreg run {where}/{DRAFTER} --tokens 2",
        f"  quantreg run {where}/{DRAFTER} --reference {where}/{FLOAT}  (what int4 cost)",
        f"  quantreg compare {where}/gptq_int8_g64_asym {where}/{FLOAT}",
        f"  quantreg run {where}/ct_w4a16_g128_asym --dtype bfloat16 --json",
    ]
    return "\n".join(lines)

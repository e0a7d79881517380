"""``quantreg run`` and ``quantreg compare``: load a head, compute logits, and (with a reference
head) report what quantization cost. Under torchrun every rank loads its vocab slice and
computes the full logits; rank 0 reports.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from quantreg.cli_commands import STDOUT, checkpoint_files, print_json
from quantreg.errors import InputError
from quantreg.files import regular_stat
from quantreg.output_files import FileId, file_ids, output_file, write_file


def cmd_run(args: argparse.Namespace) -> int:
    """Load the head, compute logits for hidden states, print top-5 ids and timings (and the
    comparison with ``--reference``)."""
    reads = _checked_inputs(args)
    head, x, logits, times = _load_and_compute(args)
    reference = _against_reference(args, head, x, logits) if args.reference else None
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.tolist()
    if args.rank != 0:
        return 0  # under torchrun every rank computed the full logits; rank 0 reports them
    if args.out is not None:
        _write_logits(args, logits, reads)
    result = {**_head_facts(head), **times, "top5": top5}
    if reference is not None:
        result["reference"] = reference
    if args.json:
        print_json(args, result)
        return 0
    args.doing = STDOUT
    _print_head(head, result, tokens=x.shape[0])
    for i, ids in enumerate(top5):
        print(f"  token {i}: top-5 ids {ids}")
    if reference is not None:
        _print_reference(reference)
    if args.out is not None:
        print(f"logits {list(logits.shape)} written to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run a head and a reference head on the same hidden states; print the metrics."""
    _checked_inputs(args)
    head, x, logits, times = _load_and_compute(args)
    reference = _against_reference(args, head, x, logits)
    if args.rank != 0:
        return 0
    result = {**_head_facts(head), **times, "reference": reference}
    if args.json:
        print_json(args, result)
        return 0
    args.doing = STDOUT
    _print_head(head, result, tokens=x.shape[0])
    _print_reference(reference)
    return 0


def _checked_inputs(args: argparse.Namespace) -> dict[FileId, Path]:
    """Check ``--hidden`` and ``--out`` before any work (the checkpoints are checked as they
    are read); returns the files the command reads.

    Raises:
        CheckpointError: ``--hidden`` is not a regular file, or ``--out`` is a path the
            command refuses.
    """
    if args.hidden is not None:  # before the load: a bad --hidden fails fast
        regular_stat(Path(args.hidden), what="hidden states file")
    paths = [*checkpoint_files(args.path), *([args.hidden] if args.hidden else [])]
    if args.reference is not None:
        paths += checkpoint_files(args.reference)
    reads = file_ids(paths)
    if args.out is not None:  # every rank checks, so all fail alike before any collective
        output_file(args.out, reads=reads, what="--out")
    return reads


def _load_and_compute(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, float]]:
    """The head, the hidden states, its logits and ``{load_s, forward_s}``."""
    import torch

    from quantreg.loading import load_lm_head
    from quantreg.values import check_logits

    args.doing = f"loading {args.prefix} of {args.path}"
    start = time.perf_counter()
    head = load_lm_head(
        args.path, device=args.device, dtype=args.dtype, requested=args.quantization,
        platform=args.platform, prefix=args.prefix, kernel=args.kernel,
        activation_dtype=args.activation_dtype,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    x = _hidden_states(args, head.embedding_dim).to(device=args.device, dtype=head.params_dtype)
    args.doing = f"computing logits for {x.shape[0]} tokens"
    start = time.perf_counter()
    with torch.inference_mode():
        logits = head.compute_logits(x)
    forward_s = time.perf_counter() - start
    check_logits(logits, x, head, args.path, args.hidden)  # no exit 0 with NaN / inf logits
    return head, x, logits, {"load_s": round(load_s, 6), "forward_s": round(forward_s, 6)}


def _against_reference(args: argparse.Namespace, head: Any, x: Any, logits: Any) -> dict[str, Any]:
    """Load the reference head in the head's dtype, run it on ``x`` and compare.

    Raises:
        InputError: the reference has another vocab or hidden size.
    """
    import torch

    from quantreg.compare import check_comparable, compare_logits
    from quantreg.loading import load_lm_head

    args.doing = f"loading the reference {args.prefix} of {args.reference}"
    reference = load_lm_head(
        args.reference, device=args.device, dtype=head.params_dtype, platform=args.platform,
        prefix=args.prefix,
    )  # fmt: skip
    check_comparable(head, reference)
    args.doing = f"computing the reference logits for {x.shape[0]} tokens"
    with torch.inference_mode():
        expected = reference.compute_logits(x)
    args.doing = "comparing the logits with the reference's"
    comparison = compare_logits(logits, expected)
    assert reference.kernel is not None  # recorded by the loader
    return {
        "path": str(args.reference),
        "method": reference.resolution.method if reference.resolution else None,
        "kernel": reference.kernel.name,
        "dtype": str(head.params_dtype).removeprefix("torch."),
        **comparison.to_dict(),
    }


def _head_facts(head: Any) -> dict[str, Any]:
    """What ran: method, kernel, resident bytes and the tensor-parallel split."""
    assert head.kernel is not None  # recorded by the loader
    return {
        "method": head.resolution.method if head.resolution else None,
        "kernel": head.kernel.name,
        "kernel_reason": head.kernel.reason,
        "activation_dtype": head.activation_dtype,
        "resident_bytes": head.resident_bytes(),
        "tp_size": head.tp_size,
        "resident_bytes_per_rank": head.tp_size > 1,
    }


def _print_head(head: Any, result: dict[str, Any], *, tokens: int) -> None:
    print(f"method: {result['method'] or 'unquantized'}  ({head.quant_reason})")
    print(f"kernel: {result['kernel']}  ({result['kernel_reason']})")
    if result["activation_dtype"] is not None:
        print(f"activations: {result['activation_dtype']}, quantized per row (opted in)")
    if head.tp_size > 1:
        where = f"on rank {head.tp_rank} (its vocab slice: bytes are per rank)"
        print(f"tensor parallel: {head.tp_size} ranks; every rank computed the full logits")
    else:
        where = "(one process: the whole head)"
    print(
        f"load {result['load_s'] * 1e3:.1f} ms, forward {result['forward_s'] * 1e3:.2f} ms "
        f"({tokens} tokens), resident head {result['resident_bytes']:,d} bytes {where}"
    )


def _print_reference(reference: dict[str, Any]) -> None:
    from quantreg.compare import Comparison

    metrics = Comparison(**{k: reference[k] for k in Comparison.__dataclass_fields__})
    print(
        f"against {reference['path']} ({reference['method'] or 'unquantized'}, kernel "
        f"{reference['kernel']}, the same hidden states in {reference['dtype']}):"
    )
    print(f"  {metrics.summary()}")


def _hidden_states(args: argparse.Namespace, hidden: int) -> Any:
    """``--hidden``'s tensor ``x`` (checked against the head's hidden size) or ``--tokens``
    random rows from ``--seed``.

    Raises:
        CheckpointError: an unreadable ``--hidden`` file (see ``read_hidden_states``).
        InputError: its ``x`` has another number of features than the head.
    """
    import torch

    from quantreg.checkpoint import read_hidden_states

    if args.hidden is None:
        args.doing = f"drawing {args.tokens} random hidden states of size {hidden}"
        return torch.randn(args.tokens, hidden, generator=torch.Generator().manual_seed(args.seed))
    args.doing = f"reading hidden states from {args.hidden}"
    x = read_hidden_states(args.hidden)
    if x.shape[-1] != hidden:
        raise InputError(
            f"{args.hidden}: tensor 'x' has {x.shape[-1]} features; the head expects "
            f"hidden size {hidden}",
            field="hidden",
        )
    return x


def _write_logits(args: argparse.Namespace, logits: Any, reads: dict[FileId, Path]) -> None:
    from quantreg.writers import save_tensors

    args.doing = f"writing logits to {args.out}"
    tensors = {"logits": logits.detach().cpu().contiguous()}
    write_file(Path(args.out), lambda tmp: save_tensors(tensors, tmp), reads=reads, what="--out")

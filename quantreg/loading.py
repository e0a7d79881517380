"""``load_lm_head``: resolve, build, validate, then load only this rank's slices.

Every expected tensor's name, shape and dtype is checked against the safetensors headers
before any data is read, and every problem is reported at once. Data is read lazily with
``safe_open(...).get_slice`` -- only the tensors under the prefix, only this rank's slice,
each shard opened once -- and handed to the method's per-parameter hook in the checkpoint's
own dtype. A failure leaves nothing behind; checkpoint files are never written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from quantreg.checkpoint import D2T_NAME, TensorInfo, read_tensor
from quantreg.decision import resolve
from quantreg.detection import flatten_config
from quantreg.distributed import TPGroup
from quantreg.drafter import draft_to_target_ids
from quantreg.errors import CheckpointError, ConfigError, DistributedError, InputError
from quantreg.head_check import check_tensors
from quantreg.head_config import default_dtype, head_geometry, parse_dtype
from quantreg.kernels.selection import Kernel, check_activation_dtype, check_kernel_activations
from quantreg.lm_head import MAX_VOCAB, ParallelLMHead
from quantreg.platform import Platform
from quantreg.reading import read_into
from quantreg.registry import Registry
from quantreg.resolution import Resolution
from quantreg.values import check_finite
from quantreg.view import CheckpointView

logger = logging.getLogger(__name__)

METHOD_DEFINED = "method-defined"


def load_lm_head(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    requested: str | None = None,
    platform: Platform | str | None = None,
    tp: Any = None,
    strict: bool = True,
    prefix: str = "lm_head",
    registry: Registry | None = None,
    kernel: str | None = None,
    activation_dtype: str | None = None,
) -> ParallelLMHead:
    """Resolve, build and load the lm_head of a checkpoint folder; returns it with
    ``.resolution`` (the method, and why) and ``.kernel`` (the kernel it runs, and why).

    ``dtype`` is the activation and compute dtype (default: the config's ``dtype`` /
    ``torch_dtype``, else the head's float tensor dtype, else float32). ``platform`` steers
    resolution and defaults to ``Platform.detect(device)``; it must describe the kind of device
    the head is loaded on. The kernel is chosen for that device, once; ``kernel`` forces one of
    ``quantreg.kernels.kernel_names()`` (the method must run it); ``activation_dtype="int8"``
    opts in to int8 activations (per row, dynamic, symmetric, as vLLM's W8A8 / W4A8; README:
    their error), refusing a head no such kernel runs. With ``strict=False`` unconsumed head
    tensors only log a WARNING. An Eagle3 drafter's ``d2t`` is loaded and checked (see
    ``ParallelLMHead.to_target_vocab``); a tied head loads from its embedding. Under tensor
    parallelism every rank reports whether its load succeeded before any returns: a failure on
    one rank raises on every rank instead of leaving them waiting.

    Raises:
        ConfigError: bad config or requested method (see :func:`quantreg.resolve`).
        InputError: a bad ``dtype``, ``tp``, ``device``, ``kernel``, ``activation_dtype``, or
            a ``platform`` of another device kind than ``device``.
        CheckpointError: missing, misshapen, mistyped or unconsumed tensors; unreadable
            files; a bad ``d2t``. The message names the tensors and files.
        DistributedError: this rank loaded fine but another rank failed.
    """
    group = TPGroup.resolve(tp)
    try:
        plat = _platform(platform, device)
        resolution = resolve(
            Path(path), platform=plat, requested=requested, prefix=prefix, registry=registry
        )
        head = _load(resolution, device, dtype, group, strict, (kernel, activation_dtype))
    except Exception:
        # Tell the other ranks, then re-raise here: an exception kept in a local forms a cycle
        # (exception -> traceback -> frame) keeping the ProcessGroup alive past
        # destroy_process_group; gloo's threads then met interpreter exit: SIGABRT.
        if group.size > 1:
            group.failed_ranks(True)
        raise
    if group.size > 1:
        failed = group.failed_ranks(False)
        if failed:
            raise DistributedError(
                f"loading {prefix} of {path} failed on rank(s) {failed} of {group.size}; "
                f"rank {group.rank} loaded its shard, but the head is unusable without "
                "every shard (see the failing rank's error)"
            )
    return head


def _platform(platform: Platform | str | None, device: str | torch.device) -> Platform:
    """The platform to resolve for: the device's, or the given one if it is of that kind.

    Raises:
        InputError: a platform of another device kind than ``device`` (nothing silent: a
            'cuda:9.0' resolution on a CPU device would choose GPU methods that then run CPU
            kernels).
    """
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"invalid device {device!r}: {exc}", field="device") from exc
    if platform is None:
        return Platform.detect(device)
    plat = Platform.coerce(platform)
    if plat.device != kind:
        raise InputError(
            f"platform '{plat}' describes a {plat.device} device, but the head is loaded on "
            f"'{device}'; pass platform=None to probe the device (or load on a {plat.device} "
            "device); to force a method anyway use requested=...",
            field="platform",
        )
    return plat


def _load(
    resolution: Resolution,
    device: str | torch.device,
    dtype: torch.dtype | str | None,
    group: TPGroup,
    strict: bool,
    asked: tuple[str | None, str | None],
) -> ParallelLMHead:
    check_activation_dtype(asked[1])
    # Every header is checked on a meta-device head first: a config that claims a huge head
    # over small tensors is refused before a byte of it is allocated.
    checked, tensors = _build(resolution, "meta", dtype, group)
    names = check_tensors(checked, tensors, resolution, strict=strict)
    head, _ = _build(resolution, device, dtype, group)
    view = resolution.view
    assert view is not None  # _build checked it
    kernel, activation_dtype = asked
    head.requested_kernel, head.activation_dtype = kernel, activation_dtype
    _attach_vocab_map(head, view, device)
    read_into(head, [(getattr(head, name), info) for name, info in names], torch.device(device))
    _process(head, tensors)
    head.eval()
    assert head.kernel is not None
    if kernel is not None and head.kernel.name != kernel:
        raise InputError(
            f"kernel {kernel!r} was requested, but '{resolution.prefix}' resolved as "
            f"{resolution.method or 'unquantized'} runs {head.kernel.name} ({head.kernel.reason})",
            field="kernel",
        )
    what = f"'{resolution.prefix}' resolved as {resolution.method or 'unquantized'}"
    check_kernel_activations(head.kernel, activation_dtype, what)
    logger.info(
        "loaded %s of %s: method %s, kernel %s, vocab %d x hidden %d, rank %d/%d, %s",
        resolution.prefix, view.source, resolution.method or "unquantized", head.kernel.name,
        head.num_embeddings, head.embedding_dim, head.tp_rank, head.tp_size, head.params_dtype,
    )  # fmt: skip
    return head


def check_lm_head(
    resolution: Resolution, *, dtype: torch.dtype | str | None = None, strict: bool = True
) -> None:
    """Check the safetensors headers of a resolved head against the parameters its method
    creates -- every name, shape and dtype, all problems at once -- without reading or
    allocating a tensor (the head is built on the ``meta`` device).

    What :func:`load_lm_head` checks before it reads any data, for callers that load the
    weights themselves (an engine's own loader) and must not find a missing or misshapen
    tensor half-way. ``resolution`` comes from :func:`quantreg.resolve` on a checkpoint
    folder; ``dtype`` and ``strict`` are :func:`load_lm_head`'s.

    Raises:
        InputError: ``resolution`` was not resolved from a checkpoint folder, or a bad
            ``dtype``.
        CheckpointError: missing, misshapen, mistyped or (``strict``) unconsumed tensors,
            or no safetensors weights; the message names the tensors and files.
    """
    view = resolution.view if isinstance(resolution, Resolution) else None
    if view is None or view.root is None:
        got = f"one of {view.source}" if view is not None else type(resolution).__name__
        raise InputError(
            "check_lm_head takes a Resolution from quantreg.resolve(<checkpoint folder>); "
            f"got {got}",
            field="resolution",
        )
    head, tensors = _build(resolution, "meta", dtype, TPGroup.resolve(1))
    check_tensors(head, tensors, resolution, strict=strict)


def _build(
    resolution: Resolution, device: str | torch.device, dtype: torch.dtype | str | None,
    group: TPGroup,
) -> tuple[ParallelLMHead, dict[str, TensorInfo]]:  # fmt: skip
    """The head of ``resolution`` with empty parameters on ``device``, and its tensors.

    Raises:
        CheckpointError: no safetensors weights, or no head tensors (see ``_head_tensors``).
        ConfigError: sizes the method's config cannot lay out (a group size that does not
            divide the hidden size, ...), naming the config file.
    """
    view = resolution.view
    assert view is not None  # resolved from a folder
    if view.tensors is None:
        raise CheckpointError(
            f"{view.source} has no safetensors weights (model.safetensors or an index)",
            path=view.source,
        )
    tensors = _head_tensors(view, resolution)
    vocab, hidden = head_geometry(view.config, tensors, resolution.prefix, view.where)
    compute_dtype = (
        parse_dtype(dtype)
        if dtype is not None
        else default_dtype(view.config, tensors, resolution.prefix)
    )
    try:
        with torch.device(device):
            head = ParallelLMHead(
                vocab, hidden, bias=f"{resolution.prefix}.bias" in tensors,
                params_dtype=compute_dtype, quant_config=resolution.config,
                prefix=resolution.prefix, tp=group,
            )  # fmt: skip
    except ConfigError as exc:  # a method's create_weights knows the field, not the file
        if exc.path is not None:
            raise
        raise ConfigError(f"{view.where}: {exc}", path=view.where, field=exc.field) from exc
    head.resolution = resolution
    return head, tensors


def _head_tensors(view: CheckpointView, resolution: Resolution) -> dict[str, TensorInfo]:
    """The tensors the head loads: its own, or the embedding it is tied to.

    Raises:
        CheckpointError: no head tensors and no tied embedding (use ``share_lm_head``).
    """
    assert view.tensors is not None
    prefix = resolution.prefix
    if resolution.tied_to is not None:
        return {f"{prefix}.weight": view.side[resolution.tied_to]}
    if view.tensors:
        return dict(view.tensors)
    tied = flatten_config(view.config).get("tie_word_embeddings")
    embedding = next((name for name in view.side if name != D2T_NAME), None)
    have = f"embedding {embedding}" if embedding else "no embedding"
    raise CheckpointError(
        f"{view.source} has no {prefix}.* tensors (tie_word_embeddings: {_flag(tied)}, "
        f"{have}); a drafter without a head of its own uses its target's: load the target's "
        "head and call quantreg.share_lm_head(None, target_head)",
        path=view.source,
        tensor=f"{prefix}.weight",
    )


def _attach_vocab_map(
    head: ParallelLMHead, view: CheckpointView, device: str | torch.device
) -> None:
    """Load and check an Eagle3 drafter's ``d2t``, if the checkpoint has one."""
    d2t = view.side.get(D2T_NAME)
    if d2t is None:
        return
    target_vocab = flatten_config(view.config).get("vocab_size")
    if (
        not isinstance(target_vocab, int)
        or isinstance(target_vocab, bool)
        or not 1 <= target_vocab <= MAX_VOCAB
    ):
        raise ConfigError(
            f"{view.where}: the checkpoint has a d2t map but field 'vocab_size' = "
            f"{target_vocab!r} is not the target vocab size (a positive integer up to "
            f"{MAX_VOCAB})",
            path=view.config_file,
            field="vocab_size",
        )
    ids = draft_to_target_ids(
        read_tensor(d2t), d2t, vocab_size=target_vocab, draft_vocab_size=head.num_embeddings
    )
    head.set_vocab_map(ids.to(device), target_vocab)


def _process(head: ParallelLMHead, tensors: Mapping[str, TensorInfo]) -> None:
    """A finite bias, then the method's post-load step; errors name the file; a head without
    a recorded kernel gets a ``method-defined`` record."""
    try:
        if head.bias is not None:
            check_finite(head.bias, f"{head.prefix}.bias", cast=True)
        head.quant_method.process_weights_after_loading(head)
    except CheckpointError as exc:
        info = tensors.get(exc.tensor or "")
        if exc.path is not None or info is None:
            raise
        raise CheckpointError(f"{info.file}: {exc}", path=info.file, tensor=exc.tensor) from exc
    if head.kernel is None:
        head.kernel = Kernel.record(
            METHOD_DEFINED,
            f"{type(head.quant_method).__qualname__}.apply computes the head itself; it "
            "records no quantreg kernel",
        )


def _flag(value: Any) -> str:
    if value is None:
        return "absent"
    return str(value).lower() if isinstance(value, bool) else repr(value)

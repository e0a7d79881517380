"""``load_lm_head``: resolve, build, validate, then load only this rank's slices.

Every expected tensor's name, shape and dtype is checked against the safetensors headers
before any data is read, and every problem is reported at once. Data is read lazily with
``safe_open(...).get_slice`` -- only the tensors under the prefix, only this rank's slice,
each shard opened once. A failure leaves nothing behind; checkpoint files are never written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from quantreg.checkpoint import D2T_NAME, EMBEDDING_NAMES, FLOAT_DTYPES, TensorInfo
from quantreg.distributed import TPGroup
from quantreg.drafter import draft_to_target_ids, flatten_config
from quantreg.errors import CheckpointError, ConfigError, DistributedError
from quantreg.lm_head import ParallelLMHead
from quantreg.platform import Platform
from quantreg.progress import LoadProgress
from quantreg.resolution import CheckpointView, Resolution, read_checkpoint, resolve

logger = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def parse_dtype(value: torch.dtype | str) -> torch.dtype:
    """A compute dtype from a torch dtype or a name (``float32``, ``bf16``, ``torch.float16``).

    Raises:
        ConfigError: not one of float32, float16, bfloat16.
    """
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            raise ConfigError(f"unsupported dtype {value!r}: expected float32, float16 or bfloat16")
        dtype = DTYPE_NAMES[key]
    else:
        raise ConfigError(f"dtype must be a torch.dtype or a string, got {value!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"unsupported dtype {dtype}: expected float32, float16 or bfloat16")
    return dtype


def _nested(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]``, else the same key in ``text_config`` / ``transformer_layer_config``."""
    if config.get(key) is not None:
        return config[key]
    for section in ("text_config", "transformer_layer_config"):
        sub = config.get(section)
        if isinstance(sub, Mapping) and sub.get(key) is not None:
            return sub[key]
    return None


def head_geometry(
    config: Mapping[str, Any], tensors: Mapping[str, TensorInfo], prefix: str, where: str
) -> tuple[int, int]:
    """``(vocab rows, hidden size)`` of the head: ``draft_vocab_size`` (Eagle3) or
    ``vocab_size``, and ``hidden_size`` -- from config.json, else from a float weight.

    Raises:
        ConfigError: a size that is not a positive integer.
        CheckpointError: neither the config nor the tensors tell a size.
    """
    float_weight = tensors.get(f"{prefix}.weight")
    if float_weight is not None and (
        float_weight.dtype not in FLOAT_DTYPES or len(float_weight.shape) != 2
    ):
        float_weight = None
    sizes = []
    for keys, axis in ((("draft_vocab_size", "vocab_size"), 0), (("hidden_size",), 1)):
        value, field = None, None
        for key in keys:
            value = _nested(config, key)
            if value is not None:
                field = key
                break
        if value is None and float_weight is not None:
            value, field = float_weight.shape[axis], f"shape of {float_weight.name}"
        if value is None:
            raise CheckpointError(
                f"{where}: cannot tell the {prefix} size: config.json has no "
                f"{' / '.join(keys)} and there is no float {prefix}.weight to infer it from",
                path=where,
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: field '{field}' = {value!r}: expected a positive integer")
        sizes.append(value)
    return sizes[0], sizes[1]


def default_dtype(
    config: Mapping[str, Any], tensors: Mapping[str, TensorInfo], prefix: str
) -> torch.dtype:
    """The config's ``dtype`` / ``torch_dtype``, else the head's float dtype, else float32."""
    for key in ("dtype", "torch_dtype"):
        value = _nested(config, key)
        if isinstance(value, str) and value.strip().lower().removeprefix("torch.") in DTYPE_NAMES:
            return parse_dtype(value)
    for name in (f"{prefix}.weight", f"{prefix}.scales", f"{prefix}.weight_scale"):
        info = tensors.get(name)
        if info is not None and info.dtype in ("F16", "BF16", "F32"):
            return TORCH_DTYPES[info.dtype]
    return torch.float32


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
) -> ParallelLMHead:
    """Resolve, build and load the lm_head of a checkpoint folder; returns it with
    ``.resolution``.

    ``dtype`` is the activation and compute dtype (default: the config's ``dtype`` /
    ``torch_dtype``, else the head's float tensor dtype, else float32). ``platform``
    defaults to ``Platform.detect(device)``. With ``strict=False`` head tensors that no
    parameter consumes only log a WARNING. An Eagle3 drafter's ``d2t`` is loaded and checked
    (see ``ParallelLMHead.to_target_vocab``); a drafter without ``lm_head.*`` tensors but with
    ``tie_word_embeddings: true`` loads its head from its embedding.

    Under tensor parallelism every rank reports whether its own load succeeded before any
    returns, so a failure on one rank raises on every rank instead of leaving them waiting.

    Raises:
        ConfigError: bad config, dtype or requested method (see :func:`quantreg.resolve`).
        CheckpointError: missing, misshapen, mistyped or unconsumed tensors; unreadable
            files; a bad ``d2t``. The message names the tensors and files.
        DistributedError: this rank loaded fine but another rank failed.
    """
    group = TPGroup.resolve(tp)
    head: ParallelLMHead | None = None
    error: Exception | None = None
    try:
        head = _load(Path(path), device, dtype, requested, platform, group, strict, prefix)
    except Exception as exc:  # re-raised below, after the other ranks have been told
        error = exc
    if group.size > 1:
        failed = group.failed_ranks(error is not None)
        if error is None and failed:
            raise DistributedError(
                f"loading {prefix} of {path} failed on rank(s) {failed} of {group.size}; "
                f"rank {group.rank} loaded its shard, but the head is unusable without "
                "every shard (see the failing rank's error)"
            )
    if error is not None:
        raise error
    assert head is not None
    return head


def _load(
    root: Path,
    device: str | torch.device,
    dtype: torch.dtype | str | None,
    requested: str | None,
    platform: Platform | str | None,
    group: TPGroup,
    strict: bool,
    prefix: str,
) -> ParallelLMHead:
    plat = Platform.detect(device) if platform is None else Platform.coerce(platform)
    resolution = resolve(root, platform=plat, requested=requested, prefix=prefix)
    view = read_checkpoint(root, prefix)
    if view.tensors is None:
        raise CheckpointError(
            f"{root} has no safetensors weights (model.safetensors or an index)", path=root
        )
    tensors = dict(view.tensors)
    if not tensors:
        tensors, resolution = _tied_head(view, resolution, prefix)
    config_where = str(view.config_file or view.source)
    vocab, hidden = head_geometry(view.config, tensors, prefix, config_where)
    compute_dtype = (
        parse_dtype(dtype) if dtype is not None else default_dtype(view.config, tensors, prefix)
    )
    with torch.device(device):
        head = ParallelLMHead(
            vocab,
            hidden,
            bias=f"{prefix}.bias" in tensors,
            params_dtype=compute_dtype,
            quant_config=resolution.config,
            prefix=prefix,
            tp=group,
        )
    head.resolution = resolution
    plan = _check_tensors(head, tensors, resolution, strict=strict)
    d2t = view.side.get(D2T_NAME)
    if d2t is not None:
        target_vocab = flatten_config(view.config).get("vocab_size")
        if not isinstance(target_vocab, int) or isinstance(target_vocab, bool) or target_vocab < 1:
            raise ConfigError(
                f"{config_where}: the checkpoint has a d2t map but field 'vocab_size' = "
                f"{target_vocab!r} is not the target vocab size (a positive integer)"
            )
        ids = draft_to_target_ids(
            _read_whole(d2t), d2t, vocab_size=target_vocab, draft_vocab_size=vocab
        )
        head.set_vocab_map(ids.to(device), target_vocab)
    progress = LoadProgress(
        sum(_slice_bytes(head, p, i) for p, i in plan),
        f"loading {prefix}",
        enabled=group.rank == 0,
    )
    try:
        _read(head, plan, torch.device(device), progress)
    finally:
        progress.close()
    try:
        head.quant_method.process_weights_after_loading(head)
    except CheckpointError as exc:
        info = tensors.get(exc.tensor or "")
        if exc.path is not None or info is None:
            raise
        raise CheckpointError(f"{info.file}: {exc}", path=info.file, tensor=exc.tensor) from exc
    head.eval()
    logger.info(
        "loaded %s of %s: %s, vocab %d x hidden %d, rank %d/%d, %s",
        prefix, view.source, resolution.method or "unquantized", vocab, hidden,
        head.tp_rank, head.tp_size, compute_dtype,
    )  # fmt: skip
    return head


def _tied_head(
    view: CheckpointView, resolution: Resolution, prefix: str
) -> tuple[dict[str, TensorInfo], Resolution]:
    """A head with no tensors of its own: its embedding when tied, else an error."""
    tied = flatten_config(view.config).get("tie_word_embeddings")
    embedding = next((view.side[n] for n in EMBEDDING_NAMES if n in view.side), None)
    if tied is not True or embedding is None:
        have = f"embedding {embedding.name}" if embedding else "no embedding"
        raise CheckpointError(
            f"{view.source} has no {prefix}.* tensors (tie_word_embeddings: "
            f"{_flag(tied)}, {have}); a drafter "
            "without a head of its own uses its target's: load the target's head and call "
            "quantreg.share_lm_head(None, target_head)",
            path=view.source,
            tensor=f"{prefix}.weight",
        )
    notes = list(resolution.notes)
    if resolution.quantized:
        notes.append(
            f"the config quantizes '{prefix}' ({resolution.rule}) but the checkpoint ties it to "
            f"the float {embedding.name}: loaded unquantized from the embedding"
        )
    tied_resolution = replace(
        resolution,
        method=None,
        quantized=False,
        config=None,
        rule=f"tie_word_embeddings: true → {embedding.name}; also: {resolution.rule}",
        notes=tuple(notes),
    )
    return {f"{prefix}.weight": embedding}, tied_resolution


def _check_tensors(
    head: ParallelLMHead,
    tensors: Mapping[str, TensorInfo],
    resolution: Resolution,
    *,
    strict: bool,
) -> list[tuple[torch.nn.Parameter, TensorInfo]]:
    """Match every parameter to its checkpoint tensor; report all problems at once."""
    prefix = head.prefix
    problems: list[str] = []
    plan = []
    for name, param in head.named_parameters(recurse=False):
        full = f"{prefix}.{name}"
        info = tensors.get(full)
        expected = head.checkpoint_shape(param)
        want = f"{_dtype_name(param.dtype)} {list(expected)}"
        if info is None:
            problems.append(f"missing {full}: expected {want}")
            continue
        found = f"{info.dtype} {list(info.shape)} in {info.file.name}"
        if info.name != full:
            found += f" (tied: {info.name})"
        if info.shape != expected:
            problems.append(f"{full}: expected shape {want}, found {found}")
        elif not _dtype_ok(param.dtype, info.dtype):
            problems.append(f"{full}: expected dtype {want}, found {found}")
        else:
            plan.append((param, info))
    consumed = {f"{prefix}.{n}" for n, _ in head.named_parameters(recurse=False)}
    unconsumed = sorted(set(tensors) - consumed)
    why = f"'{prefix}' resolved as {resolution.method or 'unquantized'} ({resolution.rule})"
    if problems:
        if unconsumed:
            problems.append(f"present but not expected: {', '.join(unconsumed)}")
        files = sorted({str(t.file) for t in tensors.values()})
        raise CheckpointError(
            f"{resolution.source}: the {prefix} tensors do not match {why}:\n  - "
            + "\n  - ".join(problems)
            + f"\n(files: {', '.join(files)})",
            path=files[0] if len(files) == 1 else resolution.source,
            tensor=next(iter(unconsumed), None),
        )
    if unconsumed:
        message = f"{resolution.source}: no parameter consumes {', '.join(unconsumed)}; {why}"
        if strict:
            raise CheckpointError(message, path=resolution.source, tensor=unconsumed[0])
        logger.warning("%s (strict=False: ignored)", message)
    return plan


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in TORCH_DTYPES.items() if v == dtype), str(dtype))


def _dtype_ok(param_dtype: torch.dtype, stored: str) -> bool:
    """Float parameters take any float tensor (cast exactly or rounded once); others match."""
    if param_dtype in _FLOATS:
        return stored in FLOAT_DTYPES
    return TORCH_DTYPES.get(stored) == param_dtype


def _flag(value: Any) -> str:
    if value is None:
        return "absent"
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _slice_bytes(head: ParallelLMHead, param: torch.nn.Parameter, info: TensorInfo) -> int:
    region = head.checkpoint_region(param)
    if region is None or not info.shape:
        return info.nbytes
    dim, start, stop = region
    return info.nbytes // max(info.shape[dim], 1) * (stop - start)


def _read(
    head: ParallelLMHead,
    plan: list[tuple[torch.nn.Parameter, TensorInfo]],
    device: torch.device,
    progress: LoadProgress,
) -> None:
    """Read each parameter's slice, one ``safe_open`` per shard."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[torch.nn.Parameter, TensorInfo]]] = {}
    for param, info in plan:
        by_file.setdefault(info.file, []).append((param, info))
    for file, items in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for param, info in items:
                    region = head.checkpoint_region(param)
                    piece = handle.get_slice(info.name)
                    if region is None:
                        data = piece[:]
                    else:
                        dim, start, stop = region
                        index = tuple(
                            slice(start, stop) if d == dim else slice(None)
                            for d in range(len(info.shape))
                        )
                        data = piece[index]
                    param.checkpoint_dtype = TORCH_DTYPES[info.dtype]  # type: ignore[attr-defined]
                    head.load_weight(param, data.to(device=device, dtype=param.dtype))
                    progress.update(data.numel() * data.element_size())
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors' own errors: truncated or corrupt files
            raise CheckpointError(f"cannot read {file}: {exc}", path=file) from exc


def _read_whole(info: TensorInfo) -> torch.Tensor:
    """One small tensor in full (e.g. ``d2t``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(info.file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(info.name)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {info.name} from {info.file}: {exc}", path=info.file, tensor=info.name
        ) from exc


def read_hidden_states(path: str | os.PathLike[str], *, name: str = "x") -> torch.Tensor:
    """The ``[tokens, hidden]`` tensor ``name`` of a safetensors file (e.g. for ``quantreg run``).

    Raises:
        CheckpointError: unreadable file, no such tensor, or not a 2-D float tensor.
    """
    from safetensors import safe_open

    file = Path(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            if name not in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                raise CheckpointError(
                    f"{file} has no tensor {name!r} (found: {', '.join(handle.keys()) or 'none'})",
                    path=file,
                    tensor=name,
                )
            x = handle.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {file}: {exc}", path=file) from exc
    if x.dim() != 2 or not x.is_floating_point():
        raise CheckpointError(
            f"{file}: tensor {name!r} must be a 2-D float [tokens, hidden] tensor, "
            f"got {x.dtype} {list(x.shape)}",
            path=file,
            tensor=name,
        )
    return x

"""Reports for the command line: ``inspect_checkpoint`` (what a checkpoint holds, which method
its head resolves to, its drafter facts), ``head_bytes`` (a layer's bytes on disk) and
``methods_here`` (which methods run their intended kernels on this machine)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantreg.candidates import is_quantized_tensor
from quantreg.checkpoint import D2T_NAME, SIDE_TENSORS, TensorInfo, tensor_infos
from quantreg.decision import resolve
from quantreg.drafter import DrafterConfig
from quantreg.errors import CheckpointError, ConfigError, QuantregError
from quantreg.platform import Platform
from quantreg.registry import Registry, default_registry


def inspect_checkpoint(
    path: str | os.PathLike[str],
    *,
    platform: Platform | str | None = None,
    prefix: str = "lm_head",
    registry: Registry | None = None,
) -> dict[str, Any]:
    """A JSON-safe summary: ``{config, method, rule, tied_to, drafter, tensors: [{name, dtype,
    shape, bytes, quantized, file}]}``: every tensor of the checkpoint from the headers only
    (``quantized``: a layer's tensor in a quantized layout; never ``d2t`` or an embedding), and
    ``drafter`` (None for a model that is no drafter) from :func:`drafter_facts`.

    Raises:
        ConfigError, CheckpointError: as :func:`quantreg.resolve`.
    """
    root = Path(path)
    registry = registry or default_registry()
    resolution = resolve(root, platform=platform, prefix=prefix, registry=registry)
    view = resolution.view
    infos = tensor_infos(view.root if view is not None and view.root else root)
    names = frozenset().union(*(cls.tensor_names for cls in registry.loaded().values()))
    if infos is None:
        raise CheckpointError(f"{root} has no safetensors weights", path=root)
    tensors = [
        {
            "name": info.name,
            "dtype": info.dtype,
            "shape": list(info.shape),
            "bytes": info.nbytes,
            "quantized": info.name not in SIDE_TENSORS
            and "." in info.name
            and is_quantized_tensor(info, info.name.rpartition(".")[0], names),
            "file": info.file.name,
        }
        for info in sorted(infos.values(), key=lambda i: i.name)
    ]
    return {
        "config": dict(view.config),
        "method": resolution.method,
        "rule": resolution.rule,
        "tied_to": resolution.tied_to,
        "drafter": drafter_facts(view.config, infos),
        "tensors": tensors,
    }


def drafter_facts(
    config: Mapping[str, Any], infos: Mapping[str, TensorInfo]
) -> dict[str, Any] | None:
    """An Eagle3 drafter's facts: ``{layout, architectures, hidden_size, draft_vocab_size,
    target_vocab_size, d2t: {present, valid, error}}`` (``d2t`` is read and checked as the
    loader checks it); ``{error}`` for a drafter config that does not validate; None for a
    checkpoint that is no drafter (no Eagle3 architecture, ``draft_vocab_size`` or ``d2t``)."""
    from quantreg.checkpoint import read_tensor
    from quantreg.drafter import draft_to_target_ids

    d2t = infos.get(D2T_NAME)
    try:
        drafter = DrafterConfig.from_config(config)
    except ConfigError as exc:
        return {"error": str(exc)} if d2t is not None or "draft_vocab_size" in config else None
    if not drafter.is_eagle3 and drafter.draft_vocab_size is None and d2t is None:
        return None
    check: dict[str, Any] = {"present": d2t is not None, "valid": None, "error": None}
    if d2t is not None:
        try:
            draft_to_target_ids(
                read_tensor(d2t), d2t, vocab_size=drafter.vocab_size,
                draft_vocab_size=drafter.head_vocab_size,
            )  # fmt: skip
            check["valid"] = True
        except CheckpointError as exc:
            check.update(valid=False, error=str(exc))
    return {
        "layout": drafter.layout,
        "architectures": list(drafter.architectures),
        "hidden_size": drafter.hidden_size,
        "draft_vocab_size": drafter.head_vocab_size,
        "target_vocab_size": drafter.vocab_size,
        "d2t": check,
    }


def head_bytes(path: str | os.PathLike[str], prefix: str = "lm_head") -> dict[str, int]:
    """Bytes on disk of each tensor of layer ``prefix`` (from the headers only).

    Raises:
        CheckpointError: no safetensors weights, or a file that cannot be read.
    """
    infos = tensor_infos(Path(path))
    if infos is None:
        raise CheckpointError(f"{path} has no safetensors weights", path=Path(path))
    return {n: i.nbytes for n, i in sorted(infos.items()) if n.startswith(f"{prefix}.")}


def methods_here(
    platform: Platform | str | None = None, *, registry: Registry | None = None
) -> list[dict[str, Any]]:
    """Every registered method as ``MethodInfo.to_dict()`` plus ``runs_here`` (whether its
    intended kernels run on ``platform``, default this machine) and ``platform_reason`` (why
    not: the method's own ``platform_reason``; a broken plugin's error). Imports every method:
    ``list_quant_methods`` stays light, this is for ``quantreg methods``.

    Raises:
        InputError: a bad platform string.
    """
    registry = registry or default_registry()
    plat = Platform.coerce(platform)
    rows = []
    for info in registry.list():
        runs, reason = None, info.error
        if info.error is None:
            try:
                cls = registry.get(info.name)
                # the hook asks the platform, not the config: an empty config is enough
                reason = cls.platform_reason(cls.model_construct(), plat)
                runs = reason is None
            except QuantregError as exc:
                runs, reason = False, str(exc)
            except Exception as exc:  # a plugin's hook that needs a real config: unknown
                reason = f"cannot tell without a checkpoint ({type(exc).__name__}: {exc})"
        rows.append({**info.to_dict(), "runs_here": runs, "platform_reason": reason})
    return rows

"""Writing quantized heads: a float weight into a method's checkpoint tensors and folders.

Each method owns its format (``QuantConfig.quantize_weight``); these functions pick the method
from the registry and write what real checkpoints hold: ``config.json`` with the matching
``quantization_config`` and ``model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from quantreg.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_FILE,
    read_header,
    read_tensors,
    weight_files,
)
from quantreg.contract import WriterOption
from quantreg.detection import detect_quant_config, load_model_config
from quantreg.errors import CheckpointError, ConfigError, InputError, QuantregError
from quantreg.output_files import output_folder, write_file, write_folder
from quantreg.registry import Registry, default_registry, get_quant_config_cls, normalize_name

logger = logging.getLogger(__name__)


def quantize(weight: torch.Tensor, method: str, **params: Any) -> dict[str, torch.Tensor]:
    """Quantize a float ``[out, in]`` (``[vocab, hidden]``) weight by round-to-nearest into
    ``method``'s checkpoint tensors, named without the layer prefix (``qweight``, ...).

    ``params`` are the method's writer options (e.g. ``bits``, ``group_size``, ``sym``,
    ``desc_act``, ``perm`` for GPTQ; ``format`` for compressed-tensors).

    Raises:
        InputError: not a 2-D float weight, a method without a writer, or a bad option (the
            message names it).
        UnknownMethodError: unknown method.
    """
    return _quantize(weight, method, **params)[0]


def _quantize(
    weight: torch.Tensor, method: str, **params: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise InputError(
            f"quantize() takes a 2-D float [out, in] weight; got {shape}", field="weight"
        )
    cls = get_quant_config_cls(method)
    try:
        return cls.quantize_weight(weight.detach().cpu(), **params)
    except ConfigError as exc:  # the writer's options are this call's arguments
        raise InputError(str(exc), field=exc.field) from exc


def writer_params(method: str, **options: Any) -> dict[str, Any]:
    """The keyword arguments of ``method``'s writer for options given under their users'
    names (``format``, ``bits``, ``group_size``, ``sym``, ``actorder``: see
    ``QuantConfig.writer_options``), e.g. GPTQ's ``actorder='group'`` is ``desc_act=True``;
    an option that is None is left out (the writer's default applies).

    Raises:
        InputError: an option ``method``'s writer does not have (the message names the
            methods whose writer has it), or a value outside its choices.
        UnknownMethodError: unknown method.
    """
    name = normalize_name(method)
    known = {option.name: option for option in get_quant_config_cls(method).writer_options()}
    params: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        option = known.get(key)
        if option is None:
            having = [names for names, opts in writers() if key in {o.name for o in opts}]
            listed = "; ".join(", ".join(names) for names in having) or "none"
            raise InputError(
                f"{name} writer: no '{key}' option (its options: {', '.join(known)}); "
                f"writers with '{key}': {listed}"
                if known
                else f"{name} has no writer, so it takes no '{key}'; writers: "
                + "; ".join(", ".join(names) for names, _ in writers()),
                field=key,
            )
        params[option.keyword] = option.writer_value(value, method=name)
    return params


def writers(
    registry: Registry | None = None,
) -> list[tuple[tuple[str, ...], tuple[WriterOption, ...]]]:
    """Every registered method with a writer that lists options, as ``(names, options)``;
    methods that share one writer (``awq`` and ``awq_marlin``) share an entry. Imports every
    method; a plugin that fails to import is left out (``quantreg methods`` shows it)."""
    registry = registry or default_registry()
    groups: dict[Any, tuple[list[str], tuple[WriterOption, ...]]] = {}
    for name in registry.names():
        try:
            cls = registry.get(name)
            options = cls.writer_options()
        except QuantregError:
            continue
        if options:
            key = getattr(cls.quantize_weight, "__func__", cls.quantize_weight)
            groups.setdefault(key, ([], options))[0].append(name)
    return [(tuple(names), options) for names, options in groups.values()]


def write_checkpoint(
    folder: str | os.PathLike[str],
    weight: torch.Tensor,
    method: str | None = None,
    *,
    d2t: torch.Tensor | None = None,
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
    config: dict[str, Any] | None = None,
    **params: Any,
) -> Path:
    """Write an Eagle3 drafter folder whose lm_head is ``weight`` quantized with ``method``
    (None or ``"unquantized"``: a plain weight in ``dtype``).

    ``config.json`` follows the EAGLE layout (``draft_vocab_size`` = rows of ``weight``,
    ``vocab_size`` = the target vocab, default the same) plus the method's
    ``quantization_config``; ``d2t`` (draft id -> target id offsets) is written when given.
    ``config`` adds or replaces config.json keys.

    Each file is written under a temporary name, then renamed into place (weights first).

    Raises:
        InputError: see :func:`quantize`.
        CheckpointError: ``folder`` holds a checkpoint (never overwritten) or is a file.
        OSError: a file could not be written (no partial file is left).
    """
    root = Path(folder)
    if os.path.lexists(root) and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a folder", path=root)
    for name in (CONFIG_NAME, SINGLE_FILE, INDEX_NAME):
        if os.path.lexists(root / name):
            raise CheckpointError(
                f"{root / name} exists; write_checkpoint never overwrites", path=root / name
            )
    if normalize_name(method or "unquantized") == "unquantized":
        tensors, qcfg = {"weight": weight.detach().cpu().to(dtype)}, None
    else:
        tensors, qcfg = _quantize(weight, method, scale_dtype=dtype, **params)  # type: ignore[arg-type]
    out = {f"lm_head.{name}": t.contiguous() for name, t in tensors.items()}
    if bias is not None:
        out["lm_head.bias"] = bias.detach().cpu().to(dtype).contiguous()
    if d2t is not None:
        out["d2t"] = d2t.detach().cpu().to(torch.int64).contiguous()
    n, k = weight.shape
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": k,
        "vocab_size": vocab_size or n,
        "draft_vocab_size": n,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    cfg.update(config or {})
    _save(root, cfg, out)
    return root


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    method: str,
    *,
    prefix: str = "lm_head",
    overwrite: bool = False,
    **params: Any,
) -> Path:
    """Copy the checkpoint ``src`` to ``dst`` with its float head quantized by ``method``
    (round-to-nearest, no calibration data).

    ``dst`` must be new or an empty folder, and its parent folder must exist; with
    ``overwrite`` an existing folder or file ``dst`` is replaced whole (never ``src``, a folder
    inside it or one holding it). ``dst`` is checked before any work, the copy is written into
    a hidden folder beside it and renamed into place: ``dst`` is never left half-written.

    Every other tensor, config key and file is kept; ``config.json`` gains the method's
    ``quantization_config``, scoped to the head (``QuantConfig.scope_config``: AWQ's
    ``modules_to_not_convert``, a GPTQModel ``dynamic`` exclusion, compressed-tensors'
    ``targets``) so that vLLM, transformers and quantreg agree that every other module is float.

    Raises:
        ConfigError: ``src`` already declares a quantization.
        InputError: a bad method option (see :func:`quantize`).
        CheckpointError: ``src`` has no float ``{prefix}.weight`` or unreadable weights;
            ``dst`` is not empty (without ``overwrite``), not a folder or regular file, is or
            holds ``src``, or its parent folder is missing (see
            :func:`quantreg.output_files.output_folder`).
        OSError: ``dst`` could not be written (it is left as it was).
    """
    source, target = Path(src), Path(dst)
    output_folder(target, source=source, overwrite=overwrite)
    config, tensors = _float_source(source)
    name = f"{prefix}.weight"
    weight = tensors.pop(name, None)
    if weight is None or not weight.is_floating_point() or weight.dim() != 2:
        raise CheckpointError(
            f"{source} has no float 2-D {name} to quantize", path=source, tensor=name
        )
    quantized, qcfg = _quantize(weight, method, scale_dtype=_scale_dtype(weight), **params)
    kept_float = sorted(
        {n.rpartition(".")[0] for n in tensors if n.endswith(".weight") and n.count(".") >= 1}
    )
    qcfg = get_quant_config_cls(method).scope_config(qcfg, quantized=prefix, kept_float=kept_float)
    tensors.update({f"{prefix}.{n}": t.contiguous() for n, t in quantized.items()})

    def fill(folder: Path) -> None:
        for item in source.iterdir():
            if (
                item.is_file()
                and item.suffix != ".safetensors"
                and item.name not in (CONFIG_NAME, INDEX_NAME)
            ):
                shutil.copy2(item, folder / item.name)
        _save(folder, {**config, "quantization_config": qcfg}, tensors)

    write_folder(target, fill, source=source, overwrite=overwrite)
    logger.info("quantized %s of %s with %s into %s", name, source, method, target)
    return target


def _float_source(source: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and every tensor of an unquantized checkpoint.

    Raises:
        ConfigError: no config.json, or it already declares a quantization.
        CheckpointError: no safetensors weights, or a bad or unreadable file.
    """
    config, config_path = load_model_config(source)
    if config_path is None:
        raise ConfigError(f"{source} has no config.json", path=source)
    existing = detect_quant_config(config, config_path=config_path, root=source)
    if existing is not None:
        raise ConfigError(
            f"{existing.where} already declares quant_method '{existing.quant_method}'; "
            "quantreg quantize only quantizes the head of an unquantized checkpoint",
            path=config_path,
            field="quant_method",
        )
    files, _ = weight_files(source)
    if not files:
        raise CheckpointError(f"{source} has no safetensors weights", path=source)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_tensors(list(read_header(file).values())))  # headers checked first
    return config, tensors


def _scale_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16


def _save(root: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write the weights, then config.json, each atomically and never over an existing file.

    Raises:
        OSError: a file could not be written.
    """
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2) + "\n"
    write_file(root / SINGLE_FILE, lambda tmp: save_tensors(tensors, tmp), replace=False)
    write_file(root / CONFIG_NAME, lambda tmp: tmp.write_text(text), replace=False)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file`` with its errors as OSError naming ``path``.

    Raises:
        OSError: the file could not be written.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        raise OSError(f"cannot write {path}: {exc}") from exc

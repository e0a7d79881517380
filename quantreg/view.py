"""What resolution sees of a checkpoint: ``CheckpointView`` (config, quantization config, the
headers of one layer's tensors), read once and cached by path, prefix and file stamps.

Only ``config.json``, the legacy quantization configs, the index and safetensors headers are
read -- never tensor data. A Resolution carries its view, so the loader never reads the
checkpoint's metadata a second time.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantreg.checkpoint import (
    SIDE_TENSORS,
    TensorInfo,
    clear_caches,
    tensor_infos,
    tensor_names,
)
from quantreg.detection import (
    LEGACY_FILES,
    DetectedQuantConfig,
    detect_quant_config,
    load_model_config,
)
from quantreg.errors import CheckpointError, ConfigError, InputError
from quantreg.files import kind, path_stat

_CACHE_SIZE = 64


@dataclass(frozen=True)
class CheckpointView:
    """What resolution knows of a checkpoint: config, quantization config, layer headers.

    ``tensors`` holds the headers of the tensors under the prefix (None: the source has no
    weights, e.g. a dict); ``side`` the headers of tensors outside it that a head may need
    (``d2t``, the embeddings a tied head loads from); ``modules`` every module name.
    """

    source: str
    root: Path | None
    config: Mapping[str, Any]
    quant: DetectedQuantConfig | None
    tensors: Mapping[str, TensorInfo] | None
    side: Mapping[str, TensorInfo] = field(default_factory=dict)
    modules: frozenset[str] = frozenset()
    config_file: Path | None = None

    @property
    def where(self) -> str:
        """The config file, else the source: what messages about the config name."""
        return str(self.config_file or self.source)


class _ViewCache:
    """Views by (resolved path, prefix), valid while the folder's file stamps are unchanged."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._views: dict[tuple[str, str], tuple[tuple[Any, ...], CheckpointView]] = {}

    def get(self, key: tuple[str, str], stamp: tuple[Any, ...]) -> CheckpointView | None:
        with self._lock:
            hit = self._views.get(key)
        return hit[1] if hit is not None and hit[0] == stamp else None

    def put(self, key: tuple[str, str], stamp: tuple[Any, ...], view: CheckpointView) -> None:
        with self._lock:
            if len(self._views) >= self._size:
                self._views.pop(next(iter(self._views)))
            self._views[key] = (stamp, view)

    def clear(self) -> None:
        with self._lock:
            self._views.clear()


_cache = _ViewCache(_CACHE_SIZE)


def clear_cache() -> None:
    """Forget every cached checkpoint view, parsed header and index."""
    _cache.clear()
    clear_caches()


def read_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, Any], prefix: str
) -> CheckpointView:
    """The checkpoint view of a folder, a config.json path or a dict (cached by path + mtime).

    Raises:
        InputError: ``source`` is neither a path nor a dict.
        CheckpointError: the path does not exist, is a broken link or a symlink loop, is
            neither a folder nor a regular file, is a ``.safetensors`` file, or its index /
            headers are bad.
        ConfigError: config.json is missing, unreadable or not JSON.
    """
    if isinstance(source, Mapping):
        return _dict_view(source)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(
            f"resolve() takes a checkpoint folder, a config.json path or a dict; got {source!r}",
            field="source",
        )
    path = Path(source).expanduser()
    mode = path_stat(path, what="checkpoint path").st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise CheckpointError(
            f"checkpoint path {path} is {kind(mode)}; expected a checkpoint folder or its "
            "config.json",
            path=path,
        )
    if stat.S_ISREG(mode) and path.suffix == ".safetensors":
        raise CheckpointError(
            f"checkpoint path {path} is a safetensors file; pass its checkpoint folder (or "
            "the folder's config.json)",
            path=path,
        )
    root = path if stat.S_ISDIR(mode) else path.parent
    key, stamp = (str(path.resolve()), prefix), _stamp(root)
    view = _cache.get(key, stamp)
    if view is None:
        view = _folder_view(path, root, prefix)
        _cache.put(key, stamp, view)
    return view


def _dict_view(source: Mapping[str, Any]) -> CheckpointView:
    if "quant_method" in source:
        label = "<quantization_config dict>"
        quant = detect_quant_config({"quantization_config": source}, label=label)
        if quant is not None:
            quant = DetectedQuantConfig(quant.quant_method, quant.data, label)
        return CheckpointView(label, None, {}, quant, None)
    quant = detect_quant_config(source, label="<config dict>")
    return CheckpointView("<config dict>", None, source, quant, None)


def _folder_view(path: Path, root: Path, prefix: str) -> CheckpointView:
    config, config_path = load_model_config(path)
    quant = detect_quant_config(config, config_path=config_path, root=root)
    if config_path is None and quant is None:
        raise ConfigError(
            f"{path} has no config.json (nor {' / '.join(n for n, _ in LEGACY_FILES)}); "
            "expected a Hugging Face checkpoint folder",
            path=path,
        )
    infos = tensor_infos(root, prefix=prefix, names=SIDE_TENSORS)
    if infos is None:
        return CheckpointView(str(path), root, config, quant, None, config_file=config_path)
    side = {n: infos.pop(n) for n in SIDE_TENSORS if n in infos and not _under(n, prefix)}
    modules = frozenset(name.rpartition(".")[0] for name in tensor_names(root))
    return CheckpointView(str(path), root, config, quant, infos, side, modules, config_path)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _stamp(root: Path) -> tuple[Any, ...]:
    """Name, size and mtime of every JSON and safetensors file: changes when any is rewritten."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return ()
    stamp = []
    for entry in entries:
        if entry.name.endswith((".json", ".safetensors")):
            try:
                st = entry.stat()
            except OSError:
                continue
            stamp.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(stamp)

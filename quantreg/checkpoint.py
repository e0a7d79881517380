"""Reading a checkpoint folder safely: config.json, the safetensors index, tensor headers.

Only safetensors is read, never pickle. Shard names from an index must be plain file names
inside the folder, and links must resolve inside it (or into the same Hugging Face cache
repository's ``blobs/``). Headers are parsed and validated here without touching tensor data,
so resolution can look at names, dtypes and shapes for free.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from quantreg.errors import CheckpointError
from quantreg.files import (
    MAX_JSON_BYTES,
    ParsedFiles,
    read_all,
    read_json,
    regular_stat,
    why_unusable,
)
from quantreg.headers import (
    DTYPE_BITS,
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    TensorInfo,
    read_header,
)
from quantreg.headers import clear_cache as _clear_headers
from quantreg.jsonbounds import JSONLimits, parse_json
from quantreg.patterns import check_name_lengths, listed

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_NAME", "D2T_NAME", "DTYPE_BITS", "EMBEDDING_NAMES", "FLOAT_DTYPES", "INDEX_NAME",
    "MAX_HEADER_BYTES", "MAX_INDEX_ENTRIES", "MAX_TENSORS", "PICKLE_NAMES", "SIDE_TENSORS",
    "SINGLE_FILE",
    "TensorInfo", "checked_file", "clear_caches", "read_header", "read_hidden_states", "read_json",
    "read_tensor", "read_tensors", "tensor_infos", "tensor_names", "weight_files",
]  # fmt: skip

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Tensors outside the head that loading an Eagle3 drafter's head may need.
EMBEDDING_NAMES = ("embed_tokens.weight", "model.embed_tokens.weight")
D2T_NAME = "d2t"
SIDE_TENSORS = (D2T_NAME, *EMBEDDING_NAMES)
# The index names every tensor of the model: a million is 5x today's largest MoE checkpoints.
MAX_INDEX_ENTRIES = 1_000_000
_INDEX = JSONLimits(max_values=MAX_INDEX_ENTRIES + 100_000)  # its metadata: a few values
_indexes: ParsedFiles[dict[str, str]] = ParsedFiles(max_files=16, max_items=MAX_INDEX_ENTRIES)


def clear_caches() -> None:
    """Forget every parsed header and index (they are also re-read when a file changes)."""
    _indexes.clear()
    _clear_headers()


def checked_file(root: Path, name: str, *, what: str) -> Path:
    """``root/name`` after checking that ``name`` is a plain relative file name inside ``root``
    and that a link resolves inside ``root`` or into its Hugging Face cache ``blobs/``.

    Raises:
        CheckpointError: the name escapes the folder, a link points elsewhere, or a link is
            broken or loops.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{what}: invalid file name {name!r}", path=root)
    pure = Path(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or name != pure.as_posix():
        raise CheckpointError(
            f"{what}: file name {name!r} must be a plain relative name inside {root}",
            path=root / name if not pure.is_absolute() else pure,
        )
    path = root / name
    if path.is_symlink() or any(p.is_symlink() for p in list(path.parents)[: len(pure.parts) - 1]):
        target = _real_path(path, what=what)
        if not (_inside(target, _real_path(root, what=what)) or _inside_hf_blobs(target, root)):
            raise CheckpointError(
                f"{what}: {path} is a link to {target}, outside the checkpoint folder {root}",
                path=path,
            )
    return path


def _real_path(path: Path, *, what: str) -> Path:
    """``path`` with every link resolved; a loop or a broken link is an error, not a guess
    (``Path.resolve()`` raises RuntimeError on a loop in some Python versions)."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        raise CheckpointError(f"{what}: {why_unusable(path, exc)}", path=path) from exc


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _inside_hf_blobs(target: Path, root: Path) -> bool:
    # Hub cache layout: models--org--name/snapshots/<rev>/file -> ../../blobs/<sha>
    real_root = _real_path(root, what="checkpoint folder")
    if real_root.parent.name != "snapshots":
        return False
    return _inside(target, real_root.parent.parent / "blobs")


def weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder, and the index's weight_map if any.

    With ``model.safetensors.index.json`` only its shards count; without it exactly
    ``model.safetensors`` (never a glob). Returns ``([], None)`` when there are no weights.
    The index is parsed once while unchanged.

    Raises:
        CheckpointError: a bad index, an unsafe shard name, or only pickle weights present.
    """
    index_path = root / INDEX_NAME
    if os.path.lexists(index_path):
        checked_file(root, INDEX_NAME, what="safetensors index")
        weight_map = _indexes.get(
            index_path, what="safetensors index", error=CheckpointError, parse=_parse_index,
            items=len,
        )  # fmt: skip
        files: dict[str, Path] = {}
        for tensor, shard in weight_map.items():
            if shard not in files:
                files[shard] = checked_file(root, shard, what=f"{index_path} entry {tensor!r}")
        return list(files.values()), weight_map
    if os.path.lexists(root / SINGLE_FILE):
        return [checked_file(root, SINGLE_FILE, what="checkpoint")], None
    pickles = [n for n in PICKLE_NAMES if os.path.lexists(root / n)]
    if pickles:
        raise CheckpointError(
            f"{root} holds only {pickles[0]}: pickle checkpoints are not read (they can run "
            "arbitrary code); convert it to safetensors first",
            path=root / pickles[0],
        )
    return [], None


def _parse_index(path: Path, handle: BinaryIO, st: os.stat_result) -> dict[str, str]:
    """The ``weight_map`` of an index file: tensor name -> shard file name."""
    what = "safetensors index"
    raw = read_all(handle, st, path=path, what=what, limit=MAX_JSON_BYTES, error=CheckpointError)
    index = parse_json(raw, where=f"{what} {path}", path=path, error=CheckpointError, limits=_INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{path}: expected a 'weight_map' object of tensor name -> shard file name",
            path=path,
        )
    if len(weight_map) > MAX_INDEX_ENTRIES:
        raise CheckpointError(
            f"{path}: 'weight_map' lists {len(weight_map):,d} tensors; quantreg reads at most "
            f"{MAX_INDEX_ENTRIES:,d}",
            path=path,
        )
    check_name_lengths(weight_map, path=path, what="weight_map")
    return weight_map


def tensor_infos(
    root: Path, *, prefix: str | None = None, names: Collection[str] = ()
) -> dict[str, TensorInfo] | None:
    """Header entries of the checkpoint's tensors: all of them, or only those under
    ``prefix.`` plus the exact ``names`` (those that exist).

    With an index only the shards that hold matching names are opened. Returns None when
    the folder has no safetensors weights.

    Raises:
        CheckpointError: see :func:`weight_files` and :func:`read_header`; also a tensor the
            index maps to a shard whose header lacks it.
    """
    files, weight_map = weight_files(root)
    if not files:
        return None

    def wanted(name: str) -> bool:
        if prefix is None:
            return True
        return name == prefix or name.startswith(prefix + ".") or name in names

    if weight_map is None:
        return {n: t for n, t in read_header(files[0]).items() if wanted(n)}
    by_file: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if wanted(name):
            by_file.setdefault(shard, []).append(name)
    result: dict[str, TensorInfo] = {}
    for shard, names in by_file.items():
        header = read_header(root / shard)
        for name in names:
            if name not in header:
                raise CheckpointError(
                    f"{root / INDEX_NAME} maps tensor {name!r} to {shard}, "
                    f"but {root / shard} does not contain it",
                    path=root / shard,
                    tensor=name,
                )
            result[name] = header[name]
    return result


def tensor_names(root: Path) -> list[str]:
    """Every tensor name of the checkpoint: the index's ``weight_map`` keys, or the single
    file's header (no shard is opened when there is an index).

    Raises:
        CheckpointError: see :func:`weight_files` and :func:`read_header`.
    """
    files, weight_map = weight_files(root)
    if weight_map is not None:
        return list(weight_map)
    return list(read_header(files[0])) if files else []


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One small tensor in full (e.g. ``d2t``).

    Raises:
        CheckpointError: see :func:`read_tensors`.
    """
    return read_tensors([info])[info.name]


def read_tensors(infos: list[TensorInfo]) -> dict[str, torch.Tensor]:
    """Whole tensors by name, all from one file (one ``safe_open``).

    Raises:
        CheckpointError: the file is no longer a regular file or cannot be read; names the
            tensor being read and the file.
    """
    from safetensors import safe_open

    if not infos:
        return {}
    file, first = infos[0].file, infos[0].name
    regular_stat(file, what=f"tensor {first!r}: file")  # safe_open would block on a FIFO
    result = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for info in infos:
                first = info.name
                result[info.name] = handle.get_tensor(info.name)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read tensor {first!r} from {file}: {exc}", path=file, tensor=first
        ) from exc
    return result


def read_hidden_states(path: str | os.PathLike[str], *, name: str = "x") -> torch.Tensor:
    """The ``[tokens, hidden]`` tensor ``name`` of a safetensors file (e.g. for ``quantreg run``).

    The file's header is checked (as every checkpoint file's is) before any data is read.

    Raises:
        CheckpointError: not a regular file, an invalid header, no such tensor, or not a 2-D
            float tensor.
    """
    file = Path(path)
    regular_stat(file, what="hidden states file")
    try:
        infos = read_header(file)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot read hidden states: {exc}", path=file) from exc
    info = infos.get(name)
    if info is None:
        raise CheckpointError(
            f"{file} has no tensor {name!r} (found: {listed(list(infos)) or 'none'})",
            path=file,
            tensor=name,
        )
    if len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{file}: tensor {name!r} must be a 2-D float [tokens, hidden] tensor, "
            f"got {info.dtype} {list(info.shape)}",
            path=file,
            tensor=name,
        )
    # an owned, freshly allocated copy: a view into the file would make the matmul's float
    # sums depend on where the tensor happens to sit in it
    return read_tensor(info).clone()

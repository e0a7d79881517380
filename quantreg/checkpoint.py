"""Reading a checkpoint folder safely: config.json, the safetensors index, tensor headers.

Only safetensors is read, never pickle. Shard names from an index must be plain file names
inside the folder, and links must resolve inside it (or into the same Hugging Face cache
repository's ``blobs/``). Headers are parsed and validated here without touching tensor data,
so resolution can look at names, dtypes and shapes for free.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantreg.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Bytes per element of the safetensors dtypes quantreg knows; others are kept but unchecked.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Tensors outside the head that loading an Eagle3 drafter's head may need.
EMBEDDING_NAMES = ("embed_tokens.weight", "model.embed_tokens.weight")
D2T_NAME = "d2t"
SIDE_TENSORS = (D2T_NAME, *EMBEDDING_NAMES)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a safetensors header describes it (no data read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (0 for dtypes quantreg does not know)."""
        return math.prod(self.shape) * DTYPE_SIZES.get(self.dtype, 0)


def read_json(path: Path, *, what: str) -> Any:
    """Parse a JSON file, raising ConfigError (config files) naming the file on failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}", path=path) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text: {exc}", path=path) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            path=path,
        ) from exc


def checked_file(root: Path, name: str, *, what: str) -> Path:
    """``root/name`` after checking that ``name`` is a plain relative file name inside ``root``
    and that a link resolves inside ``root`` or into its Hugging Face cache ``blobs/``.

    Raises:
        CheckpointError: the name escapes the folder, or a link points elsewhere.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{what}: invalid file name {name!r}", path=root)
    pure = Path(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or name != pure.as_posix():
        raise CheckpointError(
            f"{what}: file name {name!r} must be a plain relative name inside {root}",
            path=root / name if not pure.is_absolute() else pure,
        )
    path = root / name
    if path.is_symlink() or any(p.is_symlink() for p in list(path.parents)[: len(pure.parts) - 1]):
        target = path.resolve()
        if not (_inside(target, root.resolve()) or _inside_hf_blobs(target, root)):
            raise CheckpointError(
                f"{what}: {path} is a link to {target}, outside the checkpoint folder {root}",
                path=path,
            )
    return path


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _inside_hf_blobs(target: Path, root: Path) -> bool:
    # Hub cache layout: models--org--name/snapshots/<rev>/file -> ../../blobs/<sha>
    real_root = root.resolve()
    if real_root.parent.name != "snapshots":
        return False
    return _inside(target, real_root.parent.parent / "blobs")


def weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder, and the index's weight_map if any.

    With ``model.safetensors.index.json`` only its shards count; without it exactly
    ``model.safetensors`` (never a glob). Returns ``([], None)`` when there are no weights.

    Raises:
        CheckpointError: a bad index, an unsafe shard name, or only pickle weights present.
    """
    index_path = root / INDEX_NAME
    if index_path.exists() or index_path.is_symlink():
        checked_file(root, INDEX_NAME, what="safetensors index")
        try:
            index = read_json(index_path, what="safetensors index")
        except ConfigError as exc:
            raise CheckpointError(str(exc), path=index_path) from exc
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index_path}: expected a 'weight_map' object of tensor name -> shard file name",
                path=index_path,
            )
        files: dict[str, Path] = {}
        for tensor, shard in weight_map.items():
            if shard not in files:
                files[shard] = checked_file(root, shard, what=f"{index_path} entry {tensor!r}")
        return list(files.values()), weight_map
    single = root / SINGLE_FILE
    if single.exists() or single.is_symlink():
        return [checked_file(root, SINGLE_FILE, what="checkpoint")], None
    pickles = [n for n in PICKLE_NAMES if (root / n).exists()]
    if pickles:
        raise CheckpointError(
            f"{root} holds only {pickles[0]}: pickle checkpoints are not read (they can run "
            "arbitrary code); convert it to safetensors first",
            path=root / pickles[0],
        )
    return [], None


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; tensor data is not read.

    Raises:
        CheckpointError: truncated file, a header length that lies, bad JSON, unknown
            layout, or tensor byte ranges that are out of bounds, overlap or do not match
            dtype x shape.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes, no header length)",
                    path=path,
                )
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: safetensors header length {header_len} exceeds the file "
                    f"({size} bytes); the file is truncated or corrupt",
                    path=path,
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}", path=path) from exc
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON", path=path) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object", path=path)
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, entry, data_len, spans)
    spans.sort()
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise CheckpointError(
                f"{path}: tensors {first!r} and {second!r} overlap in the data section",
                path=path,
                tensor=second,
            )
    return infos


def _tensor_info(
    path: Path, name: str, entry: Any, data_len: int, spans: list[tuple[int, int, str]]
) -> TensorInfo:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {why}", path=path, tensor=name)

    if not isinstance(entry, dict):
        raise bad("header entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"dtype must be a string, got {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise bad(f"data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise bad(f"data_offsets {offsets} fall outside the {data_len}-byte data section")
    if dtype in DTYPE_SIZES and end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise bad(
            f"{end - begin} bytes do not hold a {dtype} tensor of shape {shape} "
            f"({math.prod(shape) * DTYPE_SIZES[dtype]} bytes expected)"
        )
    if end > begin:
        spans.append((begin, end, name))
    return TensorInfo(name, dtype, tuple(shape), path)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
        CheckpointError: the file cannot be read; names the tensor and the file.
    """
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
            # an owned, freshly allocated copy: a view into the file would make the matmul's
            # float sums depend on where the tensor happens to sit in it
            x = handle.get_tensor(name).clone()
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

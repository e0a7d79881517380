"""safetensors headers, parsed once and checked by safetensors' own rules (or stricter).

``quantreg resolve`` and ``inspect`` look only at headers, so a header they pass must be one
that ``safetensors.safe_open`` opens. These are the rules of safetensors 0.8
(``Metadata::validate`` and ``read_metadata``): the header is at most 100,000,000 bytes of
UTF-8 JSON; ``__metadata__`` maps strings to strings; every dtype is one safetensors knows;
a shape's element count times the dtype's bits fits 64 bits and is whole bytes; the tensors,
sorted by offsets, tile the data section exactly -- no overlap, no hole, no trailing bytes.
quantreg is stricter where the format's spec is: the header starts with ``{`` and is padded
with spaces only; and where safetensors quietly keeps the last of duplicate names, quantreg
refuses them. At most 200,000 tensors per file (real shards hold a few thousand; parsing a
header costs ~1 KB of memory per tensor here, and safetensors' own parse as much again).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from quantreg.errors import CheckpointError
from quantreg.files import ParsedFiles
from quantreg.jsonbounds import JSONLimits, parse_json
from quantreg.patterns import check_name_lengths

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE
MAX_TENSORS = 200_000
_U64 = 2**64 - 1
# Bits per element of every dtype safetensors 0.8 knows (its Dtype::bitsize).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# Counts (shape, offsets) are unsigned: "-0" must not pass as 0. A tensor entry is 6 JSON
# values plus one per dimension.
_LIMITS = JSONLimits(max_values=12 * MAX_TENSORS, minus_zero_float=True)
_parsed: ParsedFiles[dict[str, TensorInfo]] = ParsedFiles(max_files=16, max_items=2 * MAX_TENSORS)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor as a safetensors header describes it (no data read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * DTYPE_BITS.get(self.dtype, 0) // 8


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; tensor data is not read. A file is
    parsed once while it is unchanged (same inode, size, mtime and ctime).

    Raises:
        CheckpointError: not a regular file (a FIFO, a directory, a symlink loop, ...), or a
            header ``safe_open`` would refuse (see the module docstring) or quantreg does
            (duplicate names, leading or non-space padding, more than 200,000 tensors);
            the message names the file and, where there is one, the tensor.
    """
    return dict(
        _parsed.get(path, what="safetensors file", error=CheckpointError, parse=_parse, items=len)
    )


def clear_cache() -> None:
    """Forget every parsed header."""
    _parsed.clear()


def _parse(path: Path, handle: BinaryIO, st: Any) -> dict[str, TensorInfo]:
    return parse_header(_raw_header(handle, path, st.st_size), path=path, size=st.st_size)


def _raw_header(handle: BinaryIO, path: Path, size: int) -> bytes:
    try:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes, no header length)", path=path
            )
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: safetensors header length {header_len} exceeds the file "
                f"({size} bytes); the file is truncated or corrupt",
                path=path,
            )
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: safetensors header length {header_len:,d} exceeds safetensors' "
                f"limit of {MAX_HEADER_BYTES:,d} bytes",
                path=path,
            )
        raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}", path=path) from exc
    if len(raw) < header_len:
        raise CheckpointError(f"{path}: the file shrank while its header was read", path=path)
    return raw


def parse_header(raw: bytes, *, path: Path, size: int) -> dict[str, TensorInfo]:
    """The tensors of a safetensors header ``raw`` (the bytes after the length) of a file
    of ``size`` bytes.

    Raises:
        CheckpointError: see :func:`read_header`.
    """
    body = raw.rstrip(b" ")
    if not body.startswith(b"{"):
        raise CheckpointError(
            f"{path}: safetensors header must be a JSON object starting with '{{' at its first "
            f"byte; it starts with {raw[:16]!r}",
            path=path,
        )
    if not body.endswith(b"}"):
        raise CheckpointError(
            f"{path}: safetensors header must end with '}}', padded with spaces only; it ends "
            f"with {body[-16:]!r}",
            path=path,
        )
    where = f"{path}: safetensors header"
    header = parse_json(body, where=where, path=path, error=CheckpointError, limits=_LIMITS)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object", path=path)
    if len(header) > MAX_TENSORS + 1:
        raise CheckpointError(
            f"{path}: safetensors header lists {len(header) - 1:,d} tensors; quantreg reads at "
            f"most {MAX_TENSORS:,d} per file",
            path=path,
        )
    _check_metadata(path, header.pop("__metadata__", None))
    check_name_lengths(header, path=path, what="header")
    data_len = size - 8 - len(raw)
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry, data_len, spans)
    _check_tiling(path, spans, data_len)
    return infos


def _check_metadata(path: Path, metadata: Any) -> None:
    """``__metadata__``: absent, null, or an object of string values (as safetensors reads it)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{path}: safetensors header field '__metadata__' must be an object of strings, "
            f"got {type(metadata).__name__}",
            path=path,
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointError(
                f"{path}: safetensors header field '__metadata__' must map strings to strings; "
                f"key {key!r} holds {value!r}",
                path=path,
            )


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
    if dtype not in DTYPE_BITS:
        raise bad(f"unknown dtype {dtype!r} (safetensors knows {', '.join(DTYPE_BITS)})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise bad(f"shape must be a list of non-negative integers below 2**64, got {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise bad(
            f"data_offsets must be [begin, end] (integers below 2**64), got {_short(offsets)}"
        )
    begin, end = offsets
    if begin > end:
        raise bad(f"data_offsets {offsets} end before they begin")
    if end > data_len:
        raise bad(f"data_offsets {offsets} fall outside the {data_len}-byte data section")
    bits = _bits(shape, DTYPE_BITS[dtype])
    if bits is None:
        raise bad(f"shape {shape} of {dtype} overflows 64 bits")
    if bits % 8:
        raise bad(f"shape {shape} of {dtype} is {bits} bits, not a whole number of bytes")
    if end - begin != bits // 8:
        raise bad(
            f"{end - begin} bytes do not hold a {dtype} tensor of shape {shape} "
            f"({bits // 8} bytes expected)"
        )
    spans.append((begin, end, name))
    return TensorInfo(name, dtype, tuple(shape), path)


def _bits(shape: list[int], bits: int) -> int | None:
    """Element count x bits, or None where safetensors' checked 64-bit product overflows
    (it multiplies left to right: [2**32, 2**32, 0] overflows, [0, 2**32, 2**32] does not)."""
    count = 1
    for dim in shape:
        count *= dim
        if count > _U64:
            return None
    total = count * bits
    return None if total > _U64 else total


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors, sorted by offsets, must cover the data section exactly once: no overlap
    (looked for first: it is the worse fault), no hole, no trailing bytes."""
    spans.sort()
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise CheckpointError(
                f"{path}: tensors {first!r} and {second!r} overlap in the data section",
                path=path,
                tensor=second,
            )
    end = 0
    for begin, stop, name in spans:
        if begin > end:
            raise CheckpointError(
                f"{path}: tensor {name!r}: a hole of {begin - end} bytes before its "
                f"data_offsets [{begin}, {stop}] (the data before it ends at {end}); "
                "safetensors requires the tensors to tile the data section",
                path=path,
                tensor=name,
            )
        end = stop
    if end != data_len:
        raise CheckpointError(
            f"{path}: {data_len - end} trailing bytes after the last tensor (the tensors cover "
            f"{end} of the {data_len}-byte data section)",
            path=path,
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

"""Opening checkpoint files without surprises: only regular files, never a hang.

Every file quantreg reads from a checkpoint (``config.json``, the legacy quantization configs,
the index, each safetensors shard, ``--hidden``) is ``stat``-ed first: a FIFO, socket, device
or directory is refused by name, and so are symlink loops and broken links (``Path.exists()``
says False for both, which would read as "missing"). The file is then opened with
``O_NONBLOCK`` and checked again with ``fstat``, so a FIFO swapped in between cannot block.

JSON goes through one parser, :func:`parse_json`, bounded before it recurses (see
``jsonbounds``): what Python's own parser would turn into a RecursionError, a ValueError or
a silent NaN becomes an error naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

from quantreg.errors import CheckpointError, ConfigError
from quantreg.jsonbounds import JSONLimits, parse_json

ErrorType = type[ConfigError] | type[CheckpointError]
T = TypeVar("T")

# The biggest JSON file quantreg reads is an index: ~100 bytes per tensor, so this is room for
# a million tensors; safetensors' own header limit is the same number.
MAX_JSON_BYTES = 100_000_000
_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words (``a FIFO (named pipe)``, ...)."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def why_unusable(path: Path, exc: OSError) -> str:
    """Why ``os.stat``/``open`` of ``path`` failed, in words: a symlink loop, a broken link,
    a missing file, or the system's reason."""
    if exc.errno == errno.ELOOP:
        return f"{path} is a symlink loop (a link that leads back to itself)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        with contextlib.suppress(OSError):
            return f"{path} is a broken link to {os.readlink(path)} (its target does not exist)"
    if exc.errno == errno.ENOENT:
        return f"{path} does not exist"
    if exc.errno == errno.ENOTDIR:
        return f"{path}: a part of the path is not a directory"
    return f"{path}: {exc.strerror or exc}"


def path_stat(path: Path, *, what: str, error: ErrorType = CheckpointError) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed).

    Raises:
        ConfigError or CheckpointError (``error``): a symlink loop, a broken link, a missing
            path or no permission, said as such.
    """
    try:
        return os.stat(path)
    except OSError as exc:
        raise error(f"{what} {why_unusable(path, exc)}", path=path) from exc
    except ValueError as exc:  # an embedded NUL byte
        raise error(f"{what} {str(path)!r} is not a valid path: {exc}", path=path) from exc


def regular_stat(path: Path, *, what: str, error: ErrorType = CheckpointError) -> os.stat_result:
    """``path_stat`` of a path that must be a regular file (after following links).

    Raises:
        ConfigError or CheckpointError (``error``): as :func:`path_stat`, or the path is a
            FIFO, socket, device or directory.
    """
    st = path_stat(path, what=what, error=error)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {kind(st.st_mode)}, not a regular file", path=path)
    return st


@contextlib.contextmanager
def open_regular(
    path: Path, *, what: str, error: ErrorType = CheckpointError
) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """Open a regular file for reading, with its ``fstat``; never blocks on a FIFO.

    Raises:
        ConfigError or CheckpointError (``error``): as :func:`regular_stat`, also when the
            file was swapped for another kind between the check and the open.
    """
    regular_stat(path, what=what, error=error)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise error(f"{what} {why_unusable(path, exc)}", path=path) from exc
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is {kind(st.st_mode)}, not a regular file", path=path)
        yield handle, st


def read_limited(path: Path, *, what: str, limit: int, error: ErrorType = CheckpointError) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes.

    Raises:
        ConfigError or CheckpointError (``error``): as :func:`open_regular`, a read error,
            or a file over ``limit``.
    """
    with open_regular(path, what=what, error=error) as (handle, st):
        return read_all(handle, st, path=path, what=what, limit=limit, error=error)


def read_all(
    handle: BinaryIO, st: os.stat_result, *, path: Path, what: str, limit: int,
    error: ErrorType = CheckpointError,
) -> bytes:  # fmt: skip
    """The rest of an open file of at most ``limit`` bytes.

    Raises:
        ConfigError or CheckpointError (``error``): a read error or a file over ``limit``.
    """
    if st.st_size > limit:
        raise error(
            f"{what} {path} is {st.st_size:,d} bytes; quantreg reads at most {limit:,d}",
            path=path,
        )
    try:
        raw = handle.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}", path=path) from exc
    if len(raw) > limit:
        raise error(f"{what} {path} grew past {limit:,d} bytes while read", path=path)
    return raw


def read_json(
    path: Path, *, what: str, error: ErrorType = ConfigError, limits: JSONLimits | None = None
) -> Any:
    """Parse a JSON file (config.json, an index, a legacy config) by quantreg's one JSON reader.

    Raises:
        ConfigError or CheckpointError (``error``): not a readable regular file, too big,
            not UTF-8, not JSON, or beyond the bounds of ``limits`` (nesting, size of numbers,
            count of values, NaN / Infinity, duplicate keys, lone surrogates); the message
            names the file.
    """
    raw = read_limited(path, what=what, limit=MAX_JSON_BYTES, error=error)
    return parse_json(raw, where=f"{what} {path}", path=path, error=error, limits=limits)


class ParsedFiles(Generic[T]):
    """Files parsed once while unchanged: results by path and identity (device, inode, size,
    mtime, ctime), the least recently used dropped past ``max_files`` or ``max_items``.

    A resolution reads a shard's header and the index once, and ``inspect`` or a load after
    it reads them again for free; a rewritten file gets a new identity and is parsed again.
    """

    def __init__(self, max_files: int, max_items: int) -> None:
        self._max_files, self._max_items = max_files, max_items
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Any, ...], tuple[int, T]] = OrderedDict()

    def get(
        self, path: Path, *, what: str, error: ErrorType,
        parse: Callable[[Path, BinaryIO, os.stat_result], T], items: Callable[[T], int],
    ) -> T:  # fmt: skip
        """The parsed ``path``: cached, or ``parse(path, handle, fstat)`` of the opened file.

        Raises:
            ConfigError or CheckpointError: as :func:`open_regular`, or from ``parse``.
        """
        with open_regular(path, what=what, error=error) as (handle, st):
            key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._lock:
                hit = self._entries.get(key)
                if hit is not None:
                    self._entries.move_to_end(key)
                    return hit[1]
            value = parse(path, handle, st)
        self._put(key, items(value), value)
        return value

    def _put(self, key: tuple[Any, ...], size: int, value: T) -> None:
        if size > self._max_items:
            return
        with self._lock:
            self._entries[key] = (size, value)
            while (
                len(self._entries) > self._max_files
                or sum(s for s, _ in self._entries.values()) > self._max_items
            ):
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every parsed file."""
        with self._lock:
            self._entries.clear()

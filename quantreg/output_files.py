"""Writing what was asked for and nothing else: output paths checked before any work, new
content written beside its destination and renamed into place only once complete.

The rules, for ``quantreg run --out``, ``bench --json/--plot/--append-results``,
``quantize SRC DST`` and the checkpoint writers:

- an existing destination file must be a regular file (never a device such as ``/dev/null``,
  a FIFO, a socket or a folder) that this process may write, and never one of the files the
  command reads (compared by device and inode, links followed: a symlink or hard link to a
  checkpoint shard is the shard);
- a link is followed to its target, and a link to nothing is refused (writing through it would
  create a file wherever it points);
- the destination's folder must exist;
- the content goes to a fresh hidden name in that folder (``.NAME.<random>.tmp``) and is
  renamed onto the destination; any failure removes the temporary and leaves the destination
  as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from quantreg.errors import CheckpointError, InputError
from quantreg.files import kind as file_kind

logger = logging.getLogger(__name__)

FileId = tuple[int, int]


def file_ids(paths: Iterable[str | os.PathLike[str]]) -> dict[FileId, Path]:
    """``(st_dev, st_ino)`` -> path for each path that exists (links followed)."""
    ids: dict[FileId, Path] = {}
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(path)
            ids.setdefault((st.st_dev, st.st_ino), Path(path))
    return ids


def output_file(
    path: str | os.PathLike[str], *, reads: dict[FileId, Path] | None = None, what: str = "output"
) -> Path:
    """Check ``path`` as a file to create or replace; returns the path to write (links
    followed). ``reads`` are the files the command reads (:func:`file_ids`); ``what`` names the
    argument in messages (e.g. ``--out``).

    Raises:
        InputError: the path exists and is not a regular file, is one of ``reads``, is
            read-only, is a link to nothing, or its folder is missing or not writable.
    """
    given = Path(path).expanduser()
    target = _follow(given, what)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InputError(f"{what} {given}: {exc.strerror or exc}", field=what) from exc
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"{what} {given} is {file_kind(st.st_mode)}, not a regular file; quantreg "
                "writes only a new file or replaces a regular one",
                field=what,
            )
        source = (reads or {}).get((st.st_dev, st.st_ino))
        if source is not None:
            raise InputError(
                f"{what} {given} would overwrite {source}, a file this command reads; "
                "choose another file",
                field=what,
            )
        if not os.access(target, os.W_OK):
            raise InputError(f"{what} {given} is read-only; not replacing it", field=what)
    _check_folder(target.parent, given, what)
    return target


def write_file(
    path: Path,
    write: Callable[[Path], None],
    *,
    reads: dict[FileId, Path] | None = None,
    what: str = "output",
    replace: bool = True,
) -> None:
    """Write a file through ``write(temporary_path)`` and rename it onto ``path`` (checked with
    :func:`output_file` before and again right before the rename). ``replace=False`` refuses
    an existing ``path``. A replaced file keeps its permission bits.

    Raises:
        InputError: see :func:`output_file`; with ``replace=False``, ``path`` exists.
        OSError: the temporary could not be written (it is removed; ``path`` is untouched).
    """
    target = _check_target(path, reads, what, replace)
    tmp = _beside(target, "tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode  # 0o666 less the umask, as for any new file
        with contextlib.suppress(FileNotFoundError):
            mode = os.stat(target).st_mode
        write(tmp)
        os.chmod(tmp, stat.S_IMODE(mode))  # a writer may have replaced the file (safetensors)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _check_target(path, reads, what, replace)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_target(path: Path, reads: dict[FileId, Path] | None, what: str, replace: bool) -> Path:
    target = output_file(path, reads=reads, what=what)
    if not replace and os.path.lexists(target):
        raise InputError(f"{what} {path} exists; not overwriting it", field=what)
    return target


def output_folder(
    path: str | os.PathLike[str], *, source: str | os.PathLike[str], overwrite: bool
) -> Path:
    """Check ``path`` as a checkpoint folder to create from ``source``; returns the path to
    write (links followed). An existing empty folder is used; a non-empty folder or a regular
    file only with ``overwrite`` (replaced whole, see :func:`write_folder`).

    Raises:
        CheckpointError: ``path`` is ``source``, inside it (with ``overwrite``) or holds it; it
            is a non-empty folder or a file without ``overwrite``, or neither a folder nor a
            regular file; a link to nothing; its parent folder is missing or not writable.
    """
    given = Path(path).expanduser()
    try:
        target = _follow(given, "destination")
    except InputError as exc:
        raise CheckpointError(str(exc), path=given) from exc
    src = Path(os.path.realpath(Path(source).expanduser()))
    relation = (
        "is the source folder" if target == src else
        "holds the source folder" if target in src.parents else
        "is inside the source folder" if overwrite and src in target.parents else None
    )  # fmt: skip
    if relation is not None:
        raise CheckpointError(f"destination {given} {relation} {source}", path=given)
    if os.path.lexists(target):
        _check_existing(given, target, overwrite)
    try:
        _check_folder(target.parent, given, "destination")
    except InputError as exc:
        raise CheckpointError(str(exc), path=given) from exc
    return target


def _check_existing(given: Path, target: Path, overwrite: bool) -> None:
    mode = os.stat(target).st_mode
    if stat.S_ISDIR(mode):
        if not _is_empty(target) and not overwrite:
            raise CheckpointError(
                f"{given} is not empty; quantize writes into a new folder (or pass "
                "--force / overwrite=True to replace it)",
                path=given,
            )
    elif stat.S_ISREG(mode):
        if not overwrite:
            raise CheckpointError(
                f"{given} is a file; quantize writes a folder (pass --force / overwrite=True "
                "to replace the file)",
                path=given,
            )
    else:
        raise CheckpointError(
            f"{given} is {file_kind(mode)}; quantize writes a folder, never over a special file",
            path=given,
        )


def write_folder(
    path: Path, write: Callable[[Path], None], *, source: Path, overwrite: bool
) -> None:
    """Fill a new hidden folder beside ``path`` through ``write(folder)``, check ``path``
    again (:func:`output_folder`) and move the folder into place; with ``overwrite`` an
    existing ``path`` is first renamed aside and deleted only once the new one is in place.

    Raises:
        CheckpointError: see :func:`output_folder`.
        OSError: the new folder could not be written or moved (it is removed; ``path`` is as
            it was).
    """
    target = output_folder(path, source=source, overwrite=overwrite)
    tmp = _beside(target, "tmp")
    os.mkdir(tmp)
    try:
        write(tmp)
        output_folder(path, source=source, overwrite=overwrite)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target`` (absent or an empty folder: one rename); else rename
    ``target`` aside, rename ``new`` in, and put ``target`` back if that fails."""
    if not os.path.lexists(target) or (target.is_dir() and _is_empty(target)):
        os.replace(new, target)
        return
    old = _beside(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    try:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            os.unlink(old)
    except OSError as exc:
        logger.warning("replaced %s, but could not delete its old copy %s: %s", target, old, exc)


def _is_empty(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def _beside(target: Path, suffix: str) -> Path:
    """A fresh hidden name in ``target``'s folder (short enough for any file system)."""
    return target.with_name(f".{target.name[:80]}.{secrets.token_hex(6)}.{suffix}")


def _follow(given: Path, what: str) -> Path:
    """``given`` with links resolved; a link to nothing is refused."""
    if os.path.islink(given) and not os.path.exists(given):
        raise InputError(
            f"{what} {given} is a link to {os.readlink(given)}, which does not exist; "
            "not writing through it",
            field=what,
        )
    return Path(os.path.realpath(given))


def _check_folder(folder: Path, given: Path, what: str) -> None:
    if not folder.is_dir():
        raise InputError(
            f"{what} {given}: folder {folder} does not exist; create it first", field=what
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{what} {given}: folder {folder} is not writable", field=what)


def strict_json(data: Any, *, indent: int | None = 2) -> str:
    """``data`` as strict JSON (RFC 8259): a non-finite float, which a config.json can hold
    (``1e999`` parses as inf), is written as the string ``"Infinity"``, ``"-Infinity"`` or
    ``"NaN"`` -- never as the bare tokens Python's json writes and strict parsers reject."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value

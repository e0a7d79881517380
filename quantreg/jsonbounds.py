"""quantreg's one JSON parser: Python's, fenced so that no input can crash or flood it.

Python's parser recurses once per nesting level (10,000 ``[`` is a RecursionError), turns a
5,000-digit integer into a ValueError, reads ``NaN`` / ``Infinity`` (not JSON) as floats, keeps
the last of duplicate keys without a word, and builds one Python object per value (three bytes
of ``[],`` become a 56-byte list). So before parsing, one linear pass over the raw bytes (with
strings cut out) measures the nesting depth and counts the values; then the parser's hooks
refuse duplicate keys, non-JSON constants, numbers out of range and over-long integers. Each
refusal is an error naming the file and what was found.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantreg.errors import CheckpointError, ConfigError

# A JSON string, escapes included (no backtracking: the unrolled-loop form).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# Every byte but the ones that shape a document: brackets and commas.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")
# An empty array or object (strings already replaced by a placeholder value).
_EMPTY = re.compile(rb"[\[{][ \t\r\n]*[\]}]")
# A \uD800-\uDFFF escape: only these can put a lone surrogate into a str (strict UTF-8
# decoding already refused encoded ones).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CHUNK = 1 << 22


@dataclass(frozen=True)
class JSONLimits:
    """Bounds on one JSON document.

    ``max_depth``: nesting levels (real configs nest 6 at most; Python's parser fails near
    1,000). ``max_values``: values, containers included (bounds the memory the parse takes: 4
    million small objects are ~250 MB; an index of a million tensors holds a million values).
    ``max_digits``: digits of one integer literal (Python refuses more than 4,300; no config
    or header field needs more than 20). ``minus_zero_float``: read the integer literal ``-0``
    as the float ``-0.0``, as safetensors' parser does, so that a field of counts refuses it
    (Python would read it as the count 0).
    """

    max_depth: int = 64
    max_values: int = 4_000_000
    max_digits: int = 40
    minus_zero_float: bool = False


class _Refused(Exception):
    """Raised by a parser hook; becomes the caller's error with the file named."""


def parse_json(
    raw: bytes,
    *,
    where: str,
    path: Path | None,
    error: type[ConfigError] | type[CheckpointError],
    limits: JSONLimits | None = None,
) -> Any:
    """Parse UTF-8 JSON ``raw`` within ``limits``; ``where`` names it in messages (e.g.
    ``config file /ckpt/config.json``).

    Raises:
        ConfigError or CheckpointError (``error``): not UTF-8, not JSON, nested too deep, too
            many values, an integer too long, a number out of range, NaN / Infinity,
            a duplicate key, or a lone surrogate escape.
    """
    limits = limits or JSONLimits()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where} is not UTF-8 text: {exc}", path=path) from exc
    _check_shape(raw, where=where, path=path, error=error, limits=limits)
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_integer_parser(limits),
        )
    except _Refused as exc:
        raise error(f"{where}: {exc}", path=path) from None
    except json.JSONDecodeError as exc:
        raise error(
            f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            path=path,
        ) from exc
    except (RecursionError, ValueError, MemoryError) as exc:  # the bounds should prevent these
        raise error(f"{where} cannot be parsed: {type(exc).__name__}: {exc}", path=path) from exc
    if _SURROGATE_ESCAPE.search(raw) and (lone := _lone_surrogate(value)) is not None:
        raise error(
            f"{where}: string {lone!r} holds a lone surrogate escape (not a Unicode character)",
            path=path,
        )
    return value


def _check_shape(
    raw: bytes,
    *,
    where: str,
    path: Path | None,
    error: type[ConfigError] | type[CheckpointError],
    limits: JSONLimits,
) -> None:
    """Depth and value count of ``raw``, from its brackets and commas outside strings: each
    comma adds one value (an element, or a key's value), each non-empty container one more."""
    skeleton = _STRING.sub(b"0", raw)  # a string is one value, and no bracket counts inside it
    unterminated = skeleton.find(b'"')
    if unterminated >= 0:  # the parser stops at an unterminated string: so does the count
        skeleton = skeleton[:unterminated]
    marks = skeleton.translate(None, _NOT_STRUCTURE)
    brackets = marks.translate(None, b",")
    empty = _EMPTY.subn(b"", skeleton)[1]
    values = 1 + (len(marks) - len(brackets)) + len(brackets) // 2 - empty
    if values > limits.max_values:
        raise error(
            f"{where} holds more than {limits.max_values:,d} JSON values ({values:,d}); "
            "quantreg does not parse documents that large",
            path=path,
        )
    if _deeper_than(brackets, limits.max_depth):
        raise error(
            f"{where}: JSON nested deeper than {limits.max_depth} levels "
            "(real configs nest a few levels)",
            path=path,
        )


def _deeper_than(brackets: bytes, limit: int) -> bool:
    """Whether the running depth of ``[]{}`` ever exceeds ``limit`` (linear, no recursion)."""
    if len(brackets) <= limit:
        return False
    import numpy as np

    steps = np.zeros(256, dtype=np.int8)
    steps[list(b"[{")] = 1
    steps[list(b"]}")] = -1
    depth = 0
    for start in range(0, len(brackets), _CHUNK):
        chunk = np.frombuffer(brackets[start : start + _CHUNK], dtype=np.uint8)
        running = np.cumsum(steps[chunk], dtype=np.int64) + depth
        if int(running.max()) > limit:
            return True
        depth = int(running[-1])
    return False


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(
            f"duplicate key {duplicate!r} in one JSON object (which one counts is ambiguous)"
        )
    return obj


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON value (JSON has no NaN or Infinity)")


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _Refused(f"number {literal[:40]} is out of range (it would read as {value})")
    return value


def _integer_parser(limits: JSONLimits) -> Any:
    def parse(literal: str) -> int | float:
        digits = len(literal) - literal.startswith("-")
        if digits > limits.max_digits:
            raise _Refused(
                f"integer {literal[:20]}... has {digits:,d} digits (at most {limits.max_digits})"
            )
        if limits.minus_zero_float and literal == "-0":
            return -0.0
        return int(literal)

    return parse


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) holding a lone surrogate, walking without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return item
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None

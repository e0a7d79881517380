"""Messages for pydantic validation errors of a checkpoint's config: one line per bad field
naming the file, method, field, value and rule -- short, since a checkpoint's lists can be
huge (at most ten fields, each value cut to 200 characters)."""

from __future__ import annotations

import reprlib
from typing import Any

from pydantic import ValidationError

_SHOWN_ERRORS = 10
_SHOWN_CHARS = 200
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 10, 10
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = _SHOWN_CHARS, _SHOWN_CHARS, 60


def where(source: str | None) -> str:
    """`` in <source>`` for a message, or nothing when the config has no file."""
    return f" in {source}" if source else ""


def first_field(exc: ValidationError) -> str | None:
    """The dotted name of the first field a pydantic error is about."""
    errors = exc.errors(include_url=False)
    return ".".join(str(part) for part in errors[0]["loc"]) or None if errors else None


def describe_validation_error(
    exc: ValidationError,
    *,
    method: str,
    source: str | None = None,
    what: str = "quantization_config",
) -> str:
    """Turn a pydantic error into one line per bad field: file, method, field, value, rule
    (the first ten bad fields, each value cut to 200 characters: a checkpoint's lists can be
    huge)."""
    lines = []
    errors = exc.errors(include_url=False)
    for err in errors[:_SHOWN_ERRORS]:
        loc = ".".join(str(part) for part in err["loc"]) or "<config>"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "missing":
            lines.append(f"field '{loc}' is required")
        else:
            lines.append(f"field '{loc}' = {_shown(err.get('input'))}: {msg}")
    if len(errors) > _SHOWN_ERRORS:
        lines.append(f"and {len(errors) - _SHOWN_ERRORS} more")
    return f"invalid {method} {what}{where(source)}: " + "; ".join(lines)


def _shown(value: Any) -> str:
    """``repr(value)``, with at most 10 items of a list or dict and 200 characters shown."""
    text = _REPR.repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}..."

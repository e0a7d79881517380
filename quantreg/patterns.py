"""Regexes from checkpoints, checked so that matching module names takes bounded time.

Checkpoints carry regexes -- compressed-tensors ``re:`` targets and ignore entries, GPTQModel
``dynamic`` keys, ``re:`` entries in other producers' exclusion lists -- and the module names
they are matched against come from the same checkpoint's tensor names. Python's ``re``
backtracks, and a match cannot be interrupted, so ``re:(a+)+$`` against thirty ``a`` would hang
resolution. The bound therefore comes from the pattern itself, before any match:

- a pattern is parsed with Python's own parser (``re._parser``; when a future Python lacks it,
  every pattern is refused rather than matched unchecked) and its worst-case work is estimated
  against a name of :data:`MAX_NAME_CHARS` characters (see :func:`regex_problem`);
- a repeat without bound of a part that can match the same text in two ways (``(a+)+``,
  ``(a|a)*``, ``(.*)*``) is refused outright: its work grows exponentially with the name;
- otherwise the work is polynomial (each unbounded repeat such as ``.*`` can end at up to
  ``n + 1`` places; one followed by literal text only where that text occurs), and a pattern
  over :data:`MAX_STEPS` is refused (``.*a.*a.*a.*b`` is; ``.*layers.*mlp.*_proj$`` is not);
- backreferences and group conditionals are refused (not regular, and no producer writes
  them); a config may hold at most :data:`MAX_PATTERNS` regexes, together at most
  :data:`MAX_TOTAL_STEPS` per name; tensor names longer than :data:`MAX_NAME_CHARS` are refused
  where headers and indexes are read, so the estimate holds for every name matched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from quantreg.errors import CheckpointError, ConfigError, InputError

try:  # Python 3.11+; a private module, so its absence refuses every pattern
    from re import _parser as _sre
except ImportError:  # pragma: no cover - depends on the Python version
    _sre = None  # type: ignore[assignment]

MAX_NAME_CHARS = 256
MAX_PATTERN_CHARS = 1000
MAX_PATTERNS = 4096
MAX_STEPS = 2**25
MAX_TOTAL_STEPS = 2**27
_SATURATED = 2**62
_EXAMPLE = r"e.g. '.*mlp\.gate$' or 'model\.layers\.\d+\.self_attn\..*'"
_CATEGORIES = {
    "CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S", "CATEGORY_WORD": r"\w", "CATEGORY_NOT_WORD": r"\W",
}  # fmt: skip


class _Refused(Exception):
    """A construct whose matching cannot be bounded (the message says which)."""


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be matched (``re.match``) against module names in bounded time,
    as a phrase to follow the pattern in a message (``"is not a valid regular expression:
    ..."``); None when it can. Cached by pattern."""
    if not isinstance(pattern, str):
        return f"is not a string (got {type(pattern).__name__})"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are allowed"
    return _analysed(pattern)[1]


def regex_list_problem(patterns: Collection[str]) -> str | None:
    """Why a config's regexes, together, cannot be matched against one module name in bounded
    time (too many, or too much work in total); None when they can. Each pattern on its own
    is :func:`regex_problem`'s to judge."""
    if len(patterns) > MAX_PATTERNS:  # before any pattern is analysed
        return f"it holds {len(patterns)} regexes; at most {MAX_PATTERNS} are allowed"
    total = sum(_analysed(p)[0] for p in patterns if regex_problem(p) is None)
    if total > MAX_TOTAL_STEPS:
        return (
            f"its {len(patterns)} regexes together could take about {total:.1e} steps to "
            f"match one {MAX_NAME_CHARS}-character module name (limit {MAX_TOTAL_STEPS:.1e}); "
            f"expected fewer or simpler regexes ({_EXAMPLE})"
        )
    return None


def checked_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled, once :func:`regex_problem` finds nothing wrong with it.

    Raises:
        ConfigError: the problem, naming the pattern.
    """
    problem = regex_problem(pattern)
    if problem is not None:
        raise ConfigError(f"regex {pattern!r} {problem}")
    return _compiled(pattern)


@functools.lru_cache(maxsize=MAX_PATTERNS)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@functools.lru_cache(maxsize=MAX_PATTERNS)
def _analysed(pattern: str) -> tuple[int, str | None]:
    """(estimated steps against a MAX_NAME_CHARS name, the problem or None)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return 0, f"is not a valid regular expression: {exc}"
    except RecursionError:
        return 0, "nests groups too deeply"
    if _sre is None:  # pragma: no cover - depends on the Python version
        return 0, "cannot be checked on this Python (no re._parser), so it is not matched"
    try:
        tree = _sre.parse(pattern)
        steps = _Estimate(tree).steps()
    except _Refused as exc:
        return 0, str(exc)
    except RecursionError:
        return 0, "nests groups too deeply"
    except Exception as exc:  # the parser is private: a change in it must not pass a pattern
        return 0, f"cannot be checked ({type(exc).__name__}), so it is not matched"
    if steps > MAX_STEPS:
        return steps, (
            f"could take about {steps:.1e} steps to match a {MAX_NAME_CHARS}-character module "
            f"name (limit {MAX_STEPS:.1e}): its repeats (.*, +, {{m,n}}) and alternatives can "
            "split a name in too many ways; expected unbounded repeats separated by literal "
            f"text ({_EXAMPLE})"
        )
    return steps, None


def _saturate(value: int) -> int:
    return min(value, _SATURATED)


class _Estimate:
    """Worst-case work of ``re.match`` of one parsed pattern against a name of ``n`` chars.

    Each node gives ``(work, ways)``: the steps spent inside it, and how many ways it can
    succeed from one position -- each way is one more attempt at what follows it. Refinements
    that use the characters (a repeat followed by literal text) are off under IGNORECASE,
    LOCALE or inline flag groups, where the characters a node matches are harder to know.
    """

    def __init__(self, tree: Any, n: int = MAX_NAME_CHARS) -> None:
        self.tree = tree
        self.n = n
        self.flags = tree.state.flags
        self.exact = not self.flags & (re.IGNORECASE | re.LOCALE) and not _has_inline_flags(tree)

    def steps(self) -> int:
        """The whole pattern's work. A repeat of a part that matches one way, ending the
        pattern, ends the match when it succeeds: every other attempt at it fails within its
        first ``min`` iterations."""
        items = list(self.tree)
        last = items[-1] if items else None
        if last is None or str(last[0]) not in ("MAX_REPEAT", "MIN_REPEAT"):
            return self._sequence(items)[0]
        low, _, body = last[1]
        body_work, body_ways = self._sequence(list(body))
        if body_ways > 1:
            return self._sequence(items)[0]
        work, ways = self._sequence(items[:-1])
        once, _ = self._node(*last, ())
        per_try = _saturate((low + 1) * (body_work + 1))
        return _saturate(work + ways * per_try + once)

    def _sequence(self, items: Sequence[tuple[Any, Any]]) -> tuple[int, int]:
        work, ways = 0, 1
        for i, (op, av) in enumerate(items):
            node_work, node_ways = self._node(op, av, items[i + 1 :])
            work = _saturate(work + ways * node_work)
            ways = _saturate(ways * node_ways)
        return work, ways

    def _node(self, op: Any, av: Any, rest: Sequence[tuple[Any, Any]]) -> tuple[int, int]:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            return self._repeat(name, av, rest)
        if name == "SUBPATTERN":
            return self._sequence(list(av[3]))
        if name == "ATOMIC_GROUP":
            return self._sequence(list(av))[0], 1
        if name in ("ASSERT", "ASSERT_NOT"):
            return self._sequence(list(av[1]))[0] + 1, 1
        if name == "BRANCH":
            return self._branch(av[1])
        if name in ("GROUPREF", "GROUPREF_EXISTS"):
            raise _Refused(
                "uses a backreference or a group conditional, which quantreg does not match "
                f"(it can take exponential time); expected a plain regex ({_EXAMPLE})"
            )
        return 1, 1  # one character or one position: LITERAL, IN, ANY, AT, ...

    def _branch(self, branches: Sequence[Any]) -> tuple[int, int]:
        parts = [self._sequence(list(b)) for b in branches]
        work = _saturate(sum(w for w, _ in parts))
        firsts = [list(b)[:1] for b in branches]
        disjoint = self.exact and all(firsts) and _pairwise_disjoint(self, firsts)
        ways = max(k for _, k in parts) if disjoint else sum(k for _, k in parts)
        return work, _saturate(ways)

    def _repeat(self, kind: str, av: Any, rest: Sequence[tuple[Any, Any]]) -> tuple[int, int]:
        low, high, body = av
        items = list(body)
        body_work, body_ways = self._sequence(items)
        unbounded = high == _sre.MAXREPEAT
        if unbounded and body_ways > 1 and kind != "POSSESSIVE_REPEAT":
            raise _Refused(
                "repeats without bound a part that can match the same text in more than one "
                "way (nested quantifiers such as '(a+)+', overlapping alternatives such as "
                "'(a|a)*'): matching could take exponential time; expected a regex without "
                f"nested repeats ({_EXAMPLE})"
            )
        top = self.n if unbounded or body.getwidth()[0] > 0 else high
        top = min(high, top)
        if low > top:
            return _saturate(body_work * (top + 1)), 1
        if body_ways > 1:  # bounded: every combination of the body's ways
            ways = sum(body_ways**k for k in range(low, min(top, 64) + 1))
            ways = _saturate(ways if top <= 64 else _SATURATED)
            return _saturate(ways * (body_work + 1)), ways
        count = top - low + 1
        text = self._literal_text(rest)
        work = _saturate(count * (body_work + len(text) + 1))
        if kind == "POSSESSIVE_REPEAT":
            return work, 1
        return work, self._end_positions(count, items, text)

    def _end_positions(self, count: int, body: list[tuple[Any, Any]], text: str) -> int:
        """Where a repeat with ``count`` possible lengths can end such that the literal
        ``text`` after it matches: one place when its single character can never start
        ``text`` (``\\d+\\.``), at most ``n / period(text) + 1`` places otherwise."""
        if not text:
            return count
        if len(body) == 1 and not _may_match(self, *body[0], text[0]):
            return 1
        return min(count, self.n // _period(text) + 1)

    def _literal_text(self, rest: Sequence[tuple[Any, Any]]) -> str:
        """The literal characters right after a node (only when characters are exact)."""
        if not self.exact:
            return ""
        chars = []
        for op, av in rest:
            if str(op) != "LITERAL":
                break
            chars.append(chr(av))
        return "".join(chars)


def _period(text: str) -> int:
    """The smallest shift at which ``text`` overlaps itself (its length when none does)."""
    return next((q for q in range(1, len(text)) if text[q:] == text[:-q]), len(text))


def _has_inline_flags(tree: Any) -> bool:
    """Whether any group sets or clears flags (``(?i:...)``): characters are then inexact."""
    stack = [tree]
    while stack:
        for op, av in list(stack.pop()):
            name = str(op)
            if name == "SUBPATTERN":
                if av[1] or av[2]:
                    return True
                stack.append(av[3])
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                stack.append(av[2])
            elif name in ("ASSERT", "ASSERT_NOT"):
                stack.append(av[1])
            elif name == "ATOMIC_GROUP":
                stack.append(av)
            elif name == "BRANCH":
                stack.extend(av[1])
            elif name == "GROUPREF_EXISTS":
                stack.extend(b for b in av[1:] if b is not None)
    return False


def _pairwise_disjoint(estimate: _Estimate, firsts: list[list[tuple[Any, Any]]]) -> bool:
    """Whether no two branches can start with the same character (each starts with a literal
    character the others' first nodes cannot match)."""
    for i, first in enumerate(firsts):
        op, av = first[0]
        if str(op) != "LITERAL":
            return False
        others = [other[0] for j, other in enumerate(firsts) if j != i]
        if any(_may_match(estimate, *other, chr(av)) for other in others):
            return False
    return True


def _may_match(estimate: _Estimate, op: Any, av: Any, char: str) -> bool:
    """Whether the one-character node ``(op, av)`` can match ``char`` (True when unsure)."""
    name = str(op)
    if name == "LITERAL":
        return chr(av) == char
    if name == "NOT_LITERAL":
        return chr(av) != char
    if name == "ANY":
        return char != "\n" or bool(estimate.flags & re.DOTALL)
    if name != "IN":
        return True
    negate, hit = False, False
    for item_op, item_av in av:
        item = str(item_op)
        if item == "NEGATE":
            negate = True
        elif item == "LITERAL":
            hit = hit or chr(item_av) == char
        elif item == "RANGE":
            hit = hit or item_av[0] <= ord(char) <= item_av[1]
        elif item == "CATEGORY" and str(item_av) in _CATEGORIES:
            ascii_only = estimate.flags & re.ASCII
            hit = hit or re.fullmatch(_CATEGORIES[str(item_av)], char, ascii_only) is not None
        else:
            return True
    return hit != negate


def dynamic_pattern(key: str) -> str:
    """The regex of a GPTQModel ``dynamic`` key, without its ``+:`` (quantize) / ``-:`` (skip)
    sign; a key without a sign is a ``+:`` rule."""
    return key[2:] if key[:2] in ("+:", "-:") else key


def check_name_lengths(names: Iterable[str], *, path: Path, what: str) -> None:
    """The tensor names of a header or an index (``what``) are at most MAX_NAME_CHARS
    characters long: the work bound of every checkpoint regex holds for such names.

    Raises:
        CheckpointError: naming the file and the first long name (shortened).
    """
    long = next((name for name in names if len(name) > MAX_NAME_CHARS), None)
    if long is not None:
        raise CheckpointError(
            f"{path}: {what} tensor name {short_name(long)} is {len(long)} characters long; "
            f"names of at most {MAX_NAME_CHARS} characters are read",
            path=path,
            tensor=long,
        )


def check_prefix(prefix: object) -> None:
    """A layer prefix given by a caller is a name like any other.

    Raises:
        InputError: not a string, or longer than :data:`MAX_NAME_CHARS` characters.
    """
    if isinstance(prefix, str) and len(prefix) <= MAX_NAME_CHARS:
        return
    if isinstance(prefix, str):
        shown = f"{short_name(prefix)} ({len(prefix)} characters)"
    else:
        shown = repr(prefix)
    raise InputError(
        f"prefix must be a module name of at most {MAX_NAME_CHARS} characters; got {shown}",
        field="prefix",
    )


def listed(names: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` names, comma-separated, and how many more: for messages."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def short_name(name: str, limit: int = 60) -> str:
    """``name`` quoted for a message, cut to ``limit`` characters."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}..."

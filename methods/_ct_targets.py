"""compressed-tensors ``targets`` and ``ignore`` entries: how one names a module, and which
entries name no module of a checkpoint.

An entry is an exact module name, a ``re:`` regex (``re.match``, anchored at the start) or a
class name (``Linear`` matches any of quantreg's layers). Regexes come from the checkpoint and
are matched against its module names, so each is checked when the config is read
(:func:`quantreg.regex_problem`) and all of a config's together
(:func:`quantreg.regex_list_problem`): matching then takes bounded time.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from quantreg import ConfigError, checked_regex, regex_list_problem, regex_problem

LINEAR_CLASS = "Linear"
# How long resolution spends looking for entries that match no module of the checkpoint (a
# warning only); the entries left are reported as not checked.
CHECK_SECONDS = 0.2
_SHOWN = 10


def match_kind(target: str, name: str) -> int | None:
    """How ``target`` matches module ``name``: 0 exact name, 1 ``re:`` regex, 2 class ``Linear``.

    Raises:
        ConfigError: a ``re:`` entry that cannot be matched in bounded time (configs are
            checked when read, so only an unchecked entry gets here).
    """
    if target == name:
        return 0
    if target.startswith("re:"):
        return 1 if checked_regex(target[3:]).match(name) else None
    return 2 if target == LINEAR_CLASS else None


def check_entry(entry: Any) -> None:
    """A pydantic check of one entry: a ``re:`` regex must be valid and bounded.

    Raises:
        ValueError: naming the entry and the problem.
    """
    if isinstance(entry, str) and entry.startswith("re:"):
        problem = regex_problem(entry[3:])
        if problem is not None:
            raise ValueError(f"{entry!r} {problem}")


def check_entries(entries: list[str]) -> list[str]:
    """A pydantic validator's body for a list of entries: each checked (see
    :func:`check_entry`), the list returned unchanged.

    Raises:
        ValueError: naming the first bad entry and the problem.
    """
    for entry in entries:
        check_entry(entry)
    return entries


def raw_entries(data: Any) -> list[str]:
    """The ``re:`` entries of a config not validated yet (whatever its shape): counted
    before any is analysed, so that a million of them cost one ``len``."""
    if not isinstance(data, Mapping):
        return []
    lists = [data.get("ignore")]
    groups = data.get("config_groups")
    if isinstance(groups, Mapping):
        lists += [g.get("targets") for g in groups.values() if isinstance(g, Mapping)]
    sparsity = data.get("sparsity_config")
    if isinstance(sparsity, Mapping):
        lists += [sparsity.get("targets"), sparsity.get("ignore")]
    return [
        e for entries in lists if isinstance(entries, list)
        for e in entries if isinstance(e, str) and e.startswith("re:")
    ]  # fmt: skip


def check_all(entries: Sequence[str], *, method: str, source: str | None) -> None:
    """All of a config's ``re:`` entries together: how many, and their work on one name.

    Raises:
        ConfigError: naming the config file and the limit.
    """
    problem = regex_list_problem([e[3:] for e in entries if e.startswith("re:")])
    if problem is not None:
        where = f" in {source}" if source else ""
        raise ConfigError(
            f"invalid {method} quantization_config{where}: fields 'ignore' and "
            f"'config_groups' targets: {problem}",
            field="ignore",
        )


def unmatched(entries: Sequence[tuple[str, str]], modules: Collection[str]) -> list[str]:
    """One message per ``(kind, entry)`` that matches none of ``modules`` (class names other
    than ``Linear`` cannot be checked from tensor names and are skipped). The search stops
    after :data:`CHECK_SECONDS`; one more message lists the entries left unchecked."""
    deadline = time.monotonic() + CHECK_SECONDS
    found, unchecked = [], []
    for kind, entry in entries:
        if entry[:1].isupper() and entry != LINEAR_CLASS:
            continue
        matched = _matches_a_module(entry, modules, deadline)
        if matched is None:
            unchecked.append(entry)
        elif not matched:
            found.append(f"{kind} entry '{entry}' matches no module of the checkpoint")
    if unchecked:
        shown = ", ".join(repr(e) for e in unchecked[:_SHOWN])
        more = f" and {len(unchecked) - _SHOWN} more" if len(unchecked) > _SHOWN else ""
        found.append(
            f"{len(unchecked)} ignore / targets entries were not checked against the "
            f"checkpoint's {len(modules)} modules (the check stops after {CHECK_SECONDS} s): "
            f"{shown}{more}"
        )
    return found


def _matches_a_module(entry: str, modules: Collection[str], deadline: float) -> bool | None:
    """Whether ``entry`` names or matches one of ``modules``; None when ``deadline`` passed
    first (each regex match is bounded, so the clock is read between matches)."""
    if entry == LINEAR_CLASS:
        return bool(modules)
    if not entry.startswith("re:"):
        return entry in modules
    regex = checked_regex(entry[3:])
    for module in modules:
        if regex.match(module):
            return True
        if time.monotonic() > deadline:
            return None
    return False

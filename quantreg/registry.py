"""The method registry: names -> QuantConfig classes, from built-ins, decorators and plugins.

Built-in methods are registered by import string and imported on first lookup, so listing
them (or ``import quantreg``) imports no method module. Plugins come from the entry-point
group ``quantreg.methods`` (name = method name, value = ``module:ConfigClass``); they are
discovered on the first lookup or listing, and a broken one never breaks the others.
Modules are always imported outside the registry lock, so a module that registers itself
while being imported cannot deadlock another thread.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from quantreg.contract import QuantConfig
from quantreg.errors import (
    DuplicateMethodError,
    MethodDefinitionError,
    PluginError,
    UnknownMethodError,
)
from quantreg.method_names import (
    BUILTIN,
    BUILTIN_METHODS,
    ENTRY_POINT_GROUP,
    NAME_ALIASES,
    NAME_RE,
    Entry,
    MethodInfo,
    describe_class,
    names_class,
    normalize_name,
)
from quantreg.patterns import short_name

__all__ = [
    "BUILTIN_METHODS",
    "ENTRY_POINT_GROUP",
    "MethodInfo",
    "Registry",
    "default_registry",
    "get_quant_config_cls",
    "list_quant_methods",
    "normalize_name",
    "register_quant_method",
    "set_default_registry",
]

logger = logging.getLogger(__name__)

C = TypeVar("C", bound=type[QuantConfig])


class Registry:
    """A thread-safe map of method names to QuantConfig classes.

    The module-level functions use one default instance; tests build fresh ones.
    """

    def __init__(
        self,
        builtins: dict[str, str] | None = None,
        *,
        entry_point_group: str | None = ENTRY_POINT_GROUP,
    ) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        self._group = entry_point_group
        self._discovered = entry_point_group is None
        for name, target in (BUILTIN_METHODS if builtins is None else builtins).items():
            aliases = tuple(a for a, canonical in NAME_ALIASES.items() if canonical == name)
            self._entries[name] = Entry(name, aliases, BUILTIN, target=target)
            self._aliases.update(dict.fromkeys(aliases, name))

    # -- registration -------------------------------------------------------------------

    def register(
        self,
        name: str,
        cls: type[QuantConfig],
        *,
        aliases: Iterable[str] = (),
        override: bool = False,
        source: str | None = None,
    ) -> type[QuantConfig]:
        """Register ``cls`` under ``name``; see :func:`register_quant_method`."""
        if not (isinstance(cls, type) and issubclass(cls, QuantConfig)):
            raise MethodDefinitionError(
                f"cannot register {cls!r} as quantization method '{name}': "
                "expected a subclass of quantreg.QuantConfig"
            )
        key = self._checked_name(name, what="method name")
        alias_keys = tuple(dict.fromkeys(self._checked_name(a, what="alias") for a in aliases))
        with self._lock:
            existing = self._entries.get(key) or self._entries.get(self._aliases.get(key, ""))
            if existing is not None and existing.name != key:
                raise DuplicateMethodError(
                    f"cannot register '{key}': it is an alias of '{existing.name}'"
                )
            if existing is not None and self._is_same(existing, cls):
                # The same class again (e.g. a plugin module that also decorates itself).
                existing.cls, existing.target, existing.error = cls, None, None
                return cls
            for alias in alias_keys:
                owner = self._aliases.get(alias, alias if alias in self._entries else None)
                if owner is not None and owner != key:
                    raise DuplicateMethodError(
                        f"cannot register alias '{alias}' for '{key}': it already names '{owner}'"
                    )
            if existing is not None:
                if not override:
                    raise DuplicateMethodError(
                        f"quantization method '{key}' is already registered to "
                        f"{self._holder(existing)} ({existing.source}); refusing to replace it "
                        f"with {describe_class(cls)}. Pass override=True to replace it."
                    )
                logger.warning(
                    "quantization method '%s': %s replaces %s",
                    key,
                    describe_class(cls),
                    self._holder(existing),
                )
                for alias in existing.aliases:
                    self._aliases.pop(alias, None)
            self._entries[key] = Entry(
                key,
                alias_keys,
                source or f"registered: {describe_class(cls)}",
                cls=cls,
            )
            for alias in alias_keys:
                self._aliases[alias] = key
        logger.debug("registered quantization method '%s' -> %s", key, describe_class(cls))
        return cls

    def unregister(self, name: str) -> None:
        """Remove a method and its aliases (tests and interactive use)."""
        key = self.canonical_name(name)
        with self._lock:
            entry = self._entries.pop(key)
            for alias in entry.aliases:
                self._aliases.pop(alias, None)

    # -- lookup -------------------------------------------------------------------------

    def canonical_name(self, name: str) -> str:
        """The registered name that ``name`` (or its alias) denotes.

        Raises:
            UnknownMethodError: no entry or alias matches; names the closest registered one.
        """
        key = normalize_name(name)
        self._discover()
        with self._lock:
            if key in self._entries:
                return key
            if key in self._aliases:
                return self._aliases[key]
            known = sorted(self._entries)
            candidates = known + sorted(self._aliases)
        # a checkpoint's name can be a megabyte long: then no suggestion, and a shortened name
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6) if len(key) < 99 else []
        hint = f"; did you mean '{self._aliases.get(close[0], close[0])}'?" if close else ""
        raise UnknownMethodError(
            f"unknown quantization method {short_name(name)}; registered: {', '.join(known)}{hint}"
        )

    def get(self, name: str) -> type[QuantConfig]:
        """The QuantConfig class of ``name``, importing it on first use.

        Raises:
            UnknownMethodError: unknown name.
            PluginError: the plugin or built-in module providing it failed to load.
        """
        key = self.canonical_name(name)
        with self._lock:
            entry = self._entries[key]
            if entry.cls is not None:
                return entry.cls
            if entry.error is not None:
                raise PluginError(entry.error)
            target, entry_point = entry.target, entry.entry_point
        try:
            cls = self._import(key, target, entry_point)  # outside the lock
        except PluginError as exc:
            with self._lock:
                current = self._entries.get(key)
                if current is entry:
                    entry.error = str(exc)
            raise
        with self._lock:
            if entry.cls is None:
                entry.cls, entry.error = cls, None
            elif entry.cls is not cls:
                entry.error = (
                    f"quantization method '{key}' ({entry.source}) points to "
                    f"{describe_class(cls)}, but its module registered "
                    f"{describe_class(entry.cls)}"
                )
                entry.cls = None
                raise PluginError(entry.error)
            return entry.cls

    def list(self) -> list[MethodInfo]:
        """Every entry, sorted by name; plugins are imported so broken ones show their error."""
        self._discover()
        with self._lock:
            plugin_names = [n for n, e in self._entries.items() if e.entry_point is not None]
        for name in plugin_names:
            with contextlib.suppress(PluginError):  # recorded on the entry
                self.get(name)
        with self._lock:
            return [
                MethodInfo(e.name, e.aliases, e.source, e.cls is not None, e.error)
                for e in sorted(self._entries.values(), key=lambda e: e.name)
            ]

    def loaded(self) -> dict[str, type[QuantConfig]]:
        """The classes imported so far, by name (no import is triggered)."""
        with self._lock:
            return {n: e.cls for n, e in self._entries.items() if e.cls is not None}

    def broken(self) -> dict[str, str]:
        """Entries that failed to load, with their error (no import is triggered)."""
        with self._lock:
            return {n: e.error for n, e in self._entries.items() if e.error is not None}

    def builtin_names(self) -> list[str]:
        """Names of the built-in entries."""
        with self._lock:
            return sorted(n for n, e in self._entries.items() if e.source == BUILTIN)

    def names(self) -> list[str]:
        """Every registered name (after plugin discovery), sorted."""
        self._discover()
        with self._lock:
            return sorted(self._entries)

    # -- internals ----------------------------------------------------------------------

    def _checked_name(self, name: str, *, what: str) -> str:
        key = normalize_name(name)
        if not NAME_RE.match(key):
            raise MethodDefinitionError(
                f"invalid {what} {name!r}: use lower-case letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        return key

    @staticmethod
    def _is_same(entry: Entry, cls: type) -> bool:
        if entry.cls is not None:
            return entry.cls is cls
        return entry.target is not None and names_class(entry.target, cls)

    @staticmethod
    def _holder(entry: Entry) -> str:
        if entry.cls is not None:
            return describe_class(entry.cls)
        return entry.target or "?"

    def _discover(self) -> None:
        """Read the entry-point group once (metadata only; nothing is imported)."""
        if self._discovered:
            return
        try:
            found = importlib.metadata.entry_points(group=self._group)
        except Exception as exc:  # corrupt metadata of some unrelated distribution
            logger.warning("cannot read entry points of group %r: %s", self._group, exc)
            found = ()
        with self._lock:
            if self._discovered:
                return
            self._discovered = True
            for ep in found:
                self._add_entry_point(ep)

    def _add_entry_point(self, ep: importlib.metadata.EntryPoint) -> None:
        dist = getattr(ep, "dist", None)
        dist_name = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        source = f"plugin {dist_name}: {ep.name} = {ep.value}"
        key = normalize_name(ep.name)
        if not NAME_RE.match(key):
            logger.warning(
                "ignoring plugin entry point %r (%s): invalid method name", ep.name, source
            )
            return
        if key in self._entries or key in self._aliases:
            owner = self._entries.get(key) or self._entries[self._aliases[key]]
            if owner.cls is not None and owner.name == key and names_class(ep.value, owner.cls):
                # The plugin module was imported (and registered itself) before discovery.
                owner.source, owner.entry_point = source, ep
                return
            logger.warning(
                "plugin entry point '%s' (%s) ignored: the name is taken by %s (%s)",
                key,
                source,
                self._holder(owner),
                owner.source,
            )
            return
        self._entries[key] = Entry(key, (), source, target=ep.value, entry_point=ep)

    def _import(
        self, key: str, target: str | None, ep: importlib.metadata.EntryPoint | None
    ) -> type[QuantConfig]:
        what = f"plugin '{key}' ({self._entries[key].source})" if ep else f"method '{key}'"
        try:
            if ep is not None:
                obj = ep.load()
            else:
                assert target is not None
                module_name, _, attr = target.partition(":")
                obj = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
        except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() must not end us
            raise PluginError(
                f"quantization {what} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        if not (isinstance(obj, type) and issubclass(obj, QuantConfig)):
            raise PluginError(
                f"quantization {what} points to {obj!r}, which is not a quantreg.QuantConfig "
                "subclass"
            )
        return obj


_default = Registry()


def default_registry() -> Registry:
    """The process-wide registry the module-level functions use."""
    return _default


def set_default_registry(registry: Registry) -> Registry:
    """Replace the process-wide registry (tests); returns the previous one."""
    global _default
    previous, _default = _default, registry
    return previous


def register_quant_method(
    name: str, *, aliases: Iterable[str] = (), override: bool = False
) -> Callable[[C], C]:
    """Class decorator registering a QuantConfig subclass as quantization method ``name``.

    Registering the same class again is a no-op; another class under a taken name raises
    unless ``override=True``, which logs a WARNING naming both.

    Raises:
        DuplicateMethodError: the name or an alias is taken by another class.
        MethodDefinitionError: not a QuantConfig subclass, or a bad name or alias.
    """

    def decorate(cls: C) -> C:
        _default.register(name, cls, aliases=aliases, override=override)
        return cls

    return decorate


def get_quant_config_cls(name: str) -> type[QuantConfig]:
    """The QuantConfig class registered as ``name`` (or one of its aliases).

    Raises:
        UnknownMethodError: no such method; the message suggests the closest name.
        PluginError: the plugin providing it failed to import.
    """
    return _default.get(name)


def list_quant_methods() -> list[MethodInfo]:
    """Every registered method with its aliases, source, and load state, sorted by name."""
    return _default.list()

"""The exceptions quantreg raises.

Every error derives from :class:`QuantregError` and also from the builtin that fits it,
so callers may catch either::

    QuantregError
    ├── UnknownMethodError      (LookupError)  a method name nobody registered
    ├── DuplicateMethodError    (ValueError)   a name already taken by another class
    ├── MethodDefinitionError   (TypeError)    a QuantConfig subclass declared wrongly
    ├── PluginError             (ImportError)  a plugin (or an engine) that could not be loaded
    ├── InputError              (ValueError)   a bad argument of a call (dtype, tp, sizes, ...)
    ├── ConfigError             (ValueError)   a bad or unsupported quantization config
    ├── CheckpointError         (ValueError)   a bad checkpoint file, tensor or index entry
    └── DistributedError        (RuntimeError) another tensor-parallel rank failed

``InputError`` is the caller's mistake (fix the call); ``ConfigError`` and ``CheckpointError``
are the checkpoint's (fix or convert the files). Errors carry what they are about where it is
known: ``path`` (the file), ``field`` (a config field or argument name) and, for
``CheckpointError``, ``tensor``.
"""

from __future__ import annotations

from pathlib import Path


class QuantregError(Exception):
    """Root of every error quantreg raises on purpose."""


class UnknownMethodError(QuantregError, LookupError):
    """A quantization method name that no registry entry or alias matches."""


class DuplicateMethodError(QuantregError, ValueError):
    """A method name or alias that is already registered to a different class."""


class MethodDefinitionError(QuantregError, TypeError):
    """A QuantConfig subclass or registration that breaks the method contract."""


class PluginError(QuantregError, ImportError):
    """An entry-point plugin of the ``quantreg.methods`` group that could not be loaded, or an
    engine integration (``quantreg.integrations``) whose engine is missing or unsupported."""


class InputError(QuantregError, ValueError):
    """A bad argument of a call: ``field`` names the argument when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(QuantregError, ValueError):
    """A quantization config (or a request about one) that is invalid or unsupported.

    ``path`` is the config file and ``field`` the field concerned, when known.
    """

    def __init__(
        self, message: str, *, path: str | Path | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.field = field


class CheckpointError(QuantregError, ValueError):
    """A checkpoint file, index entry or tensor that is missing, unsafe or malformed.

    ``path`` is the file concerned and ``tensor`` the tensor name, when known.
    """

    def __init__(
        self, message: str, *, path: str | Path | None = None, tensor: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.tensor = tensor


class DistributedError(QuantregError, RuntimeError):
    """A collective step failed on another tensor-parallel rank (this one was fine)."""

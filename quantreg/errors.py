"""The exceptions quantreg raises.

Every error derives from :class:`QuantregError` and also from the builtin that fits it,
so callers may catch either::

    QuantregError
    ├── UnknownMethodError      (LookupError)  a method name nobody registered
    ├── DuplicateMethodError    (ValueError)   a name already taken by another class
    ├── MethodDefinitionError   (TypeError)    a QuantConfig subclass declared wrongly
    ├── PluginError             (ImportError)  an entry-point plugin that failed to load
    ├── ConfigError             (ValueError)   a bad or unsupported quantization config
    ├── CheckpointError         (ValueError)   a bad checkpoint file, tensor or index entry
    └── DistributedError        (RuntimeError) another tensor-parallel rank failed
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
    """An entry-point plugin of the ``quantreg.methods`` group that could not be loaded."""


class ConfigError(QuantregError, ValueError):
    """A quantization config (or a request about one) that is invalid or unsupported."""


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

"""Hugging Face transformers: quantreg loads the lm_head of AWQ, GPTQ, compressed-tensors and
fp8 checkpoints in ``AutoModelForCausalLM.from_pretrained``::

    import quantreg.integrations.transformers as qr_hf

    qr_hf.enable()
    model = AutoModelForCausalLM.from_pretrained("path/to/checkpoint")
    print(model.lm_head.resolution.method, model.lm_head.kernel.name)
    qr_hf.disable()  # transformers' own quantizers again

transformers picks a quantizer by ``quant_method`` and refuses a second registration of a
name, so :func:`enable` points the ``awq``, ``gptq``, ``compressed-tensors`` and ``fp8`` entries of
``AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING`` at :class:`QuantregHfQuantizer`
/ :class:`QuantregConfig`, and :func:`disable` puts the originals back. The body loads as
transformers loads a float checkpoint (a quantized body tensor is a ``ConfigError``, never a
silent float load); the head is a parameterless placeholder while the weights load, then
:func:`quantreg.load_lm_head` loads it and a :class:`QuantregLMHead` takes its place. A head
tied to the input embedding, with no tensors of its own, is left to transformers.

Limits: one device per model, no tensor parallelism, no ``save_pretrained``, no training, no
``.to()`` / cast after loading.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import quantreg
from quantreg import ConfigError, InputError, PluginError, QuantregError

try:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as exc:  # pragma: no cover - the tests skip without transformers
    raise PluginError(
        "quantreg.integrations.transformers needs transformers: "
        f"pip install 'transformers>=5.19,<6' ({exc})"
    ) from exc

if TYPE_CHECKING:
    from quantreg import Kernel, ParallelLMHead, Resolution

logger = logging.getLogger(__name__)

FORMATS = ("awq", "gptq", "compressed-tensors", "fp8")
"""The ``quant_method`` values whose transformers quantizer :func:`enable` replaces."""

SUPPORTED = ((5, 19), (6, 0))  # transformers versions [low, high)
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_MISSING = object()  # a mapping entry that did not exist before enable()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Enabled:
    """What :func:`enable` replaced, and the options it passes to ``load_lm_head``."""

    saved: dict[str, tuple[object, ...]]
    options: dict[str, str | None]


_enabled: _Enabled | None = None


def _check_version(version: str) -> None:
    """Raises: PluginError: a transformers version outside ``>=5.19,<6``, whose quantizer
    hooks this bridge was not written for."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if not found or not SUPPORTED[0] <= (int(found[1]), int(found[2])) < SUPPORTED[1]:
        raise PluginError(
            "quantreg.integrations.transformers supports transformers>=5.19,<6 "
            f"(tested 5.19.0 and 5.24.0); found {version}"
        )


def enable(
    *, requested: str | None = None, kernel: str | None = None, activation_dtype: str | None = None
) -> None:
    """Load the lm_head of ``awq``, ``gptq``, ``compressed-tensors`` and ``fp8`` checkpoints via
    quantreg in ``from_pretrained`` until :func:`disable` (the options as in
    :func:`quantreg.load_lm_head`); again with the same options, nothing happens.

    Raises:
        PluginError: an unsupported transformers version.
        InputError: a bad option, or already enabled with other options.
    """
    global _enabled
    from transformers import __version__ as version
    from transformers.quantizers import auto

    _check_version(version)
    quantreg.kernels.check_activation_dtype(activation_dtype)
    options = {"requested": requested, "kernel": kernel, "activation_dtype": activation_dtype}
    for field, value in options.items():
        if value is not None and not isinstance(value, str):
            raise InputError(f"{field} must be a string or None, got {value!r}", field=field)

    with _LOCK:
        if _enabled is not None:
            if _enabled.options != options:
                raise InputError(
                    f"quantreg's transformers bridge is already enabled with {_enabled.options}; "
                    f"call disable() before enable() with {options}"
                )
            return
        mappings = (auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING)
        saved = {fmt: tuple(m.get(fmt, _MISSING) for m in mappings) for fmt in FORMATS}
        for fmt in FORMATS:
            auto.AUTO_QUANTIZER_MAPPING[fmt] = QuantregHfQuantizer
            auto.AUTO_QUANTIZATION_CONFIG_MAPPING[fmt] = QuantregConfig
        _enabled = _Enabled(saved, options)
    logger.info("transformers %s: quantreg loads the lm_head of %s checkpoints", version,
                ", ".join(FORMATS))  # fmt: skip


def disable() -> None:
    """Give ``awq``, ``gptq``, ``compressed-tensors``, ``fp8`` back to transformers: the exact
    mapping entries :func:`enable` replaced. Nothing happens when not enabled; an entry that
    someone else replaced since is left as it is, with a WARNING. Models already loaded keep
    their quantreg heads.

    Raises:
        Nothing of its own.
    """
    global _enabled
    from transformers.quantizers import auto

    with _LOCK:
        if _enabled is None:
            return
        for fmt, (quantizer, config) in _enabled.saved.items():
            _restore(auto.AUTO_QUANTIZER_MAPPING, fmt, quantizer, QuantregHfQuantizer)
            _restore(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, fmt, config, QuantregConfig)
        _enabled = None
    logger.info("transformers: %s back to transformers' own quantizers", ", ".join(FORMATS))


def _restore(mapping: dict[str, Any], key: str, original: object, ours: type) -> None:
    if mapping.get(key) is not ours:
        logger.warning("transformers' %r entry was replaced by %r after quantreg's enable(); "
                       "disable() leaves it as it is", key, mapping.get(key))  # fmt: skip
    elif original is _MISSING:
        del mapping[key]
    else:
        mapping[key] = original


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return _enabled is not None


class QuantregConfig(QuantizationConfigMixin):
    """A checkpoint's ``quantization_config`` kept verbatim (``to_dict`` gives it back), so
    that transformers routes it to :class:`QuantregHfQuantizer`; quantreg parses it itself."""

    def __init__(self, quant_method: str, **fields: Any) -> None:
        self.quant_method = quant_method
        self.__dict__.update(fields)


class _HeadPlaceholder(nn.Module):
    """Holds the head's place, without parameters, while transformers loads the body."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise QuantregError(
            "this lm_head is a placeholder: quantreg loads the head at the end of "
            "from_pretrained, which did not finish for this model"
        )


class QuantregLMHead(nn.Module):
    """The model's output embedding run by a :class:`quantreg.ParallelLMHead` (``head``):
    ``forward`` is ``head.compute_logits`` (unpadded logits). It has no float ``weight``;
    ``head.compute_logits(torch.eye(in_features)).T`` is the dequantized one."""

    def __init__(self, head: ParallelLMHead, device: torch.device) -> None:
        super().__init__()
        self.head = head
        self.device = device
        self.in_features: int = head.embedding_dim
        self.out_features: int = head.num_embeddings

    @property
    def resolution(self) -> Resolution:
        """The method quantreg chose for the head, and why."""
        return self.head.resolution  # type: ignore[return-value]

    @property
    def kernel(self) -> Kernel:
        """The kernel the head runs, and why the others declined."""
        return self.head.kernel  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., out_features]`` for hidden states ``[..., in_features]``.

        Raises:
            InputError: hidden states on another device or in another dtype than the head
                was loaded for (the model was moved or cast after ``from_pretrained``).
        """
        if x.device != self.device or x.dtype != self.head.params_dtype:
            raise InputError(
                f"quantreg's lm_head was loaded for {self.device} {self.head.params_dtype} "
                f"but got hidden states on {x.device} {x.dtype}; pass device_map= and dtype= "
                "to from_pretrained instead of moving or casting the model afterwards",
                field="x",
            )
        return self.head.compute_logits(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"method={self.resolution.method or 'unquantized'}, kernel={self.kernel.name}"
        )


class QuantregHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``awq`` / ``gptq`` / ``compressed-tensors`` / ``fp8`` heads
    while :func:`enable` is in effect: the float body as transformers loads it, the head by
    quantreg. After loading: ``folder`` (the checkpoint), ``head_name`` (None when a tied
    head was left to transformers) and ``head`` (the :class:`quantreg.ParallelLMHead`).

    Raises:
        InputError: constructed for a float checkpoint (quantreg quantizes nothing here).
    """

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise InputError(
                "quantreg's transformers bridge loads pre-quantized checkpoints; it does not "
                "quantize a float model (quantization_config given for a checkpoint without one)",
                field="quantization_config",
            )
        with _LOCK:
            self.options = dict(_enabled.options) if _enabled is not None else {}
        self.folder: Path | None = None
        self.head_name: str | None = None
        self.head: ParallelLMHead | None = None

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        """Raises: InputError: a ``device_map`` over several devices or with ``"disk"``."""
        devices = {str(d) for d in device_map.values()} if isinstance(device_map, dict) else set()
        if len(devices) > 1 or "disk" in devices:
            raise InputError(
                "quantreg's transformers bridge runs the lm_head on the model's one device; "
                f"device_map spreads the model over {sorted(devices)}",
                field="device_map",
            )

    def _convert_model_for_quantization(self, model: nn.Module) -> None:
        """No module swaps: the body is float and loads as transformers loads it unquantized."""

    def _process_model_before_weight_loading(  # type: ignore[override]
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        """Check the body is float, then put a placeholder where the head was (unless it is
        tied with no tensors of its own) so that transformers neither allocates nor reads it.

        Raises:
            ConfigError: quantized body tensors (named), or a config quantreg refuses.
            CheckpointError: unreadable or unsafe checkpoint files.
            InputError: no safetensors checkpoint files, or a model without an output embedding.
        """
        folder = _checkpoint_folder(checkpoint_files)
        head_name = _head_name(model)
        # Only the tensors and the tie matter here (the CPU runs every format quantreg
        # reads); the method and kernel are chosen after loading, for the model's device.
        summary = quantreg.inspect_checkpoint(folder, platform="cpu", prefix=head_name)
        offenders = _quantized_body(summary["tensors"], head_name, model)
        if offenders:
            raise _body_error(folder, str(self.quantization_config.quant_method), offenders)
        resolution = quantreg.resolve(folder, platform="cpu", prefix=head_name)
        self.folder = folder
        if resolution.tied_to is not None:
            logger.info("%s of %s has no tensors of its own and is tied to %s: left to "
                        "transformers", head_name, folder, resolution.tied_to)  # fmt: skip
            return model
        _replace_head(model, head_name)
        self.head_name = head_name
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Load the head with quantreg on the model's device and dtype, and install it.

        Raises:
            CheckpointError: missing, misshapen or unconsumed head tensors (named).
            ConfigError, InputError: as :func:`quantreg.load_lm_head`; a model spread over
                several devices.
        """
        if self.folder is None or self.head_name is None:
            return model
        device, dtype = _model_device(model), model.dtype
        head = quantreg.load_lm_head(
            self.folder, device=device, dtype=dtype, prefix=self.head_name, tp=1, **self.options
        )
        model.set_submodule(self.head_name, QuantregLMHead(head, device))
        self.head = head
        resolution, kernel = head.resolution, head.kernel
        logger.info(
            "%s of %s loaded by quantreg: method %s (%s), kernel %s, %s %s", self.head_name,
            self.folder, resolution.method or "unquantized", resolution.rule, kernel.name,
            device, dtype,
        )  # fmt: skip
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        """False, with a WARNING that says why (transformers then refuses save_pretrained)."""
        logger.warning(
            "quantreg's transformers bridge cannot save this model: its %s is held in "
            "quantreg's kernel layout, not as checkpoint tensors; copy the checkpoint folder "
            "%s instead", self.head_name or "lm_head", self.folder,
        )  # fmt: skip
        return False

    @property
    def is_trainable(self) -> bool:
        """False: a quantreg head has no trainable parameters."""
        return False


def _checkpoint_folder(checkpoint_files: list[str] | None) -> Path:
    """The folder of the weight files (a hub cache snapshot works: quantreg follows its links).

    Raises:
        InputError: from_pretrained has no checkpoint files (a state_dict, a GGUF file).
    """
    if not checkpoint_files:
        raise InputError(
            "quantreg's transformers bridge reads the lm_head from the checkpoint's safetensors "
            "files; from_pretrained has none (a state_dict or a GGUF file?)",
            field="checkpoint_files",
        )
    return Path(checkpoint_files[0]).parent


def _head_name(model: nn.Module) -> str:
    """The module name of the model's output embedding.

    Raises:
        InputError: the model has none (a base model rather than a causal LM).
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    for name, module in model.named_modules() if head is not None else ():
        if module is head:
            return name
    raise InputError(
        f"{type(model).__name__} has no output embedding for quantreg to load; load the "
        "checkpoint with a *ForCausalLM class, or call "
        "quantreg.integrations.transformers.disable() first",
        field="model",
    )


def _quantized_body(tensors: list[dict[str, Any]], head_name: str, model: nn.Module) -> list[str]:
    """``name (dtype)`` of each non-head checkpoint tensor that quantreg calls quantized (a
    method's tensor name, or not float) and that the model has no tensor of that kind for."""
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    offenders = []
    for info in tensors:
        name = info["name"]
        if name.startswith(f"{head_name}.") or not info["quantized"]:
            continue
        target = own.get(name)
        if target is not None and target.is_floating_point() == (info["dtype"] in _FLOAT_DTYPES):
            continue  # the model itself declares this tensor (e.g. an integer buffer)
        offenders.append(f"{name} ({info['dtype']})")
    return offenders


def _body_error(folder: Path, quant_method: str, offenders: list[str]) -> ConfigError:
    more = f" and {len(offenders) - 8} more" if len(offenders) > 8 else ""
    return ConfigError(
        f"{folder} has quantized body tensors: {', '.join(offenders[:8])}{more}. quantreg's "
        "transformers bridge loads only the lm_head and would load these layers as float; "
        f"the body needs transformers' own '{quant_method}' quantizer: call "
        "quantreg.integrations.transformers.disable() before from_pretrained",
        path=folder / "config.json",
        field="quant_method",
    )


def _replace_head(model: nn.Module, head_name: str) -> None:
    """A parameterless placeholder for the head; transformers skips (and does not report)
    the head's checkpoint tensors and no longer ties the head to the input embedding."""
    model.set_submodule(head_name, _HeadPlaceholder())
    ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    model._keys_to_ignore_on_load_unexpected = ignored | {rf"^{re.escape(head_name)}\."}
    tied = getattr(model, "all_tied_weights_keys", None)
    for target, source in list(tied.items()) if isinstance(tied, dict) else ():
        if f"{target}.".startswith(f"{head_name}.") or f"{source}.".startswith(f"{head_name}."):
            del tied[target]


def _model_device(model: nn.Module) -> torch.device:
    """The one device the model's parameters are on.

    Raises:
        InputError: several devices, or parameters left on ``meta`` (offloaded).
    """
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise InputError(
            "quantreg's transformers bridge runs the lm_head on the model's one device; its "
            f"parameters are on {sorted(str(d) for d in devices)}: pass one device as device_map",
            field="device_map",
        )
    return devices.pop()

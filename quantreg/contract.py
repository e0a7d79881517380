"""The method contract: the two classes every quantization method provides.

A method is a pydantic model of its checkpoint's ``quantization_config`` (``QuantConfig``)
that names the ``LinearMethod`` creating, loading and running a layer's weights. Built-in
methods and plugins use exactly this contract, and nothing else of quantreg's internals:

* resolution calls the config's class-level declarations and hooks (``layer_rule``,
  ``rule_from_tensors``, ``format_reason``, ``platform_reason``, ``relabel``, ...);
* the loader calls ``create_weights``, then ``load_weight`` once per parameter with this
  rank's slice in the checkpoint's own dtype, then ``process_weights_after_loading``;
* a method reads the layer's geometry with :func:`quantreg.layer_geometry` and records the
  kernel it runs as ``layer.kernel`` (a :class:`quantreg.Kernel`, usually from
  :func:`quantreg.select_kernel`).
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from quantreg.errors import ConfigError, InputError, MethodDefinitionError
from quantreg.parameters import copy_weight, layer_geometry
from quantreg.validation_messages import describe_validation_error, first_field, where

if TYPE_CHECKING:
    import torch

    from quantreg.kernels.catalog import Weights
    from quantreg.kernels.selection import Kernel
    from quantreg.platform import Platform

logger = logging.getLogger(__name__)

# Class-level declarations of QuantConfig that a subclass must never turn into fields.
_CLASS_LEVEL = (
    "linear_method", "supports_lm_head", "checkpoint_formats", "upgrade_priority", "tensor_names",
    "variant_fields",
)  # fmt: skip


def is_lm_head(prefix: str) -> bool:
    """Whether a module name denotes an lm_head (``lm_head``, ``model.lm_head``, ...)."""
    return prefix.rsplit(".", 1)[-1] == "lm_head"


@dataclass(frozen=True)
class LayerRule:
    """What a config says about one layer: quantized or not, which key decided, and overrides.

    ``rule`` starts with the config key that decided (``lm_head``, ``ignore 'lm_head'``, ...);
    ``also`` lists other rules that matched but did not decide. ``class_target``: decided by a
    class name (compressed-tensors' ``Linear``), which engines never apply to a head -- a head
    whose tensors are float then stays float.
    """

    quantized: bool
    rule: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    also: tuple[str, ...] = ()
    class_target: bool = False


@dataclass(frozen=True)
class Relabel:
    """A checkpoint config that another method reads: ``quant_method`` and ``data`` replace
    the config's own, and ``note`` says why (it becomes a note of the Resolution).

    ``layer_rule``, when given, decides each layer in place of the reading method's own
    ``layer_rule``: for a config whose per-layer keys the reading method has no words for
    (AutoRound's ``extra_config`` read by the GPTQ and AWQ methods). It takes the layer's name
    and its tensor names after the prefix (empty when not read), and its overrides use the
    reading method's field names."""

    quant_method: str
    data: Mapping[str, Any]
    note: str
    layer_rule: Callable[[str, frozenset[str]], LayerRule] | None = None


@dataclass(frozen=True)
class WriterOption:
    """One option of a method's writer (``QuantConfig.quantize_weight``) under the name the
    producers' users know (``bits``, ``group_size``, ``sym``, ``format``, ``actorder``), as
    ``quantreg quantize --help`` lists it and ``quantreg.writer_params`` maps it.

    Attributes:
        name: the user-facing name (``quantize --group-size`` is ``group_size``).
        keyword: the writer keyword it sets (GPTQ's ``format`` is ``checkpoint_format``).
        default: the writer's value when the option is not given; None when another option
            decides it or the option is off (``note`` says which).
        choices: the values it takes (the writer checks them); empty: see ``note``.
        values: the writer's value of a choice that is not the choice itself
            (GPTQ: ``actorder='group'`` is ``desc_act=True``).
        note: what else limits the option or decides its default.
    """

    name: str
    keyword: str
    default: Any = None
    choices: tuple[Any, ...] = ()
    values: Mapping[Any, Any] = field(default_factory=dict)
    note: str = ""

    def writer_value(self, value: Any, *, method: str) -> Any:
        """The writer's value for ``value`` (the writer checks it, unless ``values`` maps it).

        Raises:
            InputError: a value outside ``choices`` of an option with ``values``.
        """
        if self.values and value not in self.values:
            expected = " or ".join(str(c) for c in self.choices)
            note = f" ({self.note})" if self.note else ""
            raise InputError(
                f"{method} writer: {self.name} {value!r} is not supported; expected "
                f"{expected}{note}",
                field=self.name,
            )
        return self.values.get(value, value)


class LinearMethod(ABC):
    """Creates, loads, repacks and runs one layer's (quantized) weights; vLLM-shaped."""

    def __init__(self, quant_config: QuantConfig | None = None) -> None:
        self.quant_config = quant_config

    @abstractmethod
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra: Any,
    ) -> None:
        """Register this rank's parameters on ``layer``, each with its loading metadata."""

    def load_weight(
        self, layer: torch.nn.Module, param: torch.nn.Parameter, loaded: torch.Tensor
    ) -> None:
        """The per-parameter load hook: the loader calls it once per parameter with this
        rank's slice of the checkpoint tensor (``layer_geometry(layer).checkpoint_region``),
        in the checkpoint's own dtype, after checking the tensor's name, shape and dtype.

        The default casts to the parameter's dtype -- or adopts the checkpoint's float dtype
        for ``keep_checkpoint_dtype`` parameters -- and zero-fills the vocab padding.

        Raises:
            CheckpointError: the slice does not fit the parameter.
        """
        copy_weight(param, loaded, layer_geometry(layer))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:  # noqa: B027
        """Repack loaded weights for the kernel this method runs (and set ``layer.kernel``);
        a no-op by default."""

    @abstractmethod
    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute ``x @ W.T (+ bias)`` for this rank's shard of the layer."""


class QuantConfig(BaseModel):
    """Base of every method's config: a pydantic model of a ``quantization_config``.

    Known fields are validated strictly (``bits: "4"`` is an error); unknown keys are kept,
    since producers add many. Subclasses declare, as ClassVars (never as fields):

    * ``linear_method`` -- the LinearMethod class that runs a layer of this method;
    * ``supports_lm_head`` -- whether that LinearMethod can run a vocab-parallel lm_head;
    * ``checkpoint_formats`` -- other ``quant_method`` values it reads (its own name always);
    * ``upgrade_priority`` -- when several methods can run a checkpoint, the highest wins;
    * ``tensor_names`` -- the tensor names (after the layer prefix) of its formats, e.g.
      ``qweight``: resolution and ``inspect`` use them to tell quantized tensors apart;
    * ``variant_fields`` -- fields (as the config spells them, aliases too) whose refused
      values (``bits: 3``) name a variant the method cannot run: a layer the config keeps
      float still resolves (float, with a note).
    """

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    linear_method: ClassVar[type[LinearMethod]]
    supports_lm_head: ClassVar[bool] = False
    checkpoint_formats: ClassVar[tuple[str, ...]] = ()
    upgrade_priority: ClassVar[int] = 0
    tensor_names: ClassVar[frozenset[str]] = frozenset()
    variant_fields: ClassVar[frozenset[str]] = frozenset()
    _layer_rule: LayerRule | None = PrivateAttr(default=None)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Runs before pydantic collects fields, so the mistake is reported before pydantic
        # silently turns the declaration into a field that shadows the class-level one.
        annotations = inspect.get_annotations(cls)
        for name in _CLASS_LEVEL:
            if name in annotations and "ClassVar" not in str(annotations[name]):
                raise MethodDefinitionError(
                    f"{cls.__module__}.{cls.__qualname__} declares '{name}' as a pydantic "
                    f"field; annotate it as ClassVar (e.g. '{name}: ClassVar[...] = ...') "
                    "or assign it without an annotation"
                )
        method = cls.__dict__.get("linear_method")
        if method is not None and not (
            isinstance(method, type) and issubclass(method, LinearMethod)
        ):
            raise MethodDefinitionError(
                f"{cls.__module__}.{cls.__qualname__}.linear_method must be a subclass of "
                f"quantreg.LinearMethod, got {method!r}"
            )
        super().__init_subclass__(**kwargs)

    @classmethod
    def from_quant_config(
        cls, data: Mapping[str, Any], *, method: str, source: str | None = None
    ) -> Self:
        """Validate a checkpoint's ``quantization_config`` dict into this config.

        Raises:
            ConfigError: a known field has a bad value; the message names the file, the
                method, the field, the value and what is allowed.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"quantization_config{where(source)} must be a JSON object, "
                f"got {type(data).__name__}"
            )
        payload = {k: v for k, v in data.items() if k != "quant_method"}
        try:
            config = cls.model_validate(payload)
        except ValidationError as exc:
            raise ConfigError(
                describe_validation_error(exc, method=method, source=source),
                field=first_field(exc),
            ) from exc
        if config.model_extra:
            logger.debug(
                "%s config%s: keeping unknown keys %s",
                method,
                where(source),
                sorted(config.model_extra),
            )
        return config

    @classmethod
    def relabel(cls, data: Mapping[str, Any]) -> Relabel | None:
        """When a config labelled with this method's name is really another method's (e.g.
        GPTQModel labels AWQ-layout exports ``gptq``): the method that reads it; None (the
        default) keeps it."""
        return None

    def layer_rule(self, prefix: str) -> LayerRule:
        """Decide whether the layer ``prefix`` is quantized under this config, and why.

        The default quantizes every layer; for an lm_head it honours a boolean ``lm_head``
        key when the config has one, else ``supports_lm_head``.
        """
        if is_lm_head(prefix):
            flag = getattr(self, "lm_head", None)
            if isinstance(flag, bool):
                return LayerRule(flag, f"lm_head: {str(flag).lower()}")
            return LayerRule(
                self.supports_lm_head,
                f"supports_lm_head: {str(self.supports_lm_head).lower()} "
                "(the config has no lm_head key)",
            )
        return LayerRule(True, "quant_method: every layer is quantized")

    def rule_from_tensors(self, prefix: str, names: frozenset[str]) -> LayerRule | None:
        """When the config keeps ``prefix`` unquantized but its tensors are quantized: a rule
        that quantizes it if ``names`` (tensor names after the prefix) are this method's
        layout, else None (and loading then fails, naming the tensors)."""
        return None

    def tensor_overrides(self, shapes: Mapping[str, tuple[int, ...]]) -> Mapping[str, Any]:
        """Fields of a quantized layer's effective config that its stored tensors decide,
        from ``shapes`` (tensor name after the prefix -> shape in the headers), e.g. whether
        fp8's ``weight_scale`` is per-tensor or per-channel; none by default."""
        return {}

    def for_layer(
        self, rule: LayerRule, shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> Self:
        """The effective config of one layer: this config with the rule's overrides (and the
        ``tensor_overrides`` of the layer's tensor ``shapes``) applied, and the rule pinned
        (``rule_for`` returns it for any prefix from then on)."""
        overrides = {**rule.overrides, **(self.tensor_overrides(shapes) if shapes else {})}
        config = self.with_overrides(overrides) if overrides else self.model_copy()
        config._layer_rule = rule
        return config

    def with_overrides(self, overrides: Mapping[str, Any]) -> Self:
        """This config with some fields replaced (validated again)."""
        return type(self).model_validate({**self.model_dump(), **overrides})

    def rule_for(self, prefix: str) -> LayerRule:
        """The rule pinned by ``for_layer`` on an effective config, else ``layer_rule``."""
        return self._layer_rule if self._layer_rule is not None else self.layer_rule(prefix)

    def format_reason(self) -> str | None:
        """Why this method cannot compute this (effective) config at all; None if it can."""
        return None

    def platform_reason(self, platform: Platform) -> str | None:
        """Why ``platform`` lacks this method's intended kernel; None if it has it."""
        return None

    @classmethod
    def quantize_weight(
        cls, weight: torch.Tensor, **params: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Quantize a float ``[out, in]`` weight into this method's checkpoint tensors (names
        without the layer prefix) and the ``quantization_config`` that describes them.

        Raises:
            ConfigError: this method has no writer, or a parameter it does not support.
        """
        raise ConfigError(f"{cls.__qualname__} has no writer: it cannot quantize a weight")

    @classmethod
    def writer_options(cls) -> tuple[WriterOption, ...]:
        """The options of ``quantize_weight`` under their users' names (``quantreg quantize
        --help`` lists them); empty (the default): no writer, or no options listed."""
        return ()

    @classmethod
    def scope_config(
        cls, qcfg: Mapping[str, Any], *, quantized: str, kept_float: Collection[str]
    ) -> dict[str, Any]:
        """The ``quantization_config`` a writer stores when only the module ``quantized`` is
        quantized and the modules ``kept_float`` stay float, in the keys this method's
        producers and engines read (vLLM, transformers), so that every reader agrees which
        layers are quantized. The default changes nothing."""
        return dict(qcfg)

    def unmatched_entries(self, modules: Collection[str]) -> list[str]:
        """Config entries that name modules the checkpoint does not have (each becomes a
        WARNING at resolution); ``modules`` are the checkpoint's module names."""
        return []

    def notes(self) -> list[str]:
        """Facts about this (effective) config worth showing in a Resolution."""
        return []

    def get_linear_method(self, layer: object, prefix: str) -> LinearMethod | None:
        """The LinearMethod for ``layer`` named ``prefix``; None keeps it unquantized.

        Raises:
            ConfigError: the layer is an lm_head this method cannot run quantized.
        """
        rule = self.rule_for(prefix)
        if not rule.quantized:
            return None
        if is_lm_head(prefix) and not self.supports_lm_head:
            raise ConfigError(
                f"{type(self).__name__} cannot run a quantized lm_head ('{prefix}', {rule.rule}); "
                "the checkpoint's head is quantized, so it cannot be loaded with this method"
            )
        if getattr(type(self), "linear_method", None) is None:
            raise MethodDefinitionError(
                f"{type(self).__qualname__} sets no linear_method, so it cannot run '{prefix}'"
            )
        return self.linear_method(self.for_layer(rule))


def select_kernel(
    weights: Weights,
    layer: torch.nn.Module | None = None,
    *,
    dtype: torch.dtype | None = None,
    allowed: Sequence[str] | None = None,
    requested: str | None = None,
    activation_dtype: str | None = None,
) -> Kernel:
    """Choose and build the kernel that runs ``weights``, on the device they are on, among
    ``allowed`` (default: every kernel), and log the choice at INFO.

    With a ``layer`` the activation dtype is the layer's compute dtype (its geometry), a
    kernel the loader was asked to force (``layer.requested_kernel``) and quantized
    activations it was asked for (``layer.activation_dtype``, e.g. ``"int8"``) are honoured,
    and the result is recorded as ``layer.kernel``. Without one, pass ``dtype``.

    Raises:
        InputError: no ``dtype`` without a layer, a forced kernel that is not allowed or
            cannot run these weights here, or an ``activation_dtype`` no kernel runs them with.
    """
    from quantreg.kernels.selection import select

    what = "weights"
    if layer is not None:
        geometry = layer_geometry(layer)
        dtype, what = geometry.params_dtype, geometry.prefix
        requested = requested or getattr(layer, "requested_kernel", None)
        activation_dtype = activation_dtype or getattr(layer, "activation_dtype", None)
    if dtype is None:
        raise InputError("select_kernel() needs a layer or a dtype", field="dtype")
    kernel = select(
        weights, dtype=dtype, device=weights.device, allowed=allowed,
        requested=requested, what=what, activation_dtype=activation_dtype,
    )  # fmt: skip
    if layer is not None:
        layer.kernel = kernel
    return kernel

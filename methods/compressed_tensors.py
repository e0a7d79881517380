"""compressed-tensors checkpoints (llm-compressor, ``ModelCompressor``): config and matching.

Targets and ignore entries follow ``compressed_tensors.utils.match``: an exact module name,
a ``re:`` regex (``re.match``, anchored at the start) or a class name. quantreg's layers are
all Linear-like, so the class name ``Linear`` matches any of them -- including an lm_head,
which is an ``nn.Linear`` when compressed-tensors writes the file. ``ignore`` wins.

``sparsity_config`` (its own ``targets``, default every layer, and ``ignore``) is read too:
quantreg does not decompress sparse weights, so a layer a non-``dense`` sparsity format
compresses is refused, never loaded as if it were dense.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Self

import torch
from pydantic import Field, PrivateAttr, field_validator

from quantreg import ConfigError, IntWeights, LayerRule, QuantConfig, WriterOption, layer_geometry
from quantreg.kernels import Float8Layout
from quantreg.methods import _ct_format as fmt
from quantreg.methods import _ct_nvfp4 as nvfp4
from quantreg.methods._ct_schema import (
    Format,
    QuantizationScheme,
    SparsityConfig,
)
from quantreg.methods._ct_targets import (
    check_all,
    check_entries,
    match_kind,
    raw_entries,
    unmatched,
)
from quantreg.methods._decoded import DecodedLinearMethod

SUPPORTED_FORMATS = (
    "pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "nvfp4-pack-quantized",
)  # fmt: skip
SUPPORTED_STRATEGIES = ("group", "channel", "tensor", "block")  # block: float8 only
STATUSES = ("initialized", "calibration", "frozen", "compressed", "decompressed")
# Tensor names (after the layer prefix) of the formats; an int8 / fp8 ``weight`` is told
# apart by its dtype.
TENSORS = frozenset(
    {
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
        "weight_global_scale",
    }
)


class CompressedTensorsLinearMethod(DecodedLinearMethod):
    """Loads one compressed-tensors scheme's tensors; integer formats run the kernel selected
    for them (any of quantreg's), float8 the exact reference kernel."""

    quant_config: CompressedTensorsConfig  # set by QuantConfig.get_linear_method

    def __init__(self, quant_config: CompressedTensorsConfig) -> None:
        super().__init__(quant_config)
        self.scheme = quant_config.weight_scheme()

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
        """Register the scheme's tensors.

        Raises:
            ConfigError: a group size that does not divide the input size (compressed-tensors
                and vLLM quantize whole groups only), naming the config field.
        """
        scheme, k = self.scheme, input_size_per_partition
        if scheme.group_size is not None and k % scheme.group_size:
            group = next(iter(self.quant_config.config_groups))
            field = f"config_groups.{group}.weights.group_size"
            raise ConfigError(
                f"compressed-tensors: field '{field}' = {scheme.group_size} does not divide the "
                f"input size {k} of {layer_geometry(layer).prefix}; expected a divisor of it "
                "(compressed-tensors and vLLM quantize whole groups only)",
                field=field,
            )
        n = sum(output_partition_sizes)
        fmt.create_weights(layer, scheme, k, n, params_dtype)

    def decode(self, layer: torch.nn.Module) -> IntWeights | Float8Layout:
        return fmt.decode(layer, self.scheme)


class CompressedTensorsConfig(QuantConfig):
    """``quantization_config`` (or ``compression_config``) of a compressed-tensors checkpoint."""

    linear_method = CompressedTensorsLinearMethod
    supports_lm_head: ClassVar[bool] = True
    tensor_names: ClassVar[frozenset[str]] = TENSORS

    format: Format = None
    config_groups: dict[str, QuantizationScheme] = Field(default_factory=dict)
    ignore: list[str] = Field(default_factory=list)
    quantization_status: str | None = None
    sparsity_config: SparsityConfig | None = None
    _source: str | None = PrivateAttr(default=None)

    @classmethod
    def from_quant_config(
        cls, data: Mapping[str, Any], *, method: str, source: str | None = None
    ) -> Self:
        """Validate a compressed-tensors config, remembering its file for later errors.

        Raises:
            ConfigError: a field (``sparsity_config``'s included) has a bad value.
        """
        check_all(raw_entries(data), method=method, source=source)  # before each is analysed
        config = super().from_quant_config(data, method=method, source=source)
        config._source = source
        return config

    @field_validator("sparsity_config", mode="before")
    @classmethod
    def _no_sparsity(cls, value: Any) -> Any:
        return None if value == {} else value  # what compressed-tensors writes for "none"

    @field_validator("quantization_status")
    @classmethod
    def _status(cls, value: str | None) -> str | None:
        if value is not None and value not in STATUSES:
            raise ValueError(f"expected one of {', '.join(STATUSES)}")
        return value

    @field_validator("ignore")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        return check_entries(value)

    def layer_rule(self, prefix: str) -> LayerRule:
        """``ignore`` first, then the best-matching target (exact name > regex > ``Linear``).

        Raises:
            ConfigError: ``sparsity_config`` compresses the layer with a sparse format.
        """
        self._refuse_sparse(prefix)
        matches = sorted(
            (kind, order, group, target)
            for order, (group, scheme) in enumerate(self.config_groups.items())
            for target in scheme.targets
            if (kind := match_kind(target, prefix)) is not None
        )
        target_texts = [f"targets '{t}' ({g})" for _, _, g, t in matches]
        for entry in self.ignore:
            if match_kind(entry, prefix) is not None:
                return LayerRule(False, f"ignore '{entry}'", also=tuple(target_texts))
        if not matches:
            return LayerRule(False, f"targets: no config group targets '{prefix}'")
        _, _, group, _ = matches[0]
        scheme = self.config_groups[group]
        overrides = {
            "config_groups": {group: scheme.model_dump()},
            "format": self.scheme_format(scheme),
        }
        by_class = matches[0][0] == 2
        return LayerRule(True, target_texts[0], overrides, tuple(target_texts[1:]), by_class)

    def _refuse_sparse(self, prefix: str) -> None:
        """Raise when ``sparsity_config`` compresses ``prefix``: its tensors are a sparse
        encoding that quantreg would otherwise read as a dense layer."""
        sparsity = self.sparsity_config
        why = sparsity.compresses(prefix) if sparsity is not None else None
        if sparsity is None or why is None:
            return
        where = f" in {self._source}" if self._source else ""
        if "sparsity_structure" in sparsity.model_fields_set:
            why += f", sparsity_structure {sparsity.sparsity_structure!r}"
        raise ConfigError(
            f"compressed-tensors{where}: sparsity_config format '{sparsity.format}' "
            f"compresses layer '{prefix}' ({why}); quantreg does not decompress sparsity "
            "formats, so it cannot load this layer. Supported: sparsity format 'dense', "
            f"or '{prefix}' in the sparsity_config's ignore list",
            field="sparsity_config",
        )

    def scheme_format(self, scheme: QuantizationScheme) -> str | None:
        """The on-disk format of a group: its own, else the model's, else inferred."""
        if scheme.format is not None:
            return scheme.format
        if self.format not in (None, "mixed-precision"):
            return self.format
        weights, acts = scheme.weights, scheme.input_activations
        if weights is None:
            return None
        if weights.type == "float":
            return "float-quantized"
        if acts is not None and acts.type == "int":
            return "int-quantized"
        return "pack-quantized"

    @property
    def scheme(self) -> QuantizationScheme | None:
        """The only scheme of an effective per-layer config (None on a whole-model config)."""
        return next(iter(self.config_groups.values())) if len(self.config_groups) == 1 else None

    def format_reason(self) -> str | None:
        scheme = self.scheme
        if scheme is None:
            return None
        fmt = self.scheme_format(scheme)
        weights = scheme.weights
        layer = f"targets {scheme.targets}"
        if fmt not in SUPPORTED_FORMATS:
            return (
                f"format {fmt!r} ({layer}) is not supported yet; supported: "
                f"{', '.join(SUPPORTED_FORMATS)}"
            )
        if weights is None:
            return f"format {fmt!r} ({layer}) quantizes no weights"
        strategy = weights.effective_strategy
        if fmt == "nvfp4-pack-quantized":
            nvfp4 = ("float", 4, "tensor_group", 16)
            got = (weights.type, weights.num_bits, strategy, weights.group_size)
            return None if got == nvfp4 else f"{fmt} weights must be {nvfp4}; got {got}"
        if strategy not in SUPPORTED_STRATEGIES:
            return (
                f"weight strategy {strategy!r} ({layer}) is not supported yet; supported: "
                f"{', '.join(SUPPORTED_STRATEGIES)}"
            )
        if fmt == "float-quantized" or (fmt == "naive-quantized" and weights.type == "float"):
            if (weights.type, weights.num_bits) != ("float", 8):
                return f"{fmt} weights must be 8-bit float; got {weights.type}{weights.num_bits}"
        elif strategy == "block":
            return f"weight strategy 'block' ({layer}) is supported for float8 weights only"
        elif weights.type != "int" or weights.num_bits not in (4, 8):
            return (
                f"{fmt} weights must be int4 or int8; got {weights.type}{weights.num_bits} "
                f"({layer})"
            )
        elif fmt != "pack-quantized" and weights.num_bits != 8:
            return f"{fmt} weights must be int8; got int{weights.num_bits} ({layer})"
        return None

    @classmethod
    def quantize_weight(
        cls, weight: torch.Tensor, **params: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Round-to-nearest tensors of one format (see ``_ct_format.quantize_ct``; NVFP4:
        ``_ct_nvfp4.quantize``, whose float8 scales ignore ``scale_dtype``)."""
        if params.get("format") == fmt.NVFP4:
            options = {k: v for k, v in params.items() if k not in ("format", "scale_dtype")}
            return nvfp4.quantize(weight, **options)
        return fmt.quantize_ct(weight, **params)

    @classmethod
    def writer_options(cls) -> tuple[WriterOption, ...]:
        """The writer's options (see ``_ct_format.writer_options``)."""
        return fmt.writer_options()

    def unmatched_entries(self, modules: Collection[str]) -> list[str]:
        """``ignore`` and ``targets`` entries that match no module of the checkpoint (see
        ``_ct_targets.unmatched``: class names are skipped, the search is time-bounded)."""
        entries = [("ignore", e) for e in self.ignore]
        for group, scheme in self.config_groups.items():
            entries += [(f"targets ({group})", t) for t in scheme.targets]
        return unmatched(entries, modules)

    @classmethod
    def scope_config(
        cls, qcfg: Mapping[str, Any], *, quantized: str, kept_float: Collection[str]
    ) -> dict[str, Any]:
        """Every config group targets ``quantized`` by name only, and nothing is ignored:
        compressed-tensors, vLLM and transformers then quantize that module alone."""
        groups = {
            name: {**group, "targets": [quantized]}
            for name, group in (qcfg.get("config_groups") or {}).items()
        }
        return {**qcfg, "config_groups": groups, "ignore": []}

    def weight_scheme(self) -> fmt.WeightScheme:
        """What the tensors of this (effective, one-scheme) layer config hold.

        Raises:
            ConfigError: not exactly one scheme with weights, or a format quantreg cannot run.
        """
        scheme = self.scheme
        if scheme is None or scheme.weights is None:
            raise ConfigError("compressed-tensors: a layer needs exactly one scheme with weights")
        reason = self.format_reason()
        if reason is not None:
            raise ConfigError(f"compressed-tensors: {reason}")
        args, acts = scheme.weights, scheme.input_activations
        strategy = args.effective_strategy
        layout = self.scheme_format(scheme) or fmt.PACKED
        if layout == fmt.NAIVE and args.type == "float":
            layout = fmt.FLOAT  # the same tensors on disk: an F8_E4M3 weight and its scale
        return fmt.WeightScheme(
            format=layout,
            bits=args.num_bits,
            strategy=strategy,
            group_size=args.group_size if strategy == "group" else None,
            symmetric=args.symmetric,
            actorder_group=args.actorder == "group",
            static_input=acts is not None and acts.dynamic is False,
            block=tuple(args.block_structure) if args.block_structure else None,  # type: ignore[arg-type]
        )

    def notes(self) -> list[str]:
        scheme = self.scheme
        if scheme is None or scheme.input_activations is None:
            return []
        acts = scheme.input_activations
        static = ", static: its input_scale is checked (finite, positive) but not applied"
        dynamic_int8 = (acts.type, acts.num_bits, acts.dynamic) == ("int", 8, True)
        opt_in = " (load with activation_dtype='int8' for dynamic int8 activations)"
        return [
            f"the checkpoint also quantizes input activations ({acts.type}{acts.num_bits}"
            f"{static if acts.dynamic is False else ''}); quantreg runs the layer weight-only: "
            f"activations stay float{opt_in if dynamic_int8 else ''}"
        ]

"""``modelopt`` checkpoints: NVIDIA ModelOpt's HF export (FP8 and NVFP4), as vLLM's
``ModelOptFp8Config`` / ``ModelOptNvFp4Config`` read them (method names ``modelopt`` and
``modelopt_fp4``; the second is an alias here: one config reads both).

Two config forms, both written by ``export_hf_checkpoint`` (nvidia-modelopt 0.47.0): the side
file ``hf_quant_config.json`` ``{"producer", "quantization": {"quant_algo", "kv_cache_quant_algo",
"group_size", "exclude_modules"}}`` (detection reads its ``quantization`` section), and
``config.json["quantization_config"]`` from ``convert_hf_quant_config_format``: ``quant_method
"modelopt"``, ``quant_algo``, ``config_groups``, ``ignore`` (the same list), ``kv_cache_scheme``.
MIXED_PRECISION exports name each quantized layer in ``quantized_layers`` with its own algo.

Which layers are quantized (vLLM's ``is_layer_excluded``): every linear layer -- the lm_head
too -- unless an ``exclude_modules`` / ``ignore`` entry names it: exactly, as a substring (vLLM
keeps this for older exports), or as an fnmatch wildcard (``lm_head``, ``*mlp.gate``,
``model.layers.0.*``; ModelOpt writes ``prefix*`` summaries). Wildcards become regexes checked
by ``quantreg.regex_problem`` before any match. The tensors: see ``_modelopt_format``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, ClassVar

import torch
from pydantic import field_validator

from quantreg import (
    InputError,
    LayerRule,
    QuantConfig,
    WriterOption,
    checked_regex,
    regex_list_problem,
    regex_problem,
)
from quantreg.kernels import Float8Layout
from quantreg.methods import _modelopt_format as fmt
from quantreg.methods._decoded import DecodedLinearMethod

EXCLUSIONS = ("exclude_modules", "ignore")
WILDCARD = "*?["
# Writer format -> the weight-only quant_algo it writes (no calibration data: no input_scale).
WRITER_ALGOS = {"fp8": fmt.FP8_PCPT, "nvfp4": fmt.W4A16_NVFP4}


class ModelOptLinearMethod(DecodedLinearMethod):
    """ModelOpt FP8 / NVFP4 tensors on the exact reference kernel (weight-only)."""

    quant_config: ModelOptConfig  # set by QuantConfig.get_linear_method

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
        """Register this rank's tensors of the layer's ``quant_algo``."""
        algo = self.quant_config.algo
        fmt.create_weights(layer, algo, input_size_per_partition, sum(output_partition_sizes))

    def decode(self, layer: torch.nn.Module) -> Float8Layout:
        return fmt.decode(layer, self.quant_config.algo)


def excluded_by(prefix: str, entries: list[str] | None) -> str | None:
    """The first entry naming ``prefix``: equal, contained in it, or an fnmatch wildcard
    matching it (bounded: the translated regex was checked when the config was read)."""
    for entry in entries or ():
        if any(c in entry for c in WILDCARD):
            if checked_regex(fnmatch.translate(entry)).match(prefix):
                return entry
        elif entry and entry in prefix:
            return entry
    return None


class ModelOptConfig(QuantConfig):
    """A ModelOpt ``quantization`` section or ``quantization_config`` (both forms' keys)."""

    linear_method = ModelOptLinearMethod
    supports_lm_head: ClassVar[bool] = True
    tensor_names: ClassVar[frozenset[str]] = frozenset(
        {"weight_scale", "weight_scale_2", "input_scale"}
    )

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    exclude_modules: list[str] | None = None
    ignore: list[str] | None = None
    quantized_layers: dict[str, dict[str, Any]] | None = None

    @field_validator("exclude_modules", "ignore")
    @classmethod
    def _wildcards(cls, value: list[str] | None) -> list[str] | None:
        """Every wildcard must translate to a regex that matches in bounded time."""
        patterns = [fnmatch.translate(e) for e in value or () if any(c in e for c in WILDCARD)]
        problem = regex_list_problem(patterns)
        if problem is not None:
            raise ValueError(problem)
        for entry in value or ():
            problem = regex_problem(fnmatch.translate(entry)) if patterns else None
            if problem is not None:
                shown = entry if len(entry) <= 60 else entry[:60] + "..."
                raise ValueError(f"wildcard {shown!r} translates to a regex that {problem}")
        return value

    @property
    def algo(self) -> str:
        """``quant_algo`` upper-cased, as vLLM normalizes it ('' when absent)."""
        return (self.quant_algo or "").upper()

    def layer_rule(self, prefix: str) -> LayerRule:
        """An exclusion entry first; then MIXED_PRECISION's ``quantized_layers`` (a layer it
        does not list is float); else every linear layer, the head included, is quantized."""
        for key in EXCLUSIONS:
            entry = excluded_by(prefix, getattr(self, key))
            if entry is not None:
                return LayerRule(False, f"{key} '{entry}'")
        if self.quantized_layers is not None:
            layer = self.quantized_layers.get(prefix)
            if not isinstance(layer, dict):
                return LayerRule(False, f"quantized_layers: no entry covers '{prefix}'")
            overrides = {"quant_algo": layer.get("quant_algo"), "quantized_layers": None}
            if "group_size" in layer:
                overrides["group_size"] = layer["group_size"]
            algo = str(layer.get("quant_algo"))
            return LayerRule(True, f"quantized_layers '{prefix}': {algo}", overrides)
        return LayerRule(True, f"quant_algo '{self.algo}': every linear layer not excluded")

    def format_reason(self) -> str | None:
        if not self.algo:
            return f"no quant_algo; supported: {', '.join(fmt.ALGOS)}"
        if self.algo not in fmt.ALGOS:
            return (
                f"quant_algo {self.quant_algo!r} is not supported; supported: "
                f"{', '.join(fmt.ALGOS)}"
            )
        if "NVFP4" in self.algo and self.group_size not in (None, fmt.GROUP):
            return f"{self.algo} with group_size {self.group_size} is not supported; expected 16"
        return None

    def notes(self) -> list[str]:
        if self.algo in fmt.STATIC_INPUT:
            return [
                f"ModelOpt {self.algo} quantizes input activations with a static input_scale; "
                "quantreg runs the layer weight-only: activations stay float"
            ]
        return []

    @classmethod
    def quantize_weight(
        cls, weight: torch.Tensor, *, format: str = "nvfp4", **unused: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """ModelOpt's weight-only tensors (``format`` ``fp8``: FP8_PER_CHANNEL_PER_TOKEN;
        ``nvfp4``: W4A16_NVFP4) and the ``config.json`` ``quantization_config`` its export
        writes (vLLM reads it). ``scale_dtype`` is ignored: ModelOpt's scales are fixed.

        Raises:
            InputError: an unknown option or format, or an NVFP4 input size not a multiple of 16.
        """
        unused.pop("scale_dtype", None)
        if unused:
            raise InputError(
                f"modelopt writer: unsupported option(s) {', '.join(sorted(unused))}",
                field=sorted(unused)[0],
            )
        if format not in WRITER_ALGOS:
            raise InputError(
                f"modelopt writer: format {format!r} is not supported; expected "
                f"{' or '.join(WRITER_ALGOS)}",
                field="format",
            )
        algo = WRITER_ALGOS[format]
        tensors = fmt.quantize(weight, algo)
        config: dict[str, Any] = {
            "quant_method": "modelopt", "quant_algo": algo, "ignore": [],
            "producer": {"name": "quantreg"},
        }  # fmt: skip
        if algo == fmt.W4A16_NVFP4:  # as convert_hf_quant_config_format writes it
            weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": fmt.GROUP}
            config["config_groups"] = {"group_0": {"weights": weights, "targets": ["Linear"]}}
        return tensors, config

    @classmethod
    def writer_options(cls) -> tuple[WriterOption, ...]:
        return (
            WriterOption(
                "format", "format", "nvfp4", tuple(WRITER_ALGOS),
                note="weight-only, no calibration: fp8 writes quant_algo "
                "FP8_PER_CHANNEL_PER_TOKEN (a float32 scale per row), nvfp4 W4A16_NVFP4 (e2m1 "
                "in groups of 16, float8 scales, float32 weight_scale_2)",
            ),
        )  # fmt: skip

    @classmethod
    def scope_config(cls, qcfg: Any, *, quantized: str, kept_float: Any) -> dict[str, Any]:
        """``ignore``: every float module, so that vLLM keeps them float."""
        return {**qcfg, "ignore": sorted(kept_float)}

"""GPTQ (AutoGPTQ, GPTQModel, optimum): ``gptq`` (exact reference kernel) and ``gptq_marlin``
(the Triton kernel on CUDA). The tensors themselves: ``_gptq_linear``.

GPTQModel labels its AWQ-layout exports ``quant_method: "gptq"`` with ``format: "gemm"`` (or
``gemv`` / ``gemv_fast``): :meth:`GPTQConfig.relabel` hands those to the AWQ methods.

The layout is ``checkpoint_format`` (AutoGPTQ, optimum) or ``format`` (GPTQModel's own field,
often the only one): ``gptq`` stores ``zero - 1``, ``gptq_v2`` the zero itself. When both are
given they must agree; when neither is, the layout is ``gptq``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Self

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from quantreg import (
    InputError,
    IntWeights,
    LayerRule,
    Platform,
    QuantConfig,
    Relabel,
    WriterOption,
    checked_regex,
    dynamic_pattern,
    is_lm_head,
    regex_list_problem,
    regex_problem,
)
from quantreg.methods import _gptq_format as fmt
from quantreg.methods._decoded import DecodedLinearMethod
from quantreg.methods._rtn import ACTORDER_NOTE, writer_defaults
from quantreg.methods._wna16 import (
    GroupSize,
    check_layout_fields,
    head_and_skip_rule,
    marlin_group_reason,
    marlin_platform_reason,
)

SUPPORTED_BITS = (4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# GPTQModel's repacked GPTQ layouts (gptq_p: split-plane words, zeros as in v2).
UNSUPPORTED_FORMATS = ("marlin", "bitblas", "qqq", "gptq_p")
# GPTQModel FORMAT values (gptqmodel/quantization/config.py, 5.x-7.x) that are not GPTQ tensors.
OTHER_GPTQMODEL_FORMATS = (
    "gguf", "fp8", "bitsandbytes", "exl3", "mxfp4", "paroquant", "llm-awq", "qvq", "qvq_v4",
    "qvq_v4_l18", "qvq_dual_v2", "qvq_v2b4_p64", "qvq_v2b2_p32",
)  # fmt: skip
# AWQ kernel layouts: GPTQModel labels such exports quant_method "gptq".
AWQ_LAYOUTS = ("gemm", "gemv", "gemv_fast")
LAYOUT_FIELDS = ("format", "checkpoint_format")
# Keys of a GPTQModel ``dynamic`` rule that change how a layer is quantized.
OVERRIDE_KEYS = ("bits", "group_size", "sym", "desc_act")


def _check_bits(value: int) -> int:
    if value not in SUPPORTED_BITS:
        raise ValueError(
            "supported GPTQ widths are 4 and 8 bits (3-bit codes straddle words, and 2-bit "
            "and 5-7-bit layouts are not supported)"
        )
    return value


Bits = Annotated[int, AfterValidator(_check_bits)]


class DynamicOverride(BaseModel):
    """The overrides of one GPTQModel ``dynamic`` rule (other keys are kept, unused)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    bits: Bits | None = None
    group_size: GroupSize | None = None
    sym: bool | None = None
    desc_act: bool | None = None


class GPTQLinearMethod(DecodedLinearMethod):
    """GPTQ tensors, run by the exact reference kernel (one group's rows at a time, gathered
    by ``g_idx``; bit for bit as GPTQModel)."""

    quant_config: GPTQConfig  # set by QuantConfig.get_linear_method
    kernels = ("reference",)

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
        cfg = self.quant_config
        k, n = input_size_per_partition, sum(output_partition_sizes)
        fmt.create_weights(layer, k, n, cfg.bits, cfg.group_size, params_dtype, g_idx=cfg.g_idx)

    def decode(self, layer: torch.nn.Module) -> IntWeights:
        cfg = self.quant_config
        return fmt.decode(
            layer, cfg.bits, cfg.zero_point_offset, sym=cfg.sym, desc_act=cfg.desc_act,
            group_size=cfg.group_size, signed_scales=cfg.signed_scales,
        )  # fmt: skip


class GPTQMarlinLinearMethod(GPTQLinearMethod):
    """GPTQ tensors run by the Triton kernel on CUDA >= 8.0, the exact kernel elsewhere;
    act-order through the load-time row permutation."""

    kernels = ("triton", "reference")


class GPTQConfig(QuantConfig):
    """``quantization_config`` (or ``quantize_config.json``) of a GPTQ checkpoint."""

    linear_method = GPTQLinearMethod
    supports_lm_head: ClassVar[bool] = True
    tensor_names: ClassVar[frozenset[str]] = fmt.TENSORS
    variant_fields: ClassVar[frozenset[str]] = frozenset(
        {"bits", "checkpoint_format", "format", "is_marlin_format"}
    )

    bits: Bits
    group_size: GroupSize
    desc_act: bool = False
    sym: bool = True
    lm_head: bool = False
    format: str | None = None
    # The layout: given, else ``format``'s, else "gptq" (validated even when absent).
    checkpoint_format: str | None = Field(None, validate_default=True)
    is_marlin_format: bool = False
    modules_to_not_convert: list[str] | None = None
    modules_in_block_to_quantize: list[str] | list[list[str]] | None = None
    dynamic: dict[str, DynamicOverride] | None = None
    # False for producers that write no g_idx (AutoRound's GPTQ packing): groups row // size.
    g_idx: bool = True
    # True for producers whose symmetric quantizer writes negative scales on purpose
    # (AutoRound): they are then not warned about.
    signed_scales: bool = False

    @field_validator("g_idx")
    @classmethod
    def _g_idx(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and info.data.get("desc_act"):
            raise ValueError("act-order (desc_act: true) needs the g_idx tensor; expected true")
        return value

    @field_validator("checkpoint_format")
    @classmethod
    def _checkpoint_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:  # GPTQModel often writes only ``format``: it decides
            return info.data.get("format") or "gptq"
        return cls._format(value)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.lower() in UNSUPPORTED_FORMATS:
            raise ValueError(
                f"the '{value}' GPTQ layout is not supported; expected one of "
                f"{', '.join(CHECKPOINT_FORMATS)} (GPTQModel: save with format='gptq')"
            )
        if value.lower() in OTHER_GPTQMODEL_FORMATS:
            raise ValueError(
                f"'{value}' is a GPTQModel format whose tensors are not GPTQ's and quantreg "
                f"does not read them; expected one of {', '.join(CHECKPOINT_FORMATS)}"
            )
        if value.lower() in AWQ_LAYOUTS:
            raise ValueError(
                f"'{value}' is an AWQ layout, read by the awq method (GPTQModel's AWQ exports "
                "are relabelled when format and checkpoint_format agree); expected one of "
                f"{', '.join(CHECKPOINT_FORMATS)} here"
            )
        if value.lower() not in CHECKPOINT_FORMATS:
            raise ValueError(f"expected one of {', '.join(CHECKPOINT_FORMATS)}")
        return value.lower()

    @classmethod
    def from_quant_config(
        cls, data: Mapping[str, Any], *, method: str, source: str | None = None
    ) -> Self:
        """Validate a GPTQ ``quantization_config``; ``format`` and ``checkpoint_format`` must
        agree when both are given (checked after each field's own value, so that an
        unsupported layout is named as such).

        Raises:
            ConfigError: the two layout fields disagree, or a field has a bad value.
        """
        config = super().from_quant_config(data, method=method, source=source)
        check_layout_fields(data, LAYOUT_FIELDS, method=method, source=source)
        return config

    @field_validator("is_marlin_format")
    @classmethod
    def _marlin(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "AutoGPTQ marlin-format checkpoints are not supported; expected false "
                "(re-save the model in the plain GPTQ format)"
            )
        return value

    @field_validator("dynamic", mode="before")
    @classmethod
    def _few_rules(cls, value: Any) -> Any:
        """The rules' regexes together (how many, their work on one name), checked before
        each rule is parsed: a million rules cost one ``len``."""
        if isinstance(value, Mapping):
            problem = regex_list_problem([dynamic_pattern(k) for k in value if isinstance(k, str)])
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("dynamic")
    @classmethod
    def _dynamic(
        cls, value: dict[str, DynamicOverride] | None
    ) -> dict[str, DynamicOverride] | None:
        """Every rule's regex must match module names in bounded time (``+:(a+)+$`` would
        hang resolution)."""
        for key in value or {}:
            problem = regex_problem(dynamic_pattern(key))
            if problem is not None:
                raise ValueError(f"rule {key!r} {problem}")
        return value

    @classmethod
    def quantize_weight(
        cls,
        weight: torch.Tensor,
        *,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        desc_act: bool = False,
        perm: torch.Tensor | None = None,
        checkpoint_format: str = "gptq",
        scale_dtype: torch.dtype = torch.float16,
        **unused: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Round-to-nearest GPTQ tensors of a float ``[out, in]`` weight.

        With ``desc_act`` the input columns are processed in the order ``perm`` (default:
        decreasing column norm) and grouped in that order, so ``g_idx`` is scattered while the
        tensors stay in the original row order -- as GPTQ's act-order writes them.

        Raises:
            ConfigError: unsupported bits / format, or sizes that do not pack.
            InputError: a bad ``perm`` or an unsupported option.
        """
        if unused:
            raise InputError(
                f"gptq writer: unsupported option(s) {', '.join(sorted(unused))}",
                field=sorted(unused)[0],
            )
        qcfg = {
            "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
            "sym": sym, "lm_head": True, "checkpoint_format": checkpoint_format,
        }  # fmt: skip
        config = cls.from_quant_config(qcfg, method="gptq")
        tensors = fmt.quantize(
            weight, bits=config.bits, group_size=config.group_size, sym=config.sym,
            desc_act=config.desc_act, zero_point_offset=config.zero_point_offset, perm=perm,
            scale_dtype=scale_dtype,
        )  # fmt: skip
        return tensors, qcfg

    @classmethod
    def writer_options(cls) -> tuple[WriterOption, ...]:
        """GPTQ's options; ``format`` is the ``checkpoint_format``, ``actorder`` is
        ``desc_act``."""
        default = writer_defaults(cls.quantize_weight)
        return (
            WriterOption("format", "checkpoint_format", default["checkpoint_format"],
                         CHECKPOINT_FORMATS, note="gptq_v2 stores the zero points without v1's -1"),
            WriterOption("bits", "bits", default["bits"], SUPPORTED_BITS),
            WriterOption("group_size", "group_size", default["group_size"],
                         note="-1 (one group) or any positive size"),
            WriterOption("sym", "sym", default["sym"], note="--no-sym: a zero point per group"),
            WriterOption("actorder", "desc_act", None, ("group",), {"group": True},
                         note=f"'group' is desc_act: {ACTORDER_NOTE}"),
        )  # fmt: skip

    @classmethod
    def scope_config(
        cls, qcfg: Mapping[str, Any], *, quantized: str, kept_float: Collection[str]
    ) -> dict[str, Any]:
        """A GPTQModel ``dynamic`` rule that excludes every module but ``quantized`` (vLLM and
        GPTQModel ``re.match`` it against module names, renamed ones included)."""
        if not kept_float:
            return dict(qcfg)
        dynamic = dict(qcfg.get("dynamic") or {})
        dynamic[f"-:^(?!{re.escape(quantized)}$)"] = {}
        return {**qcfg, "dynamic": dynamic}

    @classmethod
    def relabel(cls, data: Mapping[str, Any]) -> Relabel | None:
        """GPTQModel's weight-only exports keep quant_method "gptq" but write AWQ tensors when
        their ``format`` (or ``checkpoint_format``) is an AWQ layout: read them as ``awq``."""
        layouts = {
            value.strip().lower()
            for value in (data.get("format"), data.get("checkpoint_format"))
            if isinstance(value, str)
        }
        if len(layouts) != 1 or not layouts <= set(AWQ_LAYOUTS):
            return None  # GPTQ tensors, or fields that disagree (GPTQConfig refuses those)
        layout = data.get("format") or data.get("checkpoint_format")
        note = (
            f"says quant_method 'gptq' with format '{layout}': GPTQModel writes that for "
            "AWQ-layout tensors (qweight [in, out/8], no g_idx), so it is read as awq"
        )
        awq = {**data, "quant_method": "awq", "version": data.get("version", layout)}
        return Relabel("awq", awq, note)

    @property
    def zero_point_offset(self) -> int:
        """What the ``gptq`` (v1) layout subtracted from every stored zero point
        (``checkpoint_format`` holds the layout: given, else ``format``'s, else v1)."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def dynamic_match(self, prefix: str) -> tuple[str, bool, dict[str, Any]] | None:
        """The first ``dynamic`` rule whose regex ``re.match``-es ``prefix``.

        Returns ``(key, excluded, overrides)``; ``excluded`` for a ``-:`` rule.
        """
        for key, rule in (self.dynamic or {}).items():
            if checked_regex(dynamic_pattern(key)).match(prefix):
                overrides = {
                    k: getattr(rule, k) for k in OVERRIDE_KEYS if getattr(rule, k) is not None
                }
                return key, key.startswith("-:"), overrides
        return None

    def layer_rule(self, prefix: str) -> LayerRule:
        """``lm_head`` flag, then ``modules_to_not_convert``, then the first ``dynamic`` match."""
        decided, fired = head_and_skip_rule(
            prefix,
            lm_head=self.lm_head,
            lm_head_given="lm_head" in self.model_fields_set,
            modules=self.modules_to_not_convert,
        )
        match = self.dynamic_match(prefix)
        if decided is not None:
            if match is not None:
                decided = replace(
                    decided, also=(*decided.also, f"dynamic '{match[0]}' (not applied)")
                )
            return decided
        if match is not None:
            key, excluded, overrides = match
            if excluded:
                return LayerRule(False, f"dynamic '{key}'", also=tuple(fired))
            text = ", ".join(f"{k}={_json(v)}" for k, v in overrides.items())
            return LayerRule(
                True, f"dynamic '{key}'" + (f" → {text}" if text else ""), overrides, tuple(fired)
            )
        if not is_lm_head(prefix) and self.modules_in_block_to_quantize:
            names = [n for group in self.modules_in_block_to_quantize for n in _as_list(group)]
            if not any(name in prefix for name in names):
                return LayerRule(False, "modules_in_block_to_quantize: no entry matches")
        return LayerRule(True, fired[0] if fired else "quant_method 'gptq': every linear layer")

    def rule_from_tensors(self, prefix: str, names: frozenset[str]) -> LayerRule | None:
        """A GPTQ config that keeps the head unquantized over GPTQ-packed head tensors."""
        if names >= (fmt.TENSORS if self.g_idx else fmt.TENSORS - {"g_idx"}):
            listed = "qzeros, scales and g_idx" if self.g_idx else "qzeros and scales"
            return LayerRule(True, f"tensors: {prefix}.qweight, {listed} are GPTQ-packed")
        return None


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _json(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class GPTQMarlinConfig(GPTQConfig):
    """GPTQ tensors run by the Triton kernel (CUDA >= 8.0, symmetric, groups of -1/32/64/128);
    act-order becomes a load-time row permutation plus a run-time permutation of ``x``."""

    linear_method = GPTQMarlinLinearMethod
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("gptq",)
    upgrade_priority: ClassVar[int] = 20

    def format_reason(self) -> str | None:
        if not self.sym:
            return "gptq_marlin needs symmetric quantization (sym=true); this layer has sym=false"
        return marlin_group_reason("gptq_marlin", self.group_size)

    def platform_reason(self, platform: Platform) -> str | None:
        return marlin_platform_reason("gptq_marlin", platform)

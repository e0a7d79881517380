"""GPTQ (AutoGPTQ, GPTQModel, optimum): ``gptq`` (reference path) and ``gptq_marlin``."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

from quantreg import (
    ConfigError,
    LayerRule,
    LinearMethod,
    Platform,
    QuantConfig,
    is_lm_head,
    pack_codes,
    unpack_codes,
)
from quantreg.methods._layers import (
    check_finite,
    dequantize,
    frozen_param,
    group_blocks,
    group_order,
    grouped,
    reference_matmul,
    restore_checkpoint_dtype,
    rtn_asymmetric,
    rtn_symmetric,
)
from quantreg.methods._repack import RepackedLinearMethod, repack
from quantreg.methods._wna16 import (
    GroupSize,
    head_and_skip_rule,
    marlin_group_reason,
    marlin_platform_reason,
)

SUPPORTED_BITS = (4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
UNSUPPORTED_FORMATS = ("marlin", "bitblas", "qqq")
TENSORS = frozenset({"qweight", "qzeros", "scales", "g_idx"})
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


class GPTQLinearMethod(LinearMethod):
    """Reference GPTQ path: dequantizes one block of input rows of one group at a time.

    Tensors: ``qweight`` int32 ``[in/pf, out]`` packed along the input dim, ``qzeros`` int32
    ``[groups, out/pf]`` packed along the output dim (checkpoint_format ``gptq`` stores
    ``zero - 1``), ``scales`` ``[groups, out]``, ``g_idx`` int32 ``[in]`` (replicated).
    ``W[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]``, rounded to the scale dtype.
    With act-order the rows of a group are scattered; they are gathered by ``g_idx``.
    """

    quant_config: GPTQConfig  # set by QuantConfig.get_linear_method

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
        pf = 32 // cfg.bits
        groups = -(-k // cfg.group_size) if cfg.group_size > 0 else 1
        if k % pf or n % pf:
            raise ConfigError(
                f"GPTQ {cfg.bits}-bit packs {pf} codes per word; in={k} and out={n} must be "
                "multiples of it"
            )
        packed_out = {"output_dim": 1, "packed_dim": 1, "pack_factor": pf}
        params = {
            "qweight": frozen_param(
                (k // pf, n), torch.int32, output_dim=1, input_dim=0, packed_dim=0, pack_factor=pf
            ),
            "qzeros": frozen_param((groups, n // pf), torch.int32, **packed_out),
            "scales": frozen_param((groups, n), params_dtype, output_dim=1),
            "g_idx": frozen_param((k,), torch.int32, input_dim=0),
        }
        for name, param in params.items():
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Check scales and ``g_idx``; sort input rows by group for block-wise dequant.

        Raises:
            CheckpointError: non-finite scales, or a ``g_idx`` entry outside the groups.
        """
        restore_checkpoint_dtype(layer, "scales")
        check_finite(layer, "scales")
        prefix = layer.prefix
        order, bounds = group_order(
            layer.g_idx, layer.scales.shape[0], f"{prefix}.g_idx", f"{prefix}.scales"
        )
        layer.gptq_blocks = group_blocks(order, bounds)

    def dequantize_rows(
        self, layer: torch.nn.Module, rows: torch.Tensor, group: int
    ) -> torch.Tensor:
        """Rows ``rows`` of ``W.T`` (all in ``group``), rounded to the scale dtype."""
        cfg = self.quant_config
        bits, pf, mask = cfg.bits, 32 // cfg.bits, (1 << cfg.bits) - 1
        words = layer.qweight[rows // pf].to(torch.int64) & 0xFFFFFFFF
        codes = (words >> ((rows % pf) * bits)[:, None]) & mask
        zeros = unpack_codes(layer.qzeros[group : group + 1], bits, dim=1)
        zeros = (zeros + cfg.zero_point_offset) & mask
        return dequantize(codes, zeros, layer.scales[group : group + 1])

    def repack(self, layer: torch.nn.Module) -> None:
        """Convert the loaded tensors into the layout shared with AWQ (see ``_repack``);
        act-order becomes a row permutation here plus a permutation of ``x`` at run time."""
        cfg = self.quant_config
        mask = (1 << cfg.bits) - 1
        k = layer.g_idx.shape[0]
        zeros = (unpack_codes(layer.qzeros, cfg.bits, dim=1) + cfg.zero_point_offset) & mask
        repack(
            layer,
            bits=cfg.bits,
            codes=lambda c0, c1: unpack_codes(layer.qweight[:, c0:c1], cfg.bits, dim=0, count=k),
            zeros=zeros[:, : layer.scales.shape[1]],
            scales=layer.scales.data,
            g_idx=layer.g_idx.data,
            drop=("qweight", "qzeros", "scales", "g_idx"),
        )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return reference_matmul(
            x, bias, layer.gptq_blocks, lambda rows, g: self.dequantize_rows(layer, rows, g)
        )


class GPTQConfig(QuantConfig):
    """``quantization_config`` (or ``quantize_config.json``) of a GPTQ checkpoint."""

    linear_method = GPTQLinearMethod
    supports_lm_head: ClassVar[bool] = True

    bits: Bits
    group_size: GroupSize
    desc_act: bool = False
    sym: bool = True
    lm_head: bool = False
    checkpoint_format: str = "gptq"
    format: str | None = None
    is_marlin_format: bool = False
    modules_to_not_convert: list[str] | None = None
    modules_in_block_to_quantize: list[str] | list[list[str]] | None = None
    dynamic: dict[str, DynamicOverride] | None = None

    @field_validator("checkpoint_format", "format")
    @classmethod
    def _format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.lower() in UNSUPPORTED_FORMATS:
            raise ValueError(
                f"the '{value}' GPTQ layout is not supported; expected one of "
                f"{', '.join(CHECKPOINT_FORMATS)} (GPTQModel: save with format='gptq')"
            )
        if value.lower() not in CHECKPOINT_FORMATS:
            raise ValueError(f"expected one of {', '.join(CHECKPOINT_FORMATS)}")
        return value.lower()

    @field_validator("is_marlin_format")
    @classmethod
    def _marlin(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "AutoGPTQ marlin-format checkpoints are not supported; expected false "
                "(re-save the model in the plain GPTQ format)"
            )
        return value

    @field_validator("dynamic")
    @classmethod
    def _dynamic(
        cls, value: dict[str, DynamicOverride] | None
    ) -> dict[str, DynamicOverride] | None:
        for key in value or {}:
            pattern = key[2:] if key[:2] in ("+:", "-:") else key
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"rule {key!r} is not a valid regular expression: {exc}") from exc
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
            ConfigError: unsupported bits / format, a bad ``perm``, or sizes that do not pack.
        """
        if unused:
            raise ConfigError(f"gptq writer: unsupported option(s) {', '.join(sorted(unused))}")
        qcfg = {
            "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
            "sym": sym, "lm_head": True, "checkpoint_format": checkpoint_format,
        }  # fmt: skip
        config = cls.from_quant_config(qcfg, method="gptq")
        n, k = weight.shape
        pf, mask = 32 // bits, (1 << bits) - 1
        if k % pf or n % pf:
            raise ConfigError(
                f"GPTQ {bits}-bit needs in and out to be multiples of {pf}; got out={n}, in={k}"
            )
        order = _processing_order(weight, desc_act, perm)
        size = group_size if group_size > 0 else k
        if sym:
            codes, scales, zeros = rtn_symmetric(grouped(weight[:, order], size), bits, scale_dtype)
        else:
            codes, scales, zeros = rtn_asymmetric(
                grouped(weight[:, order], size), bits, scale_dtype, include_zero=True
            )
        in_order = torch.empty(n, k, dtype=torch.int32)
        in_order[:, order] = codes.reshape(n, -1)[:, :k]
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // size).to(torch.int32)
        stored_zeros = (zeros - config.zero_point_offset) & mask
        tensors = {
            "qweight": pack_codes(in_order.T, bits, dim=0),
            "qzeros": pack_codes(stored_zeros.T, bits, dim=1),
            "scales": scales.T.contiguous(),
            "g_idx": g_idx,
        }
        return tensors, qcfg

    @property
    def zero_point_offset(self) -> int:
        """What checkpoint_format ``gptq`` (v1) subtracted from every stored zero point."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def dynamic_match(self, prefix: str) -> tuple[str, bool, dict[str, Any]] | None:
        """The first ``dynamic`` rule whose regex ``re.match``-es ``prefix``.

        Returns ``(key, excluded, overrides)``; ``excluded`` for a ``-:`` rule.
        """
        for key, rule in (self.dynamic or {}).items():
            pattern = key[2:] if key[:2] in ("+:", "-:") else key
            if re.match(pattern, prefix):
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
        if names >= TENSORS:
            return LayerRule(
                True, f"tensors: {prefix}.qweight, qzeros, scales and g_idx are GPTQ-packed"
            )
        return None


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _json(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _processing_order(
    weight: torch.Tensor, desc_act: bool, perm: torch.Tensor | None
) -> torch.Tensor:
    """The order GPTQ processes (and groups) input columns in."""
    k = weight.shape[1]
    if perm is None:
        if not desc_act:
            return torch.arange(k)
        return torch.argsort(weight.double().norm(dim=0), descending=True, stable=True)
    if not desc_act:
        raise ConfigError("gptq writer: perm orders act-order groups; pass desc_act=True with it")
    perm = torch.as_tensor(perm, dtype=torch.int64)
    if perm.shape != (k,) or not torch.equal(perm.sort().values, torch.arange(k)):
        raise ConfigError(f"gptq writer: perm must be a permutation of range({k})")
    return perm


class GPTQMarlinLinearMethod(RepackedLinearMethod, GPTQLinearMethod):
    """GPTQ tensors repacked after loading into the layout shared with AWQ; the Triton
    kernel reads it on CUDA, elsewhere the exact block-wise CPU path does."""


class GPTQMarlinConfig(GPTQConfig):
    """GPTQ tensors repacked after loading into the shared marlin layout (fast GPU kernel);
    act-order becomes a load-time row permutation plus a runtime permutation of ``x``."""

    linear_method = GPTQMarlinLinearMethod
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("gptq",)
    upgrade_priority: ClassVar[int] = 20

    def format_reason(self) -> str | None:
        if not self.sym:
            return "gptq_marlin needs symmetric quantization (sym=true); this layer has sym=false"
        return marlin_group_reason("gptq_marlin", self.group_size)

    def platform_reason(self, platform: Platform) -> str | None:
        return marlin_platform_reason("gptq_marlin", platform)

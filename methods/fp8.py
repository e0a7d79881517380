"""``fp8`` checkpoints: transformers' ``FineGrainedFP8Config`` and DeepSeek-V3 / Qwen3-FP8
exports (``weight_block_size [rows, cols]``), as vLLM's ``Fp8Config`` reads them too.

Tensors: float8_e4m3fn ``weight [N, K]`` and float32 ``weight_scale_inv [ceil(N / rows),
ceil(K / cols)]`` -- multiplied despite its name (transformers quantizes ``w * (448 / amax)``
and stores the inverse, ``amax / 448``), so ``W = weight * weight_scale_inv[o // rows, i // cols]``
(see ``_fp8_blocks``). The vocab rows are on dim 0; a block a shard boundary cuts serves both
ranks. The head runs weight-only on the exact reference kernel: activations stay float.

Which layers are fp8: every linear layer but those ``modules_to_not_convert`` (transformers,
substring match) or ``ignored_layers`` (vLLM) name -- except the lm_head, which vLLM and
transformers keep float unless told otherwise (DeepSeek-V3's config names no exclusion and its
head is bf16): a head is fp8 only when its tensors are (``weight_scale_inv`` beside it).
Per-tensor fp8 (no ``weight_block_size``: a ``weight_scale`` and, for static activations, an
``input_scale``) is not supported yet and says so.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import torch
from pydantic import field_validator

from quantreg import (
    InputError,
    LayerRule,
    QuantConfig,
    WriterOption,
    frozen_param,
    is_lm_head,
)
from quantreg.kernels import Float8Layout
from quantreg.methods._decoded import DecodedLinearMethod
from quantreg.methods._fp8_blocks import block_problem, block_scale, decode_blocks, quantize_blocks
from quantreg.methods._wna16 import skipped_by

SCALE = "weight_scale_inv"
EXCLUSIONS = ("modules_to_not_convert", "ignored_layers")
HEAD_RULE = (
    "quant_method 'fp8': no lm_head key; vLLM and transformers keep a head float unless its "
    "tensors are float8"
)


class Fp8LinearMethod(DecodedLinearMethod):
    """float8 ``weight`` with block ``weight_scale_inv``, on the exact reference kernel."""

    quant_config: Fp8Config  # set by QuantConfig.get_linear_method

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
        """Register this rank's float8 rows and the whole (replicated) block scale."""
        k, n = input_size_per_partition, sum(output_partition_sizes)
        weight = frozen_param((n, k), torch.float8_e4m3fn, output_dim=0, input_dim=1)
        layer.register_parameter("weight", weight)
        layer.register_parameter(
            SCALE, block_scale(layer, self.quant_config.block, k, params_dtype)
        )

    def decode(self, layer: torch.nn.Module) -> Float8Layout:
        return decode_blocks(layer, self.quant_config.block, "weight", SCALE)


class Fp8Config(QuantConfig):
    """``quantization_config`` of an ``fp8`` checkpoint (the keys transformers and vLLM read)."""

    linear_method = Fp8LinearMethod
    supports_lm_head: ClassVar[bool] = True
    tensor_names: ClassVar[frozenset[str]] = frozenset({SCALE, "weight_scale", "input_scale"})

    activation_scheme: str = "dynamic"
    fmt: str = "e4m3"
    weight_block_size: list[int] | None = None
    modules_to_not_convert: list[str] | None = None
    ignored_layers: list[str] | None = None
    modules_to_convert: list[str] | None = None
    scale_fmt: str = "float"
    is_checkpoint_fp8_serialized: bool = True

    @field_validator("weight_block_size")
    @classmethod
    def _block(cls, value: list[int] | None) -> list[int] | None:
        problem = None if value is None else block_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("activation_scheme")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value not in ("dynamic", "static"):
            raise ValueError("expected 'dynamic' or 'static'")
        return value

    @property
    def block(self) -> tuple[int, int]:
        """``weight_block_size`` as ``(rows, cols)`` (set on every config that runs a layer)."""
        assert self.weight_block_size is not None  # format_reason refuses a config without
        rows, cols = self.weight_block_size
        return rows, cols

    def layer_rule(self, prefix: str) -> LayerRule:
        """An exclusion list first; then a head stays float (its tensors may say otherwise:
        ``rule_from_tensors``), every other layer is fp8."""
        for key in EXCLUSIONS:
            entry = skipped_by(prefix, getattr(self, key))
            if entry is not None:
                return LayerRule(False, f"{key} '{entry}'")
        if (
            self.modules_to_convert is not None
            and skipped_by(prefix, self.modules_to_convert) is None
        ):
            return LayerRule(False, f"modules_to_convert: no entry covers '{prefix}'")
        if is_lm_head(prefix):
            return LayerRule(False, HEAD_RULE)
        return LayerRule(True, "quant_method 'fp8': every linear layer")

    def rule_from_tensors(self, prefix: str, names: frozenset[str]) -> LayerRule | None:
        """A float8 ``weight`` with its ``weight_scale_inv`` (or ``weight_scale``) is fp8,
        whatever the config says: the tensors are the truth."""
        scale = SCALE if SCALE in names else "weight_scale" if "weight_scale" in names else None
        if "weight" not in names or scale is None:
            return None
        return LayerRule(True, f"tensors: {prefix}.weight with {scale} are fp8")

    def format_reason(self) -> str | None:
        if self.fmt != "e4m3":
            return f"fmt {self.fmt!r} is not supported; supported: 'e4m3'"
        if self.scale_fmt != "float":
            return f"scale_fmt {self.scale_fmt!r} is not supported; supported: 'float'"
        if self.weight_block_size is None:
            return (
                "fp8 without weight_block_size (per-tensor or per-channel weight_scale) is not "
                "supported yet; supported: block scales (weight_block_size, weight_scale_inv)"
            )
        if not self.is_checkpoint_fp8_serialized:
            return (
                "is_checkpoint_fp8_serialized false: vLLM quantizes such weights at load time; "
                "quantreg reads fp8-serialized checkpoints only"
            )
        if self.activation_scheme != "dynamic":
            return (
                "activation_scheme 'static' with weight_block_size is not supported (vLLM's "
                "Fp8Config refuses it too: block-wise fp8 has dynamic activations only, so no "
                "input_scale)"
            )
        return None

    def notes(self) -> list[str]:
        return [
            "the checkpoint quantizes input activations dynamically (fp8 e4m3 per token "
            "group); quantreg runs the layer weight-only: activations stay float"
        ]

    @classmethod
    def quantize_weight(
        cls,
        weight: torch.Tensor,
        *,
        block_size: tuple[int, int] | list[int] = (128, 128),
        scale_dtype: torch.dtype | None = None,
        **unused: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Round-to-nearest float8 tensors as transformers' ``Fp8Quantize`` writes them
        (``weight`` e4m3, float32 ``weight_scale_inv`` per block) and the config.
        ``scale_dtype`` is ignored: fp8 checkpoints store float32 scales.

        Raises:
            InputError: an unknown option or a block size that is not two positive ints.
        """
        if unused:
            raise InputError(
                f"fp8 writer: unsupported option(s) {', '.join(sorted(unused))}",
                field=sorted(unused)[0],
            )
        tensors = quantize_blocks(weight, tuple(block_size), torch.float32)  # type: ignore[arg-type]
        config = {
            "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
            "weight_block_size": [*block_size],
        }  # fmt: skip
        return {"weight": tensors["weight"], SCALE: tensors["weight_scale"]}, config

    @classmethod
    def writer_options(cls) -> tuple[WriterOption, ...]:
        return (
            WriterOption(
                "block_size", "block_size", (128, 128),
                note="rows x cols per float32 weight_scale_inv entry (DeepSeek-V3: 128x128)",
            ),
        )  # fmt: skip

    @classmethod
    def scope_config(
        cls, qcfg: Mapping[str, Any], *, quantized: str, kept_float: Collection[str]
    ) -> dict[str, Any]:
        """``modules_to_not_convert`` and vLLM's ``ignored_layers``: every float module, so
        that transformers and vLLM keep them float."""
        kept = sorted(kept_float)
        return {**qcfg, "modules_to_not_convert": kept, "ignored_layers": kept}

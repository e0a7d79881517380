"""``fp8`` checkpoints, as vLLM's ``Fp8Config`` reads them: block-wise (transformers'
``FineGrainedFP8Config``, DeepSeek-V3 / Qwen3-FP8: ``weight_block_size [rows, cols]``) and
per-tensor or per-channel (AutoFP8, ``neuralmagic`` / ``RedHatAI`` ``*-FP8``: no block size).

Block tensors: float8_e4m3fn ``weight [N, K]`` and float32 ``weight_scale_inv [ceil(N / rows),
ceil(K / cols)]`` -- multiplied despite its name (transformers quantizes ``w * (448 / amax)``
and stores the inverse, ``amax / 448``), so ``W = weight * weight_scale_inv[o // rows, i // cols]``
(see ``_fp8_blocks``); a block a shard boundary cuts serves both ranks. Without a block size:
``weight`` and ``weight_scale`` (``[]`` / ``[1]`` per-tensor, ``[N]`` / ``[N, 1]`` per-channel),
``W = weight * weight_scale``, plus a per-tensor ``input_scale`` when ``activation_scheme`` is
``static`` (see ``_fp8_scales``). Which of the two the head holds is read from the headers
(``tensor_overrides``). The vocab rows are on dim 0. The head runs weight-only on the exact
reference kernel: activations stay float, and a static ``input_scale`` is checked, not applied.

Which layers are fp8: every linear layer but those ``modules_to_not_convert`` (transformers,
substring match) or ``ignored_layers`` (vLLM) name -- except the lm_head, which vLLM and
transformers keep float unless told otherwise (DeepSeek-V3's config names no exclusion and its
head is bf16; AutoFP8 never quantizes it): a head is fp8 only when its tensors are (a
``weight_scale_inv`` or ``weight_scale`` beside it).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import torch
from pydantic import field_validator

from quantreg import (
    CheckpointError,
    InputError,
    LayerRule,
    QuantConfig,
    WriterOption,
    frozen_param,
    is_lm_head,
    layer_geometry,
)
from quantreg.kernels import Float8Layout
from quantreg.methods._decoded import DecodedLinearMethod
from quantreg.methods._fp8_blocks import block_problem, block_scale, decode_blocks, quantize_blocks
from quantreg.methods._fp8_scales import (
    INPUT_SCALE,
    WEIGHT_SCALE,
    create_scales,
    decode_scales,
    quantize_rows,
)
from quantreg.methods._wna16 import skipped_by

SCALE = "weight_scale_inv"
SCALES = frozenset({SCALE, WEIGHT_SCALE, INPUT_SCALE})
FORMATS = ("block", "channel", "tensor")
EXCLUSIONS = ("modules_to_not_convert", "ignored_layers")
HEAD_RULE = (
    "quant_method 'fp8': no lm_head key; vLLM and transformers keep a head float unless its "
    "tensors are float8"
)


class Fp8LinearMethod(DecodedLinearMethod):
    """float8 ``weight`` with block ``weight_scale_inv`` or a per-tensor / per-channel
    ``weight_scale``, on the exact reference kernel."""

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
        """Register this rank's float8 rows and the scale: the whole (replicated) block
        scale, or ``weight_scale`` (and a static ``input_scale``) in their stored shapes.

        Raises:
            CheckpointError: both ``weight_scale_inv`` and ``weight_scale``, a scale that does
                not fit the config, or a misshapen ``weight_scale`` / ``input_scale``.
        """
        config, k, n = self.quant_config, input_size_per_partition, sum(output_partition_sizes)
        weight = frozen_param((n, k), torch.float8_e4m3fn, output_dim=0, input_dim=1)
        layer.register_parameter("weight", weight)
        shapes = config.tensor_shapes or {}
        prefix = layer_geometry(layer).prefix
        if SCALE in shapes and WEIGHT_SCALE in shapes:
            raise CheckpointError(
                f"{prefix} holds both {prefix}.{SCALE} and {prefix}.{WEIGHT_SCALE}; expected "
                f"one: {SCALE} with weight_block_size (block-wise), {WEIGHT_SCALE} without it "
                "(per-tensor or per-channel)",
                tensor=f"{prefix}.{WEIGHT_SCALE}",
            )
        if config.weight_block_size is not None:
            layer.register_parameter(SCALE, block_scale(layer, config.block, k, params_dtype))
        elif SCALE in shapes:
            raise CheckpointError(
                f"{prefix}.{SCALE} {shapes[SCALE]} but the config has no weight_block_size; "
                f"expected {prefix}.{WEIGHT_SCALE} (per-tensor or per-channel fp8), or a "
                "weight_block_size for block scales",
                tensor=f"{prefix}.{SCALE}",
            )
        else:
            create_scales(layer, shapes, static=config.activation_scheme == "static")

    def decode(self, layer: torch.nn.Module) -> Float8Layout:
        if self.quant_config.weight_block_size is None:
            return decode_scales(layer)
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
    # Not a producer key: the layer's scale tensors and their stored shapes, which quantreg
    # reads from the safetensors headers (``tensor_overrides``) into the effective config.
    tensor_shapes: dict[str, list[int]] | None = None

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
        whatever the config says: the tensors are the truth. A non-float ``weight`` without
        a scale is claimed too, so that loading names the missing scale."""
        scale = SCALE if SCALE in names else "weight_scale" if "weight_scale" in names else None
        if "weight" not in names:
            return None
        if scale is None:  # called for quantized tensors only: this weight is not float
            return LayerRule(True, f"tensors: {prefix}.weight is not float, so fp8 (no scale)")
        return LayerRule(True, f"tensors: {prefix}.weight with {scale} are fp8")

    def tensor_overrides(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """The layer's scale tensors (``weight_scale_inv``, ``weight_scale``, ``input_scale``)
        with their stored shapes: per-tensor or per-channel, and both-present, are told there."""
        kept = {name: list(shape) for name, shape in shapes.items() if name in SCALES}
        return {"tensor_shapes": kept} if kept else {}

    def format_reason(self) -> str | None:
        if self.fmt != "e4m3":
            return f"fmt {self.fmt!r} is not supported; supported: 'e4m3'"
        if self.scale_fmt != "float":
            return f"scale_fmt {self.scale_fmt!r} is not supported; supported: 'float'"
        if not self.is_checkpoint_fp8_serialized:
            return (
                "is_checkpoint_fp8_serialized false: vLLM quantizes such weights at load time; "
                "quantreg reads fp8-serialized checkpoints only"
            )
        if self.weight_block_size is not None and self.activation_scheme != "dynamic":
            return (
                "activation_scheme 'static' with weight_block_size is not supported (vLLM's "
                "Fp8Config refuses it too: block-wise fp8 has dynamic activations only, so no "
                "input_scale)"
            )
        return None

    def notes(self) -> list[str]:
        if self.activation_scheme == "static":
            return [
                "the checkpoint quantizes input activations statically (fp8 e4m3 with its "
                "per-tensor input_scale); quantreg runs the layer weight-only: input_scale is "
                "checked (finite, positive) but not applied, activations stay float"
            ]
        return [
            "the checkpoint quantizes input activations dynamically (fp8 e4m3 per token "
            "group); quantreg runs the layer weight-only: activations stay float"
        ]

    @classmethod
    def quantize_weight(
        cls,
        weight: torch.Tensor,
        *,
        format: str = "block",
        block_size: tuple[int, int] | list[int] | None = None,
        scale_dtype: torch.dtype | None = None,
        **unused: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Round-to-nearest float8 tensors and the config. ``block`` (default): as
        transformers' ``Fp8Quantize`` writes them (``weight`` e4m3, float32
        ``weight_scale_inv`` per ``block_size`` block, default 128 x 128). ``tensor`` /
        ``channel``: float32 ``weight_scale`` ``[]`` / ``[N, 1]`` under vLLM's serialized-fp8
        config (``weight_block_size`` null, dynamic activations), as AutoFP8 writes per-tensor.
        ``scale_dtype`` is ignored: fp8 checkpoints store float32 scales.

        Raises:
            InputError: an unknown option or format, a block size that is not two positive
                ints, or a block size with format ``tensor`` / ``channel``.
        """
        if unused:
            raise InputError(
                f"fp8 writer: unsupported option(s) {', '.join(sorted(unused))}",
                field=sorted(unused)[0],
            )
        if format not in FORMATS:
            raise InputError(
                f"fp8 writer: format {format!r} is not supported; expected block, channel or "
                "tensor",
                field="format",
            )
        config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
        if format != "block":
            if block_size is not None:
                raise InputError(
                    f"fp8 writer: block_size needs format 'block', not {format!r}",
                    field="block_size",
                )
            tensors = quantize_rows(weight, per_channel=format == "channel")
            return tensors, {**config, "weight_block_size": None}
        block = tuple(block_size or (128, 128))
        tensors = quantize_blocks(weight, block, torch.float32)  # type: ignore[arg-type]
        scales = {"weight": tensors["weight"], SCALE: tensors["weight_scale"]}
        return scales, {**config, "weight_block_size": [*block]}

    @classmethod
    def writer_options(cls) -> tuple[WriterOption, ...]:
        return (
            WriterOption(
                "format", "format", "block", FORMATS,
                note="block: transformers' FineGrainedFP8 / DeepSeek-V3 weight_scale_inv; "
                "tensor: float32 weight_scale [] as AutoFP8 writes it, under vLLM's "
                "serialized-fp8 config (weight_block_size null): transformers' FineGrainedFP8 "
                "reads per-tensor fp8 only under its own names (weight_scale_inv, "
                "activation_scale), so it does not read these files; channel: weight_scale "
                "[N, 1] under the same config, which vLLM's Fp8Config does not load "
                "(per-tensor only; for a per-channel head vLLM runs, use compressed-tensors "
                "float-quantized --strategy channel)",
            ),
            WriterOption(
                "block_size", "block_size", None,
                note="format block only, where it is 128x128 unless given (DeepSeek-V3's): "
                "rows x cols per float32 weight_scale_inv entry",
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

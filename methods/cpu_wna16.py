"""``cpu_wna16`` (alias ``cpu_awq``): AWQ and GPTQ int4/int8 heads on the CPU.

Loads the checkpoint exactly as ``awq`` / ``gptq`` do and repacks into the layout shared with
the marlin methods, then picks a CPU kernel once:

* quantreg's kernel (``_cpu_kernels``) when it builds: float32 activations run its exact float32
  path (every weight rounded to the scale dtype, as the producers do); bf16 / fp16 activations
  its AVX512-BF16 / AMX paths, chosen per call by the number of rows;
* otherwise, for bf16 / fp16 heads, torch's weight-only ops where they fit -- int4 with group
  sizes 32/64/128/256 (``_weight_int4pack_mm_for_cpu``), symmetric int8 per-channel
  (``_weight_int8pack_mm``);
* otherwise the exact block-wise path of the shared layout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

import torch

from quantreg import ConfigError, LayerRule, LinearMethod, Platform, QuantConfig, unpack_codes
from quantreg.methods._cpu_kernels import apply_kernel, attach, bf16_paths
from quantreg.methods._layers import rows_matmul
from quantreg.methods._repack import (
    TORCH_INT4_GROUPS,
    apply_shared,
    regular_group_size,
)
from quantreg.methods.awq import AWQConfig
from quantreg.methods.gptq import GPTQConfig

logger = logging.getLogger(__name__)

_READERS: dict[str, type[QuantConfig]] = {"awq": AWQConfig, "gptq": GPTQConfig}
# Output rows converted to torch's int4 format per step (its blocks are 64 rows).
INT4_CHUNK = 1024
HALF_DTYPES = (torch.bfloat16, torch.float16)


class CPUWNA16LinearMethod(LinearMethod):
    """The family's own loader, then the fastest CPU kernel that fits the head."""

    quant_config: CPUWNA16Config  # set by QuantConfig.get_linear_method

    def __init__(self, quant_config: CPUWNA16Config) -> None:
        super().__init__(quant_config)
        inner = quant_config.checkpoint
        self.family = inner.linear_method(inner)

    def create_weights(self, layer: torch.nn.Module, *args: Any, **extra: Any) -> None:
        self.family.create_weights(layer, *args, **extra)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.family.process_weights_after_loading(layer)
        self.family.repack(layer)
        layer.cpu_kernel = "shared"
        if layer.wq.device.type != "cpu":
            return
        half = layer.params_dtype in HALF_DTYPES
        kernel_first = not half or bf16_paths()[0]
        if kernel_first and _to_kernel(layer):
            return
        if half and (_to_torch_int4(layer) or _to_torch_int8(layer)):
            return
        # half precision without AVX512-BF16: the float32 path, slower than torch's ops
        if not kernel_first and _to_kernel(layer):
            return
        logger.debug("%s: no CPU kernel fits; using the exact block-wise path", layer.prefix)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if layer.cpu_kernel == "shared":
            return apply_shared(layer, x, bias)
        if layer.cpu_kernel == "avx512":
            return apply_kernel(layer, x, bias)
        return rows_matmul(x, bias, layer.wperm, lambda x2: _torch_op(layer, x2))


def _torch_op(layer: torch.nn.Module, x2: torch.Tensor) -> torch.Tensor:
    """torch's int4 / int8 weight-only op on ``[rows, in]`` (features in layout order)."""
    if layer.cpu_kernel == "int4":
        sz = layer.int4_scales_zeros
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(sz.dtype).contiguous(), layer.int4_weight, layer.int4_group, sz
        )
    scales = layer.int8_scales
    return torch.ops.aten._weight_int8pack_mm(
        x2.to(scales.dtype).contiguous(), layer.int8_weight, scales
    )


def _to_kernel(layer: torch.nn.Module) -> bool:
    """Replace the shared layout by the layout of quantreg's CPU kernel."""
    k, bits = layer.wbounds[-1], layer.wbits
    attached = attach(
        layer, bits=bits, k=k, n=layer.wq.shape[1],
        codes=lambda c0, c1: unpack_codes(layer.wq[:, c0:c1], bits, dim=0, count=k),
        scales=layer.wscales, zeros=layer.wzeros, perm=layer.wperm,
        group=regular_group_size(layer),
    )  # fmt: skip
    if attached:
        layer.cpu_kernel = "avx512"
        for name in ("wq", "wscales", "wzeros"):
            delattr(layer, name)
    return attached


def _to_torch_int4(layer: torch.nn.Module) -> bool:
    """Replace the shared layout by torch's int4 CPU format when the head fits it."""
    group = regular_group_size(layer)
    k, n = layer.wbounds[-1], layer.wq.shape[1]
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if op is None or layer.wbits != 4 or group not in TORCH_INT4_GROUPS or k % group or n % 64:
        return False
    dtype = layer.params_dtype
    chunks = []
    for n0 in range(0, n, INT4_CHUNK):
        codes = unpack_codes(layer.wq[:, n0 : n0 + INT4_CHUNK], 4, dim=0, count=k)
        chunks.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.T.contiguous(), 1))
    scales = layer.wscales.to(torch.float32)
    zeros = (8 - layer.wzeros.to(torch.float32)) * scales  # w = (q - 8) * s + (8 - z) * s
    layer.register_buffer("int4_weight", torch.cat(chunks), persistent=False)
    layer.register_buffer(
        "int4_scales_zeros",
        torch.stack([scales, zeros], dim=-1).to(dtype).contiguous(),
        persistent=False,
    )
    layer.int4_group, layer.cpu_kernel = group, "int4"
    for name in ("wq", "wscales", "wzeros"):
        delattr(layer, name)
    return True


def _to_torch_int8(layer: torch.nn.Module) -> bool:
    """Symmetric int8 with one group (per-channel scales): torch's int8 CPU op."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if (
        op is None
        or layer.wbits != 8
        or len(layer.wbounds) != 2
        or not bool(((layer.wzeros == 128) | (layer.wscales == 0)).all())  # padding: scale 0
    ):
        return False
    k = layer.wbounds[-1]
    codes = unpack_codes(layer.wq, 8, dim=0, count=k)  # [K, N]
    weight = (codes - 128).to(torch.int8).T.contiguous()
    layer.register_buffer("int8_weight", weight, persistent=False)
    layer.register_buffer(
        "int8_scales", layer.wscales[0].to(layer.params_dtype).contiguous(), persistent=False
    )
    layer.cpu_kernel = "int8"
    for name in ("wq", "wscales", "wzeros"):
        delattr(layer, name)
    return True


class CPUWNA16Config(QuantConfig):
    """Wraps the checkpoint's own AWQ or GPTQ config; the CPU kernels read both layouts."""

    linear_method = CPUWNA16LinearMethod
    supports_lm_head: ClassVar[bool] = True
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("awq", "gptq")
    upgrade_priority: ClassVar[int] = 10

    source_format: Literal["awq", "gptq"]
    checkpoint: AWQConfig | GPTQConfig

    @classmethod
    def from_quant_config(
        cls, data: Mapping[str, Any], *, method: str, source: str | None = None
    ) -> Self:
        """Parse the checkpoint's AWQ or GPTQ config (by its ``quant_method``) and wrap it.

        Raises:
            ConfigError: the config is neither AWQ nor GPTQ, or is invalid as such.
        """
        fmt = str(data.get("quant_method", "")).strip().lower() if isinstance(data, Mapping) else ""
        reader = _READERS.get(fmt)
        if reader is None:
            where = f" in {source}" if source else ""
            raise ConfigError(
                f"{method} reads AWQ and GPTQ checkpoints; quant_method {fmt or None!r}{where} "
                "is neither"
            )
        inner = reader.from_quant_config(data, method=fmt, source=source)
        return cls(source_format=fmt, checkpoint=inner)

    def layer_rule(self, prefix: str) -> LayerRule:
        return self.checkpoint.layer_rule(prefix)

    def rule_from_tensors(self, prefix: str, names: frozenset[str]) -> LayerRule | None:
        return self.checkpoint.rule_from_tensors(prefix, names)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Self:
        return self.model_copy(update={"checkpoint": self.checkpoint.with_overrides(overrides)})

    def platform_reason(self, platform: Platform) -> str | None:
        if platform.device != "cpu":
            return f"cpu_wna16 runs on the CPU; platform is {platform}"
        return None

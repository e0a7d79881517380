"""The compressed-tensors LinearMethod and writer, one scheme per on-disk format.

``W[o, i] = (q[o, i] - zp[o, g(i)]) * scale[o, g(i)]``, rounded to the scale dtype (as
compressed-tensors computes it in that dtype); ``g(i)`` is ``i // group_size`` (group),
0 (channel), the whole tensor (tensor), or ``weight_g_idx[i]`` (actorder ``group``).

* ``pack-quantized``: signed codes stored offset-binary (``q + 2**(bits-1)``) in int32
  ``weight_packed [out, ceil(in*bits/32)]`` along the input dim; asymmetric zero points packed
  the same way along dim 0; ``weight_shape`` = ``[out, in]``.
* ``int-quantized`` / ``naive-quantized``: int8 ``weight [out, in]``.
* ``float-quantized``: float8_e4m3fn ``weight [out, in]``.

The vocab is on dim 0 of every tensor. The head runs weight-only: activations stay float.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from quantreg import CheckpointError, ConfigError, LinearMethod, pack_codes, unpack_codes
from quantreg.methods._cpu_kernels import apply_kernel, attach
from quantreg.methods._layers import (
    check_finite,
    dequantize,
    frozen_param,
    group_blocks,
    group_order,
    reference_matmul,
    restore_checkpoint_dtype,
)
from quantreg.methods._repack import repack, triton_on

PACKED, INT, NAIVE, FLOAT = "pack-quantized", "int-quantized", "naive-quantized", "float-quantized"
FP8_MAX = 448.0  # largest float8_e4m3fn value
WRITER = "compressed-tensors writer"


class CompressedTensorsLinearMethod(LinearMethod):
    """Loads one compressed-tensors scheme's tensors and runs them by exact block-wise
    dequantization (input columns in blocks of at most 128, one group at a time)."""

    def __init__(self, quant_config: Any) -> None:
        super().__init__(quant_config)
        scheme = quant_config.scheme
        if scheme is None or scheme.weights is None:
            raise ConfigError("compressed-tensors: a layer needs exactly one scheme with weights")
        reason = quant_config.format_reason()
        if reason is not None:
            raise ConfigError(f"compressed-tensors: {reason}")
        self.format = quant_config.scheme_format(scheme)
        self.args = scheme.weights
        self.bits = self.args.num_bits
        self.strategy = self.args.effective_strategy
        self.actorder_group = self.args.actorder == "group"
        acts = scheme.input_activations
        self.static_input = acts is not None and acts.dynamic is False

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
        k, n = input_size_per_partition, sum(output_partition_sizes)
        groups = self._groups(k)
        rows = {"output_dim": 0}
        params: dict[str, torch.nn.Parameter] = {}
        if self.format == PACKED:
            pf = 32 // self.bits
            params["weight_packed"] = frozen_param(
                (n, -(-k // pf)), torch.int32, input_dim=1, packed_dim=1, pack_factor=pf, **rows
            )
            params["weight_shape"] = frozen_param((2,), torch.int64)
            if not self.args.symmetric:
                params["weight_zero_point"] = frozen_param(
                    (n // pf, groups), torch.int32, packed_dim=0, pack_factor=pf, **rows
                )
        else:
            dtype = torch.float8_e4m3fn if self.format == FLOAT else torch.int8
            params["weight"] = frozen_param((n, k), dtype, input_dim=1, **rows)
            if not self.args.symmetric:
                zp_shape = (1,) if self.strategy == "tensor" else (n, groups)
                zp_rows = {} if self.strategy == "tensor" else rows
                params["weight_zero_point"] = frozen_param(zp_shape, torch.int8, **zp_rows)
        if self.strategy == "tensor":
            params["weight_scale"] = frozen_param((1,), params_dtype)
        else:
            params["weight_scale"] = frozen_param((n, groups), params_dtype, **rows)
        if self.actorder_group:
            params["weight_g_idx"] = frozen_param((k,), torch.int32, input_dim=0)
        if self.static_input:
            params["input_scale"] = frozen_param((1,), params_dtype)  # kept, unused: weight-only
        for name, param in params.items():
            layer.register_parameter(name, param)
        layer.ct_groups = groups

    def _groups(self, k: int) -> int:
        if self.strategy == "group":
            return -(-k // self.args.group_size)
        return 1

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Check scales, ``weight_shape`` and ``weight_g_idx``; order columns by group.

        Raises:
            CheckpointError: non-finite scales, a ``weight_shape`` that disagrees with the
                head, or a ``weight_g_idx`` entry outside the groups.
        """
        restore_checkpoint_dtype(layer, "weight_scale")
        check_finite(layer, "weight_scale")
        k = layer.input_size_per_partition
        if self.format == PACKED:
            shape = layer.weight_shape.tolist()
            if shape != [layer.org_num_embeddings, k]:
                raise CheckpointError(
                    f"{layer.prefix}.weight_shape = {shape}; expected [{layer.org_num_embeddings}, "
                    f"{k}] (vocab rows, hidden size)",
                    tensor=f"{layer.prefix}.weight_shape",
                )
        if self.actorder_group:
            g_idx = layer.weight_g_idx
        else:
            size = self.args.group_size if self.strategy == "group" else k
            g_idx = torch.arange(k) // size
        prefix = layer.prefix
        order, bounds = group_order(
            g_idx, layer.ct_groups, f"{prefix}.weight_g_idx", f"{prefix}.weight_scale"
        )
        layer.ct_blocks = group_blocks(order, bounds)
        target = kernel_target(layer.weight_scale.device) if self.format != FLOAT else ""
        attached = bool(target) and self.attach_kernel(layer, g_idx, order, bounds, target)
        layer.ct_kernel = target if attached else ""

    def attach_kernel(
        self,
        layer: torch.nn.Module,
        g_idx: torch.Tensor,
        order: torch.Tensor,
        bounds: list[int],
        target: str,
    ) -> bool:
        """Hand an integer head to quantreg's CPU kernel (``target="cpu"``, see
        ``_cpu_kernels``) or to the Triton kernel (``"triton"``: the shared layout of
        ``_repack``, which awq_marlin / gptq_marlin build too)."""
        bits, k = self.bits, layer.input_size_per_partition
        n, offset = layer.output_size_per_partition, 1 << (self.bits - 1)
        sizes = {b - a for a, b in itertools.pairwise(bounds[:-1])} or {bounds[-1]}
        regular = len(sizes) == 1 and bounds[-1] - bounds[-2] <= min(sizes)
        if target == "cpu" and not regular:
            return False
        perm = order if self.actorder_group else None
        packed = self.format == PACKED

        def codes(c0: int, c1: int) -> torch.Tensor:  # [K, c1 - c0], checkpoint row order
            if packed:
                u = unpack_codes(layer.weight_packed[c0:c1], bits, dim=1, count=k)
            else:
                u = layer.weight[c0:c1].to(torch.int32) + offset
            return u.T

        def sorted_codes(c0: int, c1: int) -> torch.Tensor:  # rows in group order
            return codes(c0, c1) if perm is None else codes(c0, c1)[perm]

        scale = layer.weight_scale
        scales = scale.reshape(1, 1).expand(1, n) if self.strategy == "tensor" else scale.T
        if self.args.symmetric:
            zeros = torch.full(scales.shape, float(offset))
        elif packed:
            zeros = unpack_codes(layer.weight_zero_point, bits, dim=0, count=n).T.to(torch.float32)
        else:
            zp = layer.weight_zero_point.to(torch.float32) + offset
            zeros = zp.reshape(1, 1).expand(1, n) if self.strategy == "tensor" else zp.T
        if target == "triton":
            repack(layer, bits=bits, codes=codes, zeros=zeros, scales=scales, g_idx=g_idx, drop=())
        elif not attach(layer, bits=bits, k=k, n=n, codes=sorted_codes, scales=scales.contiguous(),
                        zeros=zeros.contiguous(), perm=perm, group=min(sizes)):  # fmt: skip
            return False
        for name in ("weight_packed", "weight", "weight_zero_point"):
            if hasattr(layer, name):
                delattr(layer, name)
        return True

    def dequantize_columns(
        self, layer: torch.nn.Module, cols: torch.Tensor, group: int
    ) -> torch.Tensor:
        """``W[:, cols].T`` (all in ``group``), rounded to the scale dtype: ``[cols, out]``."""
        scale = layer.weight_scale
        scale = scale[:, group : group + 1] if self.strategy != "tensor" else scale.reshape(1, 1)
        if self.format == PACKED:
            pf, offset = 32 // self.bits, 1 << (self.bits - 1)
            words = layer.weight_packed[:, cols // pf].to(torch.int64) & 0xFFFFFFFF
            q = ((words >> ((cols % pf) * self.bits)) & ((1 << self.bits) - 1)) - offset
        elif self.format == FLOAT:
            q = layer.weight[:, cols].to(torch.float32)
        else:
            q = layer.weight[:, cols].to(torch.int64)
        if not self.args.symmetric:
            q = q - self._zero_points(layer, group)
        return dequantize(q, 0, scale).T

    def _zero_points(self, layer: torch.nn.Module, group: int) -> torch.Tensor:
        zp = layer.weight_zero_point
        if self.format == PACKED:
            n = layer.weight_packed.shape[0]
            codes = unpack_codes(zp[:, group : group + 1], self.bits, dim=0, count=n)
            return (codes - (1 << (self.bits - 1))).to(torch.int64)
        if self.strategy == "tensor":
            return zp.reshape(1, 1).to(torch.int64)
        return zp[:, group : group + 1].to(torch.int64)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if layer.ct_kernel == "cpu":
            return apply_kernel(layer, x, bias)
        if layer.ct_kernel == "triton":
            from quantreg.methods._triton_kernels import apply_triton

            return apply_triton(layer, x, bias)
        return reference_matmul(
            x, bias, layer.ct_blocks, lambda cols, g: self.dequantize_columns(layer, cols, g)
        )


def kernel_target(device: torch.device) -> str:
    """Which kernel integer heads use on ``device``: "cpu", "triton" or "" (none)."""
    if device.type == "cpu":
        return "cpu"
    return "triton" if triton_on(device) else ""


def quantize_ct(
    weight: torch.Tensor,
    *,
    format: str = PACKED,
    bits: int | None = None,
    strategy: str | None = None,
    group_size: int = 128,
    sym: bool = True,
    actorder: str | None = None,
    perm: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
    **unused: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Round-to-nearest compressed-tensors tensors and ``quantization_config`` of a float
    ``[out, in]`` weight, following compressed-tensors' min-max rules.

    ``format``: pack-quantized (int4 / int8; group, channel or tensor), int-quantized (int8
    weights, config declares dynamic int8 per-token activations: W8A8), naive-quantized (int8
    weight-only) or float-quantized (fp8 e4m3 weights + dynamic fp8 activations: FP8_DYNAMIC).

    Raises:
        ConfigError: an unsupported combination or option.
    """
    if unused:
        raise ConfigError(f"{WRITER}: unsupported option(s) {', '.join(sorted(unused))}")
    n, k = weight.shape
    is_float = format == FLOAT
    bits = bits or (4 if format == PACKED else 8)
    strategy = strategy or ("group" if format == PACKED and group_size > 0 else "channel")
    if format not in (PACKED, INT, NAIVE, FLOAT):
        raise ConfigError(
            f"{WRITER}: format {format!r} is not supported; expected pack-quantized, "
            "int-quantized, naive-quantized or float-quantized"
        )
    if (format == PACKED and bits not in (4, 8)) or (format != PACKED and bits != 8):
        raise ConfigError(f"{WRITER}: {format} with {bits}-bit weights is not supported")
    if strategy not in ("group", "channel", "tensor") or (strategy == "group" and format != PACKED):
        raise ConfigError(f"{WRITER}: strategy {strategy!r} is not supported for {format}")
    if is_float and not sym:
        raise ConfigError(f"{WRITER}: fp8 weights are symmetric")
    if actorder not in (None, "group") or (actorder == "group" and strategy != "group"):
        raise ConfigError(f"{WRITER}: actorder must be None, or 'group' with strategy 'group'")
    size = group_size if strategy == "group" else k
    order = _column_order(weight, actorder, perm)
    w = weight.double()[:, order]
    if strategy == "tensor":
        grouped = w.reshape(1, 1, -1)
    else:
        pad = -k % size
        grouped = torch.nn.functional.pad(w, (0, pad)).reshape(n, -1, size)
    codes, scale, zero = _rtn(grouped, bits, sym, is_float, scale_dtype)
    codes = codes.reshape(n, -1)[:, :k] if strategy != "tensor" else codes.reshape(n, k)
    in_order = torch.empty_like(codes)
    in_order[:, order] = codes
    offset = 1 << (bits - 1)
    tensors: dict[str, torch.Tensor] = {}
    if format == PACKED:
        tensors["weight_packed"] = pack_codes((in_order + offset).to(torch.int32), bits, dim=1)
        tensors["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    elif is_float:
        tensors["weight"] = in_order.to(torch.float8_e4m3fn)
    else:
        tensors["weight"] = in_order.to(torch.int8)
    tensors["weight_scale"] = scale.reshape(1) if strategy == "tensor" else scale
    if not sym:
        zp = zero.reshape(1) if strategy == "tensor" else zero
        if format == PACKED:
            zp = pack_codes((zp + offset).to(torch.int32), bits, dim=0)
        tensors["weight_zero_point"] = zp.to(torch.int32) if format == PACKED else zp.to(torch.int8)
    if actorder == "group":
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // size).to(torch.int32)
        tensors["weight_g_idx"] = g_idx
    return tensors, _ct_config(format, bits, strategy, group_size, sym, actorder, is_float)


def _rtn(
    groups: torch.Tensor, bits: int, sym: bool, is_float: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compressed-tensors' min-max rule: codes (signed ints, or fp8 values), scale and zero
    point per group (``[N, G]``); the scale is rounded to ``scale_dtype`` first."""
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if is_float:
        scale = (torch.maximum(-lo, hi) / FP8_MAX).clamp(min=1e-12).to(scale_dtype).double()
        values = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX)
        return (
            values.to(torch.float8_e4m3fn).double(),
            scale.to(scale_dtype),
            torch.zeros_like(scale),
        )
    if sym:
        scale = (
            (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=1e-8).to(scale_dtype).double()
        )
        zero = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8).to(scale_dtype).double()
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    codes = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(qmin, qmax)
    return codes.to(torch.int64), scale.to(scale_dtype), zero.to(torch.int64)


def _column_order(
    weight: torch.Tensor, actorder: str | None, perm: torch.Tensor | None
) -> torch.Tensor:
    k = weight.shape[1]
    if actorder is None:
        if perm is not None:
            raise ConfigError(f"{WRITER}: perm needs actorder='group'")
        return torch.arange(k)
    if perm is None:
        return torch.argsort(weight.double().norm(dim=0), descending=True, stable=True)
    perm = torch.as_tensor(perm, dtype=torch.int64)
    if perm.shape != (k,) or not torch.equal(perm.sort().values, torch.arange(k)):
        raise ConfigError(f"{WRITER}: perm must be a permutation of range({k})")
    return perm


def _ct_config(
    format: str,
    bits: int,
    strategy: str,
    group_size: int,
    sym: bool,
    actorder: str | None,
    is_float: bool,
) -> dict[str, Any]:
    weights = {
        "num_bits": bits, "type": "float" if is_float else "int", "symmetric": sym,
        "strategy": strategy, "group_size": group_size if strategy == "group" else None,
        "dynamic": False, "actorder": actorder, "observer": "minmax",
    }  # fmt: skip
    acts = None
    if format in (INT, FLOAT):
        acts = {"num_bits": 8, "type": "float" if is_float else "int", "symmetric": True,
                "strategy": "token", "dynamic": True, "group_size": None}  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["lm_head"],
                "format": format,
                "weights": weights,
                "input_activations": acts,
                "output_activations": None,
            }
        },
        "ignore": [],
    }

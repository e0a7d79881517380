"""compressed-tensors' on-disk tensors, one scheme per format: created, decoded and written
(functions of a ``WeightScheme``: the config and LinearMethod live in ``compressed_tensors``).

``W[o, i] = (q[o, i] - zp[o, g(i)]) * scale[o, g(i)]``, rounded to the scale dtype (as
compressed-tensors computes it in that dtype); ``g(i)`` is ``i // group_size`` (group),
0 (channel), the whole tensor (tensor), or ``weight_g_idx[i]`` (actorder ``group``).

* ``pack-quantized``: signed codes stored offset-binary (``q + 2**(bits-1)``) in int32
  ``weight_packed [out, ceil(in*bits/32)]`` along the input dim; asymmetric zero points packed
  the same way along dim 0; ``weight_shape`` = ``[out, in]``.
* ``int-quantized`` / ``naive-quantized``: int8 ``weight [out, in]``.
* ``float-quantized`` (and ``naive-quantized`` with float weights, which compressed-tensors
  writes for FP8 without input activations): float8_e4m3fn ``weight [out, in]``.

The vocab is on dim 0 of every tensor. The head runs weight-only: activations stay float.
Integer formats decode to ``quantreg.IntWeights`` and run whichever kernel selection picks
(quantreg's CPU kernel, torch's ops, Triton, or the exact reference); float8 runs the exact
reference kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from quantreg import (
    CheckpointError,
    InputError,
    IntWeights,
    WriterOption,
    frozen_param,
    layer_geometry,
    pack_codes,
    unpack_codes,
)
from quantreg.kernels import Float8Layout
from quantreg.methods import _ct_nvfp4 as nvfp4
from quantreg.methods._checks import check_finite, check_float8_codes, check_positive, check_scales
from quantreg.methods._fp8_blocks import block_scale, decode_blocks, quantize_blocks
from quantreg.methods._rtn import ACTORDER_NOTE, column_order, grouped, writer_defaults

PACKED, INT, NAIVE, FLOAT = "pack-quantized", "int-quantized", "naive-quantized", "float-quantized"
NVFP4 = "nvfp4-pack-quantized"
FP8_MAX = 448.0  # largest float8_e4m3fn value
WRITER = "compressed-tensors writer"
# The weight widths the writer takes per format (the first one is the default).
WRITER_BITS = {PACKED: (4, 8), INT: (8,), NAIVE: (8,), FLOAT: (8,), NVFP4: (4,)}


@dataclass(frozen=True)
class WeightScheme:
    """What one compressed-tensors layer's tensors hold (from its config group).

    Attributes:
        format: the on-disk format (``pack-quantized``, ``int-quantized``, ...).
        bits: the weight code width.
        strategy: ``group``, ``channel`` or ``tensor``.
        group_size: the group size of strategy ``group`` (else None).
        symmetric: no zero point tensor when true.
        actorder_group: a ``weight_g_idx`` names every column's group (actorder ``group``).
        static_input: the checkpoint stores an ``input_scale`` (kept, unused: weight-only).
        block: ``[rows, cols]`` of strategy ``block`` (float8 only; see ``_fp8_blocks``).
    """

    format: str
    bits: int
    strategy: str
    group_size: int | None
    symmetric: bool
    actorder_group: bool
    static_input: bool
    block: tuple[int, int] | None = None

    def groups(self, k: int) -> int:
        """The number of scale groups along ``k`` input columns."""
        if self.strategy == "group":
            assert self.group_size is not None
            return -(-k // self.group_size)
        return 1


def create_weights(
    layer: torch.nn.Module, scheme: WeightScheme, k: int, n: int, params_dtype: torch.dtype
) -> None:
    """Register this rank's tensors of ``scheme`` on ``layer``: ``k`` inputs, ``n`` outputs
    (the vocab on dim 0 of every tensor)."""
    if scheme.format == NVFP4:
        return nvfp4.create_weights(layer, k, n)
    groups = scheme.groups(k)
    rows = {"output_dim": 0}
    params: dict[str, torch.nn.Parameter] = {}
    if scheme.format == PACKED:
        pf = 32 // scheme.bits
        params["weight_packed"] = frozen_param(
            (n, -(-k // pf)), torch.int32, input_dim=1, packed_dim=1, pack_factor=pf, **rows
        )
        params["weight_shape"] = frozen_param((2,), torch.int64)
        if not scheme.symmetric:
            params["weight_zero_point"] = frozen_param(
                (n // pf, groups), torch.int32, packed_dim=0, pack_factor=pf, **rows
            )
    else:
        dtype = torch.float8_e4m3fn if scheme.format == FLOAT else torch.int8
        params["weight"] = frozen_param((n, k), dtype, input_dim=1, **rows)
        if not scheme.symmetric:
            zp_shape = (1,) if scheme.strategy == "tensor" else (n, groups)
            zp_rows = {} if scheme.strategy == "tensor" else rows
            params["weight_zero_point"] = frozen_param(zp_shape, torch.int8, **zp_rows)
    scale = {"keep_checkpoint_dtype": True}
    if scheme.block is not None:
        params["weight_scale"] = block_scale(layer, scheme.block, k, params_dtype)
    elif scheme.strategy == "tensor":
        params["weight_scale"] = frozen_param((1,), params_dtype, **scale)
    else:
        params["weight_scale"] = frozen_param((n, groups), params_dtype, **rows, **scale)
    if scheme.actorder_group:
        params["weight_g_idx"] = frozen_param((k,), torch.int32, input_dim=0)
    if scheme.static_input:
        params["input_scale"] = frozen_param((1,), params_dtype)  # kept, unused: weight-only
    for name, param in params.items():
        layer.register_parameter(name, param)


def decode(layer: torch.nn.Module, scheme: WeightScheme) -> IntWeights | Float8Layout:
    """The loaded tensors as ``IntWeights`` (float8: a ``Float8Layout``).

    Raises:
        CheckpointError: non-finite or overflowing scales, float8 NaN codes, a
            ``weight_shape`` that disagrees with the head, or a ``weight_g_idx`` entry outside
            the groups (see ``_checks``).
    """
    if scheme.format == NVFP4:
        return nvfp4.decode(layer)
    geometry = layer_geometry(layer)
    k, prefix = geometry.input_size, geometry.prefix
    if scheme.format == PACKED:
        shape = layer.weight_shape.tolist()
        if shape != [geometry.output_size, k]:
            raise CheckpointError(
                f"{prefix}.weight_shape = {shape}; expected [{geometry.output_size}, {k}] "
                "(vocab rows, hidden size)",
                tensor=f"{prefix}.weight_shape",
            )
    g_idx = layer.weight_g_idx.data if scheme.actorder_group else None
    if g_idx is None and scheme.strategy == "group":
        assert scheme.group_size is not None
        g_idx = torch.arange(k) // scheme.group_size
    names = (f"{prefix}.weight_g_idx", f"{prefix}.weight_scale")
    n = geometry.output_size_per_partition
    scale = layer.weight_scale.data
    scales = scale.reshape(1, 1).expand(1, n) if scheme.strategy == "tensor" else scale.T
    if scheme.block is not None:
        return decode_blocks(layer, scheme.block, "weight", "weight_scale")
    if scheme.static_input:  # checked, never applied: the head runs weight-only
        check_finite(layer, "input_scale")
        check_positive(layer, "input_scale", layer.input_scale.data.reshape(-1))
    if scheme.format == FLOAT:
        zeros = None if scheme.symmetric else _per_group(scheme, layer.weight_zero_point, n).float()
        check_scales(layer, "weight_scale", scales, zeros, (-FP8_MAX, FP8_MAX))
        check_float8_codes(layer, "weight")
        return Float8Layout.build(layer.weight.data, scales, zeros, g_idx, names)
    packed = layer.weight_packed.data.T if scheme.format == PACKED else None
    zeros = _zeros(layer, scheme, n, scales.shape)
    check_scales(layer, "weight_scale", scales, zeros, (0, (1 << scheme.bits) - 1))
    return IntWeights.create(
        bits=scheme.bits, k=k, codes=_codes(layer, scheme, k), scales=scales,
        zeros=zeros, g_idx=g_idx, names=names, k_packed=packed,
    )  # fmt: skip


def _codes(
    layer: torch.nn.Module, scheme: WeightScheme, k: int
) -> Callable[[int, int], torch.Tensor]:
    """Unsigned (offset-binary) codes ``[K, c1 - c0]`` of output columns ``c0:c1``."""
    bits, offset = scheme.bits, 1 << (scheme.bits - 1)
    if scheme.format == PACKED:
        packed = layer.weight_packed
        return lambda c0, c1: unpack_codes(packed[c0:c1], bits, dim=1, count=k).T
    weight = layer.weight
    return lambda c0, c1: (weight[c0:c1].to(torch.int32) + offset).T


def _zeros(layer: torch.nn.Module, scheme: WeightScheme, n: int, shape: torch.Size) -> torch.Tensor:
    """Unsigned zero points ``[G, N]`` (symmetric: the code offset)."""
    offset = 1 << (scheme.bits - 1)
    if scheme.symmetric:
        return torch.full(tuple(shape), offset, dtype=torch.int32)
    zp = layer.weight_zero_point
    if scheme.format == PACKED:
        return unpack_codes(zp, scheme.bits, dim=0, count=n).T
    return _per_group(scheme, zp, n).to(torch.int32) + offset


def _per_group(scheme: WeightScheme, zp: torch.Tensor, n: int) -> torch.Tensor:
    """Stored (signed) zero points as ``[G, N]``."""
    return zp.reshape(1, 1).expand(1, n) if scheme.strategy == "tensor" else zp.T


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
    block_structure: tuple[int, int] | list[int] | None = None,
    **unused: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Round-to-nearest compressed-tensors tensors and ``quantization_config`` of a float
    ``[out, in]`` weight, following compressed-tensors' min-max rules.

    ``format``: pack-quantized (int4 / int8; group, channel or tensor), int-quantized (int8
    weights, config declares dynamic int8 per-token activations: W8A8), naive-quantized (int8
    weight-only) or float-quantized (fp8 e4m3 weights + dynamic fp8 activations: FP8_DYNAMIC;
    ``block_structure [rows, cols]``: strategy ``block``); nvfp4-pack-quantized: ``_ct_nvfp4``.

    Raises:
        InputError: an unsupported combination or option.
    """
    strategy, block = _block_option(strategy, block_structure)
    bits, strategy = _writer_options(
        format, bits, strategy, group_size, sym, actorder, unused, k=weight.shape[1]
    )
    if block is not None:  # float8 only (checked above)
        config = _ct_config(format, bits, strategy, group_size, sym, actorder, True, block)
        return quantize_blocks(weight, block, scale_dtype), config
    n, k = weight.shape
    is_float = format == FLOAT
    size = group_size if strategy == "group" else k
    order = column_order(weight, actorder, perm, WRITER)
    w = weight.double()[:, order]
    blocks = w.reshape(1, 1, -1) if strategy == "tensor" else grouped(w, size)
    codes, scale, zero = _rtn(blocks, bits, sym, is_float, scale_dtype)
    codes = codes.reshape(n, -1)[:, :k] if strategy != "tensor" else codes.reshape(n, k)
    in_order = torch.empty_like(codes)
    in_order[:, order] = codes
    offset = 1 << (bits - 1)
    tensors: dict[str, torch.Tensor] = {}
    if format == PACKED:
        tensors["weight_packed"] = pack_codes((in_order + offset).to(torch.int32), bits, dim=1)
        tensors["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    else:
        tensors["weight"] = in_order.to(torch.float8_e4m3fn if is_float else torch.int8)
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


def _block_option(
    strategy: str | None, block: tuple[int, int] | list[int] | None
) -> tuple[str | None, tuple[int, int] | None]:
    """Strategy ``block`` and its ``[rows, cols]`` (default 128 x 128) when either is given."""
    if block is None and strategy != "block":
        return strategy, None
    if strategy not in (None, "block"):
        raise InputError(f"{WRITER}: block_size needs strategy 'block'", field="strategy")
    return "block", tuple(block or (128, 128))  # type: ignore[return-value]


def _writer_options(
    format: str,
    bits: int | None,
    strategy: str | None,
    group_size: int,
    sym: bool,
    actorder: str | None,
    unused: dict[str, Any],
    *,
    k: int,
) -> tuple[int, str]:
    """The writer's bits and strategy (defaults filled in), after checking every option
    (``k``: the input size, which a group size must divide).

    Raises:
        InputError: an unsupported combination or option.
    """
    if unused:
        raise InputError(
            f"{WRITER}: unsupported option(s) {', '.join(sorted(unused))}", field=sorted(unused)[0]
        )
    if format not in WRITER_BITS:
        raise InputError(
            f"{WRITER}: format {format!r} is not supported; expected "
            f"{', '.join([*WRITER_BITS][:-1])} or {[*WRITER_BITS][-1]}",
            field="format",
        )
    bits = bits or WRITER_BITS[format][0]
    strategy = strategy or ("group" if format == PACKED and group_size > 0 else "channel")
    if bits not in WRITER_BITS[format]:
        raise InputError(
            f"{WRITER}: {format} with {bits}-bit weights is not supported", field="bits"
        )
    formats = {"group": (PACKED,), "block": (FLOAT,)}.get(strategy, tuple(WRITER_BITS))
    if strategy not in ("group", "channel", "tensor", "block") or format not in formats:
        raise InputError(
            f"{WRITER}: strategy {strategy!r} is not supported for {format}", field="strategy"
        )
    if strategy == "group" and (
        not isinstance(group_size, int) or group_size < 1 or k % group_size
    ):
        raise InputError(
            f"{WRITER}: strategy 'group' needs a positive group_size dividing the input size "
            f"{k} (compressed-tensors quantizes whole groups only), got {group_size!r}",
            field="group_size",
        )
    if format == FLOAT and not sym:
        raise InputError(f"{WRITER}: fp8 weights are symmetric", field="sym")
    if actorder not in (None, "group") or (actorder == "group" and strategy != "group"):
        raise InputError(
            f"{WRITER}: actorder must be None, or 'group' with strategy 'group'; got "
            f"{actorder!r} ({ACTORDER_NOTE})",
            field="actorder",
        )
    return bits, strategy


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


def _ct_config(
    format: str,
    bits: int,
    strategy: str,
    group_size: int,
    sym: bool,
    actorder: str | None,
    is_float: bool,
    block: tuple[int, int] | None = None,
) -> dict[str, Any]:
    weights = {
        "num_bits": bits, "type": "float" if is_float else "int", "symmetric": sym,
        "strategy": strategy, "group_size": group_size if strategy == "group" else None,
        "dynamic": False, "actorder": actorder, "observer": "minmax",
    }  # fmt: skip
    if block is not None:
        weights["block_structure"] = [*block]
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


def writer_options() -> tuple[WriterOption, ...]:
    """The options of ``quantize_ct`` under the names llm-compressor's users know."""
    default = writer_defaults(quantize_ct)
    widths = "; ".join(f"{f} {' or '.join(map(str, b))}" for f, b in WRITER_BITS.items())
    every_width = tuple(sorted({b for w in WRITER_BITS.values() for b in w}))
    return (
        WriterOption("format", "format", default["format"], tuple(WRITER_BITS)),
        WriterOption("bits", "bits", None, every_width,
                     note=f"per format, the first is the default: {widths}"),
        WriterOption("group_size", "group_size", default["group_size"],
                     note=f"{PACKED} only; -1 or any other format: one scale per output channel; "
                     f"{NVFP4}: always 16"),
        WriterOption("sym", "sym", default["sym"],
                     note=f"--no-sym: a zero point per group; {FLOAT} is symmetric only"),
        WriterOption("actorder", "actorder", None, ("group",),
                     note=f"{PACKED} with a group size; {ACTORDER_NOTE}"),
        WriterOption("strategy", "strategy", None, ("group", "channel", "tensor", "block"),
                     note=f"default: group for {PACKED} with a group size, else channel; "
                     f"block: {FLOAT} only (--block-size, default 128x128); tensor: one "
                     "scale for the whole head"),
        WriterOption("block_size", "block_structure", None,
                     note=f"{FLOAT} only: strategy 'block', one scale per [rows, cols] block "
                     "(DeepSeek-V3 style: 128x128)"),
    )  # fmt: skip

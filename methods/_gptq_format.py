"""GPTQ's on-disk tensors (AutoGPTQ, GPTQModel, optimum): created, decoded, and written
(functions of plain values: the config classes and LinearMethods live in ``gptq``).

Tensors: ``qweight`` int32 ``[in/pf, out]`` packed along the input dim, ``qzeros`` int32
``[groups, out/pf]`` packed along the output dim (checkpoint_format ``gptq`` stores
``zero - 1``), ``scales`` ``[groups, out]``, ``g_idx`` int32 ``[in]`` (replicated).
``W[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]``, rounded to the scale dtype. With
act-order (``desc_act``) a group's rows are scattered: the kernels sort them by group at load
time and permute ``x`` the same way at run time.
"""

from __future__ import annotations

import torch

from quantreg import (
    CheckpointError,
    ConfigError,
    InputError,
    IntWeights,
    frozen_param,
    layer_geometry,
    pack_codes,
    unpack_codes,
)
from quantreg.methods._checks import check_scales, check_symmetric_zeros
from quantreg.methods._rtn import grouped, rtn_asymmetric, rtn_symmetric

TENSORS = frozenset({"qweight", "qzeros", "scales", "g_idx"})


def create_weights(
    layer: torch.nn.Module,
    k: int,
    n: int,
    bits: int,
    group_size: int,
    params_dtype: torch.dtype,
    *,
    g_idx: bool = True,
) -> None:
    """Register this rank's GPTQ tensors on ``layer``: ``k`` inputs, ``n`` outputs; without
    ``g_idx`` when the producer writes none (its groups are then ``row // group_size``).

    Raises:
        ConfigError: sizes that do not pack into whole words.
    """
    pf = 32 // bits
    groups = -(-k // group_size) if group_size > 0 else 1
    if k % pf or n % pf:
        raise ConfigError(
            f"GPTQ {bits}-bit packs {pf} codes per word; in={k} and out={n} must be multiples of it"
        )
    packed_out = {"output_dim": 1, "packed_dim": 1, "pack_factor": pf}
    params = {
        "qweight": frozen_param(
            (k // pf, n), torch.int32, output_dim=1, input_dim=0, packed_dim=0, pack_factor=pf
        ),
        "qzeros": frozen_param((groups, n // pf), torch.int32, **packed_out),
        "scales": frozen_param((groups, n), params_dtype, output_dim=1, keep_checkpoint_dtype=True),
    }
    if g_idx:
        params["g_idx"] = frozen_param((k,), torch.int32, input_dim=0)
    for name, param in params.items():
        layer.register_parameter(name, param)


def decode(
    layer: torch.nn.Module,
    bits: int,
    zero_point_offset: int,
    *,
    sym: bool = False,
    desc_act: bool = True,
    group_size: int = -1,
    signed_scales: bool = False,
) -> IntWeights:
    """The loaded GPTQ codes and true zero points (``zero_point_offset``, v1's ``1``, undone),
    rows grouped by ``g_idx`` (a layer without one: ``row // group_size``), after checking the
    values (see ``_checks``).

    With ``sym`` every zero point should be ``2**(bits-1)``: others are used as stored, with
    a WARNING. Without ``desc_act``, ``g_idx`` must be ``row // group_size``: vLLM then ignores
    ``g_idx`` while GPTQModel follows it, so a checkpoint whose ``g_idx`` says otherwise has no
    one meaning and is refused.

    Raises:
        CheckpointError: non-finite or overflowing scales, a ``g_idx`` entry outside the
            groups, or a ``g_idx`` that contradicts ``desc_act: false``.
    """
    mask = (1 << bits) - 1
    g_idx = getattr(layer, "g_idx", None)
    qweight = layer.qweight
    k = g_idx.shape[0] if g_idx is not None else qweight.shape[0] * (32 // bits)
    zeros = unpack_codes(layer.qzeros, bits, dim=1).add_(zero_point_offset).bitwise_and_(mask)
    zeros = zeros[:, : layer.scales.shape[1]].to(torch.uint8)  # a byte each: bits <= 8
    check_scales(layer, "scales", layer.scales.data, zeros, (0, mask), signed=signed_scales)
    if sym:
        check_symmetric_zeros(layer, "qzeros", zeros, 1 << (bits - 1), "sym: true")
    prefix = layer_geometry(layer).prefix
    weights = IntWeights.create(
        bits=bits,
        k=k,
        codes=lambda c0, c1: unpack_codes(qweight[:, c0:c1], bits, dim=0, count=k),
        scales=layer.scales.data,
        zeros=zeros,
        g_idx=g_idx.data if g_idx is not None else _plain_groups(k, group_size, qweight.device),
        names=(f"{prefix}.g_idx", f"{prefix}.scales"),
        k_packed=qweight.data,
    )
    if not desc_act and g_idx is not None:
        _check_plain_groups(g_idx.data, group_size if group_size > 0 else k, prefix)
    return weights


def _plain_groups(k: int, group_size: int, device: torch.device) -> torch.Tensor:
    """``row // group_size`` for every row (one group when ``group_size`` is -1)."""
    size = group_size if group_size > 0 else k
    return torch.arange(k, dtype=torch.int32, device=device) // size


def _check_plain_groups(g_idx: torch.Tensor, group_size: int, prefix: str) -> None:
    """Refuse a ``g_idx`` other than ``row // group_size`` under ``desc_act: false``.

    Raises:
        CheckpointError: naming ``g_idx``, the rows that differ and the first one.
    """
    expected = torch.arange(g_idx.shape[0], device=g_idx.device) // group_size
    differ = (g_idx.to(torch.int64) != expected).nonzero().flatten()
    if differ.numel():
        i = int(differ[0])
        raise CheckpointError(
            f"{prefix}.g_idx: {differ.numel()} of {g_idx.shape[0]} rows name another group than "
            f"row // group_size ({group_size}), the first g_idx[{i}] = {int(g_idx[i])} (expected "
            f"{int(expected[i])}), but desc_act is false: vLLM ignores g_idx then while "
            "GPTQModel follows it. Set desc_act: true if the groups are act-order, or write "
            "g_idx as row // group_size",
            tensor=f"{prefix}.g_idx",
        )


def quantize(
    weight: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    zero_point_offset: int,
    perm: torch.Tensor | None,
    scale_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Round-to-nearest GPTQ tensors of a float ``[out, in]`` weight (see
    ``GPTQConfig.quantize_weight``); ``zero_point_offset`` is subtracted from stored zeros.

    Raises:
        ConfigError: sizes that do not pack.
        InputError: a bad ``perm``.
    """
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
    stored_zeros = (zeros - zero_point_offset) & mask
    return {
        "qweight": pack_codes(in_order.T, bits, dim=0),
        "qzeros": pack_codes(stored_zeros.T, bits, dim=1),
        "scales": scales.T.contiguous(),
        "g_idx": g_idx,
    }


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
        raise InputError(
            "gptq writer: perm orders act-order groups; pass desc_act=True with it", field="perm"
        )
    perm = torch.as_tensor(perm, dtype=torch.int64)
    if perm.shape != (k,) or not torch.equal(perm.sort().values, torch.arange(k)):
        raise InputError(f"gptq writer: perm must be a permutation of range({k})", field="perm")
    return perm

"""GPTQ's on-disk tensors (AutoGPTQ, GPTQModel, optimum): created, decoded, and written.

Tensors: ``qweight`` int32 ``[in/pf, out]`` packed along the input dim, ``qzeros`` int32
``[groups, out/pf]`` packed along the output dim (checkpoint_format ``gptq`` stores
``zero - 1``), ``scales`` ``[groups, out]``, ``g_idx`` int32 ``[in]`` (replicated).
``W[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]``, rounded to the scale dtype. With
act-order (``desc_act``) a group's rows are scattered: the kernels sort them by group at load
time and permute ``x`` the same way at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from quantreg import (
    ConfigError,
    InputError,
    IntWeights,
    frozen_param,
    layer_geometry,
    pack_codes,
    unpack_codes,
)
from quantreg.methods._checks import check_finite
from quantreg.methods._decoded import DecodedLinearMethod
from quantreg.methods._rtn import grouped, rtn_asymmetric, rtn_symmetric

if TYPE_CHECKING:
    from quantreg.methods.gptq import GPTQConfig

TENSORS = frozenset({"qweight", "qzeros", "scales", "g_idx"})


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
            "scales": frozen_param(
                (groups, n), params_dtype, output_dim=1, keep_checkpoint_dtype=True
            ),
            "g_idx": frozen_param((k,), torch.int32, input_dim=0),
        }
        for name, param in params.items():
            layer.register_parameter(name, param)

    def decode(self, layer: torch.nn.Module) -> IntWeights:
        """The GPTQ codes and true zero points (v1's ``- 1`` undone), rows grouped by
        ``g_idx``.

        Raises:
            CheckpointError: non-finite scales, or a ``g_idx`` entry outside the groups.
        """
        check_finite(layer, "scales")
        cfg = self.quant_config
        mask = (1 << cfg.bits) - 1
        qweight, k = layer.qweight, layer.g_idx.shape[0]
        zeros = (unpack_codes(layer.qzeros, cfg.bits, dim=1) + cfg.zero_point_offset) & mask
        prefix = layer_geometry(layer).prefix
        return IntWeights.create(
            bits=cfg.bits,
            k=k,
            codes=lambda c0, c1: unpack_codes(qweight[:, c0:c1], cfg.bits, dim=0, count=k),
            scales=layer.scales.data,
            zeros=zeros[:, : layer.scales.shape[1]],
            g_idx=layer.g_idx.data,
            names=(f"{prefix}.g_idx", f"{prefix}.scales"),
        )


class GPTQMarlinLinearMethod(GPTQLinearMethod):
    """GPTQ tensors run by the Triton kernel on CUDA >= 8.0, the exact kernel elsewhere;
    act-order through the load-time row permutation."""

    kernels = ("triton", "reference")


def quantize_gptq(
    config: GPTQConfig,
    weight: torch.Tensor,
    *,
    perm: torch.Tensor | None,
    scale_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Round-to-nearest GPTQ tensors of a float ``[out, in]`` weight (see
    ``GPTQConfig.quantize_weight``).

    Raises:
        ConfigError: sizes that do not pack.
        InputError: a bad ``perm``.
    """
    bits, group_size = config.bits, config.group_size
    n, k = weight.shape
    pf, mask = 32 // bits, (1 << bits) - 1
    if k % pf or n % pf:
        raise ConfigError(
            f"GPTQ {bits}-bit needs in and out to be multiples of {pf}; got out={n}, in={k}"
        )
    order = _processing_order(weight, config.desc_act, perm)
    size = group_size if group_size > 0 else k
    if config.sym:
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

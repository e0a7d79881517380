"""ParallelLMHead: a vocab-parallel lm_head whose weights come from a quantization method.

vLLM-shaped: the vocab is padded (to ``padding_size`` and to a multiple of the TP size),
each rank holds one equal slice of the padded vocab, and ``compute_logits`` all-gathers the
slices and trims the padding so every rank gets the full ``[tokens, num_embeddings]``.
The vocab may sit on any dim of a parameter (AWQ and GPTQ keep it on dim 1): the loader
narrows along each parameter's declared ``output_dim``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from quantreg.base import LinearMethod, QuantConfig
from quantreg.distributed import TPGroup
from quantreg.errors import CheckpointError, ConfigError
from quantreg.linear import UnquantizedLinearMethod, new_param, weight_attrs

if TYPE_CHECKING:
    from quantreg.resolution import Resolution

logger = logging.getLogger(__name__)

DEFAULT_PADDING = 64


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class ParallelLMHead(torch.nn.Module):
    """A vocab-parallel lm_head (``num_embeddings`` rows of ``embedding_dim``).

    Its LinearMethod comes from ``quant_config.get_linear_method(self, prefix)``; None (or no
    config) keeps it unquantized, and ``quant_reason`` says why.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        org_num_embeddings: int | None = None,
        padding_size: int = DEFAULT_PADDING,
        quant_config: QuantConfig | None = None,
        prefix: str = "lm_head",
        tp: Any = None,
    ) -> None:
        super().__init__()
        sizes = {"num_embeddings": num_embeddings, "embedding_dim": embedding_dim}
        for name, value in {**sizes, "padding_size": padding_size}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"ParallelLMHead {name} must be a positive integer, got {value!r}"
                )
        org = num_embeddings if org_num_embeddings is None else org_num_embeddings
        if not 1 <= org <= num_embeddings:
            raise ConfigError(
                f"org_num_embeddings={org} must be between 1 and num_embeddings={num_embeddings}"
            )
        self.tp = TPGroup.resolve(tp)
        self.num_embeddings = num_embeddings
        self.org_num_embeddings = org
        self.embedding_dim = embedding_dim
        self.padding_size = padding_size
        self.prefix = prefix
        self.params_dtype = params_dtype or torch.get_default_dtype()
        # Every rank's slice is a multiple of padding_size, so packed words never straddle ranks.
        self.num_embeddings_padded = round_up(num_embeddings, padding_size * self.tp.size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp.size
        self.shard_start = self.tp.rank * self.num_embeddings_per_partition
        self.shard_end = self.shard_start + self.num_embeddings_per_partition
        self.input_size = embedding_dim
        self.output_size = self.num_embeddings_padded
        self.input_size_per_partition = embedding_dim
        self.output_size_per_partition = self.num_embeddings_per_partition
        self.output_partition_sizes = [self.num_embeddings_per_partition]
        self.quant_config = quant_config
        self.resolution: Resolution | None = None
        self.target_vocab_size = num_embeddings
        self.register_buffer("draft_to_target", None)

        method = quant_config.get_linear_method(self, prefix) if quant_config is not None else None
        if method is None:
            self.quant_reason = (
                "no quant_config" if quant_config is None
                else f"{type(quant_config).__name__}: {quant_config.rule_for(prefix).rule}"
            )  # fmt: skip
            method = UnquantizedLinearMethod()
        else:
            self.quant_reason = quant_config.rule_for(prefix).rule
        self.quant_method: LinearMethod = method
        method.create_weights(
            self,
            self.input_size_per_partition,
            self.output_partition_sizes,
            self.input_size,
            self.output_size,
            self.params_dtype,
        )
        self.has_bias = bias
        if bias:
            self.register_parameter(
                "bias",
                new_param((self.num_embeddings_per_partition,), self.params_dtype, output_dim=0),
            )
        else:
            self.register_parameter("bias", None)

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def quantized(self) -> bool:
        """Whether the head runs a quantized LinearMethod."""
        return not isinstance(self.quant_method, UnquantizedLinearMethod)

    # -- loading ------------------------------------------------------------------------

    def checkpoint_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """The full (all ranks, unpadded) shape the checkpoint must hold for ``param``."""
        attrs = weight_attrs(param)
        shape = list(param.shape)
        dim = attrs["output_dim"]
        if dim is not None:
            rows = self.org_num_embeddings
            shape[dim] = (
                math.ceil(rows / attrs["pack_factor"]) if attrs["packed_dim"] == dim else rows
            )
        return tuple(shape)

    def checkpoint_region(self, param: torch.Tensor) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` of this rank's slice in the checkpoint; None = all of it."""
        attrs = weight_attrs(param)
        dim = attrs["output_dim"]
        if dim is None:
            return None
        start, stop = self.shard_start, min(self.shard_end, self.org_num_embeddings)
        stop = max(start, stop)
        if attrs["packed_dim"] == dim:
            pf = attrs["pack_factor"]
            start, stop = start // pf, math.ceil(stop / pf)
        return dim, start, stop

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        """Copy this rank's ``loaded`` region into ``param``; the vocab padding stays zero.

        Raises:
            CheckpointError: the region does not fit the parameter.
        """
        region = self.checkpoint_region(param)
        target = param.data
        if region is not None:
            dim, start, stop = region
            target = target.narrow(dim, 0, stop - start)
        if tuple(loaded.shape) != tuple(target.shape):
            raise CheckpointError(
                f"cannot load a {tuple(loaded.shape)} slice into a {tuple(target.shape)} region "
                f"of {self.prefix} parameter {tuple(param.shape)}",
            )
        param.data.zero_()
        target.copy_(loaded)

    def resident_bytes(self) -> int:
        """Bytes this rank holds for the head: every parameter and buffer."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- running ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's logits: ``[tokens, num_embeddings_per_partition]`` (padding included)."""
        return self.quant_method.apply(self, x, self.bias)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full, unpadded logits ``[tokens, num_embeddings]`` on every rank (all-gathered)."""
        if x.shape[-1] != self.embedding_dim:
            raise ConfigError(
                f"hidden states have {x.shape[-1]} features; {self.prefix} expects "
                f"embedding_dim={self.embedding_dim}"
            )
        logits = self.tp.all_gather_last_dim(self.forward(x))
        return logits[..., : self.num_embeddings]

    def set_vocab_map(self, draft_to_target: torch.Tensor, target_vocab_size: int) -> None:
        """Attach an Eagle3 drafter's map from its vocab to the target's (``id + d2t[id]``)."""
        if draft_to_target.shape != (self.num_embeddings,):
            raise ConfigError(
                f"vocab map has shape {list(draft_to_target.shape)}; expected "
                f"[{self.num_embeddings}] (one target id per draft id)"
            )
        self.draft_to_target = draft_to_target.to(torch.int64)
        self.target_vocab_size = target_vocab_size

    def to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Scatter draft-vocab logits into the target vocab: ``[tokens, target_vocab]``,
        -inf everywhere except at the mapped ids.

        Raises:
            ConfigError: logits of the wrong width, or a smaller draft vocab with no map.
        """
        if logits.shape[-1] != self.num_embeddings:
            raise ConfigError(
                f"logits have {logits.shape[-1]} columns; expected num_embeddings="
                f"{self.num_embeddings} (the output of compute_logits)"
            )
        if self.draft_to_target is None:
            if self.target_vocab_size == self.num_embeddings:
                return logits
            raise ConfigError(
                f"{self.prefix} has no d2t map to scatter {self.num_embeddings} draft ids into "
                f"the {self.target_vocab_size}-token target vocab"
            )
        out = logits.new_full((*logits.shape[:-1], self.target_vocab_size), float("-inf"))
        out[..., self.draft_to_target.to(logits.device)] = logits
        return out

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"padded={self.num_embeddings_padded}, tp={self.tp_rank}/{self.tp_size}, "
            f"method={type(self.quant_method).__name__}"
        )

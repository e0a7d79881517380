"""ParallelLMHead: a vocab-parallel lm_head whose weights come from a quantization method.

vLLM-shaped: the vocab is padded (to ``padding_size`` and to a multiple of the TP size),
each rank holds one equal slice of the padded vocab, and ``compute_logits`` all-gathers the
slices and trims the padding so every rank gets the full ``[tokens, num_embeddings]``.
The vocab may sit on any dim of a parameter (AWQ and GPTQ keep it on dim 1): the loader
narrows along each parameter's declared ``output_dim``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from quantreg.contract import LinearMethod, QuantConfig
from quantreg.dense import UnquantizedLinearMethod
from quantreg.distributed import TPGroup
from quantreg.errors import InputError
from quantreg.parameters import LayerGeometry, frozen_param

if TYPE_CHECKING:
    from quantreg.kernels.selection import Kernel
    from quantreg.resolution import Resolution

logger = logging.getLogger(__name__)

DEFAULT_PADDING = 64
# Upper bounds of a head's sizes: far beyond any real model (vocabularies reach 2**18, hidden
# sizes 2**15), low enough that no size, padded or multiplied by the other, overflows int64.
# (A large head over small tensors is refused by the header check, on a meta-device head.)
MAX_VOCAB = 2**31 - 1  # token ids are int32 in the engines
MAX_HIDDEN = 2**20


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _checked_sizes(
    num_embeddings: int, embedding_dim: int, padding_size: int, org_num_embeddings: int | None
) -> int:
    """``org_num_embeddings`` (default ``num_embeddings``) after checking every size.

    Raises:
        InputError: a size that is not a positive integer or is beyond its bound (``MAX_VOCAB``,
            ``MAX_HIDDEN``), naming it.
    """
    sizes = {
        "num_embeddings": (num_embeddings, MAX_VOCAB), "embedding_dim": (embedding_dim, MAX_HIDDEN),
        "padding_size": (padding_size, MAX_VOCAB),
    }  # fmt: skip
    for name, (value, bound) in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(
                f"ParallelLMHead {name} must be a positive integer, got {value!r}", field=name
            )
        if value > bound:
            raise InputError(
                f"ParallelLMHead {name}={value} exceeds {bound} (no model is that large)",
                field=name,
            )
    org = num_embeddings if org_num_embeddings is None else org_num_embeddings
    if not 1 <= org <= num_embeddings:
        raise InputError(
            f"org_num_embeddings={org} must be between 1 and num_embeddings={num_embeddings}",
            field="org_num_embeddings",
        )
    return org


class ParallelLMHead(torch.nn.Module):
    """A vocab-parallel lm_head (``num_embeddings`` rows of ``embedding_dim``).

    Its LinearMethod comes from ``quant_config.get_linear_method(self, prefix)``; None (or no
    config) keeps it unquantized, and ``quant_reason`` says why. After loading, ``kernel`` is
    the kernel the method chose (a :class:`quantreg.Kernel`: name, reason, declined ones).
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
        org = _checked_sizes(num_embeddings, embedding_dim, padding_size, org_num_embeddings)
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
        self.kernel: Kernel | None = None
        self.requested_kernel: str | None = None  # a kernel the loader was asked to force
        self.activation_dtype: str | None = None  # quantized activations asked for ("int8")
        self.target_vocab_size = num_embeddings
        self.register_buffer("draft_to_target", None)
        self.quant_method: LinearMethod = self._linear_method(quant_config, prefix)
        self.quant_method.create_weights(
            self,
            self.input_size_per_partition,
            self.output_partition_sizes,
            self.input_size,
            self.output_size,
            self.params_dtype,
        )
        self.has_bias = bias
        bias_param = (
            frozen_param((self.num_embeddings_per_partition,), self.params_dtype, output_dim=0)
            if bias
            else None
        )
        self.register_parameter("bias", bias_param)

    def _linear_method(self, quant_config: QuantConfig | None, prefix: str) -> LinearMethod:
        """The config's LinearMethod for this head, or the unquantized one (``quant_reason``
        says why)."""
        method = quant_config.get_linear_method(self, prefix) if quant_config is not None else None
        if quant_config is None:
            self.quant_reason = "no quantization_config"
        else:
            rule = quant_config.rule_for(prefix).rule
            self.quant_reason = rule if method else f"{type(quant_config).__name__}: {rule}"
        return method or UnquantizedLinearMethod()

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

    @property
    def geometry(self) -> LayerGeometry:
        """What a LinearMethod may read about this head (see :class:`quantreg.LayerGeometry`)."""
        return LayerGeometry(
            prefix=self.prefix,
            input_size=self.embedding_dim,
            output_size=self.org_num_embeddings,
            output_size_per_partition=self.num_embeddings_per_partition,
            output_start=self.shard_start,
            params_dtype=self.params_dtype,
            tp_rank=self.tp.rank,
            tp_size=self.tp.size,
        )

    def checkpoint_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """The full (all ranks, unpadded) shape the checkpoint must hold for ``param``."""
        return self.geometry.checkpoint_shape(param)

    def checkpoint_region(self, param: torch.Tensor) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` of this rank's slice in the checkpoint; None = all of it."""
        return self.geometry.checkpoint_region(param)

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        """Load this rank's ``loaded`` slice (in the checkpoint's dtype) into ``param`` through
        the method's per-parameter hook (``LinearMethod.load_weight``).

        Raises:
            CheckpointError: the slice does not fit the parameter.
        """
        self.quant_method.load_weight(self, param, loaded)  # type: ignore[arg-type]

    def resident_bytes(self) -> int:
        """Bytes this rank holds for the head: every parameter, buffer and kernel tensor."""
        tensors = [*self.parameters(), *self.buffers()]
        if self.kernel is not None:
            tensors += self.kernel.tensors().values()
        seen: dict[int, int] = {}
        for t in tensors:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return sum(seen.values())

    def explain(self) -> str:
        """The resolution's account of the decision, then the kernel that runs and why."""
        lines = [self.resolution.explain()] if self.resolution is not None else []
        if self.kernel is not None:
            lines.append(self.kernel.explain())
        return "\n".join(lines)

    def report(self) -> dict[str, Any]:
        """JSON-safe: ``{resolution, kernel, method, tp_rank, tp_size, resident_bytes}``."""
        return {
            "resolution": self.resolution.to_dict() if self.resolution is not None else None,
            "kernel": self.kernel.to_dict() if self.kernel is not None else None,
            "method": type(self.quant_method).__name__,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "resident_bytes": self.resident_bytes(),
        }

    # -- running ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's logits: ``[tokens, num_embeddings_per_partition]`` (padding included)."""
        # a registered parameter is read through nn.Module.__getattr__ (Python): ~15 µs a call
        # on the caches a decode step leaves, so the common head without one does not read it
        return self.quant_method.apply(self, x, self.bias if self.has_bias else None)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full, unpadded logits ``[tokens, num_embeddings]`` on every rank (all-gathered)."""
        if x.shape[-1] != self.embedding_dim:
            raise InputError(
                f"hidden states have {x.shape[-1]} features; {self.prefix} expects "
                f"embedding_dim={self.embedding_dim}",
                field="x",
            )
        logits = self.tp.all_gather_last_dim(self.forward(x))
        if logits.shape[-1] == self.num_embeddings:  # no padding: no slice (an op, on cold caches)
            return logits
        return logits[..., : self.num_embeddings]

    def set_vocab_map(self, draft_to_target: torch.Tensor, target_vocab_size: int) -> None:
        """Attach an Eagle3 drafter's map from its vocab to the target's (``id + d2t[id]``)."""
        if draft_to_target.shape != (self.num_embeddings,):
            raise InputError(
                f"vocab map has shape {list(draft_to_target.shape)}; expected "
                f"[{self.num_embeddings}] (one target id per draft id)"
            )
        self.draft_to_target = draft_to_target.to(torch.int64)
        self.target_vocab_size = target_vocab_size

    def to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Scatter draft-vocab logits into the target vocab: ``[tokens, target_vocab]``,
        -inf everywhere except at the mapped ids.

        Raises:
            InputError: logits of the wrong width, or a smaller draft vocab with no map.
        """
        if logits.shape[-1] != self.num_embeddings:
            raise InputError(
                f"logits have {logits.shape[-1]} columns; expected num_embeddings="
                f"{self.num_embeddings} (the output of compute_logits)"
            )
        if self.draft_to_target is None:
            if self.target_vocab_size == self.num_embeddings:
                return logits
            raise InputError(
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
            f"method={type(self.quant_method).__name__}, "
            f"kernel={self.kernel.name if self.kernel is not None else None}"
        )

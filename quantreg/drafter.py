"""Eagle3 speculative-decoding drafters: their config, the d2t vocab map, and head sharing.

Two layouts exist: the original EAGLE one (``LlamaForCausalLMEagle3``; a Llama config plus
``draft_vocab_size``) and the speculators one (``Eagle3Speculator``; the decoder config nested
in ``transformer_layer_config``). A drafter's head always takes its quantization from the
drafter's own config, never from the target model's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantreg.checkpoint import D2T_NAME, TensorInfo
from quantreg.detection import flatten_config
from quantreg.errors import CheckpointError, ConfigError
from quantreg.validation_messages import describe_validation_error
from quantreg.view import read_checkpoint

if TYPE_CHECKING:
    import torch

    from quantreg.lm_head import ParallelLMHead

logger = logging.getLogger(__name__)

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3Speculator", "Eagle3LlamaForCausalLM")
_EAGLE_KEYS = ("draft_vocab_size", "target_hidden_size", "architectures", "norm_before_residual")


class DrafterConfig(BaseModel):
    """The fields of a drafter's ``config.json`` that shape its lm_head."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    draft_vocab_size: int | None = Field(default=None, gt=0)
    target_hidden_size: int | None = Field(default=None, gt=0)
    tie_word_embeddings: bool = False
    architectures: list[str] = Field(default_factory=list)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str | None = None) -> Self:
        """Validate a drafter's config.json dict (either layout).

        Raises:
            ConfigError: a missing or invalid field, naming the file.
        """
        flat = flatten_config(config)
        keys = set(cls.model_fields) | set(_EAGLE_KEYS)
        try:
            return cls.model_validate({k: v for k, v in flat.items() if k in keys})
        except ValidationError as exc:
            raise ConfigError(
                describe_validation_error(exc, method="drafter", source=source, what="config")
            ) from exc

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str]) -> Self:
        """The drafter config of a checkpoint folder (or its config.json).

        Raises:
            ConfigError: unreadable or invalid config.json.
        """
        view = read_checkpoint(path, "lm_head")
        return cls.from_config(view.config, source=view.source)

    @property
    def head_vocab_size(self) -> int:
        """Rows of the drafter's lm_head: ``draft_vocab_size``, defaulting to ``vocab_size``."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def is_eagle3(self) -> bool:
        return any(a in EAGLE3_ARCHITECTURES for a in self.architectures)

    @property
    def layout(self) -> str:
        """``speculators``, ``eagle3`` or ``plain``."""
        if "Eagle3Speculator" in self.architectures:
            return "speculators"
        return "eagle3" if self.is_eagle3 else "plain"


def has_own_lm_head(path: str | os.PathLike[str], *, prefix: str = "lm_head") -> bool:
    """Whether the checkpoint holds ``lm_head.*`` tensors of its own (headers only).

    Raises:
        CheckpointError: no safetensors weights, or bad files.
    """
    view = read_checkpoint(path, prefix)
    if view.tensors is None:
        raise CheckpointError(f"{view.source} has no safetensors weights", path=view.source)
    return bool(view.tensors)


def draft_to_target_ids(
    d2t: torch.Tensor, info: TensorInfo, *, vocab_size: int, draft_vocab_size: int
) -> torch.Tensor:
    """Target-vocab id of every draft id (``id + d2t[id]``), range- and uniqueness-checked.

    Raises:
        CheckpointError: wrong shape or dtype, an id outside ``[0, vocab_size)``, or two
            draft ids mapped to one target id; the message names ``d2t`` and the file.
    """
    import torch

    where = f"{info.file}: tensor '{D2T_NAME}'"
    if d2t.dim() != 1 or d2t.shape[0] != draft_vocab_size:
        raise CheckpointError(
            f"{where} has shape {list(d2t.shape)}; expected [{draft_vocab_size}] "
            "(draft_vocab_size)",
            path=info.file, tensor=D2T_NAME,
        )  # fmt: skip
    if d2t.dtype not in (torch.int64, torch.int32):
        raise CheckpointError(
            f"{where} has dtype {d2t.dtype}; expected int64", path=info.file, tensor=D2T_NAME
        )
    ids = torch.arange(draft_vocab_size, dtype=torch.int64) + d2t.to(torch.int64)
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero().flatten()
    if bad.numel():
        first = int(bad[0])
        raise CheckpointError(
            f"{where} maps draft id {first} to target id {int(ids[first])} (d2t[{first}] = "
            f"{int(d2t[first])}), outside [0, {vocab_size}) of vocab_size; {bad.numel()} "
            "such entries",
            path=info.file, tensor=D2T_NAME,
        )  # fmt: skip
    if torch.unique(ids).numel() != ids.numel():
        raise CheckpointError(
            f"{where} maps several draft ids to the same target id; expected a one-to-one map",
            path=info.file, tensor=D2T_NAME,
        )  # fmt: skip
    return ids


def share_lm_head(
    drafter_head: ParallelLMHead | None, target_head: ParallelLMHead
) -> ParallelLMHead:
    """The head a drafter should use: the target's when the drafter has none, or when both
    hold identical weights in identical geometry; otherwise the drafter's own.

    Quantized heads are compared by their quantized tensors (same method, same parameters);
    their ``.weight`` is never read.
    """
    if drafter_head is None:
        logger.info("drafter has no lm_head of its own: using the target's")
        return target_head
    if _same_head(drafter_head, target_head):
        logger.info("drafter and target lm_heads are identical: sharing the target's")
        return target_head
    return drafter_head


def _same_head(a: ParallelLMHead, b: ParallelLMHead) -> bool:
    import torch

    geometry = (
        "num_embeddings", "embedding_dim", "num_embeddings_padded", "tp_rank", "tp_size",
        "params_dtype",
    )  # fmt: skip
    if any(getattr(a, g) != getattr(b, g) for g in geometry):
        return False
    if type(a.quant_method) is not type(b.quant_method):
        return False
    if getattr(a, "draft_to_target", None) is not None and not torch.equal(
        a.draft_to_target, torch.arange(a.num_embeddings, device=a.draft_to_target.device)
    ):
        return False  # the drafter maps its vocab onto a subset of the target's
    tensors_a, tensors_b = _head_tensors(a), _head_tensors(b)
    if tensors_a.keys() != tensors_b.keys():
        return False
    return all(
        t.shape == tensors_b[n].shape
        and t.dtype == tensors_b[n].dtype
        and torch.equal(t, tensors_b[n])
        for n, t in tensors_a.items()
    )


def _head_tensors(head: ParallelLMHead) -> dict[str, torch.Tensor]:
    """Every tensor that defines a head's weights: its parameters and its kernel's layout
    (a quantized head's checkpoint tensors are replaced by that layout after loading)."""
    tensors = {f"param.{n}": p for n, p in head.named_parameters()}
    kernel = getattr(head, "kernel", None)
    if kernel is not None:
        tensors.update({f"kernel.{kernel.name}.{n}": t for n, t in kernel.tensors().items()})
    return tensors

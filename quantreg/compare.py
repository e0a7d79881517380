"""How much quantization cost: a head's logits against a reference head's on the same inputs.

``compare_heads`` runs both heads on the same hidden states; ``compare_logits`` compares two
logit tensors. Every metric is computed in float64 (softmax included), so that a head
compared with itself reports exactly 0 error, full agreement and 0 KL:

* ``rel_err`` = ``‖logits − ref‖ / ‖ref‖`` (Frobenius norms over every token);
* ``top1`` = share of tokens whose arg-max agrees;
* ``top5`` = mean share of the reference's 5 highest ids that are also among the head's 5
  highest (``min(5, vocab)`` ids);
* ``kl`` = mean over tokens of ``KL(softmax(ref) ‖ softmax(logits))`` in nats: the
  information a sampler loses by drawing from the head instead of the reference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from quantreg.errors import InputError

if TYPE_CHECKING:
    import torch

    from quantreg.lm_head import ParallelLMHead

TOP_K = 5


@dataclass(frozen=True)
class Comparison:
    """The metrics of one head against a reference (see the module docstring).

    Attributes:
        tokens: rows of hidden states compared.
        vocab: logits per token.
        rel_err: ``‖logits − ref‖ / ‖ref‖``.
        top1: share of tokens whose arg-max agrees, 0..1.
        top5: mean overlap of the two top-5 id sets, 0..1.
        kl: mean ``KL(ref ‖ logits)`` per token, in nats.
    """

    tokens: int
    vocab: int
    rel_err: float
    top1: float
    top5: float
    kl: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{tokens, vocab, rel_err, top1, top5, kl}``."""
        return asdict(self)

    def summary(self) -> str:
        """One line: every metric, named."""
        return (
            f"relative logit error {self.rel_err:.2e}, top-1 agreement {self.top1:.1%}, "
            f"top-{TOP_K} overlap {self.top5:.1%}, KL(ref||q) {self.kl:.2e} nats/token "
            f"({self.tokens} tokens, vocab {self.vocab})"
        )


def compare_logits(logits: torch.Tensor, reference: torch.Tensor) -> Comparison:
    """Compare ``[tokens, vocab]`` logits with the reference logits of the same inputs.

    Raises:
        InputError: the two tensors differ in shape, or are not ``[tokens, vocab]``.
    """
    import torch

    if logits.shape != reference.shape or logits.dim() != 2 or 0 in logits.shape:
        raise InputError(
            f"logits {list(logits.shape)} and reference logits {list(reference.shape)}: "
            "expected two non-empty [tokens, vocab] tensors of the same shape",
            field="logits",
        )
    q, ref = logits.detach().double().cpu(), reference.detach().double().cpu()
    norm = float(ref.norm())
    delta = float((q - ref).norm())
    rel_err = delta / norm if norm > 0 else (0.0 if delta == 0 else math.inf)
    top1 = float((q.argmax(-1) == ref.argmax(-1)).double().mean())
    k = min(TOP_K, q.shape[-1])
    top_q, top_ref = q.topk(k, dim=-1).indices, ref.topk(k, dim=-1).indices
    overlap = (top_ref[:, :, None] == top_q[:, None, :]).any(-1).double().sum(-1) / k
    log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(q, dim=-1)
    # 0 * log 0 is 0: ids the reference gives no mass add nothing
    terms = torch.where(log_p.isneginf(), 0.0, log_p.exp() * (log_p - log_q))
    return Comparison(
        tokens=q.shape[0],
        vocab=q.shape[1],
        rel_err=rel_err,
        top1=top1,
        top5=float(overlap.mean()),
        kl=float(terms.sum(-1).mean()),
    )


def compare_heads(head: ParallelLMHead, reference: ParallelLMHead, x: torch.Tensor) -> Comparison:
    """Run ``head`` and ``reference`` on the hidden states ``x`` (``[tokens, hidden]`` on the
    heads' device; cast to each head's dtype) and compare their logits.

    Raises:
        InputError: the heads differ in vocab or hidden size (the message names both), or
            ``x`` does not have the hidden size.
    """
    import torch

    check_comparable(head, reference)
    if x.dim() != 2 or x.shape[-1] != head.embedding_dim:
        raise InputError(
            f"hidden states {list(x.shape)}: expected [tokens, {head.embedding_dim}]",
            field="hidden",
        )
    with torch.inference_mode():
        logits = head.compute_logits(x.to(head.params_dtype))
        ref = reference.compute_logits(x.to(reference.params_dtype))
    return compare_logits(logits, ref)


def check_comparable(head: ParallelLMHead, reference: ParallelLMHead) -> None:
    """Check that two heads map the same hidden size to the same vocab.

    Raises:
        InputError: they differ in vocab or hidden size; the message names both shapes.
    """
    mine = (head.num_embeddings, head.embedding_dim)
    theirs = (reference.num_embeddings, reference.embedding_dim)
    if mine != theirs:
        raise InputError(
            f"cannot compare heads of different shapes: the head has vocab {mine[0]} x hidden "
            f"{mine[1]}, the reference vocab {theirs[0]} x hidden {theirs[1]}; compare a "
            "quantized head with the float head it was made from",
            field="reference",
        )

"""The record of a decision: ``Resolution`` (which method a layer gets, and why) and the
``Candidate`` methods probed for it. ``quantreg.resolve`` (in :mod:`quantreg.decision`) makes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from quantreg.checkpoint import TensorInfo
from quantreg.contract import QuantConfig
from quantreg.platform import Platform
from quantreg.view import CheckpointView

UNQUANTIZED = "unquantized"

TensorState = Literal["quantized", "unquantized", "absent"]


@dataclass(frozen=True)
class Candidate:
    """One method probed for the layer: whether it was chosen, and why (not)."""

    name: str
    accepted: bool
    reason: str
    priority: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accepted": self.accepted,
            "reason": self.reason,
            "priority": self.priority,
        }


@dataclass(frozen=True)
class Resolution:
    """Which method a layer of a checkpoint uses on a platform, with the reasons.

    ``method`` is the canonical method name, or None whenever the layer stays unquantized;
    ``rule`` starts with the config key that decided and lists other rules that fired;
    ``tensors`` is what the safetensors headers show for the layer (None: no weights read);
    ``tied_to`` names the embedding a tied head loads from; ``view`` is what was read of the
    checkpoint, so that loading never reads its metadata again.
    """

    method: str | None
    quantized: bool
    rule: str
    candidates: tuple[Candidate, ...]
    config: QuantConfig | None
    prefix: str
    platform: Platform
    source: str
    format: str | None = None
    requested: str | None = None
    tensors: TensorState | None = None
    tensor_infos: tuple[TensorInfo, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    tied_to: str | None = None
    view: CheckpointView | None = field(default=None, repr=False, compare=False)

    @property
    def tensors_agree(self) -> bool | None:
        """Whether the checkpoint's tensors match the decision (None: unknown or absent)."""
        if self.tensors in (None, "absent"):
            return None
        return (self.tensors == "quantized") == self.quantized

    def explain(self) -> str:
        """A multi-line, human-readable account of the decision."""
        fmt = f"quant_method '{self.format}'" if self.format else "no quantization_config"
        lines = [
            f"{self.prefix} of {self.source} ({fmt}, platform {self.platform})",
            f"  method: {self.method or 'unquantized'}"
            + (" (quantized)" if self.quantized else " (the layer stays unquantized)"),
            f"  rule: {self.rule}",
        ]
        if self.requested:
            lines.append(f"  requested: {self.requested}")
        lines.append("  candidates:")
        for c in self.candidates:
            prio = f" [priority {c.priority}]" if c.priority is not None else ""
            lines.append(f"    {'+' if c.accepted else '-'} {c.name}{prio}: {c.reason}")
        if self.tensors is not None:
            shown = ", ".join(
                f"{t.name} {t.dtype} {list(t.shape)}" for t in self.tensor_infos[:6]
            ) + (", ..." if len(self.tensor_infos) > 6 else "")
            lines.append(f"  tensors: {self.tensors}" + (f" ({shown})" if shown else ""))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form with keys method, quantized, rule, candidates, config and more."""
        return {
            "method": self.method,
            "quantized": self.quantized,
            "rule": self.rule,
            "candidates": [c.to_dict() for c in self.candidates],
            "config": self.config.model_dump(mode="json") if self.config is not None else None,
            "format": self.format,
            "prefix": self.prefix,
            "platform": str(self.platform),
            "source": self.source,
            "requested": self.requested,
            "tensors": None
            if self.tensors is None
            else {
                "state": self.tensors,
                "names": [t.name for t in self.tensor_infos],
            },
            "notes": list(self.notes),
            "tied_to": self.tied_to,
        }

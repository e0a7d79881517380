"""``quantreg demo``: write small Eagle3 drafter checkpoints, then resolve, load and run each.

Every row is a real round trip through the public API: the checkpoint is written to disk in
a producer's layout, resolved, loaded with ``load_lm_head(dtype=float32)``, run, and compared
with a float64 reference computed from the float weight the checkpoint was made from (for a
quantized head the error is the quantization error).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from quantreg.loading import load_lm_head
from quantreg.writers import write_checkpoint

HIDDEN = 256
DRAFT_VOCAB = 1000
TARGET_VOCAB = 4000
TOKENS = 8


@dataclass(frozen=True)
class DemoRow:
    """One demo checkpoint's outcome."""

    name: str
    method: str
    kernel: str
    rule: str
    resident_bytes: int
    vs_bf16: float
    max_abs_error: float
    target_vocab_ok: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def eagle3_config(**extra: Any) -> dict[str, Any]:
    """A drafter config.json in the original EAGLE-3 layout."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": HIDDEN,
        "vocab_size": TARGET_VOCAB,
        "draft_vocab_size": DRAFT_VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        **extra,
    }


def speculators_config(**layer: Any) -> dict[str, Any]:
    """A drafter config.json in the speculators layout (decoder config nested)."""
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "draft_vocab_size": DRAFT_VOCAB,
        "transformer_layer_config": {
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "vocab_size": DRAFT_VOCAB,
            "torch_dtype": "float16",
            **layer,
        },
    }


def sorted_d2t(generator: torch.Generator) -> torch.Tensor:
    """An EAGLE-style map: draft id i -> the i-th of a sorted random subset of target ids."""
    targets = torch.randperm(TARGET_VOCAB, generator=generator)[:DRAFT_VOCAB].sort().values
    return targets - torch.arange(DRAFT_VOCAB)


def _write(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def unquantized_drafter(folder: Path, gen: torch.Generator) -> tuple[Path, torch.Tensor]:
    weight = (torch.randn(DRAFT_VOCAB, HIDDEN, generator=gen) * 0.05).half()
    tensors = {
        "lm_head.weight": weight,
        "d2t": sorted_d2t(gen),
        "fc.weight": torch.zeros(HIDDEN, 3 * HIDDEN, dtype=torch.float16),
        "norm.weight": torch.ones(HIDDEN, dtype=torch.float16),
    }
    return _write(folder, eagle3_config(), tensors), weight


def tied_drafter(folder: Path, gen: torch.Generator) -> tuple[Path, torch.Tensor]:
    embedding = (torch.randn(DRAFT_VOCAB, HIDDEN, generator=gen) * 0.05).half()
    tensors = {"embed_tokens.weight": embedding, "d2t": sorted_d2t(gen)}
    config = speculators_config(tie_word_embeddings=True)
    config["transformer_layer_config"]["vocab_size"] = TARGET_VOCAB
    return _write(folder, config, tensors), embedding


def quantized_drafter(
    method: str, **params: Any
) -> Callable[[Path, torch.Generator], tuple[Path, torch.Tensor]]:
    """A drafter whose head is written by quantreg's own writer for ``method``."""

    def make(folder: Path, gen: torch.Generator) -> tuple[Path, torch.Tensor]:
        weight = (torch.randn(DRAFT_VOCAB, HIDDEN, generator=gen) * 0.05).half()
        path = write_checkpoint(
            folder, weight, method, d2t=sorted_d2t(gen), vocab_size=TARGET_VOCAB, **params
        )
        return path, weight

    return make


Maker = Callable[[Path, torch.Generator], tuple[Path, torch.Tensor]]
CHECKPOINTS: dict[str, Maker] = {
    "eagle3_unquantized": unquantized_drafter,
    "speculators_tied": tied_drafter,
    "awq_int4_g128": quantized_drafter("awq", group_size=128),
    "gptq_int4_g128_act_order": quantized_drafter("gptq", group_size=128, desc_act=True),
    "gptq_int8_g64_asym": quantized_drafter("gptq", bits=8, group_size=64, sym=False),
    "ct_w8a16_channel": quantized_drafter(
        "compressed-tensors", format="pack-quantized", bits=8, strategy="channel"
    ),
    "ct_w4a16_g128_asym": quantized_drafter(
        "compressed-tensors", format="pack-quantized", bits=4, group_size=128, sym=False
    ),
    "ct_w8a8_int8": quantized_drafter("compressed-tensors", format="int-quantized"),
    "ct_fp8_channel": quantized_drafter("compressed-tensors", format="float-quantized"),
}
# (row name, checkpoint, requested method: None = what resolution picks on this machine)
DEMOS: list[tuple[str, str, str | None]] = [
    ("eagle3 unquantized", "eagle3_unquantized", None),
    ("speculators tied", "speculators_tied", None),
    ("awq int4 g128", "awq_int4_g128", "awq"),
    ("awq int4 g128", "awq_int4_g128", "awq_marlin"),
    ("awq int4 g128", "awq_int4_g128", "cpu_wna16"),
    ("gptq int4 g128 act-order", "gptq_int4_g128_act_order", "gptq"),
    ("gptq int4 g128 act-order", "gptq_int4_g128_act_order", "gptq_marlin"),
    ("gptq int4 g128 act-order", "gptq_int4_g128_act_order", "cpu_wna16"),
    ("gptq int8 g64 asym", "gptq_int8_g64_asym", None),
    ("ct w8a16 int8 per-channel", "ct_w8a16_channel", None),
    ("ct w4a16 g128 asym", "ct_w4a16_g128_asym", None),
    ("ct w8a8 int8 (weight-only)", "ct_w8a8_int8", None),
    ("ct fp8 per-channel", "ct_fp8_channel", None),
]


def run_demo(folder: Path | None = None, *, seed: int = 0) -> list[DemoRow]:
    """Write every demo checkpoint under ``folder`` (default: a temporary folder), then
    resolve, load and run each (with each method that can read it); one row per run."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="quantreg-demo-") as tmp:
            return run_demo(Path(tmp), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    written = {key: make(folder / key, gen) for key, make in CHECKPOINTS.items()}
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    rows = []
    for name, key, requested in DEMOS:
        path, weight = written[key]
        head = load_lm_head(path, dtype=torch.float32, requested=requested)
        logits = head.compute_logits(x)
        reference = x.double() @ weight.double().T
        target = head.to_target_vocab(logits)
        ids = head.draft_to_target
        mapped = ids is not None and torch.equal(target[:, ids], logits)
        unmapped = torch.ones(head.target_vocab_size, dtype=torch.bool)
        if ids is not None:
            unmapped[ids] = False
        target_ok = bool(mapped and torch.isneginf(target[:, unmapped]).all())
        resolution = head.resolution
        assert resolution is not None
        rows.append(
            DemoRow(
                name=name,
                method=resolution.method or "unquantized",
                kernel=head.kernel.name if head.kernel is not None else "?",
                rule=resolution.rule.split(";")[0],
                resident_bytes=head.resident_bytes(),
                vs_bf16=head.resident_bytes() / (weight.numel() * 2),
                max_abs_error=float((logits.double() - reference).abs().max()),
                target_vocab_ok=target_ok,
            )
        )
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    """The demo table as text."""
    header = (
        f"{'checkpoint':<26} {'method':<20} {'kernel':<15} {'resident':>10} {'vs bf16':>8} "
        f"{'max |err|':>10} {'d2t':>4}  rule"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<26} {r.method:<20} {r.kernel:<15} {r.resident_bytes:>10,d} "
            f"{r.vs_bf16:>7.2f}x "
            f"{r.max_abs_error:>10.2e} {'ok' if r.target_vocab_ok else 'FAIL':>4}  {r.rule}"
        )
    return "\n".join(lines)

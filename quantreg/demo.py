"""``quantreg demo``: write small Eagle3 drafter checkpoints, then resolve, load and run each.

Every row is a real round trip through the public API: the checkpoint is written to disk in
a producer's layout, resolved, loaded with ``load_lm_head(dtype=float32)``, run, and compared
with a float64 reference computed from the float weight the checkpoint was made from (for a
quantized head the error is the quantization error). The story told before the table (the
failures quantreg exists for) is :mod:`quantreg.demo_story`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from quantreg.compare import compare_logits
from quantreg.decision import resolve
from quantreg.loading import load_lm_head
from quantreg.writers import write_checkpoint

HIDDEN = 256
DRAFT_VOCAB = 1000  # not a multiple of 64: every head is padded
TARGET_VOCAB = 4000
TOKENS = 64
# What AutoAWQ writes: no lm_head key at all (its heads are float unless someone packed them).
AUTOAWQ_CONFIG = {
    "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
    "version": "gemm", "modules_to_not_convert": None,
}  # fmt: skip


@dataclass(frozen=True)
class DemoRow:
    """One demo checkpoint's outcome.

    ``requested`` is the method forced with ``load_lm_head(requested=...)`` (None: none was),
    ``resolved`` the one resolution alone picks on this machine; ``vs_bf16`` is resident
    bytes over the same head's bf16 weight; ``rel_error`` is ``|logits - ref| / |ref|``
    (Frobenius) and ``top1`` the share of tokens whose arg-max matches, against the float
    head in float64.
    """

    name: str
    method: str
    kernel: str
    rule: str
    resident_bytes: int
    vs_bf16: float
    max_abs_error: float
    target_vocab_ok: bool
    requested: str | None = None
    resolved: str = ""
    rel_error: float = 0.0
    top1: float = 1.0
    load_s: float = 0.0
    forward_s: float = 0.0

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


def unquantized_drafter(
    folder: Path, gen: torch.Generator, weight: torch.Tensor
) -> tuple[Path, torch.Tensor]:
    tensors = {
        "lm_head.weight": weight,
        "d2t": sorted_d2t(gen),
        "fc.weight": torch.zeros(HIDDEN, 3 * HIDDEN, dtype=torch.float16),
        "norm.weight": torch.ones(HIDDEN, dtype=torch.float16),
    }
    return _write(folder, eagle3_config(), tensors), weight


def tied_drafter(folder: Path, gen: torch.Generator, _: torch.Tensor) -> tuple[Path, torch.Tensor]:
    embedding = (torch.randn(DRAFT_VOCAB, HIDDEN, generator=gen) * 0.05).half()
    tensors = {"embed_tokens.weight": embedding, "d2t": sorted_d2t(gen)}
    config = speculators_config(tie_word_embeddings=True)
    config["transformer_layer_config"]["vocab_size"] = TARGET_VOCAB
    return _write(folder, config, tensors), embedding


# (folder, generator, the float head every drafter but the tied one is made from)
Maker = Callable[[Path, torch.Generator, torch.Tensor], tuple[Path, torch.Tensor]]


def quantized_drafter(method: str, **params: Any) -> Maker:
    """A drafter whose head is ``weight`` written by quantreg's own writer for ``method``."""

    def make(folder: Path, gen: torch.Generator, weight: torch.Tensor) -> tuple[Path, torch.Tensor]:
        path = write_checkpoint(
            folder, weight, method, d2t=sorted_d2t(gen), vocab_size=TARGET_VOCAB, **params
        )
        return path, weight

    return make


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
    "ct_nvfp4": quantized_drafter("compressed-tensors", format="nvfp4-pack-quantized"),
    "fp8_block_128": quantized_drafter("fp8", format="block", block_size=(128, 128)),
    "fp8_tensor": quantized_drafter("fp8", format="tensor"),
    "modelopt_nvfp4": quantized_drafter("modelopt", format="nvfp4"),
    "autoawq_no_lm_head_key": quantized_drafter(
        "awq", group_size=128, config={"quantization_config": AUTOAWQ_CONFIG}
    ),
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
    ("ct nvfp4 g16", "ct_nvfp4", None),
    ("fp8 block 128x128", "fp8_block_128", None),
    ("fp8 per-tensor", "fp8_tensor", None),
    ("modelopt nvfp4 g16", "modelopt_nvfp4", None),
]


WEIGHT_SEED_OFFSET = 1000


def write_demo_checkpoints(folder: Path, *, seed: int = 0) -> dict[str, tuple[Path, torch.Tensor]]:
    """Write every demo checkpoint into ``folder/<name>``: name -> (folder, its float weight).

    Every head but the tied one is the same float head (``eagle3_unquantized``) in another
    format, so that checkpoint is the ``--reference`` of every quantized one.
    """
    # offset: `quantreg run --seed 0` draws its hidden states from seed 0, and the same draw
    # as the weight would make row i of the head equal to token i's hidden state
    gen = torch.Generator().manual_seed(seed + WEIGHT_SEED_OFFSET)
    weight = (torch.randn(DRAFT_VOCAB, HIDDEN, generator=gen) * 0.05).half()
    return {key: make(folder / key, gen, weight) for key, make in CHECKPOINTS.items()}


def hidden_states(seed: int = 0) -> torch.Tensor:
    """The demo's ``TOKENS`` random hidden states."""
    return torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(seed + 1))


def logit_error(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(|logits - ref| / |ref|, share of tokens whose arg-max agrees)`` against ``ref``
    (the metrics of :func:`quantreg.compare_logits`, which ``quantreg compare`` prints)."""
    comparison = compare_logits(logits, reference)
    return comparison.rel_err, comparison.top1


def run_demo(
    folder: Path | None = None,
    *,
    seed: int = 0,
    written: dict[str, tuple[Path, torch.Tensor]] | None = None,
) -> list[DemoRow]:
    """Write every demo checkpoint under ``folder`` (default: a temporary folder; none when
    ``written`` holds them already), then resolve, load and run each (with each method that
    can read it); one row per run."""
    if written is None:
        if folder is None:
            with tempfile.TemporaryDirectory(prefix="quantreg-demo-") as tmp:
                return run_demo(Path(tmp), seed=seed)
        written = write_demo_checkpoints(folder, seed=seed)
    x = hidden_states(seed)
    return [measure(name, *written[key], x, requested) for name, key, requested in DEMOS]


def measure(
    name: str, path: Path, weight: torch.Tensor, x: torch.Tensor, requested: str | None
) -> DemoRow:
    """Load ``path`` (float32, forcing ``requested`` if given), run ``x`` and compare with the
    float64 logits of ``weight``."""
    start = time.perf_counter()
    head = load_lm_head(path, dtype=torch.float32, requested=requested)
    load_s = time.perf_counter() - start
    with torch.inference_mode():
        head.compute_logits(x[:1])  # first-call costs are not the kernel's speed
        start = time.perf_counter()
        logits = head.compute_logits(x)
        forward_s = time.perf_counter() - start
    reference = x.double() @ weight.double().T
    rel_error, top1 = logit_error(logits, reference)
    resolution = head.resolution
    assert resolution is not None and head.kernel is not None  # set by the loader
    return DemoRow(
        name=name, method=resolution.method or "unquantized", kernel=head.kernel.name,
        rule=resolution.rule.split(";")[0], resident_bytes=head.resident_bytes(),
        vs_bf16=head.resident_bytes() / (weight.numel() * 2),
        max_abs_error=float((logits.double() - reference).abs().max()),
        target_vocab_ok=target_vocab_ok(head, logits), requested=requested,
        resolved=resolve(path).method or "unquantized",
        rel_error=rel_error, top1=top1, load_s=load_s, forward_s=forward_s,
    )  # fmt: skip


def target_vocab_ok(head: Any, logits: torch.Tensor) -> bool:
    """Whether the Eagle3 remap puts every draft logit at its target id and -inf elsewhere."""
    target = head.to_target_vocab(logits)
    ids = head.draft_to_target
    if ids is None or not torch.equal(target[:, ids], logits):
        return False
    unmapped = torch.ones(head.target_vocab_size, dtype=torch.bool)
    unmapped[ids] = False
    return bool(torch.isneginf(target[:, unmapped]).all())


def format_rows(rows: list[DemoRow]) -> str:
    """The demo table as text (a forced method is marked ``*``, with a footnote)."""
    header = (
        f"{'checkpoint':<26} {'method':<20} {'kernel':<10} {'resident':>9} {'vs bf16':>7} "
        f"{'rel err':>8} {'top-1':>6} {'load':>7} {'forward':>8} {'d2t':>4}  rule"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        method = r.method + ("*" if r.requested else "")
        lines.append(
            f"{r.name:<26} {method:<20} {r.kernel:<10} {r.resident_bytes:>9,d} "
            f"{r.vs_bf16:>6.2f}x {r.rel_error:>8.1e} {r.top1:>6.0%} {r.load_s * 1e3:>5.0f}ms "
            f"{r.forward_s * 1e3:>6.2f}ms {'ok' if r.target_vocab_ok else 'FAIL':>4}  {r.rule}"
        )
    forced = {r.name: r.resolved for r in rows if r.requested}
    if forced:
        picks = "; ".join(f"{name}: {method}" for name, method in forced.items())
        lines.append(f"* forced with load_lm_head(requested=...); resolution alone picks {picks}")
    return "\n".join(lines)

"""What ``quantreg bench`` times: the formats it writes, and the cases built without quantreg's
loader -- dense ``F.linear`` (the baselines) and torch's own weight-only ops (peers).

Each case holds one callable per rotated copy of its weights, so that every timed call reads
its weights from memory rather than from a cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quantreg import get_quant_config_cls

ROW_CHUNK = 8192  # vocab rows quantized per step when building a head


@dataclass(frozen=True)
class Format:
    """One quantized layout to benchmark: the writer's method and options, and the methods
    that run it (the first one is the exact reference)."""

    label: str
    writer: str
    bits: int
    params: dict[str, Any]
    methods: tuple[str, ...]


FORMATS = (
    Format("awq int4 g128", "awq", 4, {"group_size": 128}, ("awq", "awq_marlin", "cpu_wna16")),
    Format("gptq int4 g128", "gptq", 4, {"group_size": 128}, ("gptq", "gptq_marlin", "cpu_wna16")),
    Format("gptq int8 g128", "gptq", 8, {"bits": 8, "group_size": 128}, ("gptq", "cpu_wna16")),
    Format("gptq int8 channel", "gptq", 8, {"bits": 8, "group_size": -1}, ("gptq", "cpu_wna16")),
    Format("ct int4 g128", "compressed-tensors", 4,
           {"format": "pack-quantized", "bits": 4, "group_size": 128}, ("compressed-tensors",)),
    Format("ct int8 channel", "compressed-tensors", 8,
           {"format": "pack-quantized", "bits": 8, "strategy": "channel"}, ("compressed-tensors",)),
    Format("ct fp8 channel", "compressed-tensors", 8,
           {"format": "float-quantized", "strategy": "channel"}, ("compressed-tensors",)),
    Format("fp8 block 128x128", "fp8", 8, {"block_size": (128, 128)}, ("fp8",)),
    # the global scale of the whole head, which write_format quantizes in pieces
    Format("ct nvfp4 g16", "compressed-tensors", 4,
           {"format": "nvfp4-pack-quantized", "tensor_amax": 0.125}, ("compressed-tensors",)),
)  # fmt: skip


def write_format(folder: Path, fmt: Format, n: int, k: int, seed: int) -> Path:
    """Write a checkpoint whose lm_head is ``fmt`` tensors of a random fp16 ``[n, k]``
    weight, quantized by the method's own writer ``ROW_CHUNK`` vocab rows at a time (the
    writers work in float64; one chunk at a time keeps that small)."""
    from safetensors.torch import save_file

    quantize = get_quant_config_cls(fmt.writer).quantize_weight
    vocab_dim = 1 if fmt.writer in ("awq", "gptq") else 0
    parts, qcfg = [], {}
    for start in range(0, n, ROW_CHUNK):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
        weight = (torch.randn(min(ROW_CHUNK, n - start), k, generator=gen) * 0.02).half()
        part, qcfg = quantize(weight, scale_dtype=torch.float16, **fmt.params)
        parts.append(part)
    tensors = {}
    for name, first in parts[0].items():
        if name == "weight_shape":
            tensors[name] = torch.tensor([n, k], dtype=torch.int64)
        elif name == "g_idx" or first.numel() == 1:  # replicated: same for every chunk
            tensors[name] = first
        else:
            tensors[name] = torch.cat([p[name] for p in parts], dim=vocab_dim)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"hidden_size": k, "vocab_size": n, "torch_dtype": "float16",
              "quantization_config": qcfg}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    save_file({f"lm_head.{name}": t.contiguous() for name, t in tensors.items()},
              str(folder / "model.safetensors"))  # fmt: skip
    return folder


@dataclass
class Case:
    """Something to time: a name, what it computes, and one callable per rotated copy."""

    method: str
    format: str
    bits: int
    dtype: torch.dtype
    fns: list[Callable[[torch.Tensor], torch.Tensor]]
    resident_bytes: int
    computes: str
    reference: Callable[[torch.Tensor], torch.Tensor]  # exact float32 result for max_rel_err
    kernel: str
    dense: bool = False  # a dense path: a candidate for the fastest dense path of the run
    unavailable: str = ""  # why it cannot run here (then ``fns`` is empty and it is not timed)


def dense_weight(n: int, k: int) -> torch.Tensor:
    """The float32 ``[n, k]`` weight of every dense case (quantreg's baselines and peers')."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02


def linears(weights: list[torch.Tensor]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """``F.linear`` with each of ``weights``: one callable per rotated copy."""
    return [lambda x, w=w: F.linear(x, w) for w in weights]


def dense_cases(n: int, k: int, copies: int) -> list[Case]:
    """The baselines: dense ``F.linear`` in fp32 (row 0, on a float32 copy of the weight) and
    bf16 (row 1, the base of ``ratio_vs_bf16``), each over ``copies`` copies."""
    w32 = dense_weight(n, k)
    w16 = w32.to(torch.bfloat16)
    w16_exact = w16.float()
    fp32 = linears([w32, *(w32.clone() for _ in range(copies - 1))])
    bf16 = linears([w16, *(w16.clone() for _ in range(copies - 1))])
    return [
        Case("dense fp32", "float32", 32, torch.float32, fp32, n * k * 4,
             "x @ W.T, fp32", lambda x: F.linear(x, w32), "dense", dense=True),
        Case("dense bf16", "bfloat16", 16, torch.bfloat16, bf16, n * k * 2,
             "x @ W.T, bf16", lambda x: F.linear(x, w16_exact), "dense", dense=True),
    ]  # fmt: skip


def torch_peer_cases(n: int, k: int, copies: int) -> list[Case]:
    """torch's own weight-only CPU ops on random codes (what each computes is in its label),
    each over ``copies`` copies of its weights."""
    peers = []
    gen = torch.Generator().manual_seed(7)
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and n % 16 == 0 and k % 128 == 0:
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        packed = torch.cat(
            [convert(codes[r : r + 1024].to(torch.int32), 1) for r in range(0, n, 1024)]
        )
        scales = (torch.rand(k // 128, n, generator=gen) * 0.002 + 0.001).to(torch.bfloat16)
        sz = torch.stack([scales, torch.zeros_like(scales)], -1).contiguous()
        col_scales = scales.float().T.repeat_interleave(128, 1)  # [n, k]: the weights' scale

        def rows4(r0: int, r1: int) -> torch.Tensor:
            return (codes[r0:r1].float() - 8) * col_scales[r0:r1]

        peers.append(
            Case("torch int4pack", "int4 g128", 4, torch.bfloat16,
                 [lambda x, p=p: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, 128, sz)
                  for p in [packed, *(packed.clone() for _ in range(copies - 1))]],
                 packed.numel() + sz.numel() * 2,
                 "torch._weight_int4pack_mm_for_cpu (zeros added as floats)",
                 lambda x: by_rows(x, rows4, n), "torch-int4pack")
        )  # fmt: skip
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        w8 = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        s8 = (torch.rand(n, generator=gen) * 0.002 + 0.001).to(torch.bfloat16)

        def rows8(r0: int, r1: int) -> torch.Tensor:
            return w8[r0:r1].float() * s8[r0:r1].float()[:, None]

        peers.append(
            Case("torch int8pack", "int8 channel", 8, torch.bfloat16,
                 [lambda x, w=w: torch.ops.aten._weight_int8pack_mm(x, w, s8)
                  for w in [w8, *(w8.clone() for _ in range(copies - 1))]], w8.numel() + n * 2,
                 "torch._weight_int8pack_mm", lambda x: by_rows(x, rows8, n), "torch-int8pack")
        )  # fmt: skip
    return peers


def by_rows(x: torch.Tensor, rows: Callable[[int, int], torch.Tensor], n: int) -> torch.Tensor:
    """``x @ W.T`` with ``W`` built 4096 rows at a time (never the whole float weight)."""
    return torch.cat([x @ rows(r, min(r + 4096, n)).T for r in range(0, n, 4096)], dim=-1)

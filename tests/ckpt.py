"""Small checkpoint folders for tests: config.json plus lm_head tensors of each layout.

Tensor values are zeros: these checkpoints exercise names, dtypes, shapes and files, not math.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]


def float_head(n: int = 1000, k: int = 64, prefix: str = "lm_head") -> Tensors:
    return {f"{prefix}.weight": torch.zeros(n, k, dtype=torch.float16)}


def awq_head(n: int = 1024, k: int = 64, group: int = 32, prefix: str = "lm_head") -> Tensors:
    groups = 1 if group == -1 else k // group
    return {
        f"{prefix}.qweight": torch.zeros(k, n // 8, dtype=torch.int32),
        f"{prefix}.qzeros": torch.zeros(groups, n // 8, dtype=torch.int32),
        f"{prefix}.scales": torch.zeros(groups, n, dtype=torch.float16),
    }


def gptq_head(
    n: int = 1024, k: int = 64, group: int = 32, bits: int = 4, prefix: str = "lm_head"
) -> Tensors:
    pf = 32 // bits
    groups = 1 if group == -1 else k // group
    return {
        f"{prefix}.qweight": torch.zeros(k // pf, n, dtype=torch.int32),
        f"{prefix}.qzeros": torch.zeros(groups, n // pf, dtype=torch.int32),
        f"{prefix}.scales": torch.zeros(groups, n, dtype=torch.float16),
        f"{prefix}.g_idx": torch.zeros(k, dtype=torch.int32),
    }


def ct_packed_head(n: int = 1000, k: int = 64, bits: int = 8, prefix: str = "lm_head") -> Tensors:
    return {
        f"{prefix}.weight_packed": torch.zeros(n, k * bits // 32, dtype=torch.int32),
        f"{prefix}.weight_scale": torch.zeros(n, 1, dtype=torch.float16),
        f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }


def write_checkpoint(
    root: Path,
    *,
    config: dict[str, Any] | None,
    tensors: Tensors,
    shards: int = 1,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json`` and the tensors (one file, or ``shards`` files plus an index)."""
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    for name, text in (extra_files or {}).items():
        (root / name).write_text(text)
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"))
        return root
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(root / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return root


def llama_config(quantization_config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "vocab_size": 1000,
        "torch_dtype": "float16",
        **extra,
    }
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def load_regions(head: Any, tensors: Tensors, kernel: str) -> Any:
    """Fill a built ``ParallelLMHead`` from a checkpoint's whole ``tensors``, each parameter
    with its rank's region as the loader reads it, then run ``kernel``: a TP rank without a
    process group."""
    head.requested_kernel = kernel
    for name, param in head.named_parameters():
        full = tensors[f"{head.prefix}.{name}"]
        region = head.checkpoint_region(param)
        if region is not None:
            dim, start, stop = region
            full = full.narrow(dim, start, stop - start)
        head.load_weight(param, full)
    head.quant_method.process_weights_after_loading(head)
    return head


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of config ``base`` with some keys replaced (None removes a key)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out

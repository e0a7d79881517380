"""Checkpoints compressed by the compressed-tensors library itself, for conformance tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

STRATEGIES_WITH_OBSERVED_GROUPS = ("group", "tensor_group", "tensor")


def block_view(w: torch.Tensor, block: list[int]) -> torch.Tensor:
    """``[N, K]`` as ``[N / bn, bn, K / bk, bk]`` blocks; a partial last block is padded with
    its own first value, so that padding never widens a block's min..max."""
    (bn, bk), (n, k) = block, w.shape
    rows, cols = -(-n // bn) * bn, -(-k // bk) * bk
    w = torch.cat([w, w[-1:].expand(rows - n, k)]) if rows > n else w
    w = torch.cat([w, w[:, -1:].expand(rows, cols - k)], 1) if cols > k else w
    return w.reshape(rows // bn, bn, cols // bk, bk)


def compress_head(
    folder: Path, weight: torch.Tensor, scheme: dict[str, Any], *, fc: bool = False
) -> torch.Tensor:
    """Quantize ``lm_head`` (weight ``[vocab, hidden]``) with the library, write a drafter folder
    (``config.json`` with the library's own ``quantization_config`` and ``model.safetensors``),
    and return the library's own decompressed weight."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import (
        calculate_qparams,
        compute_dynamic_scales_and_zp,
        generate_gparam,
    )

    n, k = weight.shape
    model = nn.Module()
    if fc:
        model.fc = nn.Linear(3 * k, k, bias=False).to(weight.dtype)
    model.lm_head = nn.Linear(k, n, bias=False).to(weight.dtype)
    model.lm_head.weight.data.copy_(weight)
    if "preset" in scheme:
        qscheme = preset_name_to_scheme(scheme["preset"], scheme["targets"])
    else:
        qscheme = QuantizationScheme(**scheme)
    apply_quantization_config(
        model,
        QuantizationConfig(config_groups={"group_0": qscheme}, ignore=scheme.get("ignore", [])),
    )
    for module in model.modules():
        qs = getattr(module, "quantization_scheme", None)
        if qs is None or qs.weights is None:
            continue
        args, w = qs.weights, module.weight.data
        if hasattr(module, "weight_global_scale"):  # NVFP4: llm-compressor's global scale first
            module.weight_global_scale.data.copy_(generate_gparam(w.min(), w.max()).reshape(1))
        if args.strategy in STRATEGIES_WITH_OBSERVED_GROUPS:
            scale, zero_point = compute_dynamic_scales_and_zp(
                w, args, module, global_scale=getattr(module, "weight_global_scale", None)
            )
        elif args.strategy == "block":
            blocks = block_view(w, args.block_structure)
            scale, zero_point = calculate_qparams(blocks.amin((1, 3)), blocks.amax((1, 3)), args)
        else:
            scale, zero_point = calculate_qparams(
                w.amin(1, keepdim=True), w.amax(1, keepdim=True), args
            )
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        if hasattr(module, "input_scale"):  # static activations: calibrated on [-1, 1], as
            one = torch.ones(1, dtype=w.dtype)  # llm-compressor's observer would (never empty)
            scale, _ = calculate_qparams(-one, one, qs.input_activations)
            module.input_scale.data.copy_(scale.reshape(module.input_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: t.detach().contiguous() for name, t in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    config = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": k, "vocab_size": n, "draft_vocab_size": n, "torch_dtype": str(weight.dtype).removeprefix("torch.")}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    compressor.update_config(str(folder))
    compressor.decompress_model(model)
    return model.lm_head.weight.detach().clone()


def library_decompress(folder: Path, dtype: torch.dtype) -> torch.Tensor:
    """Read a checkpoint's head back as compressed-tensors (and transformers' quantizer) does:
    the config validated by the library, the compressed tensors loaded into a module it
    initialized, then its own ``decompress_model``; returns the decompressed weight."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(
        {k: v for k, v in config["quantization_config"].items() if k != "quant_method"}
    )
    model = nn.Module()
    model.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False).to(dtype)
    apply_quantization_config(model, qcfg)
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        getattr(model.lm_head, name.removeprefix("lm_head.")).data = tensor
    ModelCompressor(quantization_config=qcfg).decompress_model(model)
    return model.lm_head.weight.detach().clone()

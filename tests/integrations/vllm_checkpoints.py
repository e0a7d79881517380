"""Tiny checkpoints for the vLLM tests, written from configs (no downloads): a random Llama,
the same Llama with a float head holding a quantized head's exact weights, and a random
Eagle3 drafter in the original EAGLE layout (``midlayer.*``, ``fc``, ``d2t``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import quantreg

HIDDEN = 128
HEAD_DIM = 32  # vLLM's CPU attention has no kernel for head_dim 16


def _heads(hidden: int) -> tuple[int, int]:
    """Attention and key-value heads of a model of width ``hidden``."""
    heads = hidden // HEAD_DIM
    return heads, max(1, heads // 2)


def _llama_config(hidden: int = HIDDEN, **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": _heads(hidden)[0],
        "num_key_value_heads": _heads(hidden)[1],
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    return config


def _save(root: Path, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "model.safetensors"))
    return root


def _decoder_layer(
    gen: torch.Generator, prefix: str, q_in: int, hidden: int = HIDDEN
) -> dict[str, torch.Tensor]:
    (heads, kv_heads), inter = _heads(hidden), 2 * hidden

    def w(out: int, inp: int) -> torch.Tensor:
        return (torch.randn(out, inp, generator=gen) * 0.05).to(torch.bfloat16)

    def ones() -> torch.Tensor:
        return torch.ones(hidden, dtype=torch.bfloat16)

    return {
        f"{prefix}.self_attn.q_proj.weight": w(heads * HEAD_DIM, q_in),
        f"{prefix}.self_attn.k_proj.weight": w(kv_heads * HEAD_DIM, q_in),
        f"{prefix}.self_attn.v_proj.weight": w(kv_heads * HEAD_DIM, q_in),
        f"{prefix}.self_attn.o_proj.weight": w(hidden, heads * HEAD_DIM),
        f"{prefix}.mlp.gate_proj.weight": w(inter, hidden),
        f"{prefix}.mlp.up_proj.weight": w(inter, hidden),
        f"{prefix}.mlp.down_proj.weight": w(hidden, inter),
        f"{prefix}.input_layernorm.weight": ones(),
        f"{prefix}.post_attention_layernorm.weight": ones(),
    }


def write_llama(root: Path, *, vocab: int = 1000, layers: int = 4, seed: int = 0) -> Path:
    """A random bf16 Llama (hidden 128) with an untied float ``lm_head.weight``.

    The head predicts a fixed successor of the current token by a wide margin (row
    ``successor[t]`` is ``0.1 * embed[t]``; the small random layers barely move the embedding):
    random heads over random hidden states give near-ties that bf16 rounding alone decides,
    and greedy comparisons would test the rounding, not the head.
    """
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(vocab, HIDDEN, generator=gen)
    head = torch.empty_like(embed)
    head[torch.randperm(vocab, generator=gen)] = 0.1 * embed
    tensors = {
        "model.embed_tokens.weight": embed.to(torch.bfloat16),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        "lm_head.weight": head.to(torch.bfloat16),
    }
    for i in range(layers):
        tensors.update(_decoder_layer(gen, f"model.layers.{i}", HIDDEN))
    return _save(root, _llama_config(vocab_size=vocab, num_hidden_layers=layers), tensors)


def write_dequantized(quantized: Path, root: Path) -> Path:
    """``quantized`` with a float head holding its head's exact weights
    (``load_lm_head(..., float32).compute_logits(eye).T``): the same model, unquantized."""
    head = quantreg.load_lm_head(quantized, dtype=torch.float32)
    weight = head.compute_logits(torch.eye(head.embedding_dim)).T.contiguous()
    tensors = {
        name: t for name, t in load_file(str(quantized / "model.safetensors")).items()
        if not name.startswith("lm_head.")
    }  # fmt: skip
    tensors["lm_head.weight"] = weight
    config = json.loads((quantized / "config.json").read_text())
    config.pop("quantization_config")
    return _save(root, config, tensors)


def write_eagle3_drafter(
    root: Path, target: Path, *, draft_vocab: int, aux_layers: tuple[int, int, int]
) -> Path:
    """An Eagle3 drafter of ``target`` (a :func:`write_llama` model) in the original EAGLE
    layout (``LlamaForCausalLMEagle3``), with a float head of ``draft_vocab`` rows and a
    ``d2t`` map onto every other target id.

    It guesses right often: with its attention and MLP zeroed it reads the target's first aux
    hidden state at position i (about ``embed[t_i]``) through ``fc``, and its head row ``d`` is
    ``0.1 * embed[t]`` for the ``t`` whose second successor is target id ``d + d2t[d]``, the
    token the target produces at i + 2. Accepted drafts prove its quantized head and ``d2t``.
    """
    weights = load_file(str(target / "model.safetensors"))
    embed, head = weights["model.embed_tokens.weight"].float(), weights["lm_head.weight"].float()
    vocab = embed.shape[0]
    successor = (head @ embed.T).argmax(0)  # the token the target predicts after each token
    before = torch.empty_like(successor)
    before[successor] = torch.arange(vocab)
    target_ids = torch.arange(draft_vocab, dtype=torch.int64) * vocab // draft_vocab
    tensors = {
        name: torch.zeros_like(t) if name.endswith("proj.weight") else t
        for name, t in _decoder_layer(torch.Generator(), "midlayer", 2 * HIDDEN).items()
    }
    fc = torch.zeros(HIDDEN, 3 * HIDDEN)
    fc[:, :HIDDEN] = torch.eye(HIDDEN)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[target_ids] = True
    tensors.update({
        "midlayer.hidden_norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        "fc.weight": fc.to(torch.bfloat16),
        "norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        "lm_head.weight": (0.1 * embed[before[before[target_ids]]]).to(torch.bfloat16),
        "d2t": target_ids - torch.arange(draft_vocab, dtype=torch.int64),
        "t2d": t2d,
    })  # fmt: skip
    config = _llama_config(
        architectures=["LlamaForCausalLMEagle3"],
        num_hidden_layers=1,
        vocab_size=vocab,
        draft_vocab_size=draft_vocab,
        target_hidden_size=HIDDEN,
        eagle_aux_hidden_state_layer_ids=list(aux_layers),
    )
    return _save(root, config, tensors)


def drop_tensor(src: Path, root: Path, name: str) -> Path:
    """A copy of checkpoint ``src`` without tensor ``name``."""
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[name]
    return _save(root, json.loads((src / "config.json").read_text()), tensors)


def quantize_body(src: Path, root: Path, method: str, **params: object) -> Path:
    """``src`` (a head-quantized checkpoint) with every decoder projection quantized by
    ``method`` too, and a config that no longer keeps them float: vLLM runs that body."""
    tensors = load_file(str(src / "model.safetensors"))
    for name in [
        n for n in tensors if n.startswith("model.layers.") and n.endswith("_proj.weight")
    ]:
        layer = name.removesuffix(".weight")
        for suffix, tensor in quantreg.quantize(tensors.pop(name), method, **params).items():
            tensors[f"{layer}.{suffix}"] = tensor
    config = json.loads((src / "config.json").read_text())
    qcfg = config["quantization_config"]
    qcfg.pop("dynamic", None)
    qcfg.pop("modules_to_not_convert", None)
    for group in (qcfg.get("config_groups") or {}).values():
        group["targets"] = ["Linear"]  # compressed-tensors: every linear layer, the head too
    return _save(root, config, tensors)


def write_around_head(fixture: Path, root: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """A servable Llama around a producer's head: the fixture's ``lm_head.*`` tensors and its
    ``quantization_config`` verbatim, a random float body of the head's hidden size.

    The fixtures (``tests/fixtures/producers``) are trimmed to the head and one layer, or are
    Eagle3-like drafters; their config claims a quantized body, so this is also a head-only
    checkpoint whose config says otherwise (vLLM failure 3)."""
    head = {n: t for n, t in load_file(str(fixture / "model.safetensors")).items()
            if n.startswith("lm_head.")}  # fmt: skip
    reference = load_file(str(fixture / "reference.safetensors"))["lm_head.weight_dequant"]
    vocab, hidden = reference.shape
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        **head,
    }
    for i in range(layers):
        tensors.update(_decoder_layer(gen, f"model.layers.{i}", hidden, hidden))
    qcfg = json.loads((fixture / "config.json").read_text())["quantization_config"]
    config = _llama_config(
        hidden, vocab_size=vocab, num_hidden_layers=layers, quantization_config=qcfg
    )
    return _save(root, config, tensors)

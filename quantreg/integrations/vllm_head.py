"""``QuantregHeadMethod``: a vLLM ``ParallelLMHead`` run by quantreg's method and kernel.

vLLM's own head loader narrows along ``output_dim`` but then copies along dim 0, which breaks
AWQ / GPTQ heads (vocab on dim 1) whose vocab is not a multiple of 64; and for quantized
models it never notices a head tensor missing from the checkpoint. Here every parameter gets
its own ``weight_loader``: check the full checkpoint extent, narrow to this rank's rows with
quantreg's geometry (built from vLLM's ``shard_indices``), hand the slice to the method's public
hook ``load_weight`` and record it; ``process_weights_after_loading`` refuses a head with a
parameter never loaded, then lets the method select its kernel (``layer.kernel``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

import quantreg

# A child of vLLM's "vllm" logger: these lines appear in vLLM's log, where its users look.
logger = logging.getLogger(f"vllm.{__name__}")


ACTIVATION_ENV = "QUANTREG_ACTIVATION_DTYPE"
"""Set to ``int8`` to run the heads quantreg loads in vLLM with int8 activations (see
``quantreg.load_lm_head(activation_dtype=...)``); unset or empty: weight-only."""


def env_activation_dtype() -> str | None:
    """The activation dtype :data:`ACTIVATION_ENV` asks for (None: unset or empty).

    Raises:
        InputError: a value quantreg does not run, naming the variable.
    """
    value = os.environ.get(ACTIVATION_ENV) or None
    try:
        quantreg.kernels.check_activation_dtype(value)
    except quantreg.InputError as exc:
        raise quantreg.InputError(f"{ACTIVATION_ENV}: {exc}", field=ACTIVATION_ENV) from exc
    return value


@functools.cache
def resolution_platform() -> quantreg.Platform:
    """The platform vLLM runs on, as quantreg describes it (CUDA without initializing it:
    vLLM's front end must not touch the device).

    Raises:
        InputError: a vLLM platform other than CPU or CUDA.
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return quantreg.Platform.detect("cpu")
    if current_platform.is_cuda():
        cap = current_platform.get_device_capability()
        triton = "" if importlib.util.find_spec("triton") is not None else "-notriton"
        return quantreg.Platform.parse(f"cuda:{cap.major}.{cap.minor}{triton}")
    raise quantreg.InputError(
        "quantreg's vLLM plugin runs on CPU and CUDA; vLLM's platform is "
        f"{current_platform.device_type}",
        field="platform",
    )


class QuantregHeadMethod(QuantizeMethodBase):
    """vLLM's quantize method for one quantized lm_head: quantreg's LinearMethod, its per-
    parameter load hook and its kernel, with the checkpoint's Resolution for every message."""

    def __init__(self, resolution: quantreg.Resolution, method: quantreg.LinearMethod) -> None:
        self.resolution = resolution
        self.method = method
        self.param_names: list[str] = []
        self.loaded: set[str] = set()

    @classmethod
    def for_layer(
        cls, resolution: quantreg.Resolution, layer: torch.nn.Module, prefix: str
    ) -> QuantregHeadMethod | None:
        """The method for vLLM head ``layer``; None when quantreg keeps the head unquantized
        (vLLM's float head then loads ``lm_head.weight``).

        Raises:
            CheckpointError: the head's tensors contradict the decision (packed tensors of a
                layout no method reads, or float tensors for a quantized head), or any head
                tensor is missing, misshapen or mistyped (:func:`quantreg.check_lm_head`).
        """
        if resolution.tensors_agree is False:
            raise quantreg.CheckpointError(
                f"{resolution.source}: the {resolution.prefix} tensors are {resolution.tensors} "
                f"but the head resolved as {resolution.method or 'unquantized'}; vLLM cannot "
                f"load them:\n{resolution.explain()}",
                path=resolution.source,
                tensor=resolution.tensor_infos[0].name if resolution.tensor_infos else None,
            )
        if not resolution.quantized or resolution.config is None:
            logger.info(
                "quantreg keeps vLLM layer %s unquantized (%s); vLLM's float head runs it",
                prefix, resolution.rule,
            )  # fmt: skip
            return None
        # Every head tensor's name, shape and dtype, from the headers, before vLLM reads any.
        quantreg.check_lm_head(resolution)
        method = resolution.config.get_linear_method(layer, resolution.prefix)
        if method is None:
            return None
        logger.info(
            "vLLM layer %s: quantreg method %s (%s)", prefix, resolution.method, resolution.rule
        )
        return cls(resolution, method)

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        """The quantreg method registers this rank's parameters; each gets our loader (vLLM's
        ``weight_loader`` in ``extra_weight_attrs`` copies along dim 0 and is not used)."""
        before = {name for name, _ in layer.named_parameters(recurse=False)}
        self.method.create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
        )
        for name, param in layer.named_parameters(recurse=False):
            if name not in before:
                param.weight_loader = functools.partial(self.load, layer, name)
                self.param_names.append(name)

    def load(
        self, layer: torch.nn.Module, name: str, param: torch.nn.Parameter, loaded: torch.Tensor
    ) -> None:
        """vLLM's ``weight_loader`` for parameter ``name``: ``loaded`` is the whole checkpoint
        tensor; this rank's rows go to the method's hook in the checkpoint's own dtype.

        Raises:
            CheckpointError: a shape or an integer dtype other than the method expects.
        """
        geometry = quantreg.layer_geometry(layer)
        expected = geometry.checkpoint_shape(param)
        integer = not param.is_floating_point()
        if tuple(loaded.shape) != tuple(expected) or (
            loaded.dtype != param.dtype if integer else not loaded.is_floating_point()
        ):
            want = param.dtype if integer else "a float dtype"
            raise quantreg.CheckpointError(
                f"{self.resolution.source}: {self._tensor(name)} is {loaded.dtype} "
                f"{list(loaded.shape)}; {self._why()} expects {want} {list(expected)}",
                path=self.resolution.source,
                tensor=self._tensor(name),
            )
        region = geometry.checkpoint_region(param)
        if region is not None:
            dim, start, stop = region
            loaded = loaded.narrow(dim, start, stop - start)
        self.method.load_weight(layer, param, loaded.to(param.device))
        self.loaded.add(name)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Refuse a head with a parameter vLLM never loaded (vLLM does not track weights of
        quantized models), then let the quantreg method select and build its kernel.

        Raises:
            CheckpointError: a head tensor is missing from the checkpoint (named), or the
                method's own checks fail.
        """
        missing = [self._tensor(n) for n in self.param_names if n not in self.loaded]
        if missing:
            raise quantreg.CheckpointError(
                f"{self.resolution.source}: {', '.join(missing)} not found in the checkpoint; "
                f"{self._why()} needs "
                f"{', '.join(self._tensor(n) for n in self.param_names)}",
                path=self.resolution.source,
                tensor=missing[0],
            )
        asked = env_activation_dtype()
        layer.activation_dtype = asked
        self.method.process_weights_after_loading(layer)
        kernel = getattr(layer, "kernel", None)
        what = f"the {self.resolution.prefix} of {self.resolution.source} ({self._why()})"
        try:
            quantreg.kernels.check_kernel_activations(kernel, asked, what)
        except quantreg.InputError as exc:
            raise quantreg.InputError(
                f"{ACTIVATION_ENV}={asked}: {exc}; unset it to run the head weight-only",
                field=ACTIVATION_ENV,
            ) from exc
        logger.info(
            "vLLM %s of %s: quantreg method %s, kernel %s",
            self.resolution.prefix, self.resolution.source, self.resolution.method,
            f"{kernel.name} ({kernel.reason})" if kernel is not None else "method-defined",
        )  # fmt: skip

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This rank's logits, padding included (vLLM gathers and trims them)."""
        return self.method.apply(layer, x, bias)

    def _tensor(self, name: str) -> str:
        return f"{self.resolution.prefix}.{name}"

    def _why(self) -> str:
        res = self.resolution
        return f"'{res.prefix}' resolved as {res.method} ({res.rule})"

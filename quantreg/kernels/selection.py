"""One kernel choice per layer, made once after loading and recorded: ``select -> Kernel``.

Every kernel quantreg has is a row of ``KERNELS``, tried in that order: the first that fits the
weights, the activation dtype and the device wins, and every other kernel is recorded with the
reason it declined. A method may restrict the candidates (``allowed``: the reference methods
run only ``reference``) and a caller may force one (``requested``). The chosen :class:`Kernel`
holds its layout and multiplies by it; nothing re-probes the device afterwards.

========================  ==================================================================
kernel                    what it computes
========================  ==================================================================
``cpu-amx``               quantreg's CPU kernel, bf16 / fp16 activations: AMX ``tdpbf16ps``
                          for 2 or more rows, AVX512-BF16 ``vdpbf16ps`` for one
``cpu-vnni-wna16``        ``cpu-avx2-wna16`` built for AVX512-VNNI (``vpdpwssd``, 512-bit):
                          the same layout and sums
``cpu-avx512-bf16``       quantreg's CPU kernel, bf16 / fp16 activations: ``vdpbf16ps``
``cpu-avx2-wna16``        quantreg's int4 / int8 CPU kernel for AVX2 + FMA, bf16 / fp16
                          activations: rows in int16 fixed point (float32 FMA for rows
                          with outliers), groups applied once
``cpu-vnni-a8``           the same layout with int8 activations, only when asked for
                          (``activation_dtype="int8"``), AVX512-VNNI ``vpdpbusd``
``cpu-avx2-a8``           the same with AVX2 integer multiply-adds
``torch-int4pack``        torch's ``_weight_int4pack_mm_for_cpu`` (bf16 / fp16 heads)
``torch-int8pack``        torch's ``_weight_int8pack_mm`` (bf16 / fp16 heads)
``cpu-avx512``            quantreg's CPU kernel, float32 FMA on the producers' exact weights
``cpu-avx512-float8``     quantreg's float8 CPU kernel for AVX512-BF16, bf16 / fp16
                          activations: ``cpu-avx2-float8``'s layout, codes looked up as bf16,
                          ``vdpbf16ps``
``cpu-avx2-float8``       quantreg's float8 CPU kernel (AVX2 + FMA + F16C), bf16 / fp16
                          activations: fp8 or e2m1 (NVFP4) codes decoded in registers
``triton``                quantreg's Triton kernel (CUDA >= 8.0; the interpreter on request)
``triton-float8``         quantreg's Triton kernel for float8 / NVFP4 heads (same conditions)
``reference``             exact block-wise dequantization in float32, any device
========================  ==================================================================

Activations stay float unless a caller asks for ``activation_dtype="int8"``: then only
``cpu-vnni-a8`` or ``cpu-avx2-a8`` may run the layer (every other kernel declines, saying so),
and a layer neither can run is refused rather than run weight-only. Otherwise float32
activations always get an exact kernel (``cpu-avx512`` or ``reference``); the cpu kernels run
float32 activations on their FMA path whatever their name, and ``cpu-avx512-float8``,
``cpu-avx2-float8``, ``cpu-vnni-wna16`` and ``cpu-avx2-wna16`` decline them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantreg.errors import InputError
from quantreg.kernels.catalog import KERNELS, Target, Weights
from quantreg.kernels.layouts import LayoutTensors
from quantreg.kernels.weights import IntWeights
from quantreg.platform import Platform

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelChoice:
    """The decision: the kernel's name, why it won, and why every other one declined."""

    name: str
    reason: str
    declined: tuple[tuple[str, str], ...] = ()
    requested: bool = False


@dataclass(frozen=True, eq=False)
class Kernel:
    """The kernel a layer runs, with its layout: call it as ``kernel(x, bias)``.

    ``name`` is one of ``KERNELS`` (or ``dense`` / ``method-defined`` for layers that run no
    quantreg kernel: then ``layout`` is None and the layer computes itself).
    """

    name: str
    reason: str
    declined: tuple[tuple[str, str], ...] = ()
    layout: Any = None
    requested: bool = False
    activation_dtype: str | None = None  # what the kernel quantizes activations to (None: float)

    @classmethod
    def record(cls, name: str, reason: str) -> Kernel:
        """A record for a layer that computes without a quantreg kernel (nothing to call)."""
        return cls(name, reason)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for any leading shape of ``x``, in ``x``'s dtype.

        Raises:
            InputError: a record (``dense``, ``method-defined``) has nothing to call.
        """
        if self.layout is None:
            raise InputError(f"kernel '{self.name}' is a record: the layer computes itself")
        run = KERNELS[self.name].run
        return rows_matmul(x, bias, self.layout.perm, lambda x2: run(x2, self.layout))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layout's tensors by field name (empty for a record)."""
        if isinstance(self.layout, LayoutTensors):
            return self.layout.tensors()
        return {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``{name, reason, requested, activation_dtype, layout, declined: {name:
        reason}}``."""
        return {
            "name": self.name,
            "reason": self.reason,
            "requested": self.requested,
            "activation_dtype": self.activation_dtype,
            "layout": type(self.layout).__name__ if self.layout is not None else None,
            "declined": dict(self.declined),
        }

    def explain(self) -> str:
        """Lines for a human: the kernel, why, and every kernel declined."""
        lines = [f"  kernel: {self.name} ({self.reason})"]
        lines += [f"    - {name}: {why}" for name, why in self.declined]
        return "\n".join(lines)


def rows_matmul(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    perm: torch.Tensor | None,
    matmul: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for any leading shape: ``matmul`` gets ``x`` as ``[rows, in]``
    with its features in ``perm`` order (None: as they are); the result is in ``x``'s dtype.
    No op runs that would change nothing (a reshape of a matrix, a cast to its own dtype): on
    caches the weights just streamed through, each costs tens of microseconds."""
    flat = x.dim() != 2
    x2 = x.reshape(-1, x.shape[-1]) if flat else x
    if perm is not None:
        x2 = x2.index_select(-1, perm.to(x2.device))
    out = matmul(x2)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1]) if flat else out


ACTIVATION_DTYPES = ("int8",)
"""What ``activation_dtype`` may ask for besides None (float activations, weight-only):
``int8``, dynamic per-row symmetric quantization (``round(x * 127 / max|x|)``, as vLLM's
W8A8 / W4A8 kernels do), run by ``cpu-vnni-a8`` (AVX512-VNNI) or ``cpu-avx2-a8``."""


def check_activation_dtype(value: object) -> None:
    """Raise unless ``value`` is None or one of :data:`ACTIVATION_DTYPES`.

    Raises:
        InputError: anything else, naming the value and what is accepted.
    """
    if value is not None and value not in ACTIVATION_DTYPES:
        raise InputError(
            f"activation_dtype {value!r} is not supported; use None (float activations, "
            f"weight-only kernels) or one of {', '.join(map(repr, ACTIVATION_DTYPES))}",
            field="activation_dtype",
        )


def check_kernel_activations(kernel: Kernel | None, asked: str | None, what: str) -> None:
    """Raise unless ``kernel`` (None: the layer records no kernel) multiplies the activations
    ``asked`` for (None: nothing asked): the check after a layer chose its kernel, for the
    layers that compute without one of :data:`KERNELS` (a float head, a plugin's own method).

    Raises:
        InputError: it keeps its activations in float; the message names ``what`` (the layer
            and how it resolved) and the kernel.
    """
    if asked is None or (kernel is not None and kernel.activation_dtype == asked):
        return
    runs = f"{kernel.name} ({kernel.reason})" if kernel is not None else "no quantreg kernel"
    raise InputError(
        f"activation_dtype={asked!r} was asked for, but {what} runs {runs}, which keeps its "
        "activations in float",
        field="activation_dtype",
    )


def kernel_names() -> tuple[str, ...]:
    """Every kernel quantreg can select, in the order they are tried."""
    return tuple(KERNELS)


def choose(
    weights: Weights,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    platform: Platform | None = None,
    allowed: Sequence[str] | None = None,
    requested: str | None = None,
    activation_dtype: str | None = None,
) -> KernelChoice:
    """The first kernel of ``allowed`` (default: all, in ``KERNELS`` order) that fits; or
    ``requested``, which must fit. ``platform`` defaults to the device's, probed.
    ``activation_dtype="int8"`` asks for a kernel that quantizes the activations (see
    :data:`ACTIVATION_DTYPES`); None (the default) keeps them float: weight-only kernels.

    Raises:
        InputError: an unknown kernel name or ``activation_dtype``, a requested kernel that
            cannot run here, or no kernel with the activations asked for that can.
    """
    import torch

    check_activation_dtype(activation_dtype)
    dev = torch.device(device)
    for name in [*(allowed or ()), *([requested] if requested else [])]:
        if name not in KERNELS:
            raise InputError(
                f"unknown kernel {name!r}; quantreg's kernels: {', '.join(KERNELS)}",
                field="kernel",
            )
    target = Target(
        weights, dtype, dev, platform or Platform.detect(dev), requested, activation_dtype
    )
    pool = list(allowed) if allowed else list(KERNELS)
    if requested is not None:
        return _requested(target, requested, pool)
    declined: list[tuple[str, str]] = []
    chosen: str | None = None
    for name in KERNELS:
        if name not in pool:
            declined.append((name, f"not among this method's kernels ({', '.join(pool)})"))
            continue
        kernel = KERNELS[name]
        if chosen is None:
            why = kernel.declines(target)
        else:
            why = kernel.other_activations(target) or f"{chosen} fits and comes first"
        if why is None:
            chosen = name
        else:
            declined.append((name, why))
    if chosen is None:  # "reference" fits every layer it is offered, with float activations
        raise _none_fits(target, declined)
    return KernelChoice(chosen, KERNELS[chosen].summary, tuple(declined))


def _requested(target: Target, requested: str, pool: list[str]) -> KernelChoice:
    """The kernel asked for by name, if the method runs it and it fits.

    Raises:
        InputError: the method does not run it, or it cannot run this layer (and why).
    """
    if requested not in pool:
        raise InputError(
            f"kernel {requested!r} was requested, but this method runs only {', '.join(pool)}",
            field="kernel",
        )
    why = KERNELS[requested].declines(target)
    if why is not None:
        raise InputError(f"kernel {requested!r} cannot run this layer: {why}", field="kernel")
    declined = [(n, "not requested") for n in KERNELS if n != requested]
    return KernelChoice(
        requested, f"requested; {KERNELS[requested].summary}", tuple(declined), True
    )


def _none_fits(target: Target, declined: list[tuple[str, str]]) -> InputError:
    """The error when no kernel fits: with quantized activations asked for, why each kernel
    that runs them declined (every other one keeps the activations float)."""
    asked = target.activation_dtype
    whys = [(n, why) for n, why in declined if KERNELS[n].activation_dtype == asked]
    where = f"{describe(target.weights)} on {target.device}, {target.dtype}"
    text = "; ".join(f"{n}: {why}" for n, why in whys) or "none"
    if asked is None:  # pragma: no cover - "reference" fits every layer it is offered
        return InputError(f"no kernel fits {where}: {text}", field="kernel")
    return InputError(
        f"activation_dtype={asked!r}: no kernel with {asked} activations can run this layer "
        f"({where}); every other kernel keeps the activations float. Declined: {text}",
        field="activation_dtype",
    )


def build(choice: KernelChoice, weights: Weights, dtype: torch.dtype) -> Kernel:
    """Build the chosen kernel's layout from ``weights``."""
    kernel = KERNELS[choice.name]
    layout = kernel.build(weights, dtype)
    return Kernel(
        choice.name, choice.reason, choice.declined, layout, choice.requested,
        kernel.activation_dtype,
    )  # fmt: skip


def select(
    weights: Weights,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    platform: Platform | None = None,
    allowed: Sequence[str] | None = None,
    requested: str | None = None,
    what: str = "layer",
    activation_dtype: str | None = None,
) -> Kernel:
    """Choose a kernel (see :func:`choose`), build its layout, log the choice at INFO.

    Raises:
        InputError: see :func:`choose`.
    """
    choice = choose(
        weights, dtype=dtype, device=device, platform=platform, allowed=allowed,
        requested=requested, activation_dtype=activation_dtype,
    )  # fmt: skip
    kernel = build(choice, weights, dtype)
    logger.info(
        "%s: kernel %s (%s) for %s on %s; declined: %s",
        what, choice.name, choice.reason, describe(weights), device,
        "; ".join(f"{n}: {why}" for n, why in choice.declined) or "none",
    )  # fmt: skip
    return kernel


def describe(weights: Weights) -> str:
    """``int4 g128 [N=1024, K=256]``-style summary of the weights."""
    if isinstance(weights, IntWeights):
        group = weights.group_size
        groups = "channel" if weights.groups == 1 else (f"g{group}" if group else "act-order")
        return f"int{weights.bits} {groups} [N={weights.n}, K={weights.k}]"
    return f"fp8 [N={weights.n}, K={weights.k}]"

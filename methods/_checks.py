"""Checks the built-in methods run on loaded tensors before building a kernel.

They run on every load, so each is one cheap pass over small tensors (scales and zero points
are ``[groups, vocab]``) -- never over the packed codes, which cannot hold a bad value -- and
one pass of two integer maxima over a float8 weight, which can (its NaN codes).

What is refused (``CheckpointError`` naming the tensor): non-finite scales; scales whose
dequantized weights ``|q - z| * |s|`` overflow the scale dtype or the compute dtype (the
kernels round weights to the one and compute in the other: an infinite weight makes every
logit of its row NaN); float8 NaN codes. What is legal but odd, and logged as a WARNING naming
the tensor: vocab rows whose scales are all zero (their logits are exactly 0), negative scales
(they flip the sign of their group's weights; not warned where the producer writes them on
purpose: AutoRound's symmetric quantizer), and zero points that contradict a symmetric config
(used as stored). Where every producer stores a
positive scale (fp8's ``weight_scale``, a static ``input_scale``), zero and negative ones are
refused (``check_positive``).
"""

from __future__ import annotations

import logging

import torch

from quantreg import CheckpointError, LayerGeometry, layer_geometry
from quantreg import check_finite as finite_values

logger = logging.getLogger(__name__)


def _extremes(value: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` in one pass; NaN propagates to both."""
    low, high = torch.aminmax(value)
    return float(low), float(high)


def check_finite(layer: torch.nn.Module, name: str) -> None:
    """NaN or inf in a scale would silently poison every logit: refuse it, naming the tensor
    (``quantreg.check_finite`` on the layer's parameter ``name``).

    Raises:
        CheckpointError: the tensor holds a non-finite value.
    """
    finite_values(getattr(layer, name), f"{layer_geometry(layer).prefix}.{name}")


def check_scales(
    layer: torch.nn.Module,
    name: str,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    codes: tuple[float, float],
    *,
    signed: bool = False,
) -> None:
    """Check decoded ``[G, N]`` scales (``name`` is their tensor on ``layer``) of the vocab
    rows this rank loaded, with their ``[G, N]`` zero points (None: 0) and the ``(lowest,
    highest)`` value a code may take (``signed``: the producer writes negative scales on
    purpose, so they are not warned about). Typical scales (positive, far from overflow) cost a few
    reductions; the exact per-entry bound runs only when those say it may be needed.

    Raises:
        CheckpointError: a non-finite scale, or one whose weights overflow the scale dtype or
            the compute dtype, naming the tensor, the value and where it is.
    """
    check_finite(layer, name)
    geometry = layer_geometry(layer)
    rows = geometry.output_stop - geometry.output_start  # the rest is vocab padding
    if rows == 0:
        return  # a rank that holds only padding
    real = scales[:, :rows]
    zeros = zeros[:, :rows] if zeros is not None else None
    low, high = _extremes(real)
    z_low, z_high = _extremes(zeros) if zeros is not None else (0.0, 0.0)
    dtype = min((real.dtype, geometry.params_dtype), key=lambda d: torch.finfo(d).max)
    widest = max(z_high - codes[0], codes[1] - z_low)  # the largest |q - z|
    if max(-low, high) * widest > torch.finfo(dtype).max:
        _check_overflow(geometry, name, real, zeros, codes, dtype)
    if low <= 0:
        _warn_odd_scales(f"{geometry.prefix}.{name}", real, 0.0 if signed else low)


def _check_overflow(
    geometry: LayerGeometry,
    name: str,
    real: torch.Tensor,
    zeros: torch.Tensor | None,
    codes: tuple[float, float],
    dtype: torch.dtype,
) -> None:
    """Refuse scales whose weights ``|q - z| * |s|`` exceed ``dtype``'s finite range."""
    z = zeros.to(torch.float32) if zeros is not None else torch.zeros(())
    reach = torch.maximum(z - codes[0], codes[1] - z)
    peak = real.abs().to(torch.float32) * reach
    limit, top = torch.finfo(dtype).max, float(peak.max())
    if top <= limit:
        return
    group, row = divmod(int(peak.argmax()), peak.shape[1])
    role = "scale" if dtype == real.dtype else "compute"
    full = f"{geometry.prefix}.{name}"
    raise CheckpointError(
        f"{full}: scale {float(real[group, row]):.6g} (group {group}, vocab row "
        f"{geometry.output_start + row}) makes dequantized weights |q - z| * |s| up to "
        f"{top:.6g}, beyond {limit:.6g}, the largest finite value of the {role} dtype "
        f"{str(dtype).removeprefix('torch.')}; expected scales whose weights are finite in it",
        tensor=full,
    )


def _warn_odd_scales(full: str, real: torch.Tensor, low: float) -> None:
    """WARNING for vocab rows whose scales are all zero and for negative scales."""
    zero_rows = int((real == 0).all(dim=0).sum())
    if zero_rows:
        logger.warning(
            "%s: %d of %d vocab rows have all-zero scales: their logits are exactly 0 (plus "
            "the bias)", full, zero_rows, real.shape[1],
        )  # fmt: skip
    if low < 0:
        logger.warning(
            "%s holds %d negative scale(s) of %d: each flips the sign of its group's weights "
            "(used as stored)", full,
            int((real < 0).sum()), real.numel(),
        )  # fmt: skip


def check_positive(layer: torch.nn.Module, name: str, values: torch.Tensor) -> None:
    """Refuse zero and negative values of scale ``name`` (``values``: its entries, flat; more
    than one: per vocab row of this rank) where producers always store a positive one: fp8's
    ``weight_scale`` and every static ``input_scale`` (AutoFP8, vLLM and llm-compressor store
    ``amax / 448``, clamped above zero), so such a value is a broken file, not a zero row.

    Raises:
        CheckpointError: a value <= 0, naming the tensor, the count and the first one.
    """
    geometry = layer_geometry(layer)
    if values.numel() > 1:  # per-channel: the real rows only (the rest is vocab padding)
        values = values[: geometry.output_stop - geometry.output_start]
    bad = (values <= 0).nonzero()
    if bad.numel() == 0:
        return
    first = int(bad[0, 0])
    where = f" (vocab row {geometry.output_start + first})" if values.numel() > 1 else ""
    full = f"{geometry.prefix}.{name}"
    raise CheckpointError(
        f"{full} holds {bad.shape[0]} scale(s) <= 0, the first {float(values[first]):.6g}"
        f"{where}; expected positive scales (producers store amax / 448, clamped above 0)",
        tensor=full,
    )


def check_symmetric_zeros(
    layer: torch.nn.Module, name: str, zeros: torch.Tensor, expected: int, why: str
) -> None:
    """Warn when decoded ``[G, N]`` zero points of a symmetric config (``why``) are not all
    ``expected``: they are used as stored, while kernels that take the config at its word
    (vLLM's gptq_marlin) use ``expected``."""
    geometry = layer_geometry(layer)
    real = zeros[:, : geometry.output_stop - geometry.output_start]
    if real.numel() == 0 or _extremes(real) == (expected, expected):
        return
    logger.warning(
        "%s.%s: %d of %d zero points differ from %d, which %s implies; quantreg uses them as "
        "stored (vLLM's *_marlin kernels would use %d)",
        geometry.prefix, name, int((real != expected).sum()), real.numel(), expected, why,
        expected,
    )  # fmt: skip


def check_float8_codes(layer: torch.nn.Module, name: str) -> None:
    """Refuse float8 (e4m3fn) weights holding NaN codes (``0x7F`` / ``0xFF``): every logit of
    their row would be NaN. Two integer maxima over the bytes find them.

    Raises:
        CheckpointError: NaN codes, naming the tensor, their count and the first one.
    """
    raw = getattr(layer, name).data.view(torch.uint8)
    if int(raw.view(torch.int8).max()) != 0x7F and int(raw.max()) != 0xFF:
        return
    nan = (raw & 0x7F) == 0x7F
    first = nan.nonzero()[0].tolist()
    geometry = layer_geometry(layer)
    full = f"{geometry.prefix}.{name}"
    raise CheckpointError(
        f"{full} holds {int(nan.sum())} NaN float8 code(s) (0x7F / 0xFF), the first at "
        f"[{geometry.output_start + first[0]}, {first[1]}]; expected finite e4m3 values",
        tensor=full,
    )

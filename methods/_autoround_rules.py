"""AutoRound's ``packing_format`` values: the method that reads each, the widths its layout
holds, and a layer's overrides in that method's field names (used by ``autoround``).

Checked against auto-round 0.16.1: ``export/export_to_autoround/export.py``
(``dynamic_import_quant_linear_for_packing``: ``auto_round:auto_gptq`` / ``auto_round:gptq`` →
``qlinear_torch_zp``, GPTQ v1 zero points, no ``g_idx``; ``auto_round:auto_awq`` →
``WQLinear_GEMM``) and ``inference/convert_model.py`` (``auto_round:gptq`` and
``auto_round:awq`` normalized to the ``auto_*`` spellings).
"""

from __future__ import annotations

from typing import Any

DEFAULT_PACKING = "auto_round:auto_gptq"
# packing_format -> (the method that reads it, its tensor layout in words)
PACKINGS: dict[str, tuple[str, str]] = {
    "auto_round:auto_gptq": ("gptq", "GPTQ v1 (no g_idx)"),
    "auto_round:gptq": ("gptq", "GPTQ v1 (no g_idx)"),
    "auto_round:auto_awq": ("awq", "AutoAWQ GEMM"),
    "auto_round:awq": ("awq", "AutoAWQ GEMM"),
}
# The widths each reading method's layout holds (GPTQ: 4 and 8; AutoAWQ GEMM: 4).
BITS: dict[str, tuple[int, ...]] = {"gptq": (4, 8), "awq": (4,)}


def check_packing(value: str) -> str:
    """A ``packing_format`` quantreg reads, lower-cased.

    Raises:
        ValueError: any other value (AutoRound's other packings included), naming those read.
    """
    key = value.strip().lower()
    if key not in PACKINGS:
        raise ValueError(
            f"expected one of {', '.join(PACKINGS)}; AutoRound's other packings (auto_round "
            "asymmetric, auto_round:gptqmodel, auto_round:llm_compressor, fp8, nvfp4, mxfp4, "
            "...) are not read by quantreg"
        )
    return key


def head_layout(packing: str) -> tuple[str, str]:
    """The method that reads ``packing`` and its layout in words."""
    return PACKINGS[packing]


def check_bits(bits: int, packing: str) -> int:
    """``bits`` when the layout of ``packing`` holds it.

    Raises:
        ValueError: a width the layout does not hold, naming the widths it does.
    """
    target, layout = PACKINGS[packing]
    allowed = BITS[target]
    if bits not in allowed:
        widths = " or ".join(str(b) for b in allowed)
        raise ValueError(
            f"packing_format '{packing}' ({layout} tensors, read as {target}) holds {widths}-bit "
            "codes here"
        )
    return bits


def target_overrides(packing: str, bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    """A layer's scheme in the field names of the method that reads ``packing``."""
    if PACKINGS[packing][0] == "awq":
        return {"bits": bits, "group_size": group_size, "zero_point": not sym}
    return {"bits": bits, "group_size": group_size, "sym": sym}

"""Rules shared by the AWQ and GPTQ families (weight-only int4/int8, group-wise)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator

from quantreg import ConfigError, LayerRule, Platform, is_lm_head

# Group sizes the *_marlin methods take (their Triton kernel over the k-packed layout); -1 = one
# group per column.
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_CAPABILITY = (8, 0)


def _check_group_size(value: int) -> int:
    if value == 0 or value < -1:
        raise ValueError("expected -1 (one group) or a positive group size")
    return value


# A group size is -1 (one group over the whole input) or a positive integer.
GroupSize = Annotated[int, AfterValidator(_check_group_size)]


def marlin_platform_reason(name: str, platform: Platform) -> str | None:
    """Why ``platform`` cannot run the Triton kernel that ``name`` is for."""
    if platform.device != "cuda":
        return f"{name} needs CUDA >= 8.0 with triton; platform is {platform}"
    if not platform.has_cuda(MARLIN_MIN_CAPABILITY):
        return f"{name} needs CUDA compute capability >= 8.0; platform is {platform}"
    if not platform.triton:
        return f"{name} needs triton, which is not installed ({platform})"
    return None


def marlin_group_reason(name: str, group_size: int) -> str | None:
    """Why ``name`` (a ``*_marlin`` method) cannot take this group size."""
    if group_size not in MARLIN_GROUP_SIZES:
        sizes = ", ".join(map(str, MARLIN_GROUP_SIZES))
        return f"{name} supports group_size {sizes}; this layer has {group_size}"
    return None


def skipped_by(prefix: str, modules: list[str] | None) -> str | None:
    """The first ``modules_to_not_convert`` entry contained in ``prefix`` (substring match)."""
    for module in modules or ():
        if module and module in prefix:
            return module
    return None


def head_and_skip_rule(
    prefix: str, *, lm_head: bool, lm_head_given: bool, modules: list[str] | None
) -> tuple[LayerRule | None, list[str]]:
    """The AWQ/GPTQ rules before ``dynamic``: the ``lm_head`` flag, then the skip list.

    Returns a final rule when one of them decides, else None and the rules that fired.
    """
    skip = skipped_by(prefix, modules)
    skip_text = f"modules_to_not_convert '{skip}'" if skip else None
    fired: list[str] = []
    if is_lm_head(prefix):
        flag_text = f"lm_head: {str(lm_head).lower()}" + ("" if lm_head_given else " (absent)")
        if not lm_head:
            return LayerRule(False, flag_text, also=(skip_text,) if skip_text else ()), []
        fired.append(flag_text)
    if skip_text:
        return LayerRule(False, skip_text, also=tuple(fired)), []
    return None, fired


def check_layout_fields(
    data: Mapping[str, Any], fields: Sequence[str], *, method: str, source: str | None
) -> None:
    """Refuse a config whose layout fields (GPTQModel's ``format`` and ``checkpoint_format``,
    AutoAWQ's ``version``) name different layouts: no field may silently win over another.

    Raises:
        ConfigError: two of ``fields`` hold different strings; the message names each field
            given and its value.
    """
    if not isinstance(data, Mapping):
        return  # from_quant_config reports a config that is not a JSON object
    given = {f: data[f] for f in fields if isinstance(data.get(f), str)}
    if len({value.strip().lower() for value in given.values()}) <= 1:
        return
    where = f" in {source}" if source else ""
    named = ", ".join(f"{field} = {value!r}" for field, value in given.items())
    raise ConfigError(
        f"invalid {method} quantization_config{where}: the layout fields disagree: {named}; "
        "they name the same tensor layout and must agree (format decides only when the "
        "others are absent). Fix the config so that they agree.",
        field=list(given)[-1],
    )

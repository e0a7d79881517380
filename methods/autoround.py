"""``auto-round`` (alias ``intel/auto-round``): Intel AutoRound checkpoints in AutoRound's own
format, read by the GPTQ or AWQ methods by their ``packing_format``.

AutoRound (``auto_round/export/export_to_autoround/export.py``, 0.16.1) writes
``quant_method: "auto-round"`` and packs its integer layers in another library's layout:

* ``auto_round:auto_gptq`` (also written as ``auto_round:gptq``): GPTQ v1 tensors (stored zero
  points are ``zero - 1``; ``auto_round_extension.torch.qlinear_torch_zp``) **without**
  ``g_idx`` -- its groups are ``row // group_size``;
* ``auto_round:auto_awq`` (also ``auto_round:awq``): AutoAWQ GEMM tensors
  (``export_to_awq.utils.WQLinear_GEMM``).

Its ``bits`` / ``group_size`` / ``sym`` / ``data_type`` are the default scheme; ``extra_config``
maps a layer name -- or a regex (AutoRound's loader, ``inference/utils._expand_regex_config``,
``re.search``-es keys that are not layer names) -- to the fields it overrides; ``bits: 16``
keeps a layer float. The lm_head is quantized only when an ``extra_config`` entry names it
(AutoRound's exporter writes one for a quantized head; vLLM's ``AutoRoundConfig`` quantizes a
``ParallelLMHead`` only through an exact entry). ``block_name_to_quantize`` (or
``to_quant_block_names``) lists the name prefixes of the quantized blocks. An absent
``packing_format`` is ``auto_round:auto_gptq``, as vLLM and AutoRound's loader read it -- except
under AutoRound 0.2's label ``intel/auto-round``, whose export packed with AutoGPTQ's
QuantLinear (GPTQ v1 *with* ``g_idx``; checked against its ``export_to_autoround.py``).

The tensors win over the config: AutoRound 0.16.1's default low-memory export writes a head that
``extra_config`` says is 4-bit as a dense float weight (its fake-quantized weight), which then
loads float, the rule saying why; packed tensors under a config that keeps the head float load
quantized (the GPTQ and AWQ methods' ``rule_from_tensors``).

AutoRound's other packings (``auto_round`` asymmetric, ``auto_round:gptqmodel``,
``auto_round:llm_compressor``, fp8 / nvfp4 / mxfp4 ...) and data types are refused by name. Checked
against auto-round 0.16.1 (its export and inference code) and vLLM's
``quantization/auto_round.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from quantreg import (
    ConfigError,
    LayerRule,
    QuantConfig,
    Relabel,
    checked_regex,
    is_lm_head,
    regex_list_problem,
    regex_problem,
)
from quantreg.methods._autoround_rules import (
    DEFAULT_PACKING,
    check_bits,
    check_packing,
    head_layout,
    target_overrides,
)
from quantreg.methods._wna16 import GroupSize
from quantreg.methods.awq import AWQConfig
from quantreg.methods.gptq import GPTQConfig, GPTQLinearMethod

DATA_TYPES = ("int",)
# AutoRound 0.2's label: its export_to_autoround packed with AutoGPTQ's QuantLinear (g_idx kept)
# and wrote no packing_format.
LEGACY_LABEL = "intel/auto-round"
# A key of only name characters: linear to search for, so not counted among the regexes checked.
PLAIN_NAME = re.compile(r"[\w.]+")
# A layer's tensors in the GPTQ or AWQ layout (a float layer has only ``weight`` and ``bias``).
PACKED = GPTQConfig.tensor_names | AWQConfig.tensor_names
# Bits at or above this keep a layer float (AutoRound writes 16 with data_type "float" / "fp").
FLOAT_BITS = 16


class LayerEntry(BaseModel):
    """One ``extra_config`` entry: the scheme fields it overrides (other keys are kept)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    bits: int | None = Field(None, ge=1, le=64)
    group_size: GroupSize | None = None
    sym: bool | None = None
    data_type: str | None = None


class AutoRoundConfig(QuantConfig):
    """``quantization_config`` of an AutoRound checkpoint (``quant_method: "auto-round"``).

    It is never run itself: :meth:`relabel` hands the checkpoint to the GPTQ or AWQ methods
    (and their upgrades, ``gptq_marlin`` / ``awq_marlin`` / ``cpu_wna16``) with a layer rule
    that names the ``packing_format`` and the ``extra_config`` entry that decided.
    """

    linear_method = GPTQLinearMethod
    variant_fields: ClassVar[frozenset[str]] = frozenset({"packing_format", "data_type", "bits"})

    packing_format: str | None = None
    data_type: str = "int"
    bits: int
    group_size: GroupSize
    sym: bool = True
    block_name_to_quantize: str | list[str] | list[list[str]] | None = None
    to_quant_block_names: str | list[str] | list[list[str]] | None = None
    extra_config: dict[str, LayerEntry] | None = None

    @field_validator("packing_format")
    @classmethod
    def _packing(cls, value: str | None) -> str | None:
        return None if value is None else check_packing(value)

    @field_validator("data_type")
    @classmethod
    def _data_type(cls, value: str) -> str:
        if value.strip().lower() not in DATA_TYPES:
            raise ValueError(
                "quantreg reads AutoRound's integer weights only (data_type 'int'); float "
                "formats (fp8, nv_fp, mx_fp, ...) are not supported"
            )
        return value.strip().lower()

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int, info: ValidationInfo) -> int:
        if "packing_format" not in info.data:
            return value  # the packing_format was refused: that error says why
        return check_bits(value, info.data["packing_format"] or DEFAULT_PACKING)

    @classmethod
    def from_quant_config(
        cls, data: Mapping[str, Any], *, method: str, source: str | None = None
    ) -> Self:
        """Validate an AutoRound config; ``extra_config``'s regexes are checked first, together
        and each, so that matching a layer name against them is bounded.

        Raises:
            ConfigError: a regex that cannot be matched in bounded time, or a field with a bad
                value (the message names the file, the field, the value and what is allowed).
        """
        extra = data.get("extra_config") if isinstance(data, Mapping) else None
        keys = [
            k for k in (extra if isinstance(extra, Mapping) else ())
            if isinstance(k, str) and not PLAIN_NAME.fullmatch(k)
        ]  # fmt: skip
        where = f" in {source}" if source else ""
        problem = regex_list_problem(keys)
        if problem is not None:
            raise ConfigError(
                f"invalid {method} quantization_config{where}: field 'extra_config': {problem}",
                field="extra_config",
            )
        for key in keys:
            problem = regex_problem(key)
            if problem is not None:
                raise ConfigError(
                    f"invalid {method} quantization_config{where}: field 'extra_config': entry "
                    f"{key!r} {problem}",
                    field="extra_config",
                )
        return super().from_quant_config(data, method=method, source=source)

    @classmethod
    def relabel(cls, data: Mapping[str, Any]) -> Relabel | None:
        """The GPTQ or AWQ config its ``packing_format`` names, and this config's layer rule;
        None for a config this class refuses (parsing it then reports why)."""
        try:
            config = cls.from_quant_config(data, method="auto-round")
        except ConfigError:
            return None
        target, layout = head_layout(config.packing)
        label = str(data.get("quant_method", "")).strip().lower()
        g_idx = config.packing_format is None and label == LEGACY_LABEL
        if g_idx:
            layout = "AutoGPTQ's GPTQ v1 (with g_idx)"
        note = (
            f"quant_method '{label}' with {config.packing_text}: AutoRound writes {layout} "
            f"tensors, so it is read as {target}"
        )
        return Relabel(target, config.target_config(g_idx=g_idx), note, config.rule_with_tensors)

    @property
    def packing(self) -> str:
        """The packing: ``packing_format``, or the default vLLM and AutoRound's loader use."""
        return self.packing_format or DEFAULT_PACKING

    @property
    def packing_text(self) -> str:
        if self.packing_format is None:
            return f"no packing_format (read as '{DEFAULT_PACKING}')"
        return f"packing_format '{self.packing_format}'"

    def target_config(self, *, g_idx: bool = False) -> dict[str, Any]:
        """The GPTQ or AWQ ``quantization_config`` of the default scheme (the head is decided
        by :meth:`layer_rule`); ``g_idx`` for AutoRound 0.2's exports, written by AutoGPTQ's
        QuantLinear."""
        target, _ = head_layout(self.packing)
        if target == "awq":
            return {"quant_method": "awq", "bits": self.bits, "group_size": self.group_size,
                    "zero_point": not self.sym, "version": "gemm"}  # fmt: skip
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "desc_act": False, "checkpoint_format": "gptq",
                "g_idx": g_idx, "signed_scales": True}  # fmt: skip

    def blocks(self) -> list[str]:
        """The quantized blocks' name prefixes (a comma-separated string or nested lists)."""
        value = self.block_name_to_quantize or self.to_quant_block_names
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        flat: list[str] = []
        for item in value or []:
            flat.extend(item if isinstance(item, list) else [item])
        return flat

    def extra_entry(self, prefix: str) -> tuple[str, LayerEntry] | None:
        """The entry for ``prefix``: its exact name, else the first key that ``re.search``-es
        it (AutoRound's loader; an exact entry wins over a regex)."""
        entries = self.extra_config or {}
        if prefix in entries:
            return prefix, entries[prefix]
        for key, entry in entries.items():
            pattern = re.compile(key) if PLAIN_NAME.fullmatch(key) else checked_regex(key)
            if pattern.search(prefix):
                return key, entry
        return None

    def layer_rule(self, prefix: str) -> LayerRule:
        """``extra_config`` (exact name, then regex), then for a head: float; else
        ``block_name_to_quantize``, then the default scheme. Overrides use the reading
        method's field names.

        Raises:
            ConfigError: the deciding entry quantizes the layer in a way its packing cannot
                hold (bits, data_type).
        """
        packing = self.packing_text
        found = self.extra_entry(prefix)
        if found is not None:
            return self._entry_rule(prefix, *found)
        if is_lm_head(prefix):
            return LayerRule(
                False, f"extra_config: no entry names '{prefix}' (AutoRound quantizes a head "
                f"only through one; {packing})"
            )  # fmt: skip
        blocks = self.blocks()
        if blocks and not any(prefix.startswith(block) for block in blocks):
            return LayerRule(False, f"block_name_to_quantize: no block covers '{prefix}'")
        return LayerRule(True, f"{packing}: bits={self.bits}, group_size={self.group_size}, "
                         f"sym={str(self.sym).lower()}")  # fmt: skip

    def rule_with_tensors(self, prefix: str, names: frozenset[str]) -> LayerRule:
        """:meth:`layer_rule`, except that a layer it quantizes whose tensors (``names``, after
        the prefix) are float loads float: AutoRound 0.16.1's default low-memory export writes a
        quantized head dense -- its fake-quantized weight -- while ``extra_config`` says 4-bit.

        Raises:
            ConfigError: as :meth:`layer_rule`.
        """
        rule = self.layer_rule(prefix)
        if not rule.quantized or not names or names & PACKED:
            return rule
        shown = ", ".join(f"{prefix}.{name}" for name in sorted(names))
        verb = "is" if len(names) == 1 else "are"
        return LayerRule(
            False, f"tensors: {shown} {verb} float (AutoRound's low-memory export writes a "
            "quantized layer dense, as its fake-quantized weight): loaded float, as tensors say",
            also=(rule.rule, *rule.also),
        )  # fmt: skip

    def _entry_rule(self, prefix: str, key: str, entry: LayerEntry) -> LayerRule:
        bits = self.bits if entry.bits is None else entry.bits
        packing = self.packing_text
        if bits >= FLOAT_BITS:
            return LayerRule(False, f"extra_config '{key}': bits={bits} ({packing})")
        if (entry.model_extra or {}).get("rotation_config") is not None:
            raise ConfigError(
                f"auto-round extra_config '{key}' rotates '{prefix}' (rotation_config "
                f"{entry.model_extra['rotation_config']!r}); rotated layers are not supported",
                field="extra_config",
            )
        data_type = entry.data_type or self.data_type
        if data_type.strip().lower() not in DATA_TYPES:
            raise ConfigError(
                f"auto-round extra_config '{key}' quantizes '{prefix}' with data_type "
                f"{data_type!r}; quantreg reads AutoRound's integer weights only ('int')",
                field="extra_config",
            )
        try:
            check_bits(bits, self.packing)
        except ValueError as exc:
            raise ConfigError(
                f"auto-round extra_config '{key}' quantizes '{prefix}' with bits={bits}: {exc}",
                field="extra_config",
            ) from None
        group_size = self.group_size if entry.group_size is None else entry.group_size
        sym = self.sym if entry.sym is None else entry.sym
        text = f"bits={bits}, group_size={group_size}, sym={str(sym).lower()}"
        overrides = target_overrides(self.packing, bits, group_size, sym)
        return LayerRule(True, f"extra_config '{key}' → {text} ({packing})", overrides)

    def format_reason(self) -> str | None:
        return "AutoRound checkpoints are read by the gptq and awq methods (by packing_format)"

"""compressed-tensors' config schema: the pydantic models of a ``config_groups`` entry (its
targets and ``QuantizationArgs``) and of ``sparsity_config``, and how a target matches a module
(``compressed_tensors.utils.match``). Validated as compressed-tensors validates them, so that
a config it refuses is refused here, naming the field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ValidationInfo,
    field_validator,
    model_validator,
)

from quantreg.methods._ct_targets import check_entries, match_kind
from quantreg.methods._fp8_blocks import block_problem

FORMATS = (
    "dense", "int-quantized", "float-quantized", "naive-quantized", "pack-quantized",
    "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized",
    "mixed-precision", "sparse-bitmask", "sparse-24-bitmask", "marlin-24",
)  # fmt: skip
GROUPED_STRATEGIES = ("group", "tensor_group")  # a positive group_size required
_STRICT = ConfigDict(extra="allow", strict=True, frozen=True)


def _check_format(value: str | None) -> str | None:
    if value is not None and value not in FORMATS:
        raise ValueError(f"unknown compressed-tensors format; expected one of {', '.join(FORMATS)}")
    return value


Format = Annotated[str | None, AfterValidator(_check_format)]


class QuantizationArgs(BaseModel):
    """How one tensor kind (weights, input or output activations) is quantized."""

    model_config = _STRICT

    num_bits: int = 8
    type: Literal["int", "float"] = "int"
    symmetric: bool = True
    # strategy before group_size: group_size's validator reads it
    strategy: (
        Literal["tensor", "channel", "group", "block", "token", "tensor_group", "attn_head"] | None
    ) = None
    group_size: int | None = None
    block_structure: list[int] | None = None
    dynamic: bool | Literal["local"] = False
    actorder: Literal["group", "weight", "static"] | bool | None = None

    @field_validator("num_bits")
    @classmethod
    def _num_bits(cls, value: int) -> int:
        if not 1 <= value <= 32:
            raise ValueError("expected a bit width between 1 and 32")
        return value

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None, info: ValidationInfo) -> int | None:
        """compressed-tensors' rule: a positive size for the grouped strategies, -1 for one
        group per output channel, null otherwise."""
        strategy = info.data.get("strategy")
        if strategy in GROUPED_STRATEGIES and (value is None or value < 1):
            raise ValueError(f"strategy '{strategy}' needs a positive group size")
        if value is not None and (value < -1 or (value == 0 and strategy is None)):
            raise ValueError(
                "expected a positive group size (strategy 'group'), -1 (one group per output "
                "channel) or null"
            )
        return value

    @field_validator("block_structure")
    @classmethod
    def _block_structure(cls, value: list[int] | None) -> list[int] | None:
        problem = None if value is None else block_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _block_needs_structure(self) -> QuantizationArgs:
        """compressed-tensors' rule: strategy ``block`` if and only if a ``block_structure``."""
        if (self.strategy == "block") != (self.block_structure is not None):
            raise ValueError(
                "strategy 'block' needs a block_structure [rows, cols], and a block_structure "
                f"needs strategy 'block'; got strategy {self.strategy!r}, block_structure "
                f"{self.block_structure!r}"
            )
        return self

    @property
    def effective_strategy(self) -> str:
        """The strategy, inferred as compressed-tensors does when the field is null."""
        if self.strategy is not None:
            return self.strategy
        if self.group_size is None:
            return "tensor"
        return "group" if self.group_size > 0 else "channel"


class SparsityConfig(BaseModel):
    """A ``sparsity_config`` (compressed-tensors' ``SparsityCompressionConfig``): which layers
    a sparse format compresses. ``targets`` null means every layer."""

    model_config = _STRICT

    format: Annotated[str, AfterValidator(_check_format)]
    targets: list[str] | None = None
    ignore: list[str] | None = None
    global_sparsity: float | None = 0.0
    sparsity_structure: str | None = "unstructured"

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_entries(value)

    def compresses(self, prefix: str) -> str | None:
        """Why the sparse format compresses layer ``prefix`` (the target that matches it), or
        None: ``dense``, an ``ignore`` entry, or no target matches."""
        if self.format == "dense":
            return None
        if any(match_kind(entry, prefix) is not None for entry in self.ignore or ()):
            return None
        if self.targets is None:
            return "targets null (every layer)"
        target = next((t for t in self.targets if match_kind(t, prefix) is not None), None)
        return None if target is None else f"targets '{target}'"


class QuantizationScheme(BaseModel):
    """One ``config_groups`` entry: which modules it targets and how they are quantized."""

    model_config = _STRICT

    targets: list[str]
    weights: QuantizationArgs | None = None
    input_activations: QuantizationArgs | None = None
    output_activations: QuantizationArgs | None = None
    format: Format = None

    @field_validator("targets")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        return check_entries(value)

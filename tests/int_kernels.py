"""Which build of quantreg's AVX2 int kernel source a machine's heads get: ``cpu-vnni-*`` (the
AVX512-VNNI build, tests/test_cpu_vnni.py) where the CPU has it, else ``cpu-avx2-*``."""

from __future__ import annotations

import torch
from int_weights import random_int_weights

from quantreg.kernels import choose


def build_here(activation_dtype: str | None = None) -> str:
    """The kernel a bf16 int4 head gets on this machine (``activation_dtype="int8"``: the a8
    one), checked to be one of the two builds."""
    weights = random_int_weights(4, 128, 256, 128)
    name = choose(weights, dtype=torch.bfloat16, device="cpu",
                  activation_dtype=activation_dtype).name  # fmt: skip
    suffix = "a8" if activation_dtype else "wna16"
    assert name in (f"cpu-vnni-{suffix}", f"cpu-avx2-{suffix}"), name
    return name

"""The Triton kernels compiled ahead of time for real cards, on this machine without one
(``quantreg.kernels.triton_aot``): what a first GPU run would otherwise find -- a kernel that
does not compile for the architecture, a block needing more shared memory than the card
allows, a dot that misses the tensor cores -- fails here.

The compiles run in a fresh process: this one imported the kernels under the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# path, activation dtype, M, arch, which candidate (the first, or the widest weight tile, where
# 4 warps spilled) -> the tensor-core instruction expected
CASES = [
    ("int4 g128", "bfloat16", 1, 90, "first", "mma"),  # 16-row tiles: Ampere's mma on Hopper
    ("int4 g128", "bfloat16", 64, 90, "first", "wgmma"),  # 64-row tiles: Hopper's warp groups
    ("int4 act-order", "float16", 64, 90, "first", "wgmma"),
    ("int8 channel", "bfloat16", 16, 90, "first", "mma"),
    ("fp8 block", "bfloat16", 64, 90, "first", "wgmma"),
    ("nvfp4", "float16", 1, 90, "first", "mma"),
    ("int4 g128", "float16", 64, 80, "first", "mma"),
    ("fp8 channel", "bfloat16", 64, 80, "first", "mma"),
    ("fp8 channel", "bfloat16", 64, 90, "widest", "wgmma"),  # spilled 400 bytes at 4 warps
    ("int8 channel", "float16", 64, 80, "widest", "mma"),  # spilled 92 bytes at 4 warps
]
COMPILE = """
import json, sys, torch
sys.path.insert(0, "bench")
import gpu_aot
from quantreg.kernels.triton_aot import compile_launch
rows = []
for path, dtype, m, arch, pick, _ in json.loads(sys.argv[1]):
    plan = {"shapes": [(32000, 4096)], "ms": [m]}
    specs = [t[2] for t in gpu_aot.launches(plan) if t[:2] == (path, dtype)]
    if pick == "widest":
        specs.sort(key=lambda s: -s.config.block_n * s.config.block_k)
    done = compile_launch(specs[0], arch)
    rows.append({"mma": done.mma, "fits": done.fits, "shared": done.shared,
                 "registers": done.registers, "spilled": done.spilled})
print(json.dumps(rows))
"""


def compile_in_a_fresh_process(cases: list) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(cases)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.slow
def test_each_path_compiles_for_hopper_and_ampere_without_spilling():
    rows = compile_in_a_fresh_process(CASES)
    for (path, dtype, m, arch, pick, mma), row in zip(CASES, rows, strict=True):
        where = f"{path} {dtype} M={m} sm_{arch} ({pick}): {row}"
        assert row["mma"] == mma, where
        assert row["fits"] and row["shared"] > 0, where
        assert row["registers"] is None or 0 < row["registers"] <= 255, where
        assert row["spilled"] in (None, 0), where


def test_an_interpreted_kernel_is_refused_with_the_reason():
    from quantreg.kernels import triton_wna16
    from quantreg.kernels.triton_aot import compile_launch

    if not triton_wna16.interpreting():
        pytest.skip("the kernels are compiled functions in this process")
    x = torch.zeros(1, 256, dtype=torch.float16)
    spec = triton_wna16.launch_spec(
        x, torch.zeros(32, 64, dtype=torch.int32), torch.ones(2, 64, dtype=torch.float16),
        torch.zeros(2, 64, dtype=torch.uint8), 4, 128, None, False,
        triton_wna16.candidates(1, 64, 256, 128)[0],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"_wna16_kernel is not a compiled Triton function: "
                       r"the kernels were imported under TRITON_INTERPRET=1"):  # fmt: skip
        compile_launch(spec, 90)


@pytest.mark.parametrize(
    ("arch", "shared", "fits"),
    [(90, 232448, True), (90, 232449, False), (80, 166912, True), (80, 200000, False),
     (86, 101377, False), (75, 101376, True)],
    ids=["h100-at-limit", "h100-over", "a100-at-limit", "a100-over", "sm86-over", "unknown-arch"],
)  # fmt: skip
def test_a_block_fits_within_the_architectures_shared_memory(arch, shared, fits):
    from quantreg.kernels.triton_aot import Compiled

    assert Compiled(arch=arch, shared=shared, mma=None, kernel="k").fits is fits


def test_without_tritons_cuda_backend_the_reason_is_given(monkeypatch):
    from quantreg.kernels.triton_aot import compile_launch

    monkeypatch.setitem(sys.modules, "triton.backends.compiler", None)  # import fails
    with pytest.raises(RuntimeError, match=r"compiling ahead of time needs triton's CUDA backend"):
        compile_launch(None, 90)  # type: ignore[arg-type]

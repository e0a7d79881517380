"""Runnable documentation: every ```python block of README.md, and of the example plugin's
README, runs as written -- in order, in one fresh interpreter, in a folder where
``quantreg demo --keep demo`` wrote its checkpoints. A block that cannot run here (an engine,
a GPU) is marked ``<!-- not run: REASON -->`` on the line before it; those are listed and must
stay few."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_plugins import EXAMPLE, EXAMPLE_DIST, install

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"^(?:<!--\s*not run:\s*(?P<skip>.+?)\s*-->\n)?```python\n(?P<code>.*?)^```$", re.S | re.M
)
# Runs the blocks in one namespace, each compiled under its README line numbers, so a
# traceback points at the README line that failed.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    code = "\\n" * (block["line"] - 1) + block["code"]
    print(f"--- {block['file']}:{block['line']}", flush=True)
    exec(compile(code, block["file"], "exec"), namespace)
print("--- all blocks ran", flush=True)
"""


@dataclass(frozen=True)
class Block:
    """One ```python block: where it starts (its first code line) and why it is not run."""

    file: str
    line: int
    code: str
    skip: str | None


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [
        Block(
            file=str(path.relative_to(REPO)),
            line=text.count("\n", 0, m.start("code")) + 1,
            code=m.group("code"),
            skip=m.group("skip"),
        )
        for m in BLOCK.finditer(text)
    ]


def run_blocks(
    cwd: Path, found: list[Block], pythonpath: list[Path]
) -> subprocess.CompletedProcess:
    """Run the blocks not marked ``not run`` in a fresh interpreter in ``cwd``."""
    (cwd / "blocks.json").write_text(
        json.dumps([b.__dict__ for b in found if b.skip is None])
    )  # fmt: skip
    (cwd / "run_blocks.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run(
        [sys.executable, "run_blocks.py", "blocks.json"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture
def demo_folder(demo_run, tmp_path) -> Path:
    """A fresh folder holding a copy of the demo's checkpoints as ``demo/``."""
    kept, code, _ = demo_run
    assert code == 0
    shutil.copytree(kept, tmp_path / "demo")
    return tmp_path


def test_the_block_finder_sees_what_a_reader_sees():
    found = blocks(REPO / "README.md")
    fences = len(re.findall(r"^```python$", (REPO / "README.md").read_text(), re.M))
    assert len(found) == fences >= 6
    assert all(b.code.strip() and not b.code.startswith("```") for b in found)


def test_every_readme_block_runs_as_written(demo_folder):
    found = blocks(REPO / "README.md")
    out = run_blocks(demo_folder, found, [REPO])
    ran = [line[4:] for line in out.stdout.splitlines() if line.startswith("--- README")]
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert out.stdout.rstrip().endswith("--- all blocks ran")
    assert ran == [f"{b.file}:{b.line}" for b in found if b.skip is None]
    skipped = [(b.line, b.skip) for b in found if b.skip is not None]
    assert [reason for _, reason in skipped] == ["needs vLLM and a target model"], skipped
    assert len(ran) >= 5


def test_the_plugin_readme_runs_as_written_once_the_plugin_is_installed(tmp_path):
    readme = EXAMPLE / "README.md"
    found = blocks(readme)
    site = install(tmp_path / "site", EXAMPLE_DIST)  # what `pip install` would leave
    out = run_blocks(tmp_path, found, [REPO, site, EXAMPLE])
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert out.stdout.rstrip().endswith("--- all blocks ran")
    assert [b.skip for b in found] == [None, None]
    assert "example_int8" in out.stdout  # the checkpoint block prints the method it resolved

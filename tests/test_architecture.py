"""The shape of the code, drawn from the code itself: the import graph has no cycle, kernels
never reach for methods (nor the facade), the core names methods only by registry import
string, and modules and functions stay small enough to read in one sitting."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package folder -> its module prefix (methods/ is installed as quantreg.methods)
PACKAGES = {ROOT / "quantreg": "quantreg", ROOT / "methods": "quantreg.methods"}
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for folder, prefix in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


MODULES = modules()


def imports(name: str, path: Path) -> set[str]:
    """The quantreg modules ``name`` imports anywhere in its code (module level, inside
    functions, and under TYPE_CHECKING): each resolved to the module it names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                )
            # `from pkg import mod` imports the submodule pkg.mod when there is one
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def test_the_graph_covers_the_package():
    assert {"quantreg", "quantreg.kernels.selection", "quantreg.methods.awq"} <= GRAPH.keys()
    assert "quantreg.kernels.layouts" in GRAPH["quantreg.kernels.selection"]


def test_there_is_no_import_cycle():
    """Depth-first search for a back edge; the cycle found is printed."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    ("source", "forbidden"),
    [
        ("quantreg.kernels", "quantreg.methods"),
        ("quantreg.kernels", "quantreg"),
        ("quantreg.kernels", "quantreg.lm_head"),
        ("quantreg.kernels", "quantreg.loading"),
    ],
    ids=["kernels-to-methods", "kernels-to-facade", "kernels-to-head", "kernels-to-loader"],
)
def test_kernels_take_tensors_and_layouts_not_layers(source, forbidden):
    offenders = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if name == source or name.startswith(source + ".")
        for target in targets
        if target == forbidden or (forbidden != "quantreg" and target.startswith(forbidden + "."))
    ]
    assert offenders == []


def test_the_core_names_methods_only_by_registry_import_string():
    core = [n for n in GRAPH if not n.startswith("quantreg.methods")]
    offenders = [f"{n} -> {t}" for n in core for t in GRAPH[n] if t.startswith("quantreg.methods")]
    assert offenders == []
    registry = (ROOT / "quantreg" / "method_names.py").read_text()
    assert '"quantreg.methods.awq:AWQConfig"' in registry  # the built-ins, as strings


def test_methods_use_the_public_api_only():
    """Built-in methods import the facade, the public kernels package, and each other."""
    public = {"quantreg", "quantreg.kernels"}
    offenders = [
        f"{name} -> {target}"
        for name in GRAPH
        if name.startswith("quantreg.methods")
        for target in GRAPH[name]
        if target not in public and not target.startswith("quantreg.methods")
    ]
    assert offenders == []


def test_engine_integrations_use_the_public_api_only():
    """The vLLM plugin and the transformers quantizer are what a third party could write:
    the facade, the public kernels package, and each other."""
    public = {"quantreg", "quantreg.kernels"}
    integrations = [n for n in GRAPH if n.startswith("quantreg.integrations")]
    assert {"quantreg.integrations.vllm", "quantreg.integrations.transformers"} <= set(integrations)
    offenders = [
        f"{name} -> {target}"
        for name in integrations
        for target in GRAPH[name]
        if target not in public and not target.startswith("quantreg.integrations")
    ]
    assert offenders == []


def test_modules_and_functions_stay_small():
    long_modules = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }  # fmt: skip
    assert long_modules == {}
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {lines} lines")
    assert long_functions == []


def test_layouts_are_frozen_dataclasses_with_documented_fields():
    import dataclasses

    from quantreg import kernels

    for name in ("KPackedLayout", "CPUBlockedLayout", "CPUFloat8Layout", "TorchInt4Layout", "TorchInt8Layout", "Float8Layout", "IntWeights"):  # fmt: skip
        cls = getattr(kernels, name)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        doc = cls.__doc__ or ""
        undocumented = [f.name for f in dataclasses.fields(cls) if f.name not in doc]
        assert undocumented == [], f"{name}: {undocumented}"


def test_kernels_are_named_not_numbered():
    from quantreg.kernels import kernel_names

    names = kernel_names()
    assert names == ("cpu-amx", "cpu-vnni-wna16", "cpu-avx512-bf16", "cpu-avx2-wna16", "cpu-vnni-a8", "cpu-avx2-a8", "torch-int4pack", "torch-int8pack", "cpu-avx512", "cpu-avx512-float8", "cpu-avx2-float8", "triton", "triton-float8", "reference")  # fmt: skip
    assert all(a != b for a, b in itertools.combinations(names, 2))

"""Entry-point plugins: discovered by name, listed with their source, and isolated when broken.

Every test builds real distributions (a ``*.dist-info`` folder plus the plugin module) in
``tmp_path`` and runs quantreg in a subprocess with only that folder on ``PYTHONPATH``, so
discovery goes through ``importlib.metadata`` exactly as for an installed package.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "quantreg-int8-plugin"

BUILTINS = (
    "auto-round",
    "awq",
    "awq_marlin",
    "compressed-tensors",
    "cpu_wna16",
    "fp8",
    "gptq",
    "gptq_marlin",
    "modelopt",
    "unquantized",
)

GOOD_MODULE = """
import quantreg


class GoodLinearMethod(quantreg.LinearMethod):
    def create_weights(self, layer, *args, **extra):
        pass

    def apply(self, layer, x, bias=None):
        return x


class GoodConfig(quantreg.QuantConfig):
    linear_method = GoodLinearMethod
"""

SELF_REGISTERING_MODULE = """
import quantreg


class SelfLinearMethod(quantreg.LinearMethod):
    def create_weights(self, layer, *args, **extra):
        pass

    def apply(self, layer, x, bias=None):
        return x


@quantreg.register_quant_method("selfreg")
class SelfConfig(quantreg.QuantConfig):
    linear_method = SelfLinearMethod
"""


@dataclass
class Dist:
    """One distribution to install into a site folder: metadata, entry points and modules."""

    name: str
    version: str
    entry_points: dict[str, str]
    modules: dict[str, str] = field(default_factory=dict)

    def source(self, method: str) -> str:
        """What quantreg reports as the ``source`` of this distribution's ``method``."""
        return f"plugin {self.name} {self.version}: {method} = {self.entry_points[method]}"


GOOD = Dist("good-plugin", "1.0", {"good": "good_plugin:GoodConfig"}, {"good_plugin": GOOD_MODULE})
BROKEN = Dist("broken-plugin", "0.3", {"broken": "no_such_module:Config"})


def install(site: Path, *dists: Dist) -> Path:
    """Write each distribution's ``.dist-info`` and module files into ``site``."""
    site.mkdir(exist_ok=True)
    for dist in dists:
        info = site / f"{dist.name.replace('-', '_')}-{dist.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist.name}\nVersion: {dist.version}\n"
        )
        lines = "".join(f"{name} = {value}\n" for name, value in dist.entry_points.items())
        (info / "entry_points.txt").write_text(f"[quantreg.methods]\n{lines}")
        for module, code in dist.modules.items():
            (site / f"{module}.py").write_text(textwrap.dedent(code))
    return site


def run_python(
    tmp_path: Path, *args: str, dists: tuple[Dist, ...] = (), path: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` in ``tmp_path`` with the installed ``dists`` (and ``path``) only."""
    site = install(tmp_path / "site", *dists)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (site, *path)))}
    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def list_methods(tmp_path: Path, *dists: Dist, path: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``quantreg methods --json`` as ``{name: entry}``; the command must exit 0."""
    proc = run_python(tmp_path, "-m", "quantreg", "methods", "--json", dists=dists, path=path)
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(proc.stdout)
    names = [entry["name"] for entry in entries]
    assert names == sorted(names), "listed once each, sorted by name"
    assert len(names) == len(set(names)), "listed once each, sorted by name"
    return {entry["name"]: entry for entry in entries}


def run_checks(tmp_path: Path, code: str, *dists: Dist, path: tuple[Path, ...] = ()) -> None:
    """Run ``code`` (which may use ``pytest.raises``) in a subprocess; it must exit 0."""
    proc = run_python(tmp_path, "-c", textwrap.dedent(code), dists=dists, path=path)
    assert proc.returncode == 0, proc.stderr


# -- listing ------------------------------------------------------------------------------


def test_a_good_plugin_is_listed_as_loaded_next_to_every_builtin(tmp_path):
    methods = list_methods(tmp_path, GOOD)

    assert sorted(methods) == sorted([*BUILTINS, "good"])
    assert methods["good"] == {
        "name": "good",
        "aliases": [],
        "source": "plugin good-plugin 1.0: good = good_plugin:GoodConfig",
        "loaded": True,
        "error": None,
        "runs_here": True,
        "platform_reason": None,
    }
    assert {methods[name]["source"] for name in BUILTINS} == {"built-in"}


BROKEN_PLUGINS = [
    pytest.param(
        Dist("missing-plugin", "1.0", {"missing": "no_such_module:Config"}),
        r"failed to load: ModuleNotFoundError: No module named 'no_such_module'",
        id="module-does-not-exist",
    ),
    pytest.param(
        Dist(
            "raising-plugin",
            "2.0",
            {"raising": "raising_plugin:Config"},
            {"raising_plugin": "raise RuntimeError('needs a GPU driver')\n"},
        ),
        r"failed to load: RuntimeError: needs a GPU driver",
        id="module-raises-at-import",
    ),
    pytest.param(
        Dist(
            "missing-attr-plugin",
            "1.0",
            {"missing_attr": "missing_attr_plugin:Config"},
            {"missing_attr_plugin": "OTHER = 1\n"},
        ),
        r"failed to load: AttributeError: .*'Config'",
        id="class-missing-from-module",
    ),
    pytest.param(
        Dist(
            "not-a-config-plugin",
            "1.0",
            {"not_a_config": "not_a_config_plugin:Config"},
            {"not_a_config_plugin": "class Config:\n    pass\n"},
        ),
        r"points to <class 'not_a_config_plugin\.Config'>, which is not a "
        r"quantreg\.QuantConfig subclass",
        id="not-a-quantconfig-subclass",
    ),
]


@pytest.mark.parametrize(("dist", "error"), BROKEN_PLUGINS)
def test_a_broken_plugin_is_listed_with_its_error_and_breaks_nothing_else(tmp_path, dist, error):
    (method,) = dist.entry_points
    methods = list_methods(tmp_path, dist, GOOD)  # exit code 0 is checked there

    broken = methods[method]
    assert broken["loaded"] is False
    assert broken["source"] == dist.source(method)
    # The error names the distribution and the entry point, then what went wrong.
    assert broken["error"].startswith(f"quantization plugin '{method}' ({dist.source(method)})")
    assert re.search(error, broken["error"])
    assert methods["good"]["loaded"] is True
    assert methods["good"]["error"] is None
    assert set(BUILTINS) <= set(methods)


def test_the_text_listing_shows_a_broken_plugin_and_its_error(tmp_path):
    proc = run_python(tmp_path, "-m", "quantreg", "methods", dists=(BROKEN,))

    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^broken +broken +plugin broken-plugin 0\.3: broken = ", proc.stdout, re.M)
    assert re.search(r"^ +error: .*ModuleNotFoundError", proc.stdout, re.M)


def test_a_self_registering_plugin_module_is_listed_once_under_its_entry_point(tmp_path):
    selfreg = Dist(
        "selfreg-plugin",
        "1.0",
        {"selfreg": "selfreg_plugin:SelfConfig"},
        {"selfreg_plugin": SELF_REGISTERING_MODULE},
    )
    proc = run_python(tmp_path, "-m", "quantreg", "methods", "--json", dists=(selfreg,))

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "registering the same class again is a silent no-op"
    (entry,) = [entry for entry in json.loads(proc.stdout) if entry["name"] == "selfreg"]
    assert entry == {
        "name": "selfreg",
        "aliases": [],
        "source": selfreg.source("selfreg"),
        "loaded": True,
        "error": None,
        "runs_here": True,
        "platform_reason": None,
    }


def test_a_plugin_that_calls_sys_exit_at_import_is_listed_as_broken(tmp_path):
    exiting = Dist(
        "exiting-plugin", "1.0", {"exiting": "exiting_plugin:Config"},
        {"exiting_plugin": "import sys\nsys.exit('no CUDA')\n"},
    )  # fmt: skip
    methods = list_methods(tmp_path, exiting, GOOD)
    assert "failed to load: SystemExit: no CUDA" in methods["exiting"]["error"]
    assert methods["good"]["loaded"] is True


def test_a_package_that_reexports_its_self_registering_class_is_one_method(tmp_path):
    pkg = Dist(
        "pkg-plugin", "1.0", {"pkgplug": "pkgplug:PkgConfig"},
        {"pkgplug_config": SELF_REGISTERING_MODULE.replace("selfreg", "pkgplug").replace("SelfConfig", "PkgConfig")},
    )  # fmt: skip
    site = install(tmp_path / "site", pkg)
    (site / "pkgplug").mkdir()
    (site / "pkgplug_config.py").rename(site / "pkgplug" / "config.py")
    (site / "pkgplug" / "__init__.py").write_text("from pkgplug.config import PkgConfig\n")
    methods = list_methods(tmp_path)
    assert methods["pkgplug"]["loaded"] is True and methods["pkgplug"]["error"] is None
    assert methods["pkgplug"]["source"] == pkg.source("pkgplug")


def test_a_self_registering_plugin_imported_before_discovery_keeps_its_plugin_source(tmp_path):
    selfreg = Dist(
        "selfreg-plugin", "1.0", {"selfreg": "selfreg_plugin:SelfConfig"},
        {"selfreg_plugin": SELF_REGISTERING_MODULE},
    )  # fmt: skip
    code = "import json, selfreg_plugin, quantreg; print(json.dumps([i.to_dict() for i in quantreg.list_quant_methods()]))"
    proc = run_python(tmp_path, "-c", code, dists=(selfreg,))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    (entry,) = [e for e in json.loads(proc.stdout) if e["name"] == "selfreg"]
    assert (entry["source"], entry["loaded"]) == (selfreg.source("selfreg"), True)


# -- lookup -------------------------------------------------------------------------------


def test_lookup_returns_a_good_plugin_and_raises_plugin_error_for_a_broken_one(tmp_path):
    run_checks(
        tmp_path,
        r"""
        import pytest
        import quantreg

        cls = quantreg.get_quant_config_cls("good")
        assert (cls.__module__, cls.__qualname__) == ("good_plugin", "GoodConfig"), cls
        assert quantreg.get_quant_config_cls("good") is cls

        expected = r"plugin 'broken' \(plugin broken-plugin 0\.3: broken = no_such_module"
        with pytest.raises(quantreg.PluginError, match=expected):
            quantreg.get_quant_config_cls("broken")
        with pytest.raises(ImportError, match="ModuleNotFoundError"):
            quantreg.get_quant_config_cls("broken")  # again: the recorded error

        assert quantreg.get_quant_config_cls("awq").__qualname__ == "AWQConfig"
        """,
        GOOD,
        BROKEN,
    )


# -- the example plugin -------------------------------------------------------------------

EXAMPLE_DIST = Dist(
    "quantreg-int8-plugin",
    "0.1.0",
    {"example_int8": "quantreg_int8_plugin:Int8ChannelConfig"},
)


def test_the_example_plugin_is_listed_as_loaded(tmp_path):
    methods = list_methods(tmp_path, EXAMPLE_DIST, path=(EXAMPLE,))

    assert methods["example_int8"]["source"] == EXAMPLE_DIST.source("example_int8")
    assert methods["example_int8"]["loaded"] is True
    assert methods["example_int8"]["error"] is None


def test_the_example_plugin_computes_x_times_dequantized_weight_transposed(tmp_path):
    run_checks(
        tmp_path,
        """
        import torch
        import quantreg

        cls = quantreg.get_quant_config_cls("example_int8")
        config = cls.from_quant_config({"quant_method": "example_int8"}, method="example_int8")
        assert config.bits == 8 and cls.supports_lm_head
        layer = torch.nn.Module()
        layer.geometry = quantreg.LayerGeometry("lm_head", 16, 10, 10, 0, torch.float32)
        method = config.get_linear_method(layer, "lm_head")
        method.create_weights(layer, 16, [6, 4], 16, 10, torch.float32)

        assert layer.weight.dtype == torch.int8 and layer.weight.shape == (10, 16)
        assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (10, 1)
        assert not layer.weight.requires_grad and not layer.weight_scale.requires_grad
        assert (layer.weight.output_dim, layer.weight.input_dim) == (0, 1)
        assert layer.weight_scale.output_dim == 0
        assert getattr(layer.weight, "packed_dim", None) is None

        g = torch.Generator().manual_seed(0)
        w = torch.randint(-128, 128, (10, 16), dtype=torch.int8, generator=g)
        s = torch.rand(10, 1, generator=g) + 0.01
        layer.weight.data.copy_(w)
        layer.weight_scale.data.copy_(s)
        x = torch.randn(3, 16, generator=g)
        bias = torch.randn(10, generator=g)
        method.process_weights_after_loading(layer)
        assert isinstance(layer.kernel, quantreg.Kernel)

        torch.testing.assert_close(method.apply(layer, x), x @ (w * s).T)
        torch.testing.assert_close(method.apply(layer, x, bias), x @ (w * s).T + bias)
        """,
        EXAMPLE_DIST,
        path=(EXAMPLE,),
    )


def public_names_used(source: str) -> set[str]:
    """Every ``quantreg.<name>`` and ``from quantreg import <name>`` of a module's source."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "quantreg":
            names.add(node.attr)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quantreg"):
            assert node.module == "quantreg", f"imports {node.module}"
            names |= {alias.name for alias in node.names}
    return names


def test_the_example_plugin_uses_only_public_names():
    import quantreg

    used = public_names_used((EXAMPLE / "quantreg_int8_plugin" / "__init__.py").read_text())
    assert used and used <= set(quantreg.__all__), used - set(quantreg.__all__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_plugin_with_public_names_only_reproduces_a_builtin_bit_for_bit(tmp_path, monkeypatch, dtype):  # fmt: skip
    """The example plugin reads the tensors of compressed-tensors' symmetric int8 per-channel
    format: its logits equal the built-in method's exactly (same scale dtype, same kernel)."""
    import quantreg

    monkeypatch.syspath_prepend(str(EXAMPLE))
    from quantreg_int8_plugin import Int8ChannelConfig

    quantreg.register_quant_method("example_int8")(Int8ChannelConfig)
    weight = torch.randn(1000, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    builtin = quantreg.write_checkpoint(
        tmp_path / "ct", weight.half(), "compressed-tensors", format="int-quantized"
    )
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    shutil.copy(builtin / "model.safetensors", plugin / "model.safetensors")
    config = json.loads((builtin / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "example_int8", "bits": 8, "lm_head": True}
    (plugin / "config.json").write_text(json.dumps(config))

    ours = quantreg.load_lm_head(plugin, dtype=dtype)
    theirs = quantreg.load_lm_head(builtin, dtype=dtype)
    assert (ours.resolution.method, theirs.resolution.method) == (
        "example_int8",
        "compressed-tensors",
    )
    assert ours.kernel.name == theirs.kernel.name
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(ours.compute_logits(x), theirs.compute_logits(x))

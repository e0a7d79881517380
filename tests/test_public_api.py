"""The public facade: one sorted ``__all__``, and ``import quantreg`` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import quantreg


def test_all_is_sorted_and_unique():
    assert quantreg.__all__ == sorted(set(quantreg.__all__))


def test_all_matches_the_public_names():
    public = {name for name in dir(quantreg) if not name.startswith("_") or name == "__version__"}
    modules = {name for name in public if type(getattr(quantreg, name)).__name__ == "module"}
    assert set(quantreg.__all__) == public - modules


def test_every_error_derives_from_the_root_and_a_builtin():
    expected = {
        "UnknownMethodError": LookupError,
        "DuplicateMethodError": ValueError,
        "MethodDefinitionError": TypeError,
        "PluginError": ImportError,
        "InputError": ValueError,
        "ConfigError": ValueError,
        "CheckpointError": ValueError,
        "DistributedError": RuntimeError,
    }
    for name, builtin in expected.items():
        cls = getattr(quantreg, name)
        assert issubclass(cls, quantreg.QuantregError)
        assert issubclass(cls, builtin)


def test_import_and_listing_stay_light_and_resolving_imports_no_triton():
    """In a fresh interpreter: ``import quantreg`` and listing the methods import no method
    module, no torch and no Triton; resolving a CUDA platform still imports no Triton."""
    code = (
        "import json, sys, quantreg; quantreg.list_quant_methods(); "
        "light = sorted(m for m in sys.modules if m.startswith(('quantreg.methods', 'triton', 'torch'))); "
        "quantreg.resolve({'quant_method': 'awq', 'lm_head': True}, platform='cuda:9.0'); "
        "print(json.dumps([light, 'triton' in sys.modules]))"
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == [[], False]


def test_lazy_names_resolve_on_access():
    assert quantreg.ParallelLMHead.__module__ == "quantreg.lm_head"
    assert quantreg.load_lm_head.__module__ == "quantreg.loading"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        quantreg.nope  # noqa: B018


def test_package_ships_py_typed():
    from importlib.resources import files

    assert files("quantreg").joinpath("py.typed").is_file()


def test_errors_carry_what_they_are_about(tmp_path):
    """``path`` (the file), ``field`` (a config field or argument) and ``tensor``."""
    import json

    import torch

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 128, "lm_head": True}}))  # fmt: skip
    with pytest.raises(quantreg.ConfigError) as bad_field:
        quantreg.resolve(tmp_path, platform="cpu")
    assert (bad_field.value.path, bad_field.value.field) == (config, "bits")
    config.write_text(json.dumps({"quantization_config": {"bits": 4}}))
    with pytest.raises(quantreg.ConfigError) as no_method:
        quantreg.resolve(tmp_path, platform="cpu")
    assert (no_method.value.path, no_method.value.field) == (config, "quant_method")
    with pytest.raises(quantreg.InputError) as bad_argument:
        quantreg.ParallelLMHead(0, 8)
    assert bad_argument.value.field == "num_embeddings"
    quantreg.write_checkpoint(tmp_path / "ckpt", torch.zeros(64, 8), "gptq", group_size=8)
    with pytest.raises(quantreg.InputError) as bad_dtype:
        quantreg.load_lm_head(tmp_path / "ckpt", dtype="int8")
    assert bad_dtype.value.field == "dtype"

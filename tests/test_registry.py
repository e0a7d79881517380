"""The method registry: names, aliases, duplicates, lazy built-ins, thread safety."""

from __future__ import annotations

import logging
import sys
import textwrap
import threading
from typing import Any, ClassVar

import pytest

import quantreg
from quantreg import (
    DuplicateMethodError,
    LinearMethod,
    MethodDefinitionError,
    PluginError,
    QuantConfig,
    UnknownMethodError,
    register_quant_method,
)
from quantreg.registry import Registry, normalize_name, set_default_registry

BUILTINS = ["auto-round", "awq", "awq_marlin", "compressed-tensors", "cpu_wna16", "fp8", "gptq", "gptq_marlin", "modelopt", "unquantized"]  # fmt: skip


class _NoopMethod(LinearMethod):
    def create_weights(self, layer: Any, *args: Any, **extra: Any) -> None:
        pass

    def apply(self, layer: Any, x: Any, bias: Any = None) -> Any:
        return x


def make_config(name: str = "Cfg") -> type[QuantConfig]:
    return type(name, (QuantConfig,), {"linear_method": _NoopMethod, "__module__": __name__})


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("awq", "awq"),
        ("  GPTQ ", "gptq"),
        ("compressed_tensors", "compressed-tensors"),
        ("Compressed-Tensors", "compressed-tensors"),
        ("cpu_awq", "cpu_wna16"),
        ("awq-marlin", "awq-marlin"),  # no general -/_ folding
    ],
    ids=["plain", "case-and-space", "ct-underscore", "ct-case", "cpu-awq-alias", "no-folding"],
)
def test_names_are_stripped_lowercased_and_aliased(written, canonical):
    assert normalize_name(written) == canonical


def test_every_builtin_is_listed_without_importing_it(registry, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("quantreg.methods.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    infos = quantreg.list_quant_methods()
    assert [i.name for i in infos] == BUILTINS
    assert all(i.source == "built-in" and not i.loaded and i.error is None for i in infos)
    assert [m for m in sys.modules if m.startswith("quantreg.methods.")] == []
    assert registry.loaded() == {}


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_classes_load_on_first_lookup(name):
    cls = quantreg.get_quant_config_cls(name)
    assert issubclass(cls, QuantConfig)
    assert next(i for i in quantreg.list_quant_methods() if i.name == name).loaded


@pytest.mark.parametrize(
    ("alias", "name"),
    [("cpu_awq", "cpu_wna16"), ("compressed_tensors", "compressed-tensors")],
    ids=["cpu_awq", "compressed_tensors"],
)
def test_aliases_return_the_same_class(alias, name):
    assert quantreg.get_quant_config_cls(alias) is quantreg.get_quant_config_cls(name)
    assert alias in next(i for i in quantreg.list_quant_methods() if i.name == name).aliases


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("awq-marlin", "awq_marlin"),
        ("gptq_marlim", "gptq_marlin"),
        ("compresed-tensors", "compressed-tensors"),
    ],
    ids=["dash-for-underscore", "typo", "missing-letter"],
)
def test_unknown_names_suggest_the_closest(name, suggestion):
    with pytest.raises(UnknownMethodError, match=f"did you mean '{suggestion}'") as info:
        quantreg.get_quant_config_cls(name)
    assert isinstance(info.value, LookupError)
    assert "registered: auto-round, awq, awq_marlin" in str(info.value)


def test_unknown_name_without_a_close_match_lists_the_registered_names():
    with pytest.raises(
        UnknownMethodError, match=r"unknown quantization method 'zzz'; registered: auto-round, awq"
    ):
        quantreg.get_quant_config_cls("zzz")


def test_decorator_registers_a_new_method():
    cls = register_quant_method("my_int8", aliases=["myint8"])(make_config("MyInt8"))
    assert quantreg.get_quant_config_cls("MY_INT8") is cls
    assert quantreg.get_quant_config_cls("myint8") is cls
    info = next(i for i in quantreg.list_quant_methods() if i.name == "my_int8")
    assert (info.aliases, info.loaded, info.error) == (("myint8",), True, None)
    assert info.source == f"registered: {__name__}.MyInt8"


def test_registering_the_same_class_again_is_a_no_op():
    cls = make_config()
    register_quant_method("mine")(cls)
    assert register_quant_method("mine")(cls) is cls
    assert quantreg.get_quant_config_cls("mine") is cls


def test_another_class_under_a_taken_name_is_refused():
    first = register_quant_method("mine")(make_config("First"))
    with pytest.raises(
        DuplicateMethodError, match=r"'mine' is already registered to .*First.*override=True"
    ):
        register_quant_method("mine")(make_config("Second"))
    assert quantreg.get_quant_config_cls("mine") is first


def test_a_builtin_name_is_refused_without_override():
    with pytest.raises(
        DuplicateMethodError,
        match=r"'awq' is already registered to quantreg\.methods\.awq:AWQConfig \(built-in\)",
    ):
        register_quant_method("awq")(make_config())


def test_override_replaces_and_warns_naming_both(caplog):
    register_quant_method("mine")(make_config("First"))
    second = make_config("Second")
    with caplog.at_level(logging.WARNING, logger="quantreg.registry"):
        register_quant_method("mine", override=True)(second)
    assert quantreg.get_quant_config_cls("mine") is second
    [record] = caplog.records
    assert "Second" in record.getMessage() and "First" in record.getMessage()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aliases": ["cpu_wna16"]}, "alias 'cpu_wna16' for 'fresh': it already names 'cpu_wna16'"),
        (
            {"aliases": ["ok", "cpu_awq"]},
            "alias 'cpu_wna16' for 'fresh': it already names 'cpu_wna16'",
        ),
        ({"aliases": ["gptq"]}, "alias 'gptq' for 'fresh': it already names 'gptq'"),
    ],
    ids=["alias-is-a-name", "second-alias-is-an-alias", "alias-is-builtin"],
)
def test_a_failed_registration_leaves_no_trace(kwargs, message):
    with pytest.raises(DuplicateMethodError, match=message):
        register_quant_method("fresh", **kwargs)(make_config())
    for name in ("fresh", "ok"):
        with pytest.raises(UnknownMethodError):
            quantreg.get_quant_config_cls(name)


def test_registering_a_name_that_is_an_alias_is_refused():
    with pytest.raises(DuplicateMethodError, match="'cpu_wna16' is already registered"):
        register_quant_method("cpu_awq")(make_config())


@pytest.mark.parametrize(
    ("name", "cls", "message"),
    [
        ("good", int, "expected a subclass of quantreg.QuantConfig"),
        ("", None, "invalid method name ''"),
        ("has space", None, "invalid method name 'has space'"),
        ("-leading", None, "invalid method name '-leading'"),
    ],
    ids=["not-a-config", "empty-name", "space", "leading-dash"],
)
def test_bad_registrations_are_refused(name, cls, message):
    with pytest.raises(MethodDefinitionError, match=message):
        register_quant_method(name)(cls or make_config())


@pytest.mark.parametrize(
    "attr", ["linear_method", "supports_lm_head", "checkpoint_formats", "upgrade_priority"]
)
def test_class_level_declarations_must_not_become_fields(attr):
    source = textwrap.dedent(
        f"""
        from quantreg import QuantConfig
        class Bad(QuantConfig):
            {attr}: object = None
        """
    )
    with pytest.raises(
        MethodDefinitionError,
        match=f"declares '{attr}' as a pydantic field; annotate it as ClassVar",
    ):
        exec(source, {})


def test_class_level_declarations_as_classvar_or_plain_assignment_are_fine():
    class Good(QuantConfig):
        linear_method = _NoopMethod
        supports_lm_head: ClassVar[bool] = True
        bits: int = 8

    assert Good.supports_lm_head and Good.linear_method is _NoopMethod
    assert list(Good.model_fields) == ["bits"]


def test_linear_method_must_be_a_linear_method_subclass():
    with pytest.raises(
        MethodDefinitionError, match=r"linear_method must be a subclass of quantreg\.LinearMethod"
    ):
        type("Bad", (QuantConfig,), {"linear_method": int, "__module__": __name__})


def test_unregister_removes_name_and_aliases():
    register_quant_method("mine", aliases=["mine2"])(make_config())
    quantreg.registry.default_registry().unregister("mine2")
    for name in ("mine", "mine2"):
        with pytest.raises(UnknownMethodError):
            quantreg.get_quant_config_cls(name)


def test_a_builtin_that_fails_to_import_raises_plugin_error():
    reg = Registry({"ghost": "quantreg_no_such_module:Cfg"}, entry_point_group=None)
    with pytest.raises(PluginError, match=r"method 'ghost' failed to load: ModuleNotFoundError"):
        reg.get("ghost")
    with pytest.raises(PluginError, match="ghost"):  # remembered, not retried
        reg.get("ghost")
    assert reg.broken().keys() == {"ghost"}


def test_concurrent_registrations_and_lookups():
    classes = [make_config(f"C{i}") for i in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(50):
                register_quant_method(f"m{i}")(classes[i])
                assert quantreg.get_quant_config_cls(f"m{i}") is classes[i]
                quantreg.get_quant_config_cls("gptq")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)


def test_a_module_that_registers_itself_while_imported_does_not_deadlock(tmp_path, monkeypatch):
    """The first lookup imports the module outside the registry lock: while that import is
    held open (a gate, not a sleep), the registry still answers, and the module's own
    registration and every concurrent lookup end with one class."""
    (tmp_path / "selfreg_gate.py").write_text(
        "import threading\nentered = threading.Event()\nrelease = threading.Event()\n"
    )
    (tmp_path / "selfreg_mod.py").write_text(
        textwrap.dedent(
            """
            import quantreg
            import selfreg_gate
            from tests_support_noop import Noop

            selfreg_gate.entered.set()
            assert selfreg_gate.release.wait(30), "the test never released the import"

            @quantreg.register_quant_method("selfreg")
            class Cfg(quantreg.QuantConfig):
                linear_method = Noop
            """
        )
    )
    (tmp_path / "tests_support_noop.py").write_text(
        textwrap.dedent(
            """
            import quantreg

            class Noop(quantreg.LinearMethod):
                def create_weights(self, layer, *args, **extra):
                    pass

                def apply(self, layer, x, bias=None):
                    return x
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import selfreg_gate

    reg = Registry({"selfreg": "selfreg_mod:Cfg"}, entry_point_group=None)
    set_default_registry(reg)
    results: list[type] = []
    threads = [
        threading.Thread(target=lambda: results.append(reg.get("selfreg"))) for _ in range(8)
    ]
    threads[0].start()
    assert selfreg_gate.entered.wait(30), "the first lookup never imported the module"
    for t in threads[1:]:
        t.start()
    answered = threading.Thread(target=reg.names)  # needs the registry lock
    answered.start()
    answered.join(timeout=30)
    assert not answered.is_alive(), "the registry lock is held during the import"
    selfreg_gate.release.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert len(results) == 8 and len(set(results)) == 1
    assert [i.name for i in reg.list()] == ["selfreg"]

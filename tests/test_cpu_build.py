"""Building the CPU kernel: one cache folder per build ingredient, a first build announced
before it starts and ticking while it runs, and ``quantreg warmup``. The compiler is faked:
what is specified here is what happens around it (the real build is tests/test_cpu_kernels.py,
on a CPU with AVX-512)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time

import pytest
import torch
from cli_runner import run_cli

from quantreg.kernels import cpu, cpu_avx2, cpu_build, cpu_float8, cpu_float8_avx512, cpu_vnni

ANNOUNCE = "building quantreg's CPU kernel once (~30-60 s), cached in "


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A kernel cache of this test's own, and a process that has not built the kernel yet."""
    monkeypatch.setenv("QUANTREG_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("QUANTREG_NO_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu, "_state", {})
    return tmp_path / "kernels"


@pytest.fixture
def fake_compiler(monkeypatch):
    """``compile_extension`` replaced: it records each call and what was logged before it,
    and takes ``seconds``; an AVX-512 CPU is pretended so that the kernel is wanted."""
    calls: list[dict] = []

    def compile_extension(key, folder):
        calls.append({"key": key, "folder": folder})
        time.sleep(fake.seconds)
        if fake.error is not None:
            raise fake.error
        return fake.module

    fake = type("Fake", (), {"seconds": 0.0, "error": None, "module": object(), "calls": calls})
    monkeypatch.setattr(cpu_build, "compile_extension", compile_extension)
    monkeypatch.setattr(cpu, "cpu_supports_avx512", lambda: True)
    # the float8 kernel too: wanted (AVX2 pretended), not built yet in this process
    monkeypatch.setattr(cpu_float8, "probe_cpu_isa", lambda: frozenset(cpu_float8.FLAGS))
    monkeypatch.setattr(cpu_float8.UNIT, "state", {})
    # and the AVX2 int kernel
    monkeypatch.setattr(cpu_avx2, "probe_cpu_isa", lambda: frozenset(cpu_avx2.FLAGS))
    monkeypatch.setattr(cpu_avx2.UNIT, "state", {})
    # and its AVX512-VNNI build
    monkeypatch.setattr(cpu_vnni, "probe_cpu_isa", lambda: frozenset(cpu_vnni.FLAGS))
    monkeypatch.setattr(cpu_vnni.UNIT, "state", {})
    # and the AVX512-BF16 float8 kernel
    monkeypatch.setattr(cpu_float8_avx512, "probe_cpu_isa", lambda: frozenset(cpu_float8_avx512.FLAGS))  # fmt: skip
    monkeypatch.setattr(cpu_float8_avx512.UNIT, "state", {})
    return fake


# -- the cache key ---------------------------------------------------------------------------


def other_source(monkeypatch, tmp_path):
    changed = tmp_path / "wna16_kernel.cpp"
    changed.write_text(cpu_build.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_build, "SOURCE", changed)


def other_kernel(monkeypatch, _):
    original = cpu_build.kernel_source
    monkeypatch.setattr(
        cpu_build,
        "kernel_source",
        lambda name="wna16": dataclasses.replace(original(name), name="other"),
    )


INGREDIENTS = {
    "kernel": other_kernel,
    "source": other_source,
    "flags": lambda mp, _: mp.setattr(cpu_build, "CFLAGS", (*cpu_build.CFLAGS, "-DX")),
    "torch": lambda mp, _: mp.setattr(torch, "__version__", torch.__version__ + "+other"),
    "python": lambda mp, _: mp.setattr(sys, "version", sys.version + " (other build)"),
    "prefix": lambda mp, tmp: mp.setattr(sys, "prefix", str(tmp / "other-venv")),
    "compiler": lambda mp, _: mp.setenv("CXX", "clang++-not-installed"),
}


@pytest.mark.parametrize("ingredient", list(INGREDIENTS), ids=list(INGREDIENTS))
def test_every_build_ingredient_changes_the_cache_folder(ingredient, monkeypatch, tmp_path):
    before = cpu_build.build_key()
    INGREDIENTS[ingredient](monkeypatch, tmp_path)
    after = cpu_build.build_key()
    changed = [f.name for f in dataclasses.fields(before) if getattr(before, f.name) != getattr(after, f.name)]  # fmt: skip
    assert changed == [ingredient]
    assert after.digest != before.digest
    assert cpu_build.build_dir(after) != cpu_build.build_dir(before)
    assert after.module_name != before.module_name


# kernel -> whether cpu_common.h is in its unit (every kernel but the AVX-512 int one shares it)
PRELUDE_IN = {"wna16_avx2": True, "wna16_vnni": True, "float8": True, "float8_avx512": True, "wna16": False}  # fmt: skip


@pytest.mark.parametrize("kernel", list(PRELUDE_IN), ids=list(PRELUDE_IN))
def test_the_shared_prelude_is_part_of_the_avx2_kernels_source_key(kernel, monkeypatch, tmp_path):
    before = cpu_build.build_key(kernel)
    changed = tmp_path / "cpu_common.h"
    changed.write_text(cpu_build.AVX2_COMMON.read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_build, "AVX2_COMMON", changed)
    after = cpu_build.build_key(kernel)
    assert (after.source != before.source) == PRELUDE_IN[kernel]
    assert (after.digest != before.digest) == PRELUDE_IN[kernel]


@pytest.mark.parametrize("kernel", ["float8", "float8_avx512"])
def test_the_float8_prelude_is_part_of_both_float8_kernels_source_key(kernel, monkeypatch, tmp_path):  # fmt: skip
    before = cpu_build.build_key(kernel)
    changed = tmp_path / "float8_common.h"
    changed.write_text(cpu_build.FLOAT8_COMMON.read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_build, "FLOAT8_COMMON", changed)
    assert cpu_build.build_key(kernel).source != before.source


def test_the_table_covers_every_field_of_the_key():
    assert [f.name for f in dataclasses.fields(cpu_build.BuildKey)] == list(INGREDIENTS)


def test_the_same_environment_finds_the_same_folder(cache):
    first, second = cpu_build.build_key(), cpu_build.build_key()
    assert first == second and first.digest == second.digest
    assert cpu_build.build_dir(first) == cache / first.digest


def test_the_compiler_is_named_by_what_it_resolves_to(monkeypatch):
    monkeypatch.setenv("CXX", "clang++-not-installed")
    assert cpu_build.compiler_identity() == "clang++-not-installed (not found)"
    monkeypatch.setenv("CXX", sys.executable)  # any program that answers --version
    assert cpu_build.compiler_identity().startswith(f"{sys.executable} -> ")


# -- the announcement ------------------------------------------------------------------------


def test_a_first_build_is_announced_before_it_starts_and_ticks(fake_compiler, monkeypatch, caplog):
    monkeypatch.setattr(cpu_build, "TICK_S", 0.05)
    fake_compiler.seconds = 0.3
    announced_first = []
    original = cpu_build.compile_extension

    def compile_after_announcement(key, folder):
        announced_first.append([r.getMessage() for r in caplog.records])
        return original(key, folder)

    monkeypatch.setattr(cpu_build, "compile_extension", compile_after_announcement)
    with caplog.at_level(logging.WARNING, logger="quantreg"):
        module = cpu_build.build()

    key = cpu_build.build_key()
    assert module is fake_compiler.module
    assert announced_first == [[ANNOUNCE + str(cpu_build.build_dir(key))]]
    messages = [r.getMessage() for r in caplog.records]
    ticks = [m for m in messages if m.startswith("still building quantreg's CPU kernel... ")]
    assert len(ticks) >= 2, messages
    assert messages[-1].startswith("quantreg's CPU kernel built in ")
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_a_cached_build_is_loaded_silently(fake_compiler, caplog):
    key = cpu_build.build_key()
    cpu_build.build_dir(key).mkdir(parents=True)
    (cpu_build.build_dir(key) / f"{key.module_name}.so").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="quantreg"):
        assert cpu_build.build() is fake_compiler.module
    assert caplog.records == []
    assert [c["folder"] for c in fake_compiler.calls] == [cpu_build.build_dir(key)]


def test_a_failed_build_is_the_reason_the_kernel_is_unavailable(fake_compiler, caplog):
    fake_compiler.error = RuntimeError("Error building extension 'quantreg_wna16': no ninja")
    with caplog.at_level(logging.WARNING, logger="quantreg"):
        assert cpu.extension() is None
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(ANNOUNCE)
    assert not any("built in" in m for m in messages)
    assert cpu.unavailable_reason() == (
        "building the C++ kernel failed: RuntimeError: Error building extension "
        "'quantreg_wna16': no ninja"
    )


# -- quantreg warmup -------------------------------------------------------------------------


def test_warmup_builds_once_then_finds_the_cache(fake_compiler, cache):
    """Every kernel: the int4 / int8 one, the float8 one, the AVX2 and AVX512-VNNI builds of
    the other int4 / int8 one, then the AVX512-BF16 float8 one, each in its own folder."""
    first = run_cli("warmup")
    names = ("wna16", "float8", "wna16_avx2", "wna16_vnni", "float8_avx512")
    keys = tuple(cpu_build.build_key(k) for k in names)
    assert first.returncode == 0
    wna16, float8, avx2, vnni, float8_512 = first.stdout.splitlines()
    assert wna16.startswith("quantreg's CPU kernel is ready (built in ")
    assert wna16.endswith(f"cached in {cache / keys[0].digest}")
    assert float8.startswith("quantreg's float8 CPU kernel is ready (built in ")
    assert float8.endswith(f"cached in {cache / keys[1].digest}")
    assert avx2.startswith("quantreg's AVX2 int4 / int8 CPU kernel is ready (built in ")
    assert avx2.endswith(f"cached in {cache / keys[2].digest}")
    assert vnni.startswith("quantreg's AVX512-VNNI int4 / int8 CPU kernel is ready (built in ")
    assert vnni.endswith(f"cached in {cache / keys[3].digest}")
    assert float8_512.startswith("quantreg's AVX512-BF16 float8 CPU kernel is ready (built in ")
    assert float8_512.endswith(f"cached in {cache / keys[4].digest}")
    assert [c["key"] for c in fake_compiler.calls] == list(keys)
    for key in keys:  # what the compiler leaves
        (cache / key.digest / f"{key.module_name}.so").write_bytes(b"")
    cpu._state.clear()  # a new process
    cpu_float8.UNIT.state.clear()
    cpu_avx2.UNIT.state.clear()
    cpu_vnni.UNIT.state.clear()
    cpu_float8_avx512.UNIT.state.clear()
    second = run_cli("warmup", "--json")
    report = json.loads(second.stdout)
    assert second.returncode == 0
    for part in ("float8", "avx2", "vnni", "float8_avx512"):
        report[part]["seconds"] = 0
    assert report | {"seconds": 0} == {
        "ready": True, "needed": True, "reason": None, "cache": str(cache / keys[0].digest),
        "cached": True, "seconds": 0,
        "float8": {"ready": True, "needed": True, "reason": None,
                   "cache": str(cache / keys[1].digest), "cached": True, "seconds": 0},
        "avx2": {"ready": True, "needed": True, "reason": None,
                 "cache": str(cache / keys[2].digest), "cached": True, "seconds": 0},
        "vnni": {"ready": True, "needed": True, "reason": None,
                 "cache": str(cache / keys[3].digest), "cached": True, "seconds": 0},
        "float8_avx512": {"ready": True, "needed": True, "reason": None,
                          "cache": str(cache / keys[4].digest), "cached": True, "seconds": 0},
    }  # fmt: skip


def test_warmup_exits_1_when_the_build_fails(fake_compiler):
    fake_compiler.error = OSError("c++: not found")
    out = run_cli("warmup")
    assert out.returncode == 1
    wna16, float8, avx2, vnni, float8_512 = out.stdout.splitlines()
    assert wna16.startswith("quantreg's CPU kernel could not be built in ")
    assert wna16.endswith("building the C++ kernel failed: OSError: c++: not found")
    assert float8.startswith("quantreg's float8 CPU kernel could not be built in ")
    assert float8.endswith("building the C++ float8 kernel failed: OSError: c++: not found")
    assert avx2.startswith("quantreg's AVX2 int4 / int8 CPU kernel could not be built in ")
    assert avx2.endswith("building the C++ AVX2 int4 / int8 kernel failed: OSError: c++: not found")
    assert vnni.startswith("quantreg's AVX512-VNNI int4 / int8 CPU kernel could not be built in ")
    assert vnni.endswith(
        "building the C++ AVX512-VNNI int4 / int8 kernel failed: OSError: c++: not found"
    )
    assert float8_512.startswith("quantreg's AVX512-BF16 float8 CPU kernel could not be built in ")
    assert float8_512.endswith(
        "building the C++ AVX512-BF16 float8 kernel failed: OSError: c++: not found"
    )


def test_warmup_on_this_machine(monkeypatch):
    """Here: a CPU without AVX-512 has nothing to build for the int kernel (exit 0, the reason
    on stdout), one with AVX2 + FMA + F16C builds the float8 and the AVX2 int kernels (or
    finds them built), one with AVX512-VNNI the VNNI build of the latter, one with AVX512-BF16
    the AVX-512 float8 kernel; with AVX-512 the real int kernel is built or found in the cache
    -- the user's cache, which the real-kernel tests use too, so that the suite compiles each
    kernel once."""
    monkeypatch.delenv("QUANTREG_KERNEL_CACHE")
    out = run_cli("warmup")
    assert out.returncode == 0
    wna16, float8, avx2, vnni, float8_512 = out.stdout.splitlines()
    if cpu.cpu_supports_avx512():
        assert wna16.startswith("quantreg's CPU kernel is ready (")
    else:
        assert wna16 == (
            "nothing to build for quantreg's CPU kernel: this CPU lacks AVX-512 (avx512f/"
            "avx512bw/avx512vl/avx512vbmi/f16c); heads run cpu-avx2-wna16, torch's ops or the "
            "reference kernel"
        )
    if cpu_float8.not_here() is None:
        assert float8.startswith("quantreg's float8 CPU kernel is ready (")
    else:
        assert float8.startswith("nothing to build for quantreg's float8 CPU kernel: ")
    if cpu_avx2.not_here() is None:
        assert avx2.startswith("quantreg's AVX2 int4 / int8 CPU kernel is ready (")
    else:
        assert avx2.startswith("nothing to build for quantreg's AVX2 int4 / int8 CPU kernel: ")
    if cpu_vnni.not_here() is None:
        assert vnni.startswith("quantreg's AVX512-VNNI int4 / int8 CPU kernel is ready (")
    else:
        assert vnni == (
            "nothing to build for quantreg's AVX512-VNNI int4 / int8 CPU kernel: "
            f"{cpu_vnni.not_here()}; heads run another kernel"
        )
    if cpu_float8_avx512.not_here() is None:
        assert float8_512.startswith("quantreg's AVX512-BF16 float8 CPU kernel is ready (")
    else:
        assert float8_512 == (
            "nothing to build for quantreg's AVX512-BF16 float8 CPU kernel: "
            f"{cpu_float8_avx512.not_here()}; heads run cpu-avx2-float8 or the reference kernel"
        )


def test_warmup_when_the_kernel_is_switched_off(fake_compiler, monkeypatch):
    monkeypatch.setenv("QUANTREG_NO_CPU_KERNELS", "1")
    out = run_cli("warmup", "--json")
    assert out.returncode == 0
    report = json.loads(out.stdout)
    off = {"ready": False, "needed": False, "reason": "QUANTREG_NO_CPU_KERNELS is set",
           "cache": None, "cached": False, "seconds": 0}  # fmt: skip
    assert report | {
        "seconds": 0,
        "float8": report["float8"] | {"seconds": 0},
        "avx2": report["avx2"] | {"seconds": 0},
        "vnni": report["vnni"] | {"seconds": 0},
        "float8_avx512": report["float8_avx512"] | {"seconds": 0},
    } == {
        **off,
        "float8": off,
        "avx2": off,
        "vnni": off,
        "float8_avx512": off,
    }  # every kernel
    assert fake_compiler.calls == []


# -- the folder lock ---------------------------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True], ids=["first-build", "cached-build"])
def test_a_lock_file_left_by_a_killed_build_is_removed_not_waited_for(fake_compiler, monkeypatch, caplog, cached):  # fmt: skip
    """torch's ``load_inline`` waits for its ``lock`` file to go, forever; a build killed while
    it held one (Ctrl-C in the first 30-60 s) left it behind for every later process."""
    key = cpu_build.build_key()
    folder = cpu_build.build_dir(key)
    folder.mkdir(parents=True)
    if cached:
        (folder / f"{key.module_name}.so").write_bytes(b"")
    (folder / "lock").write_text("")
    seen = []
    original = cpu_build.compile_extension
    monkeypatch.setattr(cpu_build, "compile_extension", lambda k, f: seen.append((f / "lock").exists()) or original(k, f))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="quantreg"):
        assert cpu_build.build() is fake_compiler.module
    assert seen == [False]
    assert f"removed {folder / 'lock'}, left by an interrupted build of quantreg's CPU kernel" in caplog.text  # fmt: skip


def test_a_build_waits_for_another_process_building_the_same_folder_and_says_so(fake_compiler, caplog):  # fmt: skip
    """The other process's lock (here: another open file description, as another process has)
    is held for 0.3 s; the build waits for it, saying so, then runs -- and finds no stale
    ``lock`` while the other one works (a live build's is not removed)."""
    import fcntl

    key = cpu_build.build_key()
    folder = cpu_build.build_dir(key)
    folder.mkdir(parents=True)
    holder = open(folder / cpu_build.FOLDER_LOCK, "a")  # noqa: SIM115
    fcntl.flock(holder, fcntl.LOCK_EX)
    (folder / "lock").write_text("")  # the other process's torch baton, live

    def other_process_finishes() -> None:
        time.sleep(0.3)
        (folder / "lock").unlink()
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()

    threading.Thread(target=other_process_finishes).start()
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="quantreg"):
        assert cpu_build.build() is fake_compiler.module
    assert time.perf_counter() - start >= 0.25
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"waiting for another process building or loading quantreg's CPU kernel in {folder}"  # fmt: skip
    assert not any(m.startswith("removed") for m in messages)

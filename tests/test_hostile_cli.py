"""Hostile command lines: the CLI never writes over what the user did not mean (a device, a
FIFO, a folder, a file it reads), checks every argument before any work, answers every failure
with one ``quantreg: error: ...`` line (exit 1; usage errors exit 2) and never a traceback, and
writes only strict JSON."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli, run_cli_batch
from safetensors.torch import load_file, save_file
from test_bad_inputs import CATALOGUE, base, digest, shard

import quantreg
from quantreg import CheckpointError, InputError, quantize_checkpoint
from quantreg.cli import build_parser
from quantreg.output_files import strict_json

HIDDEN = 64


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return base(tmp_path / "ckpt")


@pytest.fixture
def hidden(tmp_path) -> Path:
    path = tmp_path / "hidden.safetensors"
    save_file({"x": torch.randn(3, HIDDEN)}, str(path))
    return path


def everything(*folders: Path) -> dict[str, str]:
    """Digest of each folder's regular files, temporaries included (a leftover shows up)."""
    return {f"{folder.name}/{k}": v for folder in folders for k, v in digest(folder).items()}


def fail(constant: str) -> None:
    raise AssertionError(f"non-strict JSON constant {constant}")


def assert_error_line(out: subprocess.CompletedProcess[str], code: int, pattern: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert re.search(pattern, out.stderr), out.stderr
    if code == 1:
        assert out.stderr.startswith("quantreg: error: "), out.stderr


# -- run --out: never over a device, a folder, or a file the run reads ------------------------


def _symlink_to_shard(tmp: Path, ckpt: Path, _: Path) -> Path:
    (tmp / "link.safetensors").symlink_to(ckpt / "model.safetensors")
    return tmp / "link.safetensors"


def _hard_link_to_shard(tmp: Path, ckpt: Path, _: Path) -> Path:
    os.link(ckpt / "model.safetensors", tmp / "hard.safetensors")
    return tmp / "hard.safetensors"


def _index_shard(tmp: Path, ckpt: Path, _: Path) -> Path:
    shard(ckpt)
    return ckpt / "model-00001-of-00001.safetensors"


def _dangling_link(tmp: Path, ckpt: Path, _: Path) -> Path:
    (tmp / "dangling").symlink_to(tmp / "nowhere" / "logits.safetensors")
    return tmp / "dangling"


OUT_REFUSED = [
    ("existing-folder", lambda t, c, h: (t / "folder").mkdir() or t / "folder", r"--out .*folder is a directory, not a regular file"),
    ("dev-null", lambda t, c, h: Path("/dev/null"), r"--out /dev/null is a character device, not a regular file"),
    ("dev-full", lambda t, c, h: Path("/dev/full"), r"--out /dev/full is a character device"),
    ("own-shard", lambda t, c, h: c / "model.safetensors", r"--out .*model.safetensors would overwrite .*ckpt/model.safetensors, a file this command reads"),
    ("own-config", lambda t, c, h: c / "config.json", r"--out .*config.json would overwrite .*config.json, a file this command reads"),
    ("symlink-to-shard", _symlink_to_shard, r"--out .*link.safetensors would overwrite .*ckpt/model.safetensors"),
    ("hard-link-to-shard", _hard_link_to_shard, r"--out .*hard.safetensors would overwrite .*ckpt/model.safetensors"),
    ("index-shard", _index_shard, r"would overwrite .*model-00001-of-00001.safetensors, a file this command reads"),
    ("the-hidden-file", lambda t, c, h: h, r"--out .*hidden.safetensors would overwrite .*hidden.safetensors"),
    ("missing-parent", lambda t, c, h: t / "missing" / "logits.safetensors", r"--out .*logits.safetensors: folder .*missing does not exist; create it first"),
    ("dangling-symlink", _dangling_link, r"--out .*dangling is a link to .*nowhere/logits.safetensors, which does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in OUT_REFUSED], ids=[c[0] for c in OUT_REFUSED])  # fmt: skip
def test_run_out_is_refused_before_loading_and_nothing_changes(tmp_path, ckpt, hidden, make, message):  # fmt: skip
    out = make(tmp_path, ckpt, hidden)
    special = {p: os.stat(p).st_mode for p in ("/dev/null", "/dev/full")}
    before = everything(tmp_path, ckpt)
    result = run_cli("run", str(ckpt), "--hidden", str(hidden), "--out", str(out), "--dtype", "float32")  # fmt: skip
    assert_error_line(result, 1, message)
    assert everything(tmp_path, ckpt) == before
    assert {p: os.stat(p).st_mode for p in special} == special
    assert all(stat.S_ISCHR(mode) for mode in special.values())


def test_out_is_checked_before_the_checkpoint_is_read(tmp_path, ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00")  # a load would fail on this
    result = run_cli("run", str(ckpt), "--out", "/dev/null")
    assert_error_line(result, 1, r"--out /dev/null is a character device")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only file")
def test_a_read_only_out_file_is_not_replaced(tmp_path, ckpt):
    out = tmp_path / "logits.safetensors"
    out.write_text("keep")
    out.chmod(0o444)
    assert_error_line(run_cli("run", str(ckpt), "--out", str(out)), 1, r"is read-only")
    assert out.read_text() == "keep"


def test_run_out_writes_a_new_file_or_replaces_a_regular_one(tmp_path, ckpt, hidden):
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    old.write_text("previous")
    old.chmod(0o640)
    link = tmp_path / "link.safetensors"
    link.symlink_to(old)
    head = quantreg.load_lm_head(ckpt, dtype=torch.float32)
    expected = head.compute_logits(load_file(str(hidden))["x"])
    for out in (new, link):
        result = run_cli("run", str(ckpt), "--hidden", str(hidden), "--out", str(out), "--dtype", "float32")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert torch.equal(load_file(str(out))["logits"], expected)
    assert link.is_symlink() and os.readlink(link) == str(old)  # the link's target is replaced
    assert stat.S_IMODE(old.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hidden.safetensors", "link.safetensors", "new.safetensors", "old.safetensors"]  # fmt: skip


def test_a_failed_write_leaves_the_old_out_file_and_no_temporary(tmp_path, ckpt, monkeypatch):
    out = tmp_path / "logits.safetensors"
    out.write_text("previous")

    def full_disk(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("quantreg.writers.save_tensors", full_disk)
    result = run_cli("run", str(ckpt), "--out", str(out))
    assert_error_line(result, 1, r"^quantreg: error: writing logits to .*logits.safetensors: No space left on device: .*\.tmp\n$")  # fmt: skip
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "logits.safetensors"]


# -- inputs that would hang or are not files ---------------------------------------------------


def test_fifos_are_refused_without_waiting_and_stay_fifos(tmp_path, ckpt, hidden):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        (["run", str(ckpt), "--out", str(fifo)], r"--out .*fifo is a FIFO \(named pipe\), not a regular file"),
        (["run", str(ckpt), "--hidden", str(fifo)], r"hidden states file .*fifo is a FIFO \(named pipe\), not a regular file"),
        (["run", str(fifo)], r"checkpoint path .*fifo is a FIFO \(named pipe\); expected a checkpoint folder or its config.json"),
        (["resolve", str(fifo)], r"checkpoint path .*fifo is a FIFO"),
        (["inspect", str(fifo)], r"checkpoint path .*fifo is a FIFO"),
        (["quantize", str(fifo), str(tmp_path / "q"), "--method", "gptq"], r"fifo is a FIFO \(named pipe\), not a regular file"),
        (["quantize", str(ckpt), str(fifo), "--method", "gptq", "--force"], r"fifo is a FIFO \(named pipe\); quantize writes a folder, never over a special file"),
    ]  # fmt: skip
    before = everything(ckpt)
    results = run_cli_batch([argv for argv, _ in cases], timeout=120)
    for (argv, message), result in zip(cases, results, strict=True):
        assert result["code"] == 1, (argv, result)
        assert result["stderr"].startswith("quantreg: error: "), (argv, result)
        assert re.search(message, result["stderr"]), (argv, result)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert everything(ckpt) == before
    assert not (tmp_path / "q").exists()


def test_stdout_on_a_full_disk_is_an_error_not_a_traceback():
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "quantreg", "methods", "--json"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == "quantreg: error: writing to standard output: No space left on device\n"


# -- failures while working: one line, exit 1 -------------------------------------------------


def _raise(exc: BaseException):
    def fake(*args, **kwargs):
        raise exc

    return fake


ALLOC = "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"  # fmt: skip
SafetensorError = __import__("safetensors").SafetensorError
FAILURES = [
    ("memory-error", "quantreg.loading.load_lm_head", MemoryError(), r"^quantreg: error: out of memory while loading lm_head of .*ckpt: MemoryError\n$"),
    ("torch-cpu-allocator", "quantreg.loading.load_lm_head", RuntimeError(ALLOC), r"^quantreg: error: out of memory while loading lm_head of .*ckpt: \[enforce fail .*can't allocate memory.*\n$"),
    ("torch-out-of-memory", "quantreg.loading.load_lm_head", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), r"^quantreg: error: out of memory while loading .*: CUDA out of memory. Tried to allocate 2.00 GiB\n$"),
    ("permission-error", "quantreg.loading.load_lm_head", PermissionError(errno.EACCES, "Permission denied", "/x/model.safetensors"), r"^quantreg: error: loading lm_head of .*ckpt: Permission denied: /x/model.safetensors\n$"),
    ("is-a-directory", "quantreg.loading.load_lm_head", IsADirectoryError(errno.EISDIR, "Is a directory", "/x"), r"^quantreg: error: loading lm_head of .*: Is a directory: /x\n$"),
    ("safetensors-error", "quantreg.loading.load_lm_head", SafetensorError("Error while deserializing header: HeaderTooLarge"), r"^quantreg: error: loading lm_head of .*: Error while deserializing header: HeaderTooLarge\n$"),
    ("oom-reading-hidden", "quantreg.checkpoint.read_hidden_states", MemoryError(), r"^quantreg: error: out of memory while reading hidden states from .*hidden.safetensors: MemoryError\n$"),
    ("a-bug", "quantreg.loading.load_lm_head", ValueError("boom"), r"^quantreg: error: internal error while loading lm_head of .*ckpt: ValueError: boom -- this is a bug in quantreg; please report it .*-v shows the traceback\)\n$"),
]  # fmt: skip


@pytest.mark.parametrize(("target", "exc", "message"), [c[1:] for c in FAILURES], ids=[c[0] for c in FAILURES])  # fmt: skip
def test_a_failure_while_running_is_one_line_with_what_was_being_done(ckpt, hidden, monkeypatch, target, exc, message):  # fmt: skip
    monkeypatch.setattr(target, _raise(exc))
    before = everything(ckpt)
    assert_error_line(run_cli("run", str(ckpt), "--hidden", str(hidden)), 1, message)
    assert everything(ckpt) == before


def test_verbose_shows_the_traceback_of_an_internal_error_only(ckpt, monkeypatch):
    monkeypatch.setattr("quantreg.loading.load_lm_head", _raise(ValueError("boom")))
    loud = run_cli("-v", "run", str(ckpt))
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "ValueError: boom" in loud.stderr
    monkeypatch.setattr("quantreg.loading.load_lm_head", _raise(MemoryError()))
    assert "Traceback" not in run_cli("-v", "run", str(ckpt)).stderr


# -- every argument checked while parsing: usage errors exit 2 ---------------------------------

USAGE = [
    ("tokens-0", ["run", "P", "--tokens", "0"], r"quantreg run: error: argument --tokens: '0' is out of range: expected an integer from 1 to 65536"),
    ("tokens-negative", ["run", "P", "--tokens", "-1"], r"argument --tokens: '-1' is out of range"),
    ("tokens-huge", ["run", "P", "--tokens", str(10**9)], r"argument --tokens: '1000000000' is out of range"),
    ("tokens-not-a-number", ["run", "P", "--tokens", "4.5"], r"argument --tokens: '4.5' is not an integer"),
    ("seed-negative", ["run", "P", "--seed", "-1"], r"quantreg run: error: argument --seed: '-1' is out of range: expected an integer from 0 to 18446744073709551615"),
    ("seed-2-to-the-64", ["run", "P", "--seed", str(2**64)], r"argument --seed: '18446744073709551616' is out of range"),
    ("demo-seed-negative", ["demo", "--seed", "-5"], r"quantreg demo: error: argument --seed: '-5' is out of range"),
    ("bits-0", ["quantize", "S", "D", "--method", "gptq", "--bits", "0"], r"quantreg quantize: error: argument --bits: '0' is out of range: expected an integer from 1 to 16"),
    ("bits-huge", ["quantize", "S", "D", "--method", "gptq", "--bits", str(10**20)], r"argument --bits: '100000000000000000000' is out of range"),
    ("group-size-0", ["quantize", "S", "D", "--method", "gptq", "--group-size", "0"], r"argument --group-size: '0' is out of range: expected an integer from 1 to 1048576 or -1"),
    ("group-size-huge", ["quantize", "S", "D", "--method", "gptq", "--group-size", str(10**20)], r"argument --group-size: '100000000000000000000' is out of range"),
    ("m-0", ["bench", "--m", "1,0"], r"quantreg bench: error: argument --m: '1,0': token counts must be from 1 to 65536; got 0"),
    ("m-not-numbers", ["bench", "--m", "1,x"], r"argument --m: 'x' is not an integer"),
    ("shape-zero", ["bench", "--shape", "0x64"], r"argument --shape: '0x64': expected 1 <= N <= 4194304 and 1 <= K <= 131072"),
    ("shape-huge", ["bench", "--shape", "64x1000000000"], r"argument --shape: '64x1000000000': expected 1 <= N"),
    ("shape-not-nxk", ["bench", "--shape", "64"], r"argument --shape: '64': expected NxK, e.g. 32000x4096"),
    ("budget-nan", ["bench", "--budget", "nan"], r"argument --budget: 'nan' is out of range: expected seconds from 0 to 3600"),
    ("budget-negative", ["bench", "--budget", "-1"], r"argument --budget: '-1' is out of range"),
    ("budget-inf", ["bench", "--budget", "inf"], r"argument --budget: 'inf' is out of range"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in USAGE], ids=[c[0] for c in USAGE])
def test_a_bad_number_is_a_usage_error(argv, message):
    assert_error_line(run_cli(*argv), 2, message)


def test_the_bounds_themselves_are_accepted():
    args = build_parser().parse_args(["run", "P", "--tokens", "65536", "--seed", str(2**64 - 1)])
    assert (args.tokens, args.seed) == (65536, 2**64 - 1)
    args = build_parser().parse_args(["bench", "--m", "1,65536", "--shape", "4194304x131072", "--budget", "0"])  # fmt: skip
    assert (args.m, args.shape, args.budget) == ((1, 65536), [(4194304, 131072)], 0.0)


NAMES = [
    ("device", ["--device", "bogus"], r"invalid device 'bogus'"),
    pytest.param("device-absent", ["--device", "cuda:7"], r"device 'cuda:7' requested but CUDA is not available", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
    ("dtype", ["--dtype", "int8"], r"unsupported dtype 'int8': expected float32, float16 or bfloat16"),
    ("platform", ["--platform", "tpu"], r"invalid platform 'tpu'"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "extra", "message"), NAMES, ids=lambda v: v if isinstance(v, str) and "'" not in v else None)  # fmt: skip
def test_an_unknown_name_is_an_error_of_exit_1(ckpt, name, extra, message):
    assert_error_line(run_cli("run", str(ckpt), *extra), 1, message)


# -- quantize: never into what exists, unless --force; --force swaps whole ----------------------


@pytest.fixture
def float_src(tmp_path) -> Path:
    weight = torch.randn(256, HIDDEN, generator=torch.Generator().manual_seed(1)).half()
    return quantreg.write_checkpoint(tmp_path / "src", weight, None)


def _non_empty(tmp: Path, src: Path) -> Path:
    (tmp / "dst").mkdir()
    (tmp / "dst" / "notes.txt").write_text("mine")
    return tmp / "dst"


QUANTIZE_REFUSED = [
    ("existing-file", lambda t, s: (t / "dst").write_text("mine") and t / "dst", [], r"dst is a file; quantize writes a folder \(pass --force"),
    ("non-empty-folder", _non_empty, [], r"dst is not empty; quantize writes into a new folder \(or pass --force"),
    ("dst-is-src", lambda t, s: s, ["--force"], r"destination .*src is the source folder .*src"),
    ("dst-inside-src", lambda t, s: s / "q", ["--force"], r"destination .*src/q is inside the source folder"),
    ("dst-holds-src", lambda t, s: t, ["--force"], r"destination .* holds the source folder .*src"),
    ("dev-null", lambda t, s: Path("/dev/null"), ["--force"], r"/dev/null is a character device; quantize writes a folder, never over a special file"),
    ("missing-parent", lambda t, s: t / "missing" / "dst", [], r"destination .*missing/dst: folder .*missing does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "extra", "message"), [c[1:] for c in QUANTIZE_REFUSED], ids=[c[0] for c in QUANTIZE_REFUSED])  # fmt: skip
def test_quantize_refuses_a_destination_and_changes_nothing(tmp_path, float_src, make, extra, message):  # fmt: skip
    dst = make(tmp_path, float_src)
    before = everything(tmp_path, float_src, *([dst] if dst.is_dir() else []))
    with pytest.raises(CheckpointError, match=message):
        quantize_checkpoint(float_src, dst, "gptq", group_size=32, overwrite="--force" in extra)
    result = run_cli("quantize", str(float_src), str(dst), "--method", "gptq", *extra)
    assert_error_line(result, 1, message)
    assert everything(tmp_path, float_src, *([dst] if dst.is_dir() else [])) == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize(
    ("existing", "flags"),
    [("folder", ["--force"]), ("file", ["--force"]), ("empty-folder", [])],
    ids=["non-empty-folder-forced", "file-forced", "empty-folder"],
)
def test_quantize_writes_the_destination_whole(tmp_path, float_src, existing, flags):
    dst = tmp_path / "dst"
    if existing == "folder":
        _non_empty(tmp_path, float_src)
    elif existing == "file":
        dst.write_text("mine")
    else:
        dst.mkdir()
    result = run_cli("quantize", str(float_src), str(dst), "--method", "gptq", "--group-size", "32", *flags)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert quantreg.load_lm_head(dst, dtype=torch.float32).resolution.method in {
        "gptq",
        "cpu_wna16",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temporary left


def test_a_failed_quantize_leaves_the_destination_as_it_was(tmp_path, float_src, monkeypatch):
    dst = _non_empty(tmp_path, float_src)
    before = everything(tmp_path, dst)
    monkeypatch.setattr("quantreg.writers.save_tensors", _raise(OSError(errno.ENOSPC, "No space left on device")))  # fmt: skip
    with pytest.raises(OSError, match="No space left on device"):
        quantize_checkpoint(float_src, dst, "gptq", group_size=32, overwrite=True)
    result = run_cli("quantize", str(float_src), str(dst), "--method", "gptq", "--force")
    assert_error_line(result, 1, r"^quantreg: error: quantizing lm_head of .*src into .*dst: No space left on device\n$")  # fmt: skip
    assert everything(tmp_path, dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_a_failed_swap_puts_the_old_destination_back(tmp_path, float_src, monkeypatch):
    dst = _non_empty(tmp_path, float_src)
    before = everything(tmp_path, dst)
    rename = os.rename

    def failing(src, target):
        if str(src).endswith(".tmp"):  # the new folder moving in
            raise OSError(errno.EIO, "Input/output error")
        rename(src, target)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="Input/output error"):
        quantize_checkpoint(float_src, dst, "gptq", group_size=32, overwrite=True)
    monkeypatch.undo()
    assert everything(tmp_path, dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_write_checkpoint_refuses_a_file_and_a_dangling_link(tmp_path):
    weight = torch.zeros(8, HIDDEN)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CheckpointError, match=r"file exists and is not a folder"):
        quantreg.write_checkpoint(tmp_path / "file", weight, None)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors exists; write_checkpoint never overwrites"):  # fmt: skip
        quantreg.write_checkpoint(tmp_path / "ck", weight, None)
    assert not (tmp_path / "elsewhere.safetensors").exists()
    assert (tmp_path / "file").read_text() == "mine"


# -- strict JSON --------------------------------------------------------------------------------


def _with_infinities(folder: Path) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = "@inf@"
    config["quantization_config"]["damp_loss"] = "@-inf@"
    text = json.dumps(config).replace('"@inf@"', "1e999").replace('"@-inf@"', "-1e999")
    (folder / "config.json").write_text(text)
    return folder


def test_methods_json_is_strict():
    result = run_cli("methods", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout, parse_constant=fail)


@pytest.mark.parametrize("command", ["resolve", "inspect", "run"])
def test_numbers_beyond_a_double_in_config_json_are_refused_not_printed_as_infinity(ckpt, command):
    # Python's json reads 1e999 as inf; quantreg's parser refuses it naming the file, so no
    # non-finite value reaches any output (strict_json would still write it as a string)
    _with_infinities(ckpt)
    result = run_cli(command, str(ckpt), "--json")
    assert_error_line(
        result, 1, r"config.json: number -?1e999 is out of range \(it would read as -?inf\)"
    )
    assert result.stdout == ""


def test_demo_and_bench_json_are_strict(tmp_path, monkeypatch):
    from quantreg.demo import DemoRow

    row = DemoRow("x", "gptq", "reference", "lm_head", 1, float("nan"), float("inf"), True)
    monkeypatch.setattr("quantreg.demo_story.run_demo", lambda written, seed: [row])
    result = run_cli("demo", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout, parse_constant=fail)["rows"]
    assert rows[0]["max_abs_error"] == "Infinity"
    rows = [{"method": "m", "kernel": "k", "format": "f", "N": 1, "K": 1, "M": 1, "dtype": "bf16", "median_ms": 0.0,
             "ratio_vs_bf16": float("inf"), "gbps": float("nan"), "resident_bytes": 0, "peak_transient_bytes": 0, "max_rel_err": 0.0}]  # fmt: skip
    monkeypatch.setattr("quantreg.bench.run_bench", lambda **kwargs: {"machine": {}, "rows": rows})
    result = run_cli("bench", "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "bench.json").read_text(), parse_constant=fail)
    assert saved["rows"][0]["ratio_vs_bf16"] == "Infinity" and saved["rows"][0]["gbps"] == "NaN"


def test_bench_outputs_are_checked_before_timing(tmp_path, monkeypatch):
    monkeypatch.setattr("quantreg.bench.run_bench", _raise(AssertionError("must not run")))
    assert_error_line(run_cli("bench", "--json", "/dev/null"), 1, r"--json /dev/null is a character device")  # fmt: skip
    (tmp_path / "d").mkdir()
    assert_error_line(run_cli("bench", "--append-results", str(tmp_path / "d")), 1, r"--append-results .*d is a directory")  # fmt: skip


def test_strict_json_names_every_non_finite_number():
    data = {"a": [float("inf"), (float("-inf"), float("nan"))], "b": {"c": 1.5, "d": None}}
    assert json.loads(strict_json(data), parse_constant=fail) == {
        "a": ["Infinity", ["-Infinity", "NaN"]], "b": {"c": 1.5, "d": None},
    }  # fmt: skip


# -- resolve --check: run's header check, without loading ---------------------------------------

HEAD_CASES = [case for case in CATALOGUE if case[0] in {"missing-scales", "qweight-wrong-dtype", "hidden-size-mismatch", "transposed-qweight", "unconsumed-tensor"}]  # fmt: skip


@pytest.mark.parametrize(("damage", "message"), [c[1:4:2] for c in HEAD_CASES], ids=[c[0] for c in HEAD_CASES])  # fmt: skip
def test_resolve_check_fails_with_runs_message(ckpt, damage, message):
    damage(ckpt)
    before = everything(ckpt)
    run = run_cli("run", str(ckpt), "--dtype", "float32")
    check = run_cli("resolve", str(ckpt), "--check", "--dtype", "float32")
    assert_error_line(check, 1, message)
    assert check.stderr == run.stderr and check.stdout == ""
    assert run_cli("resolve", str(ckpt)).returncode == 0  # plain resolve: the decision only
    assert run_cli("resolve", str(ckpt), "--check").stderr == run_cli("run", str(ckpt)).stderr
    with pytest.raises(CheckpointError, match=message):
        quantreg.check_lm_head(quantreg.resolve(ckpt), dtype=torch.float32)
    assert everything(ckpt) == before


def test_resolve_check_passes_a_good_checkpoint(ckpt):
    result = run_cli("resolve", str(ckpt), "--check", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] in {"gptq", "cpu_wna16", "gptq_marlin"}


def test_an_input_error_names_the_argument():
    from quantreg.output_files import output_file

    with pytest.raises(InputError, match=r"--out /dev/null is a character device") as info:
        output_file("/dev/null", what="--out")
    assert info.value.field == "--out"

"""The command line: version, verbosity, exit codes, and the methods listing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import quantreg
from quantreg.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantreg", *args], capture_output=True, text=True)


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"quantreg {quantreg.__version__}"


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["resolve"], ["methods", "--bogus"]],
    ids=["no-command", "unknown-command", "missing-path", "unknown-option"],
)
def test_usage_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "usage: quantreg" in capsys.readouterr().err


def test_methods_json_lists_every_builtin(capsys):
    assert main(["methods", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == [
        "auto-round", "awq", "awq_marlin", "compressed-tensors", "cpu_wna16", "fp8", "gptq",
        "gptq_marlin", "modelopt", "unquantized",
    ]  # fmt: skip
    assert all(
        set(e) == {"name", "aliases", "source", "loaded", "error", "runs_here", "platform_reason"}
        for e in entries
    )


def test_methods_text(capsys):
    assert main(["methods"]) == 0
    assert "cpu_wna16  " in capsys.readouterr().out


def test_demo_lists_the_registry(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"quantreg {quantreg.__version__}") and "gptq_marlin" in out
    titles = [line.split(" ", 1)[0] for line in out.splitlines() if line[:1].isdigit()]
    assert titles == ["1.", "2.", "3.", "4."]
    assert "missing ['weight'], unconsumed ['qweight', 'qzeros', 'scales']" in out
    assert "quantreg.resolve(path): the tensors win" in out
    assert "compute_logits equals the one-process logits bit for bit: yes" in out
    assert "* forced with load_lm_head(requested=...); resolution alone picks" in out
    steps = out.rstrip().splitlines()
    steps = steps[steps.index("next, try:") :]
    assert (
        steps[1] == "  quantreg demo --keep DIR      (keeps the checkpoints; this run's are gone)"
    )
    assert (
        "  quantreg run DIR/awq_int4_g128 --reference DIR/eagle3_unquantized  (what int4 cost)"
        in steps
    )


@pytest.mark.parametrize(
    "args",
    [["-v", "methods"], ["methods", "-v"], ["--verbose", "methods", "--json"]],
    ids=["before-command", "after-command", "long-form"],
)
def test_verbose_is_accepted_before_or_after_the_command(args, capsys):
    assert main(args) == 0


@pytest.mark.slow
def test_verbose_logs_the_decision(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "awq", "lm_head": True}})
    )
    quiet, loud = (
        run_cli("resolve", str(tmp_path), "--platform", "cpu"),
        run_cli("-v", "resolve", str(tmp_path), "--platform", "cpu"),
    )
    assert "INFO" not in quiet.stderr
    assert "INFO quantreg.decision: lm_head of" in loud.stderr and "-> cpu_wna16" in loud.stderr


def test_a_quantreg_error_exits_1_with_the_message_and_no_traceback(tmp_path, capsys):
    assert main(["resolve", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("quantreg: error: checkpoint path") and "does not exist" in err

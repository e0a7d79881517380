"""Output that does not mislead: every command's help has a description and examples and lists
the writers' choices and defaults from the code; ``methods`` says what runs here; ``run
--reference`` / ``compare`` say what quantization cost; ``quantize`` says what it did;
``inspect`` shows drafter facts and whole JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import load_file, save_file

import quantreg
from quantreg import InputError, compare_logits
from quantreg.cli import build_parser
from quantreg.platform import Platform
from quantreg.writers import writers

VOCAB, HIDDEN = 256, 128


def float_drafter(folder: Path, *, vocab: int = VOCAB, seed: int = 0, **config: object) -> Path:
    """An Eagle3 drafter with a float16 head, a valid d2t and a target vocab twice as large."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, HIDDEN, generator=gen) * 0.05).half()
    d2t = torch.arange(vocab, dtype=torch.int64)  # draft id i -> target id 2i
    quantreg.write_checkpoint(folder, weight, d2t=d2t, vocab_size=2 * vocab, config=config)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, str]:
    """A float drafter, its head quantized by ``quantreg quantize`` (GPTQ int8), and what
    quantize printed."""
    root = tmp_path_factory.mktemp("pair")
    src = float_drafter(root / "float")
    out = run_cli("quantize", str(src), str(root / "gptq"), "--method", "gptq", "--bits", "8")
    assert out.returncode == 0, out.stderr
    return src, root / "gptq", out.stdout


# -- help: a description and examples everywhere; the writers' choices from the code -----------


def subcommands() -> dict[str, object]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_command_help_has_a_description_and_examples(command):
    out = run_cli(command, "--help")
    assert out.returncode == 0
    usage, _, rest = out.stdout.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert usage.startswith(f"usage: quantreg {command}") and len(description.split()) >= 10
    assert f"quantreg {command}" in out.stdout.split("examples:\n", 1)[1]


def test_quantize_help_lists_every_writer_option_with_its_choices_and_default():
    text = run_cli("quantize", "--help").stdout.split("writers (round-to-nearest)", 1)[1]
    found = writers()
    assert {"awq", "gptq", "compressed-tensors"} <= {n for names, _ in found for n in names}
    for names, options in found:
        block = text.split(f"--method {names[0]}", 1)[1].split("\n  --method ", 1)[0]
        flat = " ".join(block.split())
        for option in options:
            line = flat.split(f"--{option.name.replace('_', '-')} ", 1)[1]
            for choice in option.choices:
                shown = f"{choice} (default)" if choice == option.default else str(choice)
                assert shown in line, (names, option.name, shown)
            if not option.choices and option.default is not None:
                default = {True: "on", False: "off"}.get(option.default, option.default)
                assert line.startswith(f"default {default}"), (names, option.name, line)


# -- methods: what runs on this machine ---------------------------------------------------------


def test_methods_say_whether_each_runs_here_as_the_method_itself_says(registry):
    rows = json.loads(run_cli("methods", "--json").stdout)
    here = Platform.detect()
    for row in rows:
        cls = registry.get(row["name"])
        reason = cls.platform_reason(cls.model_construct(), here)
        assert (row["runs_here"], row["platform_reason"]) == (reason is None, reason), row
    text = run_cli("methods").stdout
    for row in rows:
        line = next(line for line in text.splitlines() if line.startswith(f"{row['name']} "))
        assert f"here: {'yes' if row['runs_here'] else 'no'}" in line
        if row["platform_reason"]:
            assert f"not here: {row['platform_reason']}" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the marlin methods run on this machine")
def test_methods_on_a_cpu_name_what_the_marlin_methods_lack():
    text = run_cli("methods").stdout
    assert "not here: awq_marlin needs CUDA >= 8.0 with triton; platform is cpu" in text
    assert "forced (--quantization), the method runs its CPU path" in text


# -- how much did quantization cost -------------------------------------------------------------


def _shifted(x: torch.Tensor) -> torch.Tensor:
    return x + 3.0  # softmax, arg-max and top-5 do not move; the logits do


def _reversed(x: torch.Tensor) -> torch.Tensor:
    return -x


METRICS = [
    # name, transform of the reference, expected (rel_err > 0, top1, top5, kl > 0)
    ("identical", lambda x: x.clone(), (False, 1.0, 1.0, False)),
    ("shifted-by-a-constant", _shifted, (True, 1.0, 1.0, False)),
    ("negated", _reversed, (True, 0.0, 0.0, True)),
]


@pytest.mark.parametrize(("transform", "expected"), [m[1:] for m in METRICS], ids=[m[0] for m in METRICS])  # fmt: skip
def test_compare_logits_metrics(transform, expected):
    reference = torch.randn(8, 50)
    c = compare_logits(transform(reference), reference)
    assert (c.rel_err > 0, c.top1, c.top5, c.kl > 1e-12) == expected
    assert (c.tokens, c.vocab) == (8, 50) and c.kl >= -1e-12


def test_compare_logits_refuses_different_shapes():
    with pytest.raises(InputError, match=r"logits \[2, 5\] and reference logits \[2, 6\]"):
        compare_logits(torch.zeros(2, 5), torch.zeros(2, 6))


def test_run_against_itself_costs_nothing(pair):
    src, _, _ = pair
    out = run_cli("run", str(src), "--reference", str(src), "--tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    ref = json.loads(out.stdout)["reference"]
    assert (ref["rel_err"], ref["top1"], ref["top5"], ref["kl"]) == (0.0, 1.0, 1.0, 0.0)
    assert (ref["tokens"], ref["vocab"], ref["method"], ref["dtype"]) == (8, VOCAB, None, "float16")


def test_run_reference_reports_a_small_plausible_cost_of_int8(pair):
    src, quantized, _ = pair
    out = run_cli("run", str(quantized), "--reference", str(src), "--tokens", "32", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    ref = data["reference"]
    assert data["method"] != ref["method"] and ref["method"] is None
    assert 0 < ref["rel_err"] < 2e-2 and 0 < ref["kl"] < 1e-3
    assert ref["top1"] >= 0.9 and ref["top5"] >= 0.9
    text = run_cli("compare", str(quantized), str(src), "--tokens", "32").stdout
    assert f"relative logit error {ref['rel_err']:.2e}, top-1 agreement {ref['top1']:.1%}" in text
    assert f"against {src} (unquantized, kernel dense, the same hidden states in float16)" in text


def test_compare_refuses_heads_of_different_shapes(tmp_path, pair):
    src, _, _ = pair
    other = float_drafter(tmp_path / "other", vocab=VOCAB // 2)
    for argv in (["compare", str(src), str(other)], ["run", str(src), "--reference", str(other)]):
        out = run_cli(*argv)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr == (
            f"quantreg: error: cannot compare heads of different shapes: the head has vocab "
            f"{VOCAB} x hidden {HIDDEN}, the reference vocab {VOCAB // 2} x hidden {HIDDEN}; "
            "compare a quantized head with the float head it was made from\n"
        )


# -- quantize: settings, bytes, round-to-nearest; --actorder per format -------------------------


def test_quantize_prints_settings_bytes_and_round_to_nearest(pair):
    _, quantized, stdout = pair
    assert "quantized with gptq by round-to-nearest (no calibration data)" in stdout
    assert "settings: format gptq (default), bits 8, group_size 128 (default), sym on (default), actorder off" in stdout  # fmt: skip
    before = VOCAB * HIDDEN * 2  # the float16 weight
    after = sum(t.numel() * t.element_size() for n, t in load_file(str(quantized / "model.safetensors")).items() if n.startswith("lm_head."))  # fmt: skip
    assert f"lm_head on disk: {before:,d} bytes (weight) -> {after:,d} bytes (g_idx, qweight, qzeros, scales): {after / before:.2f}x" in stdout  # fmt: skip


CT_ACTORDER = ("config_groups", "group_0", "weights", "actorder")
ACTORDER = [
    # name, method, flags, (config path to the act-order value, expected)
    ("gptq-actorder", "gptq", ["--actorder", "group"], (("desc_act",), True)),
    ("gptq-desc-act-alias", "gptq", ["--desc-act"], (("desc_act",), True)),
    ("ct-actorder", "compressed-tensors", ["--actorder", "group"], (CT_ACTORDER, "group")),
    ("ct-desc-act-alias", "compressed-tensors", ["--desc-act"], (CT_ACTORDER, "group")),
    ("gptq-v2-format", "gptq", ["--format", "gptq_v2"], (("checkpoint_format",), "gptq_v2")),
]


@pytest.mark.parametrize(("method", "flags", "expected"), [a[1:] for a in ACTORDER], ids=[a[0] for a in ACTORDER])  # fmt: skip
def test_quantize_maps_the_users_names_per_format(tmp_path, pair, method, flags, expected):
    src, _, _ = pair
    out = run_cli("quantize", str(src), str(tmp_path / "q"), "--method", method, "--group-size", "32", *flags)  # fmt: skip
    assert out.returncode == 0, out.stderr
    value = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    for key in expected[0]:
        value = value[key]
    assert value == expected[1]


REFUSED = [
    ("awq-has-no-actorder", ["--method", "awq", "--actorder", "group"], r"awq writer: no 'actorder' option \(its options: format, bits, group_size, sym\); writers with 'actorder': compressed-tensors; gptq, gptq_marlin"),
    ("gptq-weight-order", ["--method", "gptq", "--actorder", "weight"], r"gptq writer: actorder 'weight' is not supported; expected group \('group' is desc_act: .*round-to-nearest does not run\)"),
    ("ct-weight-order", ["--method", "compressed-tensors", "--actorder", "weight"], r"compressed-tensors writer: actorder must be None, or 'group' with strategy 'group'; got 'weight' \(.*round-to-nearest does not run\)"),
    ("contradicting-alias", ["--method", "gptq", "--desc-act", "--actorder", "weight"], r"--desc-act is --actorder group; it contradicts --actorder weight"),
    ("awq-gemv", ["--method", "awq", "--format", "gemv"], r"field 'version' = 'gemv': only the 'gemm' layout is supported"),
    ("no-writer", ["--method", "cpu_wna16", "--bits", "4"], r"cpu_wna16 has no writer, so it takes no 'bits'; writers: awq, awq_marlin; compressed-tensors; fp8; gptq, gptq_marlin"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])  # fmt: skip
def test_quantize_refuses_an_option_the_format_lacks(tmp_path, pair, flags, message):
    src, _, _ = pair
    out = run_cli("quantize", str(src), str(tmp_path / "q"), *flags)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("quantreg: error: ")
    assert re.search(message, out.stderr), out.stderr
    assert not (tmp_path / "q").exists()


# -- inspect: drafter facts, whole JSON, d2t is no quantized tensor -----------------------------


def test_inspect_shows_drafter_facts_and_never_marks_d2t_quantized(pair):
    _, quantized, _ = pair
    report = json.loads(run_cli("inspect", str(quantized), "--json").stdout)
    assert report["drafter"] == {
        "layout": "eagle3", "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": HIDDEN,
        "draft_vocab_size": VOCAB, "target_vocab_size": 2 * VOCAB,
        "d2t": {"present": True, "valid": True, "error": None},
    }  # fmt: skip
    flags = {t["name"]: t["quantized"] for t in report["tensors"]}
    assert flags == {"d2t": False, **{f"lm_head.{n}": True for n in ("g_idx", "qweight", "qzeros", "scales")}}  # fmt: skip
    text = run_cli("inspect", str(quantized)).stdout
    assert f"drafter: eagle3 (LlamaForCausalLMEagle3), hidden {HIDDEN}, draft vocab {VOCAB} -> target vocab {2 * VOCAB}; d2t present, valid" in text  # fmt: skip
    assert "\n    d2t " in text and "\n  q lm_head.qweight " in text


def test_inspect_names_an_invalid_d2t(tmp_path):
    folder = float_drafter(tmp_path / "bad")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["d2t"] = torch.full((VOCAB,), 10**6, dtype=torch.int64)
    save_file(tensors, str(folder / "model.safetensors"))
    d2t = json.loads(run_cli("inspect", str(folder), "--json").stdout)["drafter"]["d2t"]
    assert d2t["present"] and d2t["valid"] is False and "maps draft id 0 to target id 1000000" in d2t["error"]  # fmt: skip
    assert "d2t present, INVALID: " in run_cli("inspect", str(folder)).stdout


def test_inspect_prints_a_long_quantization_config_whole(pair, tmp_path):
    _, quantized, _ = pair
    folder = tmp_path / "long"
    folder.mkdir()
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = [f"layers.{i}.mlp" for i in range(40)]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((quantized / "model.safetensors").read_bytes())
    text = run_cli("inspect", str(folder)).stdout
    block = text.split("quantization_config:\n", 1)[1].split("\ndrafter:", 1)[0]
    assert json.loads(block) == config["quantization_config"]

"""A catalogue of checkpoints whose sizes or values are poisoned: absurd sizes are refused
before anything is allocated, values that would make non-finite logits are refused naming the
tensor, legal-but-odd values load with a WARNING naming it, and ``quantreg run`` never exits 0
with a NaN or inf logit."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli_batch
from safetensors.torch import save_file
from test_bad_inputs import HIDDEN, VOCAB, base, digest, edit_config, edit_tensors
from torch.overrides import TorchFunctionMode

import quantreg
from quantreg import CheckpointError, ConfigError, InputError, QuantregError, load_lm_head
from quantreg.kernels import kernel_names

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CT = "compressed-tensors"
WRITER = {"gptq": {}, "awq": {"group_size": 32}, CT: {"group_size": 32}, None: {}}
FP8 = {"format": "float-quantized"}


def tensor(name: str, change: Callable[[torch.Tensor], object]) -> Callable[[Path], None]:
    """Change one tensor in place (``change`` gets it and mutates it)."""
    return edit_tensors(lambda t: change(t[name]))


def put(name: str, make: Callable[[dict], torch.Tensor]) -> Callable[[Path], None]:
    """Replace (or add) one tensor: ``make`` gets every tensor and returns the new one."""
    return edit_tensors(lambda t: t.update({name: make(t)}))


def at(index: tuple[int, ...] | int, value: float) -> Callable[[torch.Tensor], None]:
    return lambda t: t.__setitem__(index, value)


def fp8_code(index: tuple[int, int], code: int) -> Callable[[torch.Tensor], None]:
    return lambda t: t.view(torch.uint8).__setitem__(index, code)


def ct_weights(**change: object) -> Callable[[Path], None]:
    return edit_config(lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(change))  # fmt: skip


def nan_bias(t: dict) -> torch.Tensor:
    bias = torch.zeros(VOCAB)
    bias[7] = float("nan")
    return bias


def scales_f32(index: tuple[int, int], value: float) -> Callable[[dict], torch.Tensor]:
    def make(t: dict) -> torch.Tensor:
        scales = t["lm_head.scales"].float()
        scales[index] = value
        return scales

    return make


def plain(folder: Path, method: str | None, **params: object) -> Path:
    return base(folder, method, **{**WRITER[method], **params})


GROUP_FIELD = r"config_groups\.group_0\.weights\.group_size"
# id, method, writer options, damage, compute dtype, error, message
REFUSED = [
    # sizes in config.json: bounded, named, refused before anything is built
    ("vocab-beyond-int32", "gptq", {}, edit_config(lambda c: c.update(draft_vocab_size=2**31)), F32, ConfigError, r"config.json: field 'draft_vocab_size' = 2147483648: expected at most 2147483647"),
    ("vocab-beyond-int64", "gptq", {}, edit_config(lambda c: c.update(draft_vocab_size=2**64)), F32, ConfigError, r"field 'draft_vocab_size' = 18446744073709551616: expected at most 2147483647"),
    ("vocab-size-alone-absurd", None, {}, edit_config(lambda c: (c.pop("draft_vocab_size"), c.update(vocab_size=2**40))), F32, ConfigError, r"config.json: field 'vocab_size' = 1099511627776: expected at most 2147483647"),
    ("hidden-2^21", "gptq", {}, edit_config(lambda c: c.update(hidden_size=2**21)), F32, ConfigError, r"config.json: field 'hidden_size' = 2097152: expected at most 1048576"),
    ("hidden-beyond-int64", None, {}, edit_config(lambda c: c.update(hidden_size=2**70)), F32, ConfigError, r"field 'hidden_size' = 1180591620717411303424: expected at most 1048576"),
    ("target-vocab-absurd", "gptq", {}, edit_config(lambda c: c.update(vocab_size=2**40)), F32, ConfigError, r"d2t map but field 'vocab_size' = 1099511627776 is not the target vocab size \(a positive integer up to 2147483647\)"),
    ("huge-head-over-small-tensors", "gptq", {}, edit_config(lambda c: c.update(draft_vocab_size=65536, hidden_size=16384)), F32, CheckpointError, r"lm_head.qweight: expected shape I32 \[2048, 65536\], found I32 \[8, 1000\]"),
    # non-finite float tensors
    ("gptq-nan-bias", "gptq", {}, put("lm_head.bias", nan_bias), F32, CheckpointError, r"model.safetensors: lm_head.bias holds 1 non-finite value\(s\) \(NaN or inf\) as float32, the first at \[7\]"),
    ("float-inf-bias", None, {}, put("lm_head.bias", lambda t: torch.full((VOCAB,), float("inf"))), F32, CheckpointError, r"lm_head.bias holds 1000 non-finite value\(s\)"),
    ("f32-bias-overflows-fp16", "gptq", {}, put("lm_head.bias", lambda t: torch.full((VOCAB,), 1e6)), F16, CheckpointError, r"lm_head.bias holds 1000 non-finite value\(s\) \(NaN or inf\) as float16, .*load with dtype=float32"),
    ("float-nan-weight", None, {}, tensor("lm_head.weight", at((3, 5), float("nan"))), F32, CheckpointError, r"model.safetensors: lm_head.weight holds 1 non-finite value\(s\) \(NaN or inf\) as float32, the first at \[3, 5\]"),
    ("float-inf-weight", None, {}, tensor("lm_head.weight", at((999, 63), float("-inf"))), F16, CheckpointError, r"lm_head.weight holds 1 non-finite value\(s\) .* the first at \[999, 63\]"),
    ("f32-float-weight-overflows-fp16", None, {}, put("lm_head.weight", lambda t: t["lm_head.weight"].float().index_fill_(0, torch.tensor([2]), 1e5)), F16, CheckpointError, r"lm_head.weight holds 64 non-finite value\(s\) \(NaN or inf\) as float16, the first at \[2, 0\]"),
    # scales whose dequantized weights overflow the scale dtype or the compute dtype
    ("gptq-fp16-scale-overflows", "gptq", {}, tensor("lm_head.scales", at((0, 3), 1e4)), F32, CheckpointError, r"model.safetensors: lm_head.scales: scale 10000 \(group 0, vocab row 3\) makes dequantized weights \|q - z\| \* \|s\| up to 80000, beyond 65504, the largest finite value of the scale dtype float16"),
    ("gptq-f32-scale-overflows-fp16-compute", "gptq", {}, put("lm_head.scales", scales_f32((1, 5), 1e6)), F16, CheckpointError, r"lm_head.scales: scale 1e\+06 \(group 1, vocab row 5\) .* up to 8e\+06, beyond 65504, the largest finite value of the compute dtype float16"),
    ("gptq-f32-scale-overflows-f32", "gptq", {}, put("lm_head.scales", scales_f32((0, 0), 1e38)), F32, CheckpointError, r"lm_head.scales: scale 1e\+38 \(group 0, vocab row 0\) .* the scale dtype float32"),
    ("awq-bf16-scale-overflows", "awq", {}, put("lm_head.scales", lambda t: t["lm_head.scales"].bfloat16().index_fill_(1, torch.tensor([9]), 1e38)), F32, CheckpointError, r"model.safetensors: lm_head.scales: scale 9\.\d+e\+37 \(group 0, vocab row 9\) .* the scale dtype bfloat16"),
    ("ct-int4-scale-overflows", CT, {}, tensor("lm_head.weight_scale", at((3, 1), 1e4)), F32, CheckpointError, r"lm_head.weight_scale: scale 10000 \(group 1, vocab row 3\) .* up to 80000, beyond 65504"),
    ("ct-fp8-scale-overflows", CT, FP8, tensor("lm_head.weight_scale", at(4, 200.0)), F32, CheckpointError, r"lm_head.weight_scale: scale 200 \(group 0, vocab row 4\) .* up to 89600, beyond 65504"),
    ("gptq-nan-scale-under-fp16", "gptq", {}, tensor("lm_head.scales", at((1, 1), float("nan"))), F16, CheckpointError, r"lm_head.scales holds 1 non-finite value\(s\) \(NaN or inf\)"),
    # float8 NaN codes (e4m3fn has no inf: 0x7F and 0xFF are NaN)
    ("ct-fp8-nan-code", CT, FP8, tensor("lm_head.weight", fp8_code((2, 9), 0x7F)), F32, CheckpointError, r"model.safetensors: lm_head.weight holds 1 NaN float8 code\(s\) \(0x7F / 0xFF\), the first at \[2, 9\]"),
    ("ct-fp8-negative-nan-codes", CT, FP8, tensor("lm_head.weight", fp8_code((slice(5, 7), 0), 0xFF)), BF16, CheckpointError, r"lm_head.weight holds 2 NaN float8 code\(s\) .* the first at \[5, 0\]"),
    # F64 scales: refused from the header (the kernels take 16- and 32-bit scales)
    ("gptq-f64-scales", "gptq", {}, put("lm_head.scales", lambda t: t["lm_head.scales"].double()), F32, CheckpointError, r"lm_head.scales: expected dtype F16, BF16 or F32 \[2, 1000\] \(it keeps the checkpoint's dtype.*found F64 \[2, 1000\] in model.safetensors"),
    ("ct-f64-weight-scale", CT, {}, put("lm_head.weight_scale", lambda t: t["lm_head.weight_scale"].double()), BF16, CheckpointError, r"lm_head.weight_scale: expected dtype F16, BF16 or F32 \[1000, 2\].*found F64"),
    # g_idx that contradicts desc_act: false (vLLM ignores it, GPTQModel follows it)
    ("g-idx-swapped-desc-act-false", "gptq", {}, tensor("lm_head.g_idx", lambda g: (g.__setitem__(0, 1), g.__setitem__(40, 0))), F32, CheckpointError, r"model.safetensors: lm_head.g_idx: 2 of 64 rows name another group than row // group_size \(32\), the first g_idx\[0\] = 1 \(expected 0\), but desc_act is false"),
    ("g-idx-one-group-desc-act-false", "gptq", {}, tensor("lm_head.g_idx", lambda g: g.zero_()), F32, CheckpointError, r"lm_head.g_idx: 32 of 64 rows .* the first g_idx\[32\] = 0 \(expected 1\)"),
    # config fields, named where they are parsed or laid out
    ("ct-group-size-null", CT, {}, ct_weights(group_size=None), F32, ConfigError, rf"invalid compressed-tensors quantization_config in .*config.json.*field '{GROUP_FIELD}' = None: strategy 'group' needs a positive group size"),
    ("ct-group-size-0", CT, {}, ct_weights(group_size=0), F32, ConfigError, rf"field '{GROUP_FIELD}' = 0: strategy 'group' needs a positive group size"),
    ("ct-group-size-minus-1-strategy-group", CT, {}, ct_weights(group_size=-1), F32, ConfigError, rf"field '{GROUP_FIELD}' = -1: strategy 'group' needs a positive group size"),
    ("ct-group-size-minus-2", CT, {}, ct_weights(group_size=-2, strategy=None), F32, ConfigError, rf"field '{GROUP_FIELD}' = -2: expected a positive group size \(strategy 'group'\), -1"),
    ("ct-group-size-0-no-strategy", CT, {}, ct_weights(group_size=0, strategy=None), F32, ConfigError, rf"field '{GROUP_FIELD}' = 0: expected a positive group size"),
    ("ct-group-size-does-not-divide", CT, {}, ct_weights(group_size=48), F32, ConfigError, rf"config.json: compressed-tensors: field '{GROUP_FIELD}' = 48 does not divide the input size 64 of lm_head"),
    ("ct-num-bits-0", CT, {}, ct_weights(num_bits=0), F32, ConfigError, r"field 'config_groups.group_0.weights.num_bits' = 0: expected a bit width between 1 and 32"),
    ("ct-strategy-unknown", CT, {}, ct_weights(strategy="rowwise"), F32, ConfigError, r"field 'config_groups.group_0.weights.strategy' = 'rowwise'"),
    ("awq-group-size-does-not-divide", "awq", {}, edit_config(lambda c: c["quantization_config"].update(group_size=48)), F32, ConfigError, r"config.json: AWQ needs the input size \(64\) to be a multiple of group_size \(48\)"),
]  # fmt: skip
REFUSED_IDS = [case[0] for case in REFUSED]


@pytest.fixture
def poisoned(request, tmp_path) -> tuple[Path, torch.dtype, type, str]:
    _, method, params, damage, dtype, error, message = request.param
    folder = plain(tmp_path / "ckpt", method, **params)
    damage(folder)
    return folder, dtype, error, message


@pytest.mark.parametrize("poisoned", REFUSED, ids=REFUSED_IDS, indirect=True)
def test_a_poisoned_checkpoint_is_refused_naming_what_is_wrong(poisoned):
    folder, dtype, error, message = poisoned
    before = digest(folder)
    with pytest.raises(error, match=message) as info:
        load_lm_head(folder, dtype=dtype)
    assert isinstance(info.value, QuantregError)
    assert digest(folder) == before


class Allocations(TorchFunctionMode):
    """Records the largest tensor storage any torch call returns off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type != "meta":
            self.largest = max(self.largest, out.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("method", ["gptq", "awq", CT, None], ids=["gptq", "awq", "ct", "float"])
@pytest.mark.parametrize(
    ("vocab", "hidden"), [(65536, 16384), (2**31 - 1, 2**20)], ids=["65536x16384", "2^31x2^20"]
)
def test_a_huge_head_over_small_tensors_is_refused_before_it_is_allocated(
    tmp_path, method, vocab, hidden
):
    folder = plain(tmp_path / "ckpt", method)
    edit_config(lambda c: c.update(draft_vocab_size=vocab, vocab_size=vocab, hidden_size=hidden))(
        folder
    )
    with Allocations() as seen, pytest.raises(CheckpointError, match=r"expected shape"):
        load_lm_head(folder, dtype=F32)
    assert seen.largest < 1 << 20, f"{seen.largest} bytes allocated at once"


def test_the_allocation_probe_sees_a_real_head(tmp_path):
    folder = plain(tmp_path / "ckpt", "gptq")
    with Allocations() as seen:
        load_lm_head(folder, dtype=F32)
    assert seen.largest >= VOCAB * HIDDEN // 2  # the packed codes, at least


# id, method, writer options, damage, the WARNING (logger quantreg.methods._checks)
WARNED = [
    ("gptq-all-zero-scales", "gptq", {}, tensor("lm_head.scales", lambda s: s.zero_()), r"lm_head.scales: 1000 of 1000 vocab rows have all-zero scales: their logits are exactly 0"),
    ("gptq-two-zero-rows", "gptq", {}, tensor("lm_head.scales", lambda s: s[:, 3:5].zero_()), r"lm_head.scales: 2 of 1000 vocab rows have all-zero scales"),
    ("ct-all-zero-weight-scale", CT, {}, tensor("lm_head.weight_scale", lambda s: s.zero_()), r"lm_head.weight_scale: 1000 of 1000 vocab rows have all-zero scales"),
    ("gptq-negative-scales", "gptq", {}, tensor("lm_head.scales", lambda s: s[0, :10].neg_()), r"lm_head.scales holds 10 negative scale\(s\) of 2000: each flips the sign of its group's weights"),
    ("gptq-qzeros-not-8-under-sym", "gptq", {}, tensor("lm_head.qzeros", lambda z: z.zero_()), r"lm_head.qzeros: 2000 of 2000 zero points differ from 8, which sym: true implies; quantreg uses them as stored"),
    ("gptq-one-zero-point-off", "gptq", {}, tensor("lm_head.qzeros", lambda z: z[1, 0].add_(1)), r"lm_head.qzeros: 1 of 2000 zero points differ from 8"),
    ("awq-qzeros-not-8-under-zero-point-false", "awq", {"sym": True}, tensor("lm_head.qzeros", lambda z: z.zero_()), r"lm_head.qzeros: 2000 of 2000 zero points differ from 8, which zero_point: false implies"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "params", "damage", "warning"),
    [case[1:] for case in WARNED],
    ids=[case[0] for case in WARNED],
)
def test_legal_but_odd_values_load_with_a_warning_naming_the_tensor(
    tmp_path, caplog, method, params, damage, warning
):
    folder = plain(tmp_path / "ckpt", method, **params)
    damage(folder)
    with caplog.at_level("WARNING", logger="quantreg.methods._checks"):
        head = load_lm_head(folder, dtype=F32)
    assert re.search(warning, caplog.text), caplog.text
    logits = head.compute_logits(torch.randn(3, HIDDEN))
    assert torch.isfinite(logits).all()


def test_an_all_zero_scale_row_gives_zero_logits(tmp_path, caplog):
    folder = plain(tmp_path / "ckpt", "gptq")
    tensor("lm_head.scales", lambda s: s[:, 3:5].zero_())(folder)
    logits = load_lm_head(folder, dtype=F32).compute_logits(torch.randn(3, HIDDEN))
    assert (logits[:, 3:5] == 0).all() and (logits[:, 5] != 0).all()


def test_a_plain_checkpoint_logs_no_warning(tmp_path, caplog):
    folder = plain(tmp_path / "ckpt", "gptq")
    with caplog.at_level("WARNING"):
        load_lm_head(folder, dtype=F32)
    assert not caplog.records


LEGAL = [
    ("gptq-group-size-does-not-divide", "gptq", {"group_size": 48}, lambda p: None),
    ("ct-group-size-minus-1-means-channel", CT, {"strategy": "channel"}, ct_weights(group_size=-1, strategy=None)),
    ("gptq-f64-bias", "gptq", {}, put("lm_head.bias", lambda t: torch.linspace(-1, 1, VOCAB, dtype=torch.float64))),
    ("float-f64-weight", None, {}, put("lm_head.weight", lambda t: t["lm_head.weight"].double())),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "params", "change"), [c[1:] for c in LEGAL], ids=[c[0] for c in LEGAL]
)
def test_legal_inputs_near_the_limits_load_and_give_finite_logits(tmp_path, method, params, change):
    folder = plain(tmp_path / "ckpt", method, **params)
    change(folder)
    logits = load_lm_head(folder, dtype=F32).compute_logits(torch.randn(3, HIDDEN))
    assert logits.shape == (3, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("group_size", [48, 0, -1], ids=["48-of-64", "0", "-1"])
def test_the_compressed_tensors_writer_refuses_a_group_size_it_could_not_load(group_size):
    with pytest.raises(InputError, match=r"strategy 'group' needs a positive group_size dividing the input size 64"):  # fmt: skip
        quantreg.quantize(torch.randn(128, HIDDEN), CT, strategy="group", group_size=group_size)


def test_f64_scales_are_refused_at_load_whatever_the_kernel(tmp_path):
    """Never a failure on the first forward: the header check refuses them before any kernel
    is chosen, so no kernel (here or on a GPU or AVX-512 machine) ever sees an F64 scale."""
    folder = plain(tmp_path / "ckpt", "gptq")
    put("lm_head.scales", lambda t: t["lm_head.scales"].double())(folder)
    for kernel in kernel_names():
        for dtype in (F32, BF16):
            with pytest.raises(CheckpointError, match=r"lm_head.scales: expected dtype F16, BF16 or F32"):  # fmt: skip
                load_lm_head(folder, dtype=dtype, kernel=kernel)


@pytest.mark.parametrize("method", ["gptq", CT], ids=["gptq", "ct"])
def test_an_f64_bias_runs_on_every_kernel_this_machine_has(tmp_path, method):
    """An F64 bias is cast to the compute dtype at load: every kernel that runs here (the
    compressed-tensors method may run any of them, Triton through its interpreter) gives the
    reference kernel's logits."""
    folder = plain(tmp_path / "ckpt", method)
    put("lm_head.bias", lambda t: torch.linspace(-1, 1, VOCAB, dtype=torch.float64))(folder)
    x = torch.randn(3, HIDDEN)
    ran = {}
    for kernel in kernel_names():
        for dtype in (F32, BF16):
            try:
                head = load_lm_head(folder, dtype=dtype, kernel=kernel)
            except InputError as exc:
                assert "cannot run this layer" in str(exc) or "was requested" in str(exc)
                continue
            if kernel == "triton" and dtype == BF16:
                continue  # no GPU here: the Triton interpreter computes bf16 wrongly
            ran[(kernel, dtype)] = head.compute_logits(x.to(dtype)).float()
    assert ("reference", F32) in ran and ("torch-int4pack", BF16) in ran
    assert torch.isfinite(ran[("reference", F32)]).all()
    for (kernel, dtype), logits in ran.items():
        tol = 1e-3 if dtype == F32 else 3e-2  # the precision contract's fast-path bounds
        reference = ran[("reference", dtype)]
        torch.testing.assert_close(logits, reference, rtol=tol, atol=tol, msg=f"{kernel} {dtype}")


# -- the command line ---------------------------------------------------------------------------


def _huge_logits(folder: Path) -> None:
    """A float head whose fp16 weights are finite but whose fp16 logits are not."""
    quantreg.write_checkpoint(folder, torch.full((VOCAB, HIDDEN), 6e4), dtype=F16)


def _nan_hidden(folder: Path) -> None:
    plain(folder, "gptq")
    x = torch.randn(2, HIDDEN)
    x[1, 3] = float("nan")
    save_file({"x": x}, str(folder.parent / f"{folder.name}-x.safetensors"))


def test_quantreg_run_never_exits_0_with_non_finite_logits(tmp_path):
    """Every refused checkpoint exits 1 with its message and no traceback; the final guard of
    ``quantreg run`` turns logits that are still non-finite into an error naming the cause;
    legal-but-odd checkpoints exit 0 with finite logits."""
    cases = []  # (id, argv, expected code, message)
    for name, method, params, damage, dtype, _, message in REFUSED:
        folder = plain(tmp_path / name, method, **params)
        damage(folder)
        cases.append((name, ["run", str(folder), "--dtype", str(dtype).removeprefix("torch.")], 1, message))  # fmt: skip
    _huge_logits(tmp_path / "fp16-logits-overflow")
    cases.append(("fp16-logits-overflow", ["run", str(tmp_path / "fp16-logits-overflow"), "--dtype", "float16"], 1, r"fp16-logits-overflow: lm_head \(unquantized, kernel dense\) computed \d+ non-finite logit\(s\) \(NaN or inf\) of 4000 as float16 from finite hidden states"))  # fmt: skip
    _nan_hidden(tmp_path / "nan-hidden")
    hidden = str(tmp_path / "nan-hidden-x.safetensors")
    cases.append(("nan-hidden-states", ["run", str(tmp_path / "nan-hidden"), "--hidden", hidden], 1, r"nan-hidden-x.safetensors: tensor 'x' holds 1 non-finite value"))  # fmt: skip
    for name, method, params, damage, _ in WARNED:
        folder = plain(tmp_path / name, method, **params)
        damage(folder)
        cases.append((name, ["run", str(folder), "--json"], 0, ""))
    results = run_cli_batch([case[1] for case in cases], timeout=600)
    for (name, _, code, message), result in zip(cases, results, strict=True):
        assert result["code"] == code, (name, result["stderr"])
        assert "Traceback" not in result["stderr"], name
        if code:
            assert result["stderr"].startswith("quantreg: error: "), (name, result["stderr"])
            assert re.search(message, result["stderr"]), (name, result["stderr"])
        else:
            assert json.loads(result["stdout"])["top5"], name

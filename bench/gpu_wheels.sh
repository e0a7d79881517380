#!/bin/sh
# The wheels bench/gpu.py needs on the device machine that its image lacks -- pydantic and what
# it needs -- built for that machine's Python 3.12, downloaded here into .whl/ (ignored by git).
# A device call names ".whl" in its carry; bench/gpu_device.sh installs them there.
#   sh bench/gpu_wheels.sh
set -eu
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0
ls .whl

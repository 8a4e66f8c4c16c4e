#!/usr/bin/env bash
# Downloads, here, the wheels tools/gpu_check.sh installs on the device machine (which has no registry access):
# CUTLASS's headers for the build, and the peers and writers it lacks (compressed-tensors and its dependencies,
# qwix). They land in .whl (git-ignored); pass it to the device with carry=[".whl"]. The device's Python is 3.12,
# so binary wheels are fetched for it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl nvidia-cutlass==4.2.0.0 compressed-tensors==0.20.1 loguru pydantic \
  annotated-types typing-inspection typing-extensions qwix==0.1.8 opt_einsum absl-py
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
  "pydantic-core==$(unzip -p .whl/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==//p')" psutil
ls .whl

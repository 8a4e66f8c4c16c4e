#!/usr/bin/env bash
# The wgmma prototype (wgmma_probe.cu): build here, run on the device with carry=["tools/wgmma_probe/bin"].
#   bash tools/wgmma_probe/run.sh build
#   bash tools/wgmma_probe/run.sh run        # WGMMA_PROBE_DIAGNOSE=1: small cases against a host product
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
case ${1:-} in
build)
  mkdir -p "$HERE/bin"
  nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Xptxas -v -I"$REPO/csrc" \
    "$HERE/wgmma_probe.cu" "$REPO/csrc/kernels/sm_count.cu" "$REPO/csrc/kernels/marlin_hopper.cu" -o "$HERE/bin/wgmma_probe" 2>&1 | grep -A2 WgmmaMarlin ;;
run)
  "$HERE/bin/wgmma_probe" ;;
*)
  echo "usage: $0 build | run" >&2
  exit 2 ;;
esac

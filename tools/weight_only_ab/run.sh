#!/usr/bin/env bash
# A/B of kernels/weight_only.cu: the version at git revision BASE (default HEAD) against the working tree's, built
# into two standalone binaries (seconds of device time, no package build), timed on the same cases, and their
# outputs compared. Build on this machine, run on the device:
#   bash tools/weight_only_ab/run.sh build [BASE]     # here: compiles ab_base and ab_new into tools/weight_only_ab/bin
#   bash tools/weight_only_ab/run.sh run              # on the device, with carry=["tools/weight_only_ab/bin"]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=$HERE/bin
case ${1:-} in
build)
  mkdir -p "$BIN/base/kernels"
  git -C "$REPO" show "${2:-HEAD}:csrc/kernels/weight_only.cu" > "$BIN/base/kernels/weight_only.cu"
  cp "$REPO"/csrc/kernels/{weight_only.h,sm_count.h,types.h} "$BIN/base/kernels/"
  flags=(-std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a)
  nvcc "${flags[@]}" -I"$BIN/base" "$HERE/ab.cu" "$REPO/csrc/kernels/sm_count.cu" -o "$BIN/ab_base" &
  base_build=$!
  nvcc "${flags[@]}" -I"$REPO/csrc" "$HERE/ab.cu" "$REPO/csrc/kernels/sm_count.cu" -o "$BIN/ab_new"
  wait "$base_build" ;;  # a bare `wait` would not report the background build's failure
run)
  cd "$BIN"
  ./ab_base base > base.txt
  ./ab_new new > new.txt
  paste base.txt new.txt
  python3 "$HERE/compare.py" base new
  rm -f ./*.bin ;;
*)
  echo "usage: $0 build [BASE] | run" >&2
  exit 2 ;;
esac

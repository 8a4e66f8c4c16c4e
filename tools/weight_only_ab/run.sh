#!/usr/bin/env bash
# A/B of one weight-only kernel file: the version at git revision BASE (default HEAD) against the working tree's,
# built into two standalone binaries (seconds of device time, no package build), timed on the same cases, and
# their outputs compared. KERNEL is weight_only (ab.cu: gptq_gemm / awq_gemm) or marlin (marlin_ab.cu). Build on
# this machine, run on the device:
#   bash tools/weight_only_ab/run.sh build KERNEL [BASE]  # here: KERNEL_base and KERNEL_new into tools/weight_only_ab/bin
#   bash tools/weight_only_ab/run.sh run KERNEL           # on the device, with carry=["tools/weight_only_ab/bin"]
# Any other binary in bin/ named KERNEL_* (a timing-only variant built by hand) runs after them.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=$HERE/bin
kernel=${2:-}
case $kernel in
weight_only) driver=$HERE/ab.cu ;;
marlin) driver=$HERE/marlin_ab.cu ;;
*) echo "usage: $0 build KERNEL [BASE] | run KERNEL   (KERNEL: weight_only or marlin)" >&2; exit 2 ;;
esac
case ${1:-} in
build)
  base=$BIN/base_$kernel
  mkdir -p "$base/kernels"
  git -C "$REPO" show "${3:-HEAD}:csrc/kernels/$kernel.cu" > "$base/kernels/$kernel.cu"
  for file in $kernel.h sm_count.h types.h device_utils.cuh; do  # the headers BASE built with
    git -C "$REPO" show "${3:-HEAD}:csrc/kernels/$file" > "$base/kernels/$file"
  done
  flags=(-std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr)
  base_sources=("$REPO/csrc/kernels/sm_count.cu") new_sources=("$REPO/csrc/kernels/sm_count.cu")
  if [ "$kernel" = marlin ]; then
    # marlin.cu hands many rows to the Hopper kernel, which shares its fragment helpers: both from BASE where
    # it has them (a BASE from before them has neither).
    for file in marlin_fragments.cuh marlin_hopper.cu; do
      git -C "$REPO" show "${3:-HEAD}:csrc/kernels/$file" > "$base/kernels/$file" 2>/dev/null || rm -f "$base/kernels/$file"
    done
    [ -f "$base/kernels/marlin_hopper.cu" ] && base_sources+=("$base/kernels/marlin_hopper.cu")
    new_sources+=("$REPO/csrc/kernels/marlin_hopper.cu")
  fi
  nvcc "${flags[@]}" -I"$base" "$driver" "${base_sources[@]}" -o "$BIN/${kernel}_base" &
  base_build=$!
  nvcc "${flags[@]}" -I"$REPO/csrc" "$driver" "${new_sources[@]}" -o "$BIN/${kernel}_new"
  wait "$base_build" ;;  # a bare `wait` would not report the background build's failure
run)
  cd "$BIN"
  ./"${kernel}_base" base > base.txt
  ./"${kernel}_new" new > new.txt
  paste base.txt new.txt
  python3 "$HERE/compare.py" base new
  for extra in "${kernel}"_*; do
    case $extra in "${kernel}_base"|"${kernel}_new") continue ;; esac
    [ -x "$extra" ] && ./"$extra" "${extra#"${kernel}"_}"
  done
  rm -f ./*.bin ;;
*)
  echo "usage: $0 build KERNEL [BASE] | run KERNEL" >&2
  exit 2 ;;
esac

#!/usr/bin/env bash
# Builds the scaled-GEMM configuration sweep (one translation unit per line of configs.txt, compiled in
# parallel; a configuration that does not compile is reported and left out) and runs it:
#   bash tools/scaled_mm_sweep/run.sh BUILD_DIR [fp8|int8:M,K,N ...]
# Without a run spec it only builds (a compile check on a machine without a GPU).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=$1
shift
mkdir -p "$build"
cutlass=$(python3 -c "import importlib.util, os; r = importlib.util.find_spec('cutlass_library').submodule_search_locations[0]; print(os.path.join(r, 'source', 'include'), os.path.join(r, 'source', 'tools', 'util', 'include'))")
flags="-std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Xptxas -warn-spills -I$repo/csrc -I$build"
for dir in $cutlass; do flags+=" -I$dir"; done

names=()
while IFS='|' read -r name operand config; do
  name=$(echo "$name" | xargs)
  [[ -z "$name" || "$name" == \#* ]] && continue
  operand=$(echo "$operand" | xargs)
  unit="namespace jaxq::sm90 {
cudaError_t Sweep_$name(const ScaledMmParams& p, cudaStream_t stream) {
  return RunScaledMmWith<MmOperand::$operand, FloatType::kBF16, $config>(p, stream);
}
}  // namespace jaxq::sm90"
  # Rewritten only when it changed, so that a rerun recompiles only new or changed configurations.
  if [ ! -f "$build/$name.cu" ] || [ "$(tail -n +2 "$build/$name.cu")" != "$unit" ]; then
    printf '#include "kernels/scaled_mm_sm90.cuh"\n%s\n' "$unit" > "$build/$name.cu"
    rm -f "$build/$name.o"
  fi
  echo "$operand" > "$build/$name.operand"
  names+=("$name")
done < "$here/configs.txt"

start=$SECONDS
compile() {  # name: compiles $build/name.cu unless its object is there; the log keeps ptxas's spill warnings
  [ -f "$build/$1.o" ] || nvcc $flags -c "$build/$1.cu" -o "$build/$1.o" > "$build/$1.log" 2>&1 || rm -f "$build/$1.o"
}
export -f compile
export build flags
printf '%s\n' "${names[@]}" | xargs -P "${JOBS:-$(nproc)}" -I{} bash -c 'compile {}'

registry="$build/sweep_registry.h"
{
  echo '#pragma once'
  echo '#include "kernels/scaled_mm.h"'
  echo 'struct SweepEntry { const char* name; jaxq::MmOperand operand; const char* spills; cudaError_t (*run)(const jaxq::ScaledMmParams&, cudaStream_t); };'
} > "$registry"
table=""
objects=()
for name in "${names[@]}"; do
  if [ ! -f "$build/$name.o" ]; then
    echo "$name: does not compile: $(grep -m1 -i error "$build/$name.log" | cut -c1-300)"
    continue
  fi
  spills=$(grep -c "spill" "$build/$name.log" || true)
  echo "namespace jaxq::sm90 { cudaError_t Sweep_$name(const ScaledMmParams&, cudaStream_t); }" >> "$registry"
  table+="  {\"$name\", jaxq::MmOperand::$(cat "$build/$name.operand"), \"$([ "$spills" = 0 ] && echo "" || echo " (spills)")\", jaxq::sm90::Sweep_$name},"$'\n'
  objects+=("$build/$name.o")
done
{
  echo "inline const SweepEntry kSweepEntries[] = {"
  printf '%s' "$table"
  echo "};"
  echo "constexpr int kSweepEntryCount = sizeof(kSweepEntries) / sizeof(kSweepEntries[0]);"
} >> "$registry"
nvcc $flags -c "$here/sweep.cu" -o "$build/sweep.o"
nvcc $flags -c "$repo/csrc/kernels/sm_count.cu" -o "$build/sm_count.o"
nvcc -gencode arch=compute_90a,code=sm_90a "${objects[@]}" "$build/sweep.o" "$build/sm_count.o" -o "$build/scaled_mm_sweep"
echo "built ${#objects[@]} configurations in $((SECONDS - start)) s"
[ $# -eq 0 ] || "$build/scaled_mm_sweep" "$@"

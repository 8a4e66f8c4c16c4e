#!/usr/bin/env bash
# The project's GPU checks, the same every time: build, GPU tests, compute-sanitizer, benchmark.
# Usage on the device machine, from the repo root:  bash tools/gpu_check.sh [STAGE...]
#   stages: build sanitizer_bin tests sanitizer bench nn layer ncu ncu_gemm ncu_hopper removal ab sweep (default: tests
#   sanitizer bench). The build runs first every time (BUILD=0 skips it; the stage build alone does only that);
#   sanitizer_bin (compute-sanitizer on binaries built here from this tree and carried: the Marlin harness
#   tools/weight_only_ab/bin/marlin_new, memcheck over every variant and racecheck over the Hopper kernel's;
#   tools/sanitize/bin/activation_kernels, memcheck) needs no package, so it runs beside the build and is
#   reported where it stands in the list (put it first; each run stops after SANITIZER_BIN_LIMIT seconds, 300
#   unless set, rc=124 in its log); ncu_hopper
#   profiles the wgmma kernel through the Marlin harness, removal times it without one part of its loop, and ab
#   times two builds of it (tools/weight_only_ab/run.sh build marlin BASE) and compares their outputs (AB_CASE).
#   TESTS_FILTER (pytest -k), SANITIZER_SETS (activation weight_only scaled_mm marlin; marlin_hopper alone),
#   SANITIZER_TOOLS and BENCH_ARGS narrow a run. JAXQ_COMMIT (the caller's `git rev-parse --short HEAD`) names
#   the tree in the bench's markdown: the device's copy has no .git. BUILD=0 reuses the package a previous
#   call installed on a still-warm machine (same tree).
# Logs go to $OUT (the device tool's output folder) or ./gpu-out.
set -uo pipefail
REPO=$PWD
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=${*:-tests sanitizer bench}
# The harness stages run binaries built on the CPU machine and carried: without another stage, no package.
package=0
for stage in $stages; do
  case $stage in sanitizer_bin|ab|removal|ncu_hopper) ;; *) package=1 ;; esac
done
status=0

echo "=== environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; nvcc --version | tail -1
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/env.log"

# The original Marlin kernel, a peer in the benchmark, compiles beside jaxq when its sources were carried in
# .peers/ist-marlin (tools/marlin_peer.md); the benchmark waits for it.
export JAXQ_MARLIN_PEER_SRC=$REPO/.peers/ist-marlin
if [ "$package" = 1 ] && [ -f "$JAXQ_MARLIN_PEER_SRC/marlin_cuda_kernel.cu" ] && python3 -c "import torch" 2>/dev/null; then
  python3 -m jaxq.bench_torch --build-marlin > "$OUT/marlin_peer_build.log" 2>&1 &
fi

# compute-sanitizer on programs outside XLA: memcheck under the XLA process crashed inside compute-sanitizer
# (rc 139 at start, the H100 on 2026-12-07).
marlin_bin=$REPO/tools/weight_only_ab/bin/marlin_new activation_bin=$REPO/tools/sanitize/bin/activation_kernels
sanitized_bins=()
if [[ " $stages " == *" sanitizer_bin "* ]]; then
  [ -x "$activation_bin" ] && sanitized_bins+=("activation memcheck -")
  [ -x "$marlin_bin" ] && sanitized_bins+=("marlin racecheck hopper" "marlin memcheck 1")
  [ ${#sanitized_bins[@]} -gt 0 ] || { echo "sanitizer_bin: build $marlin_bin or $activation_bin here first"; exit 1; }
  ( cd /tmp
    for run in "${sanitized_bins[@]}"; do
      set -- $run
      bin=$marlin_bin; [ $1 = activation ] && bin=$activation_bin
      log=$OUT/sanitizer_bin_$1_$2.log
      MARLIN_AB_SANITIZE=$3 timeout "${SANITIZER_BIN_LIMIT:-300}" compute-sanitizer --tool $2 --error-exitcode 1 \
        --print-limit 20 "$bin" > "$log" 2>&1
      echo "rc=$?" >> "$log"
    done ) &
  bin_sanitizer=$!
fi

if [ "$package" = 1 ] && [ "${BUILD:-1}" = 1 ]; then
  # CUTLASS's headers (nvidia-cutlass, a build requirement) are not on the device machine: carry its wheel in .whl.
  if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$REPO"/.whl/nvidia_cutlass-*.whl || { echo "nvidia-cutlass missing: carry its wheel in .whl"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  echo "=== build"
  start=$SECONDS
  python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "built in $((SECONDS - start)) s"
fi
[ "$package" = 0 ] || (cd /tmp && python3 -c "import jaxq; assert jaxq.cuda_available(), 'kernels not usable'; print('cuda_available: True')") || exit 1
# Peers and writers the machine lacks, carried as wheels in .whl: compressed-tensors (with loguru, pydantic and
# pydantic-core for the machine's Python, ...) for the equivalence tests, qwix (with opt_einsum, absl-py) for the
# decoder-layer benchmark. Without them those parts skip.
carried=$(ls "$REPO"/.whl/*.whl 2>/dev/null | grep -v nvidia_cutlass)
if [ -n "$carried" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $carried && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# Tests run from outside the checkout, so that the installed package (with its compiled module) is imported.
for stage in $stages; do
  case $stage in
  build) ;;
  tests)
    echo "=== pytest -m gpu"
    # TESTS_FILTER (a pytest -k expression) narrows the run while iterating on one kernel.
    (cd /tmp && python3 -m pytest -m gpu -q -p no:cacheprovider "$REPO/tests" ${TESTS_FILTER:+-k "$TESTS_FILTER"} 2>&1) \
      | tee "$OUT/gpu_tests.log" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
  sanitizer_bin)
    echo "=== compute-sanitizer on standalone binaries (Marlin harness, activation kernels)"
    wait "$bin_sanitizer"
    for run in "${sanitized_bins[@]}"; do
      set -- $run
      log=$OUT/sanitizer_bin_$1_$2.log
      echo "$1 $2: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|ran every|^rc=' "$log" | tr '\n' ' ')"
      grep -q "^rc=0" "$log" || status=1
    done ;;
  sanitizer)
    echo "=== compute-sanitizer on the kernels"
    # Each buffer its own cudaMalloc (no pool), so memcheck sees accesses past a buffer's end.
    san_tests="$REPO/tests/test_gpu.py::test_packed_kernel_batched $REPO/tests/test_gpu.py::test_nvfp4_kernel_batched_global_scales"
    san_tests+=" $REPO/tests/test_gpu.py::test_group_quant_kernel_group_sizes"
    for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
      for set in ${SANITIZER_SETS:-activation weight_only scaled_mm marlin}; do
        # The GEMM kernels run from a script without CPU references: memcheck once crashed inside
        # compute-sanitizer while XLA compiled a CPU reference under pytest.
        if [ $set = activation ]; then
          cmd=(python3 -m pytest -v -p no:cacheprovider $san_tests -k "bfloat16 or batched")
        else
          cmd=(python3 "$REPO/tools/gemm_kernels.py" $set)
          # racecheck over every weight-only variant outlasts a 10-minute device call: one dtype.
          [ $tool = racecheck ] && { [ $set = weight_only ] || [ $set = marlin ] || [ $set = marlin_hopper ]; } &&
            cmd+=(bfloat16)
        fi
        (cd /tmp && XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool $tool --target-processes all \
           --print-limit 20 "${cmd[@]}" 2>&1) > "$OUT/sanitizer_${tool}_$set.log"
        rc=$?
        echo "$tool $set: rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|ran every' "$OUT/sanitizer_${tool}_$set.log" | tr '\n' ' ')"
        [ $rc -eq 0 ] || status=1
      done
    done ;;
  sweep)
    echo "=== scaled-GEMM tile configurations outside JAX (tools/scaled_mm_sweep; SWEEP_ARGS: KIND:M,K,N ...)"
    bash "$REPO/tools/scaled_mm_sweep/run.sh" /tmp/scaled_mm_sweep ${SWEEP_ARGS:-fp8:128,8192,28672 \
      fp8:4096,8192,28672 int8:4096,4096,14336 int8:4096,8192,28672} 2>&1 | tee "$OUT/sweep.log" | tail -60
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
  bench)
    echo "=== benchmark"
    # BENCH_ARGS narrows the run, e.g. BENCH_ARGS="--ops awq_gemm,gptq_gemm".
    (cd /tmp && python3 -m jaxq.bench ${BENCH_ARGS:-} --markdown "$OUT/bench.md" 2>&1) | tee "$OUT/bench.log" | tail -40 ;;
  ncu)
    echo "=== ncu: kernel time and DRAM traffic per op at M=16384 K=7168 (clocks as found)"
    for op in per_token_group_fp8_quant per_token_group_fp8_quant_packed scaled_fp4_quant; do
      (cd /tmp && ncu --clock-control none -k regex:"GroupQuant|Nvfp4" -c 2 \
         --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active \
         python3 -m jaxq.bench --rows 16384 --ops $op 2>&1) > "$OUT/ncu_$op.log"
      echo "--- $op"; grep -E "^\s+(gpu__|dram__|sm__)" "$OUT/ncu_$op.log" | tail -8
    done ;;
  ncu_hopper)
    echo "=== ncu: the wgmma kernel (Marlin harness, uint4b8 G128 bf16, K8192 N28672) at M128 and M256 (clocks as found)"
    for m in 128 256; do
      (cd /tmp && MARLIN_AB_CASE="hopper u4b8 M$m" ncu --clock-control none -k regex:MarlinHopper -c 1 \
         --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
         --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis "$marlin_bin" ncu 2>&1) > "$OUT/ncu_hopper_$m.log"
      echo "--- M$m"; grep -E "Duration|Throughput|Issued Ipc|No Eligible|Stall|Achieved Occupancy|Registers Per|Pipe" \
        "$OUT/ncu_hopper_$m.log" | head -40
    done ;;
  ab)
    echo "=== Marlin A/B: tools/weight_only_ab/bin/marlin_base against marlin_new (built here by run.sh build marlin BASE)"
    # AB_CASE picks the cases whose name holds it (default: the wgmma kernel's); outputs compared by rel L2.
    # AB_EXTRA: tags of more builds in bin/ (marlin_TAG), timed and compared after them.
    (cd "$REPO/tools/weight_only_ab/bin" && export MARLIN_AB_CASE="${AB_CASE:-hopper}" &&
      ./marlin_base base > "$OUT/ab_base.txt" 2>&1 && ./marlin_new new > "$OUT/ab_new.txt" 2>&1 &&
      paste "$OUT/ab_base.txt" "$OUT/ab_new.txt" | cut -c1-200 && python3 ../compare.py base new | tee "$OUT/ab_compare.txt" &&
      for tag in ${AB_EXTRA:-}; do  # more builds of the kernel, bin/marlin_TAG, each against the base
        ./marlin_$tag $tag > "$OUT/ab_$tag.txt" 2>&1 && cat "$OUT/ab_$tag.txt" &&
          python3 ../compare.py base $tag | tee -a "$OUT/ab_compare.txt" || exit 1
      done)
    [ $? -eq 0 ] || status=1
    rm -f "$REPO"/tools/weight_only_ab/bin/*.bin ;;
  removal)
    echo "=== the wgmma kernel without one part of its loop (tools/weight_only_ab/removal_study.py; timing only)"
    for case in "hopper u4b8 M128" "hopper u4b8 M16" "hopper u4b8 M256"; do
      for bin in "$marlin_bin" "$REPO"/tools/weight_only_ab/bin/marlin_no_*; do
        (cd /tmp && MARLIN_AB_CASE="$case" "$bin" "$(basename "$bin" | sed 's/^marlin_//')" 2>&1 | grep -v "\] copy ") \
          | tee -a "$OUT/removal.log"
      done
    done
    rm -f /tmp/*.bin ;;
  ncu_gemm)
    echo "=== ncu: weight-only GEMM kernels at M=1 and M=16, K=8192 N=28672 (clocks as found)"
    for args in "gptq 4 1" "awq 4 1" "gptq 4 16"; do
      set -- $args
      (cd /tmp && ncu --clock-control none -k regex:"WeightOnlyGemm" -c 1 --section SpeedOfLight --section Occupancy \
         --section WarpStateStats --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis \
         python3 "$REPO/tools/one_gemm.py" $1 $2 $3 8192 28672 2>&1) > "$OUT/ncu_gemm_$1_$3.log"
      echo "--- $args"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issued Ipc|No Eligible|Stall|Block Limit|Waves|Grid Size|Dynamic Shared|One or More" "$OUT/ncu_gemm_$1_$3.log" | head -30
    done
    # SASS with per-instruction execution counts, for reading where the issue slots go.
    (cd /tmp && ncu --clock-control none -k regex:"WeightOnlyGemm" -c 1 --section SourceCounters --page source \
       --print-source sass --csv python3 "$REPO/tools/one_gemm.py" gptq 4 1 8192 28672 2>&1) > "$OUT/ncu_gemm_sass_gptq_1.csv"
    echo "sass listing: $(wc -l < "$OUT/ncu_gemm_sass_gptq_1.csv") lines" ;;
  nn)
    echo "=== jaxq.nn: GPU tests, transformers equivalence on the kernels, the demo"
    (cd /tmp && python3 -m pytest -m gpu -q -p no:cacheprovider "$REPO/tests/test_nn.py" "$REPO/tests/test_fuse.py" 2>&1) | tee "$OUT/nn_gpu_tests.log" | tail -5
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    # from_pretrained models on the GPU (their layers on the CUDA kernels) against transformers (the
    # compressed-tensors cases skip unless its wheels were carried, see above).
    (cd /tmp && python3 "$REPO/tools/transformers_check.py" 2>&1) | tee "$OUT/transformers_check.log" | grep "^|"
    (cd /tmp && python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_transformers.py" 2>&1) | tail -3
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    (cd /tmp && python3 -m jaxq.demo --qlora 2>&1) | tee "$OUT/demo.log" | grep -v Warning
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
  layer)
    echo "=== the Llama-3-8B decoder layer per scheme, separate and fused projections, qwix's beside them"
    # LAYER_VARIANTS (comma-separated, e.g. "gptq,gptq marlin fused") and LAYER_ROWS narrow the run.
    (cd /tmp && python3 -m jaxq.bench --ops decoder_layer ${LAYER_VARIANTS:+--layer-variants "$LAYER_VARIANTS"} \
       ${LAYER_ROWS:+--layer-rows "$LAYER_ROWS"} --markdown "$OUT/bench_layer.md" 2>&1) | tee "$OUT/bench_layer.log" | tail -40 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
# The device tool returns at most 8 files: the logs go into one archive (a later call in the same command appends
# to it), the benchmark's markdown tables stay beside it.
(cd "$OUT" && loose=$(ls | grep -vE '^(logs\.tar|bench.*\.md)$') && tar -rf logs.tar $loose && rm -f $loose)
exit $status

#!/bin/bash
# One device call for the fused backward: build, GPU tests, timings, compute-sanitizer (each part time-boxed,
# logs under $OUT; a part with a time box of 0 is skipped). Run from the repository root.
export PYTHONPATH=$PWD HF_FFF_CACHE=${HF_FFF_CACHE:-/tmp/hf} PYTHONUNBUFFERED=1
export HF_FFF_CUDA_BACKWARD=${HF_FFF_CUDA_BACKWARD:-fused}  # the default; set =reference to time the torch backward
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
SECONDS=0
python -c "from hf_fff.backends import cuda; k = cuda.load_kernels(); print('built', k is not None and k.backward is not None)" 2>&1 | tail -5
echo "build: ${SECONDS}s"
run_tests() {  # $1: time box, $2: -k expression, $3: log name
  [ "$1" = 0 ] && return
  timeout "$1" python -m pytest tests/test_cuda_backward.py -q -p no:cacheprovider --maxfail=10 -k "$2" >"$OUT/$3.log" 2>&1
  echo "pytest $3 rc=$? at ${SECONDS}s"; grep -E "passed|failed|Error|assert" "$OUT/$3.log" | tail -15
  grep -E "^[.sFE]+ *(\[|$)" "$OUT/$3.log" | tail -3
}
run_tests "${GRID_S:-120}" "matches_float64 and not chunk_model" grid
if [ "${BENCH_S:-90}" != 0 ]; then
  timeout "${BENCH_S:-90}" python benchmarks/bench_backward.py ${BENCH_ARGS:---tokens 1024 4096 16384 32768 --profile} 2>&1 | tee "$OUT/bench.log"
  echo "bench done at ${SECONDS}s"
fi
run_tests "${TEST_S:-120}" "not matches_float64 and not chunk_model" other
for tool in memcheck racecheck; do
  [ "${SAN_S:-60}" = 0 ] && break
  timeout "${SAN_S:-60}" compute-sanitizer --tool $tool --error-exitcode 9 python benchmarks/sanitize_backward.py >"$OUT/$tool.log" 2>&1
  echo "$tool rc=$? at ${SECONDS}s"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|done|Error" "$OUT/$tool.log" | tail -3
done

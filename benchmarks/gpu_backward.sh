#!/bin/bash
# One device call for the fused backward: build, GPU tests, timings, compute-sanitizer (each part time-boxed,
# logs under $OUT). Run from the repository root.
export PYTHONPATH=$PWD HF_FFF_CACHE=${HF_FFF_CACHE:-/tmp/hf} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
SECONDS=0
python -c "from hf_fff.backends import cuda; k = cuda.load_kernels(); print('built', k is not None and k.backward is not None)" 2>&1 | tail -5
echo "build: ${SECONDS}s"
timeout ${TEST_S:-150} python -m pytest tests/test_cuda_backward.py -q -p no:cacheprovider --maxfail=10 -k "not chunk_model" >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? at ${SECONDS}s"; grep -E "passed|failed|Error|error|assert" "$OUT/pytest.log" | tail -25
timeout ${BENCH_S:-110} python benchmarks/bench_backward.py --tokens 1024 4096 16384 32768 --profile 2>&1 | tee "$OUT/bench.log"
echo "bench done at ${SECONDS}s"
for tool in memcheck racecheck; do
  timeout ${SAN_S:-60} compute-sanitizer --tool $tool --error-exitcode 9 python benchmarks/sanitize_backward.py >"$OUT/$tool.log" 2>&1
  echo "$tool rc=$? at ${SECONDS}s"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|done|Error" "$OUT/$tool.log" | tail -3
done

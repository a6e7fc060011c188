#!/usr/bin/env bash
# One device run for the CUDA backend: environment, build, CUDA tests, compute-sanitizer, benchmarks.
#
#   bash benchmarks/gpu_run.sh [env] [build] [tests] [backward] [training] [sanitize] [bench] [bench-quick]
#                              [bench-backward] [hf-bench] [train-bench] [train-compile] [profile-train]
#                              [sanitize-backward] [ncu-backward]
#                              (default: env build tests backward training sanitize bench)
#
# Each test or benchmark step is time-boxed by STEP_S seconds (default 600), so that one device call can
# run several steps and still return its logs.
# Logs go to $OUT (the device tool's return folder) or ./gpu_logs. The table of targets prints last.
# NAIVE_DIR: a folder holding the authors' fff_cuda.cpp + fff_cuda_kernel.cu to time side by side.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_FFF_CACHE=${HF_FFF_CACHE:-/tmp/hf_fff_cache}
PY=${PYTHON:-python3}
steps=${*:-env build tests backward training sanitize bench}
box() { timeout "${STEP_S:-600}" "$@"; }
# compute-sanitizer memcheck and racecheck of benchmarks/<script>.py for each script named; non-zero if any reports
# an error (the callers pipe it through tee, so it returns its status instead of setting `status`)
sanitize_scripts() {
  local failed=0 tool script
  for tool in memcheck racecheck; do
    echo "== $tool"
    for script in "$@"; do
      box compute-sanitizer --tool $tool --error-exitcode 1 $PY -X faulthandler benchmarks/$script.py > "$OUT/${script}_$tool.log" 2>&1 || failed=1
      grep -v "^=========     " "$OUT/${script}_$tool.log" | head -40
    done
  done
  return $failed
}
status=0

for step in $steps; do
  case $step in
    env)
      { date -u; nvidia-smi; $PY -c "import torch, transformers, triton; p = torch.cuda.get_device_properties(0); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__); print(p.name, p.multi_processor_count, 'SMs', round(p.L2_cache_size / 2**20), 'MB L2')"; nvcc --version | tail -2; } 2>&1 | tee "$OUT/env.log" ;;
    build)
      $PY -c "
import time, torch
from hf_fff.backends import cuda
t = time.time(); m = cuda.load_module(); print('extension', 'built' if m else 'FAILED', f'in {time.time() - t:.0f} s')
raise SystemExit(m is None)" 2>&1 | tee "$OUT/build.log" || status=1 ;;
    tests)
      box $PY -m pytest tests/test_cuda_backend.py -q -rfEs --tb=short -p no:cacheprovider ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1 || status=1
      tail -15 "$OUT/tests.log" ;;
    backward)
      box $PY -m pytest tests/test_cuda_backward.py -q -rfEs --tb=short -p no:cacheprovider > "$OUT/backward.log" 2>&1 || status=1
      tail -15 "$OUT/backward.log" ;;
    training)
      box $PY -m pytest tests/test_training_stack.py -q -rfEs --tb=short -p no:cacheprovider -k "cuda" > "$OUT/training.log" 2>&1 || status=1
      tail -8 "$OUT/training.log" ;;
    hf-bench)
      box $PY -m hf_fff_cli bench --device cuda --dtype bfloat16 --tokens 1 4096 32768 --json "$OUT/hf_bench_bf16.json" 2>&1 | tee "$OUT/hf_bench_bf16.log" | tail -30 ;;
    train-bench)  # give it STEP_S of 300 or more: on an H100 its two sequence-classification tables alone took 170 s
      box $PY -m hf_fff_cli bench --device cuda --train --json "$OUT/train_bench.json" 2>&1 | tee "$OUT/train_bench.log" | tail -40 ;;
    train-compile)  # eager and torch.compile'd steps side by side; TRAIN_CASES="task:batch ..." (default seq-cls:32),
                    # COMPILE_MODE (default: default; reduce-overhead replays CUDA graphs)
      for case in ${TRAIN_CASES:-seq-cls:32}; do
        box $PY -c "
import sys
from hf_fff.tools.bench import run_train_bench
task, batch = sys.argv[1].split(':')
run_train_bench(device='cuda', batches={task: (int(batch),)}, backward_tokens=(), compile_mode=sys.argv[3], json_path=sys.argv[2])" \
          "$case" "$OUT/train_compile_${case/:/_}_${COMPILE_MODE:-default}.json" "${COMPILE_MODE:-default}" 2>&1 \
          | tee "$OUT/train_compile_${case/:/_}_${COMPILE_MODE:-default}.log" | grep -v "^$" | tail -12
      done ;;
    profile-train)  # with the free-FFF bound and (mlm) sparse prediction; PROFILE_ARGS=--compile profiles compiled steps
      for case in "seq-cls 32" "seq-cls 128" "mlm 128"; do
        set -- $case
        box $PY benchmarks/profile_train.py --task $1 --batch $2 --free-fff --sparse-prediction ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile_train_$1_$2.log" | tail -4 || status=1
      done ;;
    sanitize)  # the forward's strategies and the fused backward's paths
      sanitize_scripts sanitize_cuda sanitize_backward 2>&1 | tee "$OUT/sanitize.log"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    sanitize-backward)  # the fused backward's paths only
      sanitize_scripts sanitize_backward 2>&1 | tee "$OUT/sanitize.log"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    ncu-backward)  # Nsight Compute sections of one warm fused backward (token pass, weight pass, fixup) per dtype
      for dtype in ${NCU_DTYPES:-fp32 bf16}; do
        box ncu --clock-control none --kernel-name regex:"token_pass|weight_pass|fixup" --launch-skip 3 --launch-count 3 \
          --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
          --section MemoryWorkloadAnalysis $PY benchmarks/bench_backward.py --tokens ${NCU_TOKENS:-32768} --dtypes $dtype \
          > "$OUT/ncu_backward_$dtype.log" 2>&1 || status=1
        grep -E "^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issued Warp Per" "$OUT/ncu_backward_$dtype.log" | head -60
      done ;;
    bench)
      $PY benchmarks/bench_cuda.py ${NAIVE_DIR:+--naive "$NAIVE_DIR"} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || status=1 ;;
    bench-backward)  # BENCH_BACKWARD_ARGS replaces the arguments, e.g. "--tokens 4096 32768 --variants A=0 A=1" to A/B a knob
      box $PY benchmarks/bench_backward.py ${BENCH_BACKWARD_ARGS:---tokens 4096 16384 32768 --profile} 2>&1 \
        | tee "$OUT/bench_backward.log" || status=1 ;;
    bench-quick)
      $PY benchmarks/bench_cuda.py --quick --no-compile ${NAIVE_DIR:+--naive "$NAIVE_DIR"} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || status=1 ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status

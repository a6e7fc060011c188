#!/usr/bin/env bash
# Build the torch-free CPU kernel test (cuda/cpu_test/fff_cpu_kernel_test.cpp) for every instruction set and
# run it where possible: x86-64 (SSE2), x86-64-v3 (AVX2+FMA), x86-64-v4 (AVX-512) natively when the CPU has
# them, aarch64 (NEON) with the cross compiler under qemu-user. Prints one table row per target.
#   usage: benchmarks/cpu_isa.sh [seed]
set -u
repo="$(cd "$(dirname "$0")/.." && pwd)"
harness="$repo/cuda/cpu_test/fff_cpu_kernel_test.cpp"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
seed="${1:-20261207}"
flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
has() { for f in "$@"; do [[ " $flags " == *" $f "* ]] || return 1; done; }

printf '%-8s %-12s %-10s %-8s %s\n' target march build run result
row() {  # name compiler march runner... (runner empty: run natively)
  local name=$1 compiler=$2 march=$3; shift 3
  local bin="$work/test_$name" build=ok run=native result
  if ! command -v "$compiler" >/dev/null; then
    printf '%-8s %-12s %-10s %-8s %s\n' "$name" "$march" missing - "skipped: $compiler not installed"; return
  fi
  if ! "$compiler" -std=c++17 -O2 -Wall -Wextra -Werror -march="$march" -I"$repo/cuda" "$harness" -o "$bin" 2>"$work/$name.log"; then
    printf '%-8s %-12s %-10s %-8s %s\n' "$name" "$march" FAILED - "$(tail -3 "$work/$name.log" | tr '\n' ' ')"; return
  fi
  if [[ "${1:-}" == skip ]]; then
    printf '%-8s %-12s %-10s %-8s %s\n' "$name" "$march" ok - "built; not run: $2"; return
  fi
  [[ $# -gt 0 ]] && run="$1"
  local start end
  start=$(date +%s.%N)
  "$@" "$bin" "$seed" >"$work/$name.out" 2>&1
  local rc=$?
  end=$(date +%s.%N)
  result="$(head -1 "$work/$name.out" | sed 's/fff_cpu_kernel_test: //'); $(tail -1 "$work/$name.out") ($(printf '%.1f' "$(echo "$end - $start" | bc)") s)"
  [[ $rc -ne 0 ]] && result="FAILED (rc $rc): $result; $(grep FAIL "$work/$name.out" | head -3 | tr '\n' ' ')"
  printf '%-8s %-12s %-10s %-8s %s\n' "$name" "$march" ok "$run" "$result"
}

row sse2 g++ x86-64
if has avx2 fma f16c; then row avx2 g++ x86-64-v3; else row avx2 g++ x86-64-v3 skip "CPU lacks AVX2/FMA/F16C"; fi
if has avx512f avx512bw avx512vl avx512dq; then row avx512 g++ x86-64-v4; else row avx512 g++ x86-64-v4 skip "CPU lacks AVX-512"; fi
if command -v qemu-aarch64 >/dev/null; then
  row aarch64 aarch64-linux-gnu-g++ armv8-a qemu-aarch64 -L /usr/aarch64-linux-gnu
else
  row aarch64 aarch64-linux-gnu-g++ armv8-a skip "qemu-aarch64 not installed"
fi

// Host-side helpers that the strategy families' launchers share: errors, occupancy, grids, shared-memory limits,
// persistent and cooperative launches, and the compile-time dispatch on the row layout (with_vectors, with_full).
// No torch here: errors are std::runtime_error, which the binding's pybind11 layer raises as RuntimeError.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.cuh"

namespace hf_fff_cuda {
namespace {

[[noreturn]] inline void fail(const std::string& message) { throw std::runtime_error("hf_fff CUDA: " + message); }

inline void check_cuda(cudaError_t err) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // clears a non-sticky error, so that the next call does not report it again
  fail(cudaGetErrorString(err));
}

// After a <<<...>>> launch: a bad configuration is reported here, not at the next call.
inline void check_launch() { check_cuda(cudaGetLastError()); }

// What a strategy implements, as a specialisation StrategyImpl<its enumerator in strategies.h>:
//   static Plan plan(Params& p, const Problem& problem);     host: check the problem, set p's fields, ask for scratch
//   static void bind(Params& p, int* ints, float* floats);   point p's scratch fields into the allocation
//   template <typename T> static void launch(const Params& p, cudaStream_t stream);
// NoScratch supplies bind() for the strategies without scratch.
template <int kStrategy>
struct StrategyImpl;

struct NoScratch {
  static void bind(Params&, int*, float*) {}
};

// The fast paths hold rows as 16-byte vectors per lane: every strategy but general needs them.
inline void require_fast(const Params& p, const Problem& problem) {
  if (problem.fast) return;
  const int64_t per_vector = 16 / problem.element_size;
  fail(std::string("strategy ") + strategy_name(p.strategy) + " needs hidden % " + std::to_string(per_vector) +
       " == 0, 16-byte aligned rows and hidden <= " + std::to_string(8 * 32 * per_vector) + "; use strategy general");
}

// The plan of a strategy that needs the fast path and nothing else.
struct FastPathOnly : NoScratch {
  static Plan plan(Params& p, const Problem& problem) {
    require_fast(p, problem);
    return {};
  }
};

// Calls f(std::integral_constant<int, NV>{}) with NV = p.vectors, the fast path's 16-byte vectors per lane: the
// smallest of {1, 2, 3, 4, 6, 8} that covers a row (vectors_for in fff_cuda.cpp), which load_lane_row relies on.
template <typename F>
void with_vectors(const Params& p, F&& f) {
  switch (p.vectors) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: fail("unsupported vectors per lane (" + std::to_string(p.vectors) + ")");
  }
}

// Calls f(std::true_type{}) when a row is exactly NV vectors per lane (the kFull instantiation of the kernels that
// have one applies), else f(std::false_type{}).
template <typename T, int NV, typename F>
void with_full(const Params& p, F&& f) {
  if (p.hidden == NV * 32 * Elem<T>::kVec) f(std::true_type{});
  else f(std::false_type{});
}

template <typename Kernel>
int blocks_per_sm(Kernel kernel, size_t smem) {
  int blocks = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem));
  return blocks > 0 ? blocks : 1;
}

// One warp per token up to one full wave of resident blocks, then a grid-stride loop.
template <typename Kernel>
int64_t token_grid(Kernel kernel, const Params& p, size_t smem, int& cached_per_sm) {
  if (cached_per_sm == 0) cached_per_sm = blocks_per_sm(kernel, smem);
  const int64_t wanted = (p.tokens + kWarps - 1) / kWarps;
  const int64_t wave = static_cast<int64_t>(cached_per_sm) * p.num_sms;
  return wanted < wave ? wanted : wave;
}

// One warp per token (kThreads-thread blocks, no dynamic shared memory), `per_sm` caching the kernel's occupancy.
template <typename Kernel>
void launch_warp_per_token(Kernel kernel, int& per_sm, const Params& p, cudaStream_t stream) {
  kernel<<<token_grid(kernel, p, 0, per_sm), kThreads, 0, stream>>>(p);
  check_launch();
}

// Raise a kernel's dynamic shared memory limit once per device (needed above 48 KB).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, int (&done)[64]) {
  int device = 0;
  check_cuda(cudaGetDevice(&device));
  if (device < 0 || device >= 64 || done[device] >= static_cast<int>(bytes)) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  done[device] = static_cast<int>(bytes);
}

// Host cache of a persistent kernel's launch: shared-memory limit raised per device, blocks per SM for the last
// shared-memory size asked.
struct PersistentLaunch {
  int smem_done[64] = {};
  size_t smem = ~size_t{0};
  int per_sm = 0;
};

// Raise the kernel's shared-memory limit and return how many of its `threads`-thread blocks fit on an SM with `smem`
// bytes each (0: none), both remembered in `cache`.
template <typename Kernel>
int persistent_blocks_per_sm(Kernel kernel, int threads, size_t smem, PersistentLaunch& cache) {
  allow_smem(kernel, smem, cache.smem_done);
  if (cache.smem != smem) {
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&cache.per_sm, kernel, threads, smem));
    cache.smem = smem;
  }
  return cache.per_sm;
}

// At most one wave of `threads`-thread blocks, each warp taking `per_warp` tokens per round (the staged strategy: its
// rows take most of the shared memory, so one block per SM).
template <typename Kernel>
void launch_persistent(Kernel kernel, int threads, int per_warp, size_t smem, PersistentLaunch& cache, const Params& p,
                       cudaStream_t stream) {
  if (persistent_blocks_per_sm(kernel, threads, smem, cache) <= 0)
    fail(std::string("the ") + strategy_name(p.strategy) + " strategy's rows do not fit in shared memory");
  const int64_t per_block = static_cast<int64_t>(threads / 32) * per_warp;
  const int64_t wanted = (p.tokens + per_block - 1) / per_block;
  const int64_t wave = static_cast<int64_t>(cache.per_sm) * p.num_sms;
  kernel<<<wanted < wave ? wanted : wave, threads, smem, stream>>>(p);
  check_launch();
}

// A launch with one attribute (a cluster shape, a cooperative grid); its error, unchecked.
template <typename... Args>
cudaError_t launch_with_attribute(const cudaLaunchAttribute& attribute, void (*kernel)(Args...), int64_t blocks,
                                  int threads, size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attributes[1] = {attribute};
  config.attrs = attributes;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// A cooperative launch (every block resident at once, for grid-wide barriers); its error, unchecked.
template <typename... Args>
cudaError_t launch_cooperative(void (*kernel)(Args...), int64_t blocks, int threads, size_t smem, cudaStream_t stream,
                               Args... args) {
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeCooperative;
  attribute.val.cooperative = 1;
  return launch_with_attribute(attribute, kernel, blocks, threads, smem, stream, args...);
}

}  // namespace
}  // namespace hf_fff_cuda

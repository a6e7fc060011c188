// Helpers of the two torch bindings of the CUDA extension (fff_cuda.cpp, fff_cuda_backward.cpp).
#pragma once

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <string>

namespace hf_fff_cuda {

// Error messages are assembled from strings only: on the device image (torch 2.11), streaming an integer
// into a TORCH_CHECK message from an extension crashed inside libstdc++ (std::ostream::_M_insert<long>,
// seen 2026-11-23), so numbers, shapes and devices go through std::string first.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string dims(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

// A device attribute per device index, read once (the binding asks on every call). Template parameter so
// that each attribute keeps its own cache.
template <cudaDeviceAttr kAttribute>
int device_attribute(int device) {
  static std::atomic<int> cache[64] = {};
  if (device < 0 || device >= 64) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, kAttribute, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

inline int sm_count(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }

}  // namespace hf_fff_cuda

// Helpers of the two torch bindings of the CUDA extension (fff_cuda.cpp, fff_cuda_backward.cpp).
#pragma once

#include <torch/extension.h>

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

}  // namespace hf_fff_cuda

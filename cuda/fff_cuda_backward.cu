// The fused FFF backward of backward.cuh, instantiated for the three kernel dtypes.
#include "backward.cuh"

#include <algorithm>

namespace hf_fff_cuda {

void launch_backward_f32(const BackwardParams& p, cudaStream_t stream) { bwd::launch_backward<float>(p, stream); }
void launch_backward_f16(const BackwardParams& p, cudaStream_t stream) { bwd::launch_backward<__half>(p, stream); }
void launch_backward_bf16(const BackwardParams& p, cudaStream_t stream) { bwd::launch_backward<__nv_bfloat16>(p, stream); }

void launch_backward_keys(const int64_t* leaves, int* keys, int64_t tokens, int trees, int depth, cudaStream_t stream) {
  const int64_t total = tokens * trees;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 4096);
  bwd::keys_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(leaves, keys, tokens, trees, depth);
  HF_FFF_BWD_LAUNCH_CHECK("key kernel launch");
}

}  // namespace hf_fff_cuda

// The FFF kernels for __nv_bfloat16: one file per dtype so that the build compiles them in parallel.
#include "dispatch.cuh"

namespace hf_fff_cuda {
void launch_bf16(const Params& p, cudaStream_t stream) { launch<__nv_bfloat16>(p, stream); }
}  // namespace hf_fff_cuda

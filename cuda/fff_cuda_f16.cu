// The FFF kernels for __half: one file per dtype so that the build compiles them in parallel.
#include "dispatch.cuh"

namespace hf_fff_cuda {
void launch_f16(const Params& p, cudaStream_t stream) { launch<__half>(p, stream); }
}  // namespace hf_fff_cuda

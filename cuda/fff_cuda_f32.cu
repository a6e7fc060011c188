// The FFF kernels for float: one file per dtype so that the build compiles them in parallel.
#include "dispatch.cuh"

namespace hf_fff_cuda {
void launch_f32(const Params& p, cudaStream_t stream) { launch<float>(p, stream); }
}  // namespace hf_fff_cuda

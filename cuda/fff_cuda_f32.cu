// The FFF kernels of fff_cuda.cuh for one dtype; one file per dtype so that ninja compiles them in parallel.
#include "fff_cuda.cuh"

namespace hf_fff_cuda {
void launch_f32(const Params& p, cudaStream_t stream) { launch<float>(p, stream); }
}  // namespace hf_fff_cuda

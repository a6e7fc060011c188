// Interface between the CUDA FFF kernels (fff_cuda.cuh, instantiated per dtype in fff_cuda_*.cu, built by
// nvcc without torch headers so that the per-dtype files compile fast and in parallel) and the binding
// fff_cuda.cpp (host compiler: tensor checks, allocation, strategy choice).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

// Helpers that both the binding (host compiler) and the kernels (nvcc) compute.
#ifdef __CUDACC__
#define HF_FFF_HOST_DEVICE __host__ __device__
#else
#define HF_FFF_HOST_DEVICE
#endif

namespace hf_fff_cuda {

// How a call is computed. Every strategy computes the same function; they differ in speed only.
enum Strategy : int {
  kAuto = 0,     // pick one of the below from the problem size (choose_strategy)
  kSingle = 1,   // one warp per token walks every level of every tree, one launch
  kGeneral = 4,  // any hidden size, stride or alignment: scalar loads, nothing held in registers
  kSubtree = 6,  // few tokens: a block per token computes the logits of 5 levels of subtree at once, then
                 // routes through them in shared memory (3 dependent rounds of fetches at depth 11, not 12)
  kSorted = 7,   // fp32, one tree, many tokens: route the top `split` levels, group tokens by the node they reached
                 // (counting sort), finish each group with its subtree's rows held in shared memory
  kCluster = 8,  // few tokens, Hopper and later: a cluster of 8 blocks per token computes 6 levels of subtree
                 // per round over distributed shared memory (2 dependent rounds of fetches at depth 11)
  kStaged = 10,  // one tree: kSingle with the top levels' rows in shared memory (one block per SM), two tokens per
                 // warp and, at 16 bits, the routing dot products on tensor cores
};

struct Params {
  const void* x;  // (tokens, hidden), unit column stride, row stride ldx elements
  int64_t ldx;
  const void* w_in;   // (trees * N, hidden) contiguous, N = 2^(depth+1) - 1
  const void* b_in;   // (trees * N,)
  const void* w_out;  // (trees * N, hidden) contiguous
  void* y;            // (tokens, hidden) contiguous, written
  int64_t* leaves;    // (tokens, trees) contiguous, written
  int64_t tokens;
  int hidden;
  int depth;
  int trees;
  int strategy;  // resolved (never kAuto)
  int vectors;   // fast paths: 16-byte vectors of a row per lane (1, 2, 3, 4, 6 or 8)
  int num_sms;
  int64_t smem_limit;  // the device's opt-in shared memory per block
  int major;           // the device's compute capability major version
  // kSorted scratch: bucket (tokens), order (tokens), counts (2 * 2^split: counts then cursors, zeroed by the
  // launcher), g_top (tokens * split GELU values of the top levels)
  int split;
  int* bucket;
  int* order;
  int* counts;
  float* g_top;
  // kSorted: each token's rank within its bucket among its step-1 block's tokens (tokens), each step-1 block's first
  // rank per bucket (blocks * 2^split)
  int* rank;
  int* block_base;
  // kStaged: levels of w_in routed and of w_out accumulated from shared memory (each <= depth + 1)
  int staged_in;
  int staged_out;
  // kGeneral scratch: visited rows and their GELU values, (tokens, trees * (depth + 1)) each
  int* rec_row;
  float* rec_g;
};

// Dynamic shared memory of kSorted's finishing block: the bucket's rows (w_in of its subtree, w_out of its
// subtree and of the split ancestors), the subtree's biases and the bucket offsets.
HF_FFF_HOST_DEVICE inline int64_t sorted_smem_bytes(int depth, int split, int64_t hidden, int64_t element_size) {
  const int64_t sub = (int64_t{2} << (depth - split)) - 1;
  return (2 * sub + split) * hidden * element_size + 4 * sub + 4 * ((int64_t{1} << split) + 1);
}

// Dynamic shared memory of kStaged's block: the top in_levels rows of w_in and out_levels rows of w_out per tree.
inline int64_t staged_smem_bytes(int64_t trees, int in_levels, int out_levels, int64_t hidden, int64_t element_size) {
  return trees * (((int64_t{1} << in_levels) - 1) + ((int64_t{1} << out_levels) - 1)) * hidden * element_size;
}

constexpr int kMaxRankedBlocksPerSm = 1;  // kSorted's step-1 blocks per SM: block_base has num_sms rows

void launch_f32(const Params& p, cudaStream_t stream);
void launch_f16(const Params& p, cudaStream_t stream);
void launch_bf16(const Params& p, cudaStream_t stream);

}  // namespace hf_fff_cuda

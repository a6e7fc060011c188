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
  kAuto = 0,         // pick one of the below from the problem size (choose_strategy)
  kSingle = 1,       // one warp per token walks every level of every tree, one launch
  kSpeculative = 2,  // kSingle, also fetching both children of each node while the current dot product
                     // reduces: twice the weight reads, a shorter serial chain (few tokens: latency-bound)
  kBucketed = 3,     // one tree, many tokens: route the top `split` levels, group tokens by the node they
                     // reached (counting sort), finish each group together so that the rows of its subtree
                     // are read from L2 once per SM instead of once per token
  kGeneral = 4,      // any hidden size, stride or alignment: scalar loads, nothing held in registers
  kTensorCore = 5,   // kBucketed with every dot product on tensor cores (float16/bfloat16, one tree,
                     // depth 6..11): the top depth-5 levels and the 6 below are each computed densely for
                     // 16-token groups per warp (tc::logits_kernel, tc::output_kernel in fff_cuda.cuh)
  kSubtree = 6,      // few tokens: a block per token computes the logits of 5 levels of subtree at once, then
                     // routes through them in shared memory (3 dependent rounds of fetches at depth 11, not 12)
  kSorted = 7,       // kBucketed whose finishing blocks hold the bucket's rows (its subtree's w_in, w_out and
                     // the w_out rows above it) in shared memory: one tree, the rows must fit (split chosen so)
  kCluster = 8,      // few tokens, Hopper and later: a cluster of 8 blocks per token computes 6 levels of subtree
                     // per round over distributed shared memory (2 dependent rounds of fetches at depth 11)
  kSortedTensor = 9, // kSorted with the finishing products on tensor cores (float16/bfloat16, one tree, a
                     // subtree of at most 5 levels below the split, hidden % 16 == 0)
  kStaged = 10,      // kSingle with the top levels' rows of every tree in shared memory (one block per SM), two
                     // tokens per warp (one tree) and, at 16 bits, the routing dot products on tensor cores
  kSortedPipelined = 11,  // kSorted (its fp32 finishing step is pipelined wherever it can be since the twelfth
                          // session; the name stays for the callers that ask for it)
};

// The strategies that route the top levels, sort tokens by bucket and finish each bucket from shared memory.
inline bool is_sorted_strategy(int s) { return s == kSorted || s == kSortedPipelined; }

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
  // kBucketed / kSorted / kTensorCore scratch: bucket (tokens), order (tokens), counts (2 * 2^split: counts then cursors,
  // zeroed by the launcher), g_top (tokens * split GELU values of the top levels)
  int split;
  int* bucket;
  int* order;
  int* counts;
  float* g_top;
  // Scratch of the strategies whose step 1 ranks tokens (kSorted, kSortedTensor, kTensorCore): each token's
  // rank within its bucket among its step-1 block's tokens (tokens), each step-1 block's first rank per
  // bucket (blocks * 2^split); kTensorCore only: the subtree GELU values (tokens * 6)
  int* rank;
  int* block_base;
  float* g_sub;
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

// kSortedTensor: output slots (the subtree's nodes, then the split ancestors) rounded up to k steps of 16.
HF_FFF_HOST_DEVICE inline int sorted_tc_slots(int sub, int split) { return (sub + split + 15) / 16 * 16; }

// Dynamic shared memory of kSortedTensor's finishing block: rows (32 for logits, the output slots), padded by
// 8 elements; 16 warps' G (hi and lo) and logit tiles; the subtree's biases; the bucket offsets.
inline int64_t sorted_tc_smem_bytes(int depth, int split, int64_t hidden) {
  const int sub = (2 << (depth - split)) - 1;
  const int64_t slots = sorted_tc_slots(sub, split);
  const int64_t stride = hidden + 8;
  return (32 + slots) * stride * 2 + 16 * (2 * 16 * (slots + 8) * 2 + 16 * 33 * 4) + 4 * 32 + 4 * ((int64_t{1} << split) + 1);
}

// kTensorCore's shared memory per block. Logits kernel: the block of levels' 64 w_in rows (padded by 8
// elements, for ldmatrix), then per warp a ring of 4 x stages (16 tokens x 64 columns, padded) and a 16 x 65
// fp32 logit tile. Output kernel: the 80 w_out slot rows (padded by 8 elements, for ldmatrix), then per warp a 16 x 64 output
// stage and 16 x 16 floats of per-token coefficients. Both grow with hidden; the strategy takes widths
// whose rows fit.
constexpr int kTcLogitsWarps = 8;
constexpr int kMaxRankedBlocksPerSm = 1;  // ranking step-1 blocks per SM: block_base has num_sms rows
constexpr int kTcOutputWarps = 16;
HF_FFF_HOST_DEVICE constexpr int64_t tc_logits_smem_bytes(int64_t hidden) {
  return 64 * (hidden + 8) * 2 + kTcLogitsWarps * (4 * 16 * 72 * 2 + 16 * 65 * 4);
}
HF_FFF_HOST_DEVICE constexpr int64_t tc_output_smem_bytes(int64_t hidden) {
  return 80 * (hidden + 8) * 2 + kTcOutputWarps * (16 * 72 * 2 + 16 * 16 * 4);
}

void launch_f32(const Params& p, cudaStream_t stream);
void launch_f16(const Params& p, cudaStream_t stream);
void launch_bf16(const Params& p, cudaStream_t stream);

}  // namespace hf_fff_cuda

// Interface between the CUDA FFF kernels (fff_cuda.cuh, instantiated per dtype in fff_cuda_*.cu, built by
// nvcc without torch headers so that the per-dtype files compile fast and in parallel) and the binding
// fff_cuda.cpp (host compiler: tensor checks, allocation, strategy choice).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

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
                     // depth 6..11, hidden % 16 == 0): the top depth-5 levels and the 6 below are each
                     // computed densely for a tile of 32 tokens (see tc_kernel in fff_cuda.cuh)
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
  // kBucketed / kTensorCore scratch: bucket (tokens), order (tokens), counts (2 * 2^split: counts then cursors,
  // zeroed by the launcher), g_top (tokens * split GELU values of the top levels)
  int split;
  int* bucket;
  int* order;
  int* counts;
  float* g_top;
  // kGeneral scratch: visited rows and their GELU values, (tokens, trees * (depth + 1)) each
  int* rec_row;
  float* rec_g;
};

void launch_f32(const Params& p, cudaStream_t stream);
void launch_f16(const Params& p, cudaStream_t stream);
void launch_bf16(const Params& p, cudaStream_t stream);

}  // namespace hf_fff_cuda

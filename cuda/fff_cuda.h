// The interface between the binding (fff_cuda.cpp: host compiler, torch) and the CUDA sources (nvcc, no torch
// headers, so that the per-dtype files fff_cuda_{f32,f16,bf16}.cu compile fast and in parallel): the parameter
// struct every kernel takes, and the three calls the binding makes (plan, bind_scratch, launch_<dtype>).
//
// The sources: strategies.h (the table), primitives.cuh (element types and math the backward shares), common.cuh
// (the forward's device helpers), launch.cuh (host launch helpers), one header per strategy family (walk.cuh,
// few_tokens.cuh, staged.cuh, sorted.cuh), dispatch.cuh (the automatic choice and the table-driven dispatch),
// fff_cuda_plan.cu and fff_cuda_{f32,f16,bf16}.cu (what is compiled). docs/cuda_design.md says
// why each strategy exists. The fused backward (backward.h, backward.cuh, fff_cuda_backward.{cu,cpp}) is built into
// the same extension; binding.h holds what both torch bindings share.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "strategies.h"

namespace hf_fff_cuda {

// How a call is computed: kAuto (choose_strategy picks) or a row of strategies.h.
enum Strategy : int {
  kAuto = 0,
#define HF_FFF_STRATEGY_ENUMERATOR(enumerator, name, id, purpose) enumerator = id,
  HF_FFF_STRATEGIES(HF_FFF_STRATEGY_ENUMERATOR)
#undef HF_FFF_STRATEGY_ENUMERATOR
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
  // kSorted: the bucket level, and scratch: bucket (tokens), order (tokens), counts (2 * 2^split: counts then
  // cursors, zeroed by the launcher), g_top (tokens * split GELU values of the top levels)
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

// What the binding knows beyond Params: the element size, whether the 16-byte vector path applies (sizes, row
// stride and alignment allow it) and the strategy's setting from HF_FFF_CUDA_SPLIT (0: automatic).
struct Problem {
  int64_t element_size;
  bool fast;
  int64_t option;
};

// A strategy's plan: the scratch it needs (int32 and float32 elements) and its setting (kSorted: the bucket level,
// kStaged: the top levels held in shared memory; 0 for the others).
struct Plan {
  int64_t ints = 0;
  int64_t floats = 0;
  int setting = 0;
};

// Resolves p.strategy (kAuto: the automatic choice) and fills the strategy's own fields of p; throws
// std::runtime_error, naming the limit, where the strategy cannot take the problem.
Plan plan(Params& p, const Problem& problem);
// Points p's scratch fields into `ints` and `floats` (allocated by the caller as plan() asked).
void bind_scratch(Params& p, int* ints, float* floats);
// The name of a strategy id (strategies.h), or "unknown".
const char* strategy_name(int strategy);

// Enqueue the kernels of p.strategy on `stream`; throw std::runtime_error on a CUDA error.
void launch_f32(const Params& p, cudaStream_t stream);
void launch_f16(const Params& p, cudaStream_t stream);
void launch_bf16(const Params& p, cudaStream_t stream);

}  // namespace hf_fff_cuda

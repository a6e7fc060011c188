// The automatic choice and the table-driven dispatch: every strategy family's header, the choice, and launch<T>() as a
// switch over the rows of strategies.h (fff_cuda_plan.cu holds plan(), bind_scratch() and strategy_name(), switches
// over the same rows).
#pragma once

#include "few_tokens.cuh"
#include "sorted.cuh"
#include "staged.cuh"
#include "walk.cuh"

namespace hf_fff_cuda {
namespace {

// The automatic choice, from measurements on an H100 and an H200 at width 768, depth 11 (docs/cuda_design.md has the
// tables). Few tokens: cluster up to 16 tokens on Hopper (8 SMs per token: 16 tokens fill the GPU), subtree up to one
// block per SM (bf16: 14.3 against 16.9 us for single at 128 tokens; 36.7 against 16.4 at 512). One tree of depth >= 6
// and many tokens: staged from 8192 tokens at 16 bits (bf16: 36.7 against 43.8 us for single at 8192, 109.2 against
// 122.8 at 32768, where sorted took 122.6), from 4096 at fp32 (37.6 against 41.9 us) until sorted wins (16384: 108.1
// against 111.5; 32768: 170.7 against 208.1). Below those sizes single: the staged block's copy of ~190 KB of rows
// and sorted's fixed ~40 us (a routing step, then blocks staging up to 200 KB of rows each) cost more than they save.
constexpr int kManyTokensMinDepth = 6;
constexpr int64_t kStagedMinTokens16 = 8192;
constexpr int64_t kStagedMinTokens32 = 4096;
constexpr int64_t kSortedMinTokens32 = 16384;
constexpr int64_t kSubtreeMaxBlocksPerSm = 1;
constexpr int64_t kClusterMaxTokens = 16;

int choose_strategy(const Params& p, const Problem& problem) {
  if (!problem.fast) return kGeneral;
  if (p.trees == 1 && p.depth >= kManyTokensMinDepth) {
    if (problem.element_size == 2 && p.tokens >= kStagedMinTokens16) return kStaged;
    if (problem.element_size == 4 && p.tokens >= kSortedMinTokens32 &&
        sorted_split(p.depth, p.hidden, problem.element_size, p.smem_limit) > 0)
      return kSorted;
    if (problem.element_size == 4 && p.tokens >= kStagedMinTokens32) return kStaged;
  }
  if (p.major >= 9 && p.tokens <= kClusterMaxTokens) return kCluster;
  if (p.tokens <= kSubtreeMaxBlocksPerSm * static_cast<int64_t>(p.num_sms)) return kSubtree;
  return kSingle;
}

template <typename T>
void launch(const Params& p, cudaStream_t stream) {
  if (p.tokens == 0) return;
  switch (p.strategy) {
#define HF_FFF_LAUNCH_CASE(enumerator, name, id, purpose) \
  case enumerator:                                        \
    StrategyImpl<enumerator>::template launch<T>(p, stream); \
    return;
    HF_FFF_STRATEGIES(HF_FFF_LAUNCH_CASE)
#undef HF_FFF_LAUNCH_CASE
  }
  fail("unknown strategy " + std::to_string(p.strategy));
}

}  // namespace
}  // namespace hf_fff_cuda

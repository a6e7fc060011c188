// The staged strategy: many tokens of one tree, the one-warp walk with the top levels' rows held in shared memory
// (one block per SM), two tokens per warp and, at 16 bits, the routing dot products on tensor cores.
// Why (Nsight Compute, bf16, 32768 tokens, H100): the single walk issues ~2500 warp
// instructions per token at 0.65 per scheduler cycle with L2 at 66% of its peak: each warp waits on its token's
// chain of 12 dependent row fetches. Shared memory for levels 0..staged_in-1 of w_in and 0..staged_out-1 of w_out
// (6 and 6 at bf16 width 768: 189 KB) cuts the L2 reads by 14% and the chain's L2 round trips by two; the tensor-core
// dot cuts the instructions by a fifth and keeps x packed, which lets the two-token walk fit a 1024-thread block
// (64 chains per SM instead of 24): 125 -> 109 us.
#pragma once

#include "launch.cuh"

namespace hf_fff_cuda {
namespace {

// Copy n 16-byte vectors from global to shared memory with the whole block, 4 loads per thread in flight (a
// load-store loop waits one L2 round trip per vector: ~6 us for 189 KB).
__device__ __forceinline__ void stage_vectors(uint4* dst, const uint4* src, int n) {
  constexpr int kBatch = 4;
  for (int v0 = threadIdx.x; v0 < n; v0 += kBatch * blockDim.x) {
    uint4 r[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int v = v0 + b * blockDim.x;
      if (v < n) r[b] = __ldg(src + v);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int v = v0 + b * blockDim.x;
      if (v < n) dst[v] = r[b];
    }
  }
}

// D += A B for one m16n8k16: A (16 x 16) in a = A[g][2t, 2t+1], A[g+8][2t, 2t+1], A[g][2t+8, 2t+9],
// A[g+8][2t+8, 2t+9]; B (16 x 8) in b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; lane = 4 g + t.
// Not volatile: the compiler may schedule it like any arithmetic.
// One m16n8k16 with fp32 accumulation whose A and B hold `ab_type` ("bf16" or "f16") elements.
#define HF_FFF_MMA_M16N8K16(ab_type)                                                                          \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." ab_type "." ab_type ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \
      "{%0,%1,%2,%3};\n"                                                                                        \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                         \
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1))
template <typename T>
struct Mma16816;
template <>
struct Mma16816<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint4& a, unsigned b0, unsigned b1) {
    HF_FFF_MMA_M16N8K16("bf16");
  }
};
template <>
struct Mma16816<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint4& a, unsigned b0, unsigned b1) {
    HF_FFF_MMA_M16N8K16("f16");
  }
};
#undef HF_FFF_MMA_M16N8K16

// This lane's share of x . row: the warp's shares sum to the dot product (pair_sum). x and the row are
// each lane's raw 16-byte vectors (as loaded).
// 16-bit types, on tensor cores: per 16-byte vector two m16n8k16 whose A is the lane's row vector as loaded
// (words 0-3 = A[g][2t, 2t+1], A[g+8][2t, 2t+1], A[g][2t+8, 2t+9], A[g+8][2t+8, 2t+9] for lane (g, t) =
// (lane / 4, lane % 4)) and whose B column g is two of the same lane's x words: x words 0 and 2 into D1, 1 and 3
// into D2. Row g of D1 then multiplies row words 0 and 2 by x words 0 and 2, row g+8 of D2 row words 1 and 3 by x
// words 1 and 3, so D1[g][g] + D2[g+8][g] is x . row over lanes 4g..4g+3's elements (the other entries mix
// unrelated words and are not read); lane 4g + g/2 holds both, the other lanes contribute 0. Every operand is a
// register as loaded: no widening and no moves (the earlier form, x as A and the row as B with A's rows 8-15 zero,
// also took 2 products per vector but measured 1-4% slower in the pair kernel at 32768 tokens).
// Products of 16-bit values are exact in fp32 and the sums are fp32, so routing still decides on fp32 logits (in
// another summation order than the CUDA-core walks). fp32: the CUDA-core dot.
template <typename T, int NV>
__device__ __forceinline__ float row_dot_share(const uint4 (&xr)[NV], const Row<T, NV>& r, int lane) {
  if constexpr (std::is_same<T, float>::value) {
    float xf[NV][4];
#pragma unroll
    for (int c = 0; c < NV; ++c) Elem<float>::unpack(xr[c], xf[c]);
    return partial_dot<float, NV>(xf, r);
  } else {
    float d1[4] = {0.f, 0.f, 0.f, 0.f}, d2[4] = {0.f, 0.f, 0.f, 0.f};  // two accumulator chains
#pragma unroll
    for (int c = 0; c < NV; ++c) {
      Mma16816<T>::run(d1, r.v[c], xr[c].x, xr[c].z);
      Mma16816<T>::run(d2, r.v[c], xr[c].y, xr[c].w);
    }
    const int g = lane >> 2;
    const float d = (g & 1) ? d1[1] + d2[3] : d1[0] + d2[2];
    return (lane & 3) == (g >> 1) ? d : 0.f;
  }
}

// The one-warp walk (walk_levels) for two tokens at once, with the tensor-core dot at 16 bits: their row fetches are
// independent, so each level waits one round trip for
// both.
template <typename T, int NV, From kFrom = From::kGlobal>
__device__ __forceinline__ void route_pair(const uint4 (&xa)[NV], const uint4 (&xb)[NV], const T* __restrict__ w_in,
                                           const T* __restrict__ b_in, int nvec, int lane, int level_begin,
                                           int level_end, int depth, int& na, int& nb, int& node_a, float& logit_a,
                                           int& node_b, float& logit_b) {
  const uint4* w_lane = reinterpret_cast<const uint4*>(w_in) + lane;
  const auto logits = [&](int a, int b, float& la, float& lb) {
    Row<T, NV> ra, rb;
    load_lane_row<NV, kFrom>(ra.v, lane_row(w_lane, a, nvec), lane, nvec);
    load_lane_row<NV, kFrom>(rb.v, lane_row(w_lane, b, nvec), lane, nvec);
    const float bias_a = Elem<T>::load(b_in + a), bias_b = Elem<T>::load(b_in + b);
    la = row_dot_share<T, NV>(xa, ra, lane);
    lb = row_dot_share<T, NV>(xb, rb, lane);
    pair_sum(la, lb, lane);  // both tokens' sums in 6 shuffles
    la += bias_a;
    lb += bias_b;
  };
  walk_pair_levels(logits, lane, level_begin, level_end, depth, na, nb, node_a, logit_a, node_b, logit_b);
}

// One tree, two tokens per warp: the pair kernel's threads. At width <= 768 (16-bit) x stays packed for the tensor-
// core dot and the walk fits 64 registers, so a block of 1024 threads (64 tokens in flight per SM, against 24 for
// the single walk) runs; otherwise the single walk's register budget.
template <typename T, int NV>
struct PairThreads {
  static constexpr int value = !std::is_same<T, float>::value && NV <= 3 ? 1024 : kThreads * SingleMinBlocks<T, NV>::value;
};

// Tokens ma and mb (mb == ma for an odd last token): route both together, then accumulate and store each.
// Levels [0, in_end) of w_in and [0, out_end) of w_out come from the shared-memory copies s_in / s_out.
template <typename T, int NV>
__device__ __forceinline__ void walk_pair(const Params& p, int64_t ma, int64_t mb, const T* s_in, const T* s_out,
                                          int in_end, int out_end, int lane, int nvec) {
  constexpr int V = Elem<T>::kVec;
  HF_FFF_TENSORS(T, p);
  uint4 xa[NV], xb[NV];
  load_x_raw<T, NV>(xa, x + ma * p.ldx, lane, nvec);
  load_x_raw<T, NV>(xb, x + mb * p.ldx, lane, nvec);
  int na = 0, nb = 0, node_a = 0, node_b = 0;
  float logit_a = 0.f, logit_b = 0.f;
  route_pair<T, NV, From::kShared>(xa, xb, s_in, b_in, nvec, lane, 0, in_end, p.depth, na, nb, node_a, logit_a, node_b,
                                   logit_b);
  route_pair<T, NV>(xa, xb, w_in, b_in, nvec, lane, in_end, p.depth + 1, p.depth, na, nb, node_a, logit_a, node_b,
                    logit_b);
  const int64_t first_leaf = (int64_t{1} << p.depth) - 1;
  if (lane == 0) {
    p.leaves[ma] = na - first_leaf;
    p.leaves[mb] = nb - first_leaf;
  }
  // one token's output pass at a time: y of both would not fit beside the rows in flight
  auto output = [&](int64_t m, int my_node, float my_logit) {
    float yf[NV][V];
    zero(yf);
    const float g = gelu(my_logit);
    accumulate_out<T, NV, From::kShared>(yf, s_out, nvec, lane, 0, out_end, my_node, g);
    accumulate_out<T, NV>(yf, w_out, nvec, lane, out_end, p.depth + 1, my_node, g);
    store_y<T, NV>(y + m * p.hidden, yf, lane, nvec);
  };
  output(ma, node_a, logit_a);
  if (mb != ma) output(mb, node_b, logit_b);
}

// staged: two tokens per warp (route_pair), the top levels' rows in shared memory. (Issuing the copy
// asynchronously and walking each warp's first pair from global memory meanwhile was measured: bf16 32768 tokens
// 114 -> 123 us, as that first round reads levels 0-5 from L2 with L1 mostly given to shared memory.)
template <typename T, int NV, bool kFull>
__global__ void __launch_bounds__(PairThreads<T, NV>::value, 1) staged_pair_kernel(const Params p) {
  constexpr int kBlockWarps = PairThreads<T, NV>::value / 32;
  extern __shared__ uint4 staged_rows_smem[];
  const int lane = threadIdx.x & 31;
  const int nvec = row_vectors<T, NV, kFull>(p.hidden);
  const int in_rows = (1 << p.staged_in) - 1, out_rows = (1 << p.staged_out) - 1;
  uint4* s_in = staged_rows_smem;
  uint4* s_out = s_in + in_rows * nvec;
  stage_vectors(s_in, static_cast<const uint4*>(p.w_in), in_rows * nvec);
  stage_vectors(s_out, static_cast<const uint4*>(p.w_out), out_rows * nvec);
  __syncthreads();
  const T* t_in = reinterpret_cast<const T*>(s_in);
  const T* t_out = reinterpret_cast<const T*>(s_out);
  const int64_t pairs = (p.tokens + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlockWarps;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kBlockWarps + (threadIdx.x >> 5); q < pairs; q += stride) {
    const int64_t ma = 2 * q, mb = 2 * q + 1 < p.tokens ? 2 * q + 1 : 2 * q;  // an odd last token pairs with itself
    walk_pair<T, NV>(p, ma, mb, t_in, t_out, p.staged_in, p.staged_out, lane, nvec);
  }
}

// Dynamic shared memory of the staged block: the top in_levels rows of w_in and out_levels rows of w_out.
inline int64_t staged_smem_bytes(int in_levels, int out_levels, int64_t hidden, int64_t element_size) {
  return (((int64_t{1} << in_levels) - 1) + ((int64_t{1} << out_levels) - 1)) * hidden * element_size;
}

// The deepest number of top levels (of w_in and of w_out alike) whose rows fit in one block's shared memory, at most
// depth + 1 (0 when not even the roots fit: the walk then reads every row from global memory, as single does).
inline int staged_levels(int depth, int64_t hidden, int64_t element_size, int64_t smem_limit) {
  int levels = 0;
  while (levels < depth + 1 && levels < 24 && staged_smem_bytes(levels + 1, levels + 1, hidden, element_size) <= smem_limit)
    ++levels;
  return levels;
}

template <>
struct StrategyImpl<kStaged> : NoScratch {
  // problem.option: the top levels to hold (0: as many as fit).
  static Plan plan(Params& p, const Problem& problem) {
    require_fast(p, problem);
    if (p.trees != 1) fail("the staged strategy takes one tree, got " + std::to_string(p.trees));
    const int fit = staged_levels(p.depth, p.hidden, problem.element_size, p.smem_limit);
    if (problem.option < 0 || problem.option > fit)
      fail("the staged strategy holds at most " + std::to_string(fit) + " top levels per matrix here (depth + 1 and " +
           "the device's " + std::to_string(p.smem_limit) + " bytes of shared memory per block), asked for " +
           std::to_string(problem.option));
    p.staged_in = p.staged_out = problem.option > 0 ? static_cast<int>(problem.option) : fit;
    return {0, 0, p.staged_in};
  }
  template <typename T>
  static void launch(const Params& p, cudaStream_t stream) {
    const size_t smem = static_cast<size_t>(staged_smem_bytes(p.staged_in, p.staged_out, p.hidden, sizeof(T)));
    with_vectors(p, [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      with_full<T, NV>(p, [&](auto full) {
        static PersistentLaunch cache;
        launch_persistent(staged_pair_kernel<T, NV, decltype(full)::value>, PairThreads<T, NV>::value, 2, smem, cache,
                          p, stream);
      });
    });
  }
};

}  // namespace
}  // namespace hf_fff_cuda

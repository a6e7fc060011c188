// The one-warp walk (common.cuh's route and accumulate_out): single, one warp per token over every tree, the
// default between the few-token and the many-token strategies; general, the same walk with scalar loads for any
// width, row stride or alignment.
#pragma once

#include "launch.cuh"

namespace hf_fff_cuda {
namespace {

// single: one warp per token, all trees, one launch.
template <typename T, int NV>
__global__ void __launch_bounds__(kThreads, SingleMinBlocks<T, NV>::value) single_kernel(const Params p) {
  constexpr int V = Elem<T>::kVec;
  HF_FFF_TENSORS(T, p);
  const int lane = threadIdx.x & 31;
  const int nvec = p.hidden / V;
  const int64_t n_nodes = nodes_per_tree(p.depth);
  const int64_t first_leaf = (int64_t{1} << p.depth) - 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); m < p.tokens; m += stride) {
    float xf[NV][V];
    load_x<T, NV>(xf, x + m * p.ldx, lane, nvec);  // not pinned (pin_x): see SingleMinBlocks
    float yf[NV][V];
    zero(yf);
    for (int t = 0; t < p.trees; ++t) {
      const int64_t base = t * n_nodes;
      int my_node = 0;
      float my_logit = 0.f;
      const int n = route<T, NV>(xf, w_in + base * p.hidden, b_in + base, nvec, lane, 0, p.depth + 1, p.depth, 0,
                                 my_node, my_logit);
      accumulate_out<T, NV>(yf, w_out + base * p.hidden, nvec, lane, 0, p.depth + 1, my_node, gelu(my_logit));
      if (lane == 0) p.leaves[m * p.trees + t] = n - first_leaf;
    }
    store_y<T, NV>(y + m * p.hidden, yf, lane, nvec);
  }
}

// general: any hidden size, row stride and alignment. Lanes stride over the row with scalar loads; routing writes
// each visited row and its GELU to scratch, then the output pass reads them back (the same warp, ordered by
// __syncwarp), so nothing is limited by registers.
template <typename T>
__global__ void __launch_bounds__(kThreads) general_kernel(const Params p) {
  HF_FFF_TENSORS(T, p);
  const int lane = threadIdx.x & 31;
  const int hidden = p.hidden;
  const int64_t n_nodes = nodes_per_tree(p.depth);
  const int64_t first_leaf = (int64_t{1} << p.depth) - 1;
  const int records = p.trees * (p.depth + 1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); m < p.tokens; m += stride) {
    const T* xr = x + m * p.ldx;
    int* rec_row = p.rec_row + m * records;
    float* rec_g = p.rec_g + m * records;
    for (int t = 0; t < p.trees; ++t) {
      int64_t n = 0;
      for (int level = 0; level <= p.depth; ++level) {
        const int64_t row = t * n_nodes + n;
        const T* wr = w_in + row * hidden;
        float acc = 0.f;
        for (int h = lane; h < hidden; h += 32) acc = fmaf(Elem<T>::load(xr + h), Elem<T>::load(wr + h), acc);
        const float logit = warp_sum(acc) + Elem<T>::load(b_in + row);
        if (lane == 0) {
          rec_row[t * (p.depth + 1) + level] = static_cast<int>(row);
          rec_g[t * (p.depth + 1) + level] = gelu(logit);
        }
        if (level < p.depth) n = 2 * n + 1 + (logit > 0.f ? 1 : 0);
      }
      if (lane == 0) p.leaves[m * p.trees + t] = n - first_leaf;
    }
    __syncwarp();  // lane 0's records are visible to the whole warp
    T* yr = y + m * hidden;
    for (int h = lane; h < hidden; h += 32) {
      float acc = 0.f;
      for (int r = 0; r < records; ++r) acc = fmaf(rec_g[r], Elem<T>::load(w_out + rec_row[r] * static_cast<int64_t>(hidden) + h), acc);
      Elem<T>::store(yr + h, acc);
    }
  }
}

template <>
struct StrategyImpl<kSingle> : FastPathOnly {
  template <typename T>
  static void launch(const Params& p, cudaStream_t stream) {
    with_vectors(p, [&](auto nv) {
      static int per_sm = 0;  // occupancy of this instantiation (same on every device of one build)
      launch_warp_per_token(single_kernel<T, decltype(nv)::value>, per_sm, p, stream);
    });
  }
};

template <>
struct StrategyImpl<kGeneral> {
  // Scratch: the visited rows (int32) and their GELU values (float32), trees * (depth + 1) of each per token.
  static Plan plan(Params& p, const Problem&) {
    const int64_t records = p.tokens * p.trees * (p.depth + 1);
    return {records, records, 0};
  }
  static void bind(Params& p, int* ints, float* floats) {
    p.rec_row = ints;
    p.rec_g = floats;
  }
  template <typename T>
  static void launch(const Params& p, cudaStream_t stream) {
    static int per_sm = 0;
    launch_warp_per_token(general_kernel<T>, per_sm, p, stream);
  }
};

}  // namespace
}  // namespace hf_fff_cuda

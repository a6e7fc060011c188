// The few-token strategies. With few tokens a call is one chain of dependent row fetches (12 at depth 11) and the
// GPU is mostly idle, so these spend more reads to wait on fewer rounds: a whole subtree's logits per round, then the
// route through them. subtree: one block per token, 5 levels per round; cluster (Hopper): 8 blocks per token over
// distributed shared memory, 6 levels per round. Both sum as single does: the same bits.
#pragma once

#include <limits>

#include "launch.cuh"

namespace hf_fff_cuda {
namespace {

// ---------------------------------------------------------------------------------------------------
// subtree: few tokens, where a call is one chain of dependent row fetches and the GPU is mostly idle.
// One block of 16 warps per token goes down in rounds of up to 5 levels: the block computes the logits of
// all 31 nodes of the subtree below the current node at once (two rows per warp, every load in flight
// together), then one thread routes through them in shared memory. Depth 11 costs 3 dependent rounds of
// fetches instead of 12 (4x the w_in reads, which at this size nobody else wants). During routing, warp 0
// pulls the visited w_out rows into L1, and the output pass gives each thread one 16-byte vector of the
// row, over all levels. Logits and the output sum are computed exactly as single computes them (same
// lane layout, reduction and order), so both strategies give the same bits.
namespace subtree {
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kRound = 5;                        // levels per round
constexpr int kRoundNodes = (1 << kRound) - 1;   // 31: at most two per warp
constexpr int kMaxLevels = 32;                   // depth <= 30
}  // namespace subtree

// yv += g(level) * w_out row vector, levels [first, end) with their vectors in raw[0, end - first), in
// level order (the order single sums in). Shared by the subtree and cluster kernels.
template <typename T, int N>
__device__ __forceinline__ void accumulate_levels(float (&yv)[Elem<T>::kVec], const uint4 (&raw)[N], const float* path_g,
                                                  int first, int end) {
  constexpr int V = Elem<T>::kVec;
#pragma unroll
  for (int u = 0; u < N; ++u) {
    if (first + u < end) {
      const float g = path_g[first + u];
      float w[V];
      Elem<T>::unpack(raw[u], w);
#pragma unroll
      for (int e = 0; e < V; ++e) yv[e] = fmaf(g, w[e], yv[e]);
    }
  }
}

template <typename T, int NV>
__global__ void __launch_bounds__(subtree::kThreads, 1) subtree_kernel(const Params p) {
  constexpr int V = Elem<T>::kVec;
  constexpr bool kBothInFlight = NV <= 4;  // two rows of registers per lane fit under 128 registers
  __shared__ float logit_s[subtree::kRoundNodes];
  __shared__ int path_node[subtree::kMaxLevels];  // heap index within the tree, per level
  __shared__ float path_logit[subtree::kMaxLevels];
  __shared__ float path_g[subtree::kMaxLevels];
  __shared__ int next_s;
  HF_FFF_TENSORS(T, p);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nvec = p.hidden / V;
  const int depth = p.depth;
  const int64_t m = blockIdx.x;
  const int64_t n_nodes = nodes_per_tree(depth);
  const int64_t first_leaf = (int64_t{1} << depth) - 1;

  float xf[NV][V];
  load_x<T, NV, XUse::kReused>(xf, x + m * p.ldx, lane, nvec);
  float yv[V];
  zero(yv);

  for (int t = 0; t < p.trees; ++t) {
    const T* tw_in = w_in + t * n_nodes * p.hidden;
    const T* tb_in = b_in + t * n_nodes;
    const T* tw_out = w_out + t * n_nodes * p.hidden;
    int n = 0;  // node at the first level of the round (block-uniform)
    int done = 0;  // levels below this one are in yv already
    for (int level0 = 0; level0 <= depth; level0 += subtree::kRound) {
      const int r = min(subtree::kRound, depth + 1 - level0);
      const int count = (1 << r) - 1;
      // the previous round's w_out rows (levels done..level0-1) load together with this round's w_in rows
      uint4 out_raw[subtree::kRound];
      if (tid < nvec) {
#pragma unroll
        for (int u = 0; u < subtree::kRound; ++u)
          if (done + u < level0) out_raw[u] = __ldg(reinterpret_cast<const uint4*>(tw_out + static_cast<int64_t>(path_node[done + u]) * p.hidden) + tid);
      }
      if (kBothInFlight) {
        Row<T, NV> rows[2];
        float bias[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int j = warp + k * subtree::kWarps;
          if (j < count) {
            const int node = subtree_node(n, j);
            load_row<T, NV>(rows[k], row_at(tw_in, node, p.hidden), lane, nvec);
            bias[k] = Elem<T>::load(tb_in + node);
          }
        }
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int j = warp + k * subtree::kWarps;
          if (j < count) {
            const float logit = warp_sum(partial_dot<T, NV>(xf, rows[k])) + bias[k];
            if (lane == 0) logit_s[j] = logit;
          }
        }
      } else {
#pragma unroll 1
        for (int j = warp; j < count; j += subtree::kWarps) {
          const int node = subtree_node(n, j);
          Row<T, NV> row;
          load_row<T, NV>(row, row_at(tw_in, node, p.hidden), lane, nvec);
          const float logit = warp_sum(partial_dot<T, NV>(xf, row)) + Elem<T>::load(tb_in + node);
          if (lane == 0) logit_s[j] = logit;
        }
      }
      if (tid < nvec) accumulate_levels<T, subtree::kRound>(yv, out_raw, path_g, done, level0);
      done = level0;
      __syncthreads();
      if (warp == 0) {
        if (lane == 0) {
          int j = 0;
          for (int d = 0; d < r; ++d) {
            const float logit = logit_s[j];
            path_node[level0 + d] = subtree_node(n, j);
            path_logit[level0 + d] = logit;
            if (level0 + d < depth) j = 2 * j + 1 + (logit > 0.f ? 1 : 0);  // left on <= 0 and NaN
          }
          next_s = subtree_node(n, j);  // the node below the round's last level (unused after the leaf)
        }
        __syncwarp();
        if (lane < r) path_g[level0 + lane] = gelu(path_logit[level0 + lane]);
        for (int d = 0; d < r; ++d) prefetch_rows<T>(tw_out, path_node[level0 + d], 1, p.hidden, lane);
      }
      __syncthreads();
      n = next_s;
    }
    if (tid == 0) p.leaves[m * p.trees + t] = path_node[depth] - first_leaf;
    if (tid < nvec) {  // the last round's levels
      uint4 out_raw[subtree::kRound];
#pragma unroll
      for (int u = 0; u < subtree::kRound; ++u)
        if (done + u <= depth) out_raw[u] = __ldg(reinterpret_cast<const uint4*>(tw_out + static_cast<int64_t>(path_node[done + u]) * p.hidden) + tid);
      accumulate_levels<T, subtree::kRound>(yv, out_raw, path_g, done, depth + 1);
    }
    __syncthreads();  // the next tree reuses the path arrays
  }
  if (tid < nvec) __stcs(reinterpret_cast<uint4*>(y + m * p.hidden) + tid, Elem<T>::pack(yv));
}

// ---------------------------------------------------------------------------------------------------
// cluster (Hopper, few tokens): one token per cluster of 8 blocks on 8 SMs, 64 warps in all. A round
// covers 6 levels: the 63 nodes below the current one, one row per warp, computed at once; each warp sends
// its logit to all 8 blocks through distributed shared memory, one cluster barrier later every block walks
// the 6 levels itself (same logits, same path, no second exchange). Depth 11 is 2 rounds of fetches, each
// block reading 8 rows instead of a whole round's 63. While a round computes, each block also loads its
// slice of the previous round's w_out rows (the output: block r owns columns r/8 of the row). Logits and
// the output sum are those of single, bit for bit.
namespace cluster {
constexpr int kBlocks = 8;                       // cluster size (portable maximum)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRound = 6;                        // levels per round: 63 nodes <= kBlocks * kWarps
constexpr int kRoundNodes = (1 << kRound) - 1;
constexpr int kMaxLevels = 32;
}  // namespace cluster

template <typename T, int NV>
__global__ void __launch_bounds__(cluster::kThreads) cluster_kernel(const Params p) {
  constexpr int V = Elem<T>::kVec;
  __shared__ float logit_s[2][cluster::kRoundNodes + 1];  // by round parity: a block may run one round ahead
  __shared__ int path_node[cluster::kMaxLevels];
  __shared__ float path_g[cluster::kMaxLevels];
  HF_FFF_TENSORS(T, p);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const unsigned rank = cluster_rank();
  const int nvec = p.hidden / V;
  const int per_block = (nvec + cluster::kBlocks - 1) / cluster::kBlocks;  // output vectors of this block
  const int my_vec = static_cast<int>(rank) * per_block + tid;
  const bool outputs = tid < per_block && my_vec < nvec;
  const int depth = p.depth;
  const int64_t m = blockIdx.x / cluster::kBlocks;
  const int64_t n_nodes = nodes_per_tree(depth);
  const int64_t first_leaf = (int64_t{1} << depth) - 1;
  const int my_j = static_cast<int>(rank) * cluster::kWarps + warp;  // this warp's node in each round

  cluster_arrive_relaxed();  // every block of the cluster has started before the first remote store
  float xf[NV][V];
  // x and y straight from Params rather than the prologue's restrict-qualified x and y: with those, the compiler
  // allocates the NV = 1 instantiation's registers differently, and this kernel's machine code is the measured one.
  load_x<T, NV, XUse::kReused>(xf, static_cast<const T*>(p.x) + m * p.ldx, lane, nvec);
  float yv[V];
  zero(yv);
  bool first_exchange = true;
  int parity = 0;

  for (int t = 0; t < p.trees; ++t) {
    const T* tw_in = w_in + t * n_nodes * p.hidden;
    const T* tb_in = b_in + t * n_nodes;
    const T* tw_out = w_out + t * n_nodes * p.hidden;
    int n = 0, done = 0;
    for (int level0 = 0; level0 <= depth; level0 += cluster::kRound) {
      const int r = min(cluster::kRound, depth + 1 - level0);
      const int count = (1 << r) - 1;
      uint4 out_raw[cluster::kRound];  // this block's slice of the previous round's w_out rows
      if (outputs) {
#pragma unroll
        for (int u = 0; u < cluster::kRound; ++u)
          if (done + u < level0)
            out_raw[u] = __ldg(reinterpret_cast<const uint4*>(tw_out + static_cast<int64_t>(path_node[done + u]) * p.hidden) + my_vec);
      }
      float logit = 0.f;
      if (level0 + r > depth && my_j < count && lane * 128 < per_block * 16) {
        // last round: pull this block's slice of every candidate's w_out row into L1 for the output pass
        const int node = subtree_node(n, my_j);
        prefetch_l1(reinterpret_cast<const char*>(tw_out + static_cast<int64_t>(node) * p.hidden) +
                    static_cast<int64_t>(rank) * per_block * 16 + lane * 128);
      }
      if (my_j < count) {
        const int node = subtree_node(n, my_j);
        Row<T, NV> row;
        load_row<T, NV>(row, row_at(tw_in, node, p.hidden), lane, nvec);
        logit = warp_sum(partial_dot<T, NV>(xf, row)) + Elem<T>::load(tb_in + node);
      }
      if (outputs) accumulate_levels<T, cluster::kRound>(yv, out_raw, path_g, done, level0);
      done = level0;
      if (first_exchange) {
        cluster_wait();
        first_exchange = false;
      }
      if (my_j < count && lane < cluster::kBlocks) store_remote(&logit_s[parity][my_j], lane, logit);
      cluster_arrive();
      cluster_wait();
      if (tid == 0) {  // every block walks the same logits to the same path
        int j = 0;
        for (int d = 0; d < r; ++d) {
          const float l = logit_s[parity][j];
          path_node[level0 + d] = subtree_node(n, j);
          path_g[level0 + d] = l;  // the logit for now: GELU below, off the serial walk
          if (level0 + d < depth) j = 2 * j + 1 + (l > 0.f ? 1 : 0);  // left on <= 0 and NaN
        }
        logit_s[parity][cluster::kRoundNodes] = __int_as_float(subtree_node(n, j));  // next round's root
      }
      __syncthreads();
      if (tid < r) path_g[level0 + tid] = gelu(path_g[level0 + tid]);
      __syncwarp();  // warp 0 writes these GELU values and its first lanes (the output threads) read them
      n = __float_as_int(logit_s[parity][cluster::kRoundNodes]);
      parity ^= 1;
    }
    if (rank == 0 && tid == 0) p.leaves[m * p.trees + t] = path_node[depth] - first_leaf;
    if (outputs) {  // the last round's levels
      uint4 out_raw[cluster::kRound];
#pragma unroll
      for (int u = 0; u < cluster::kRound; ++u)
        if (done + u <= depth)
          out_raw[u] = __ldg(reinterpret_cast<const uint4*>(tw_out + static_cast<int64_t>(path_node[done + u]) * p.hidden) + my_vec);
      accumulate_levels<T, cluster::kRound>(yv, out_raw, path_g, done, depth + 1);
    }
    __syncthreads();  // path arrays are rewritten by the next tree
  }
  if (outputs) __stcs(reinterpret_cast<uint4*>(static_cast<T*>(p.y) + m * p.hidden) + my_vec, Elem<T>::pack(yv));
}

template <>
struct StrategyImpl<kSubtree> : FastPathOnly {
  template <typename T>
  static void launch(const Params& p, cudaStream_t stream) {
    with_vectors(p, [&](auto nv) {
      subtree_kernel<T, decltype(nv)::value><<<p.tokens, subtree::kThreads, 0, stream>>>(p);  // one block per token
      check_launch();
    });
  }
};

template <>
struct StrategyImpl<kCluster> : NoScratch {
  static Plan plan(Params& p, const Problem& problem) {
    require_fast(p, problem);
    if (p.major < 9)
      fail("the cluster strategy needs thread-block clusters (compute capability 9.0 or later), this device has " +
           std::to_string(p.major) + ".x");
    if (p.tokens > std::numeric_limits<int>::max() / cluster::kBlocks) fail("the cluster strategy takes at most 2^28 tokens");
    return {};
  }
  template <typename T>
  static void launch(const Params& p, cudaStream_t stream) {
    with_vectors(p, [&](auto nv) {
      cudaLaunchAttribute attribute = {};
      attribute.id = cudaLaunchAttributeClusterDimension;
      attribute.val.clusterDim.x = cluster::kBlocks;
      attribute.val.clusterDim.y = 1;
      attribute.val.clusterDim.z = 1;
      check_cuda(launch_with_attribute(attribute, cluster_kernel<T, decltype(nv)::value>, p.tokens * cluster::kBlocks,
                                       cluster::kThreads, 0, stream, p));
    });
  }
};

}  // namespace
}  // namespace hf_fff_cuda

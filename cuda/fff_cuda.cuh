// CUDA kernels of the FFF conditional matmul (UltraFastBERT, arXiv 2311.10770), inference forward.
//
// Per token and tree: walk depth+1 levels from the root; at each node logit = x . w_in[node] + b (fp32
// accumulation), go left on logit <= 0; y += GELU(logit) * w_out[node]. Returns y and the leaf reached.
//
// Design (numbers for H100, hidden 768, depth 11, bf16; see benchmarks/results_cuda.md):
// * One warp per token. The token's x sits in registers as fp32 (24 floats per lane at width 768); each
//   visited row is read with 16-byte loads, one per lane per 512 bytes, so a warp reads a row in 3
//   instructions. The dot product ends in a butterfly shuffle reduction, which leaves the bitwise same
//   sum in every lane, so the routing branch is warp-uniform.
// * The walk is split into a routing pass (w_in rows only: the serial chain) and an output pass (w_out
//   rows of all levels, independent loads several levels at a time). Lane l keeps level l's node and
//   logit, so the per-level state lives in registers without local memory (depth <= 31).
// * GELU (erfc form) is off the serial chain: each lane evaluates its own level's GELU once, after routing.
// * Weights (12.6 MB at bf16) are read through L1/L2 with ld.global.nc; x and y stream past L1 with
//   evict-first hints so that they do not push the weights out.
// * kBucketed (many tokens, one tree): the deep levels of a random walk read 3 KB of rows per token and
//   level from L2 (0.6 GB at 32768 tokens), more than L2 can serve quickly. Routing only the top
//   `split` levels first, then sorting tokens by the node they reached (a counting sort: histogram,
//   scan, scatter) makes the tokens an SM finishes share one subtree, whose rows stay in its L1.
//   Measured, the bf16 walk turned out latency-bound rather than L2-bound, so sorting pays only where
//   rows are wider or registers scarcer (fp32 from 16384 tokens, fp16 from 4096; see fff_cuda.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include <c10/cuda/CUDAException.h>

#include "fff_cuda.h"

namespace hf_fff_cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Blocks per SM asked of the register allocator: one warp per token is latency-bound (a serial chain of
// dependent row fetches), so occupancy matters more than unrolling; wide rows need their registers.
template <int NV>
struct MinBlocks {
  static constexpr int value = NV <= 2 ? 4 : (NV <= 4 ? 3 : 2);
};

// ---------------------------------------------------------------------------------------------------
// Element types: 16-byte vector <-> fp32 values, scalar loads and stores.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[kVec]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[kVec]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
  static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  // bf16 is the top half of an fp32: widening is a shift or a mask, exact.
  static __device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[kVec]) {
    unpack2(v.x, f[0], f[1]);
    unpack2(v.y, f[2], f[3]);
    unpack2(v.z, f[4], f[5]);
    unpack2(v.w, f[6], f[7]);
  }
  static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // round to nearest even, as torch's .to(bfloat16)
    return *reinterpret_cast<unsigned*>(&h);
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[kVec]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return __uint_as_float(static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    lo = f.x;
    hi = f.y;
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[kVec]) {
    unpack2(v.x, f[0], f[1]);
    unpack2(v.y, f[2], f[3]);
    unpack2(v.z, f[4], f[5]);
    unpack2(v.w, f[6], f[7]);
  }
  static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[kVec]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
  static __device__ __forceinline__ float load(const __half* p) {
    return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
  }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

// Exact (erf) GELU, torch.nn.GELU's default, written with erfc: 1 + erf(z) = erfc(-z) without the
// cancellation that 1 + erff(z) suffers for z << 0 (relative error of a few ulp over the whole range).
__device__ __forceinline__ float gelu(float v) { return 0.5f * v * erfcf(-v * 0.70710678118654752f); }

// Butterfly reduction: every lane ends with the same bits (fp addition commutes), so a branch on the
// result is uniform across the warp.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__host__ __device__ __forceinline__ int64_t nodes_per_tree(int depth) { return (int64_t{2} << depth) - 1; }

// ---------------------------------------------------------------------------------------------------
// Fast path: a row is NV 16-byte vectors per lane; vector c of lane l covers elements
// [(32 c + l) * kVec, (32 c + l + 1) * kVec). Vectors past the row end (nvec = hidden / kVec) read as 0.
template <typename T, int NV>
struct Row {
  uint4 v[NV];
};

template <typename T, int NV>
__device__ __forceinline__ void load_row(Row<T, NV>& r, const T* row, int lane, int nvec) {
  const uint4* p = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    const int v = c * 32 + lane;
    r.v[c] = v < nvec ? __ldg(p + v) : make_uint4(0u, 0u, 0u, 0u);
  }
}

template <typename T, int NV>
__device__ __forceinline__ void load_x(float (&xf)[NV][Elem<T>::kVec], const T* row, int lane, int nvec) {
  const uint4* p = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    const int v = c * 32 + lane;
    const uint4 raw = v < nvec ? __ldcs(p + v) : make_uint4(0u, 0u, 0u, 0u);  // read once: evict first
    Elem<T>::unpack(raw, xf[c]);
  }
}

template <typename T, int NV>
__device__ __forceinline__ void store_y(T* row, const float (&yf)[NV][Elem<T>::kVec], int lane, int nvec) {
  uint4* p = reinterpret_cast<uint4*>(row);
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    const int v = c * 32 + lane;
    if (v < nvec) __stcs(p + v, Elem<T>::pack(yf[c]));  // written once: streaming store
  }
}

// This lane's part of x . row (one partial sum per vector: NV independent FMA chains).
template <typename T, int NV>
__device__ __forceinline__ float partial_dot(const float (&xf)[NV][Elem<T>::kVec], const Row<T, NV>& r) {
  constexpr int V = Elem<T>::kVec;
  float acc[NV];
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    float w[V];
    Elem<T>::unpack(r.v[c], w);
    acc[c] = 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e) acc[c] = fmaf(xf[c][e], w[e], acc[c]);
  }
  float s = acc[0];
#pragma unroll
  for (int c = 1; c < NV; ++c) s += acc[c];
  return s;
}

// Walk levels [level_begin, level_end) of one tree from node n (heap index within the tree); lane `level`
// records that level's node and logit. Returns the node after the last level (a child while
// level < depth, else the node itself).
template <typename T, int NV>
__device__ __forceinline__ int route(const float (&xf)[NV][Elem<T>::kVec], const T* __restrict__ w_in,
                                     const T* __restrict__ b_in, int hidden, int nvec, int lane, int level_begin,
                                     int level_end, int depth, int n, int& my_node, float& my_logit) {
  for (int level = level_begin; level < level_end; ++level) {
    Row<T, NV> r;
    load_row<T, NV>(r, w_in + static_cast<int64_t>(n) * hidden, lane, nvec);
    const float bias = Elem<T>::load(b_in + n);
    const float logit = warp_sum(partial_dot<T, NV>(xf, r)) + bias;
    if (lane == level) {
      my_node = n;
      my_logit = logit;
    }
    if (level < depth) n = 2 * n + 1 + (logit > 0.f ? 1 : 0);  // left on <= 0 (and on NaN, as torch)
  }
  return n;
}

__device__ __forceinline__ void prefetch_l1(const void* ptr) { asm volatile("prefetch.global.L1 [%0];\n" ::"l"(ptr)); }

// Bring `n_rows` consecutive rows into this SM's L1 (128-byte lines spread over the lanes).
template <typename T>
__device__ __forceinline__ void prefetch_rows(const T* base, int64_t first_row, int n_rows, int hidden, int lane) {
  const char* start = reinterpret_cast<const char*>(base + first_row * hidden);
  const int64_t bytes = static_cast<int64_t>(n_rows) * hidden * sizeof(T);
  for (int64_t off = static_cast<int64_t>(lane) * 128; off < bytes; off += 32 * 128) prefetch_l1(start + off);
}

// route() that fetches both children's rows before reducing the current dot product: the next level's
// operands are in flight during the reduction. That alone still waits one L2 round trip per level (the
// children are requested one level before use), so the walk also pulls the 8 rows three levels further
// down into L1 (one of them will be the node there) and each visited node's w_out row (for the output
// pass): a level then costs an L1 hit plus the reduction. (Prefetching to L2 instead was measured: 2 us
// slower with the weights in L2, 0.6 us faster without.)
template <typename T, int NV>
__device__ __forceinline__ int route_speculative(const float (&xf)[NV][Elem<T>::kVec], const T* __restrict__ w_in,
                                                 const T* __restrict__ b_in, const T* __restrict__ w_out, int hidden,
                                                 int nvec, int lane, int depth, int& my_node, float& my_logit) {
  int n = 0;
  Row<T, NV> cur;
  load_row<T, NV>(cur, w_in, lane, nvec);
  float bias = Elem<T>::load(b_in);
  if (depth >= 2) prefetch_rows<T>(w_in, 3, 4, hidden, lane);  // level 2; level 1 is loaded below
  for (int level = 0; level <= depth; ++level) {
    if (level + 3 <= depth) prefetch_rows<T>(w_in, (static_cast<int64_t>(n) + 1) * 8 - 1, 8, hidden, lane);
    prefetch_rows<T>(w_out, n, 1, hidden, lane);
    Row<T, NV> left, right;
    float bias_left = 0.f, bias_right = 0.f;
    const bool descend = level < depth;
    if (descend) {
      const int64_t child = 2 * static_cast<int64_t>(n) + 1;
      load_row<T, NV>(left, w_in + child * hidden, lane, nvec);
      load_row<T, NV>(right, w_in + (child + 1) * hidden, lane, nvec);
      bias_left = Elem<T>::load(b_in + child);
      bias_right = Elem<T>::load(b_in + child + 1);
    }
    const float logit = warp_sum(partial_dot<T, NV>(xf, cur)) + bias;
    if (lane == level) {
      my_node = n;
      my_logit = logit;
    }
    if (descend) {
      const bool go_right = logit > 0.f;
      n = 2 * n + 1 + (go_right ? 1 : 0);
#pragma unroll
      for (int c = 0; c < NV; ++c) cur.v[c] = go_right ? right.v[c] : left.v[c];
      bias = go_right ? bias_right : bias_left;
    }
  }
  return n;
}

// y += sum over levels 0..depth of g(level) * w_out[node(level)], where lane `level` holds node and g.
// U levels per step: their U * NV loads are independent and in flight together.
template <typename T, int NV>
__device__ __forceinline__ void accumulate_out(float (&yf)[NV][Elem<T>::kVec], const T* __restrict__ w_out,
                                               int hidden, int nvec, int lane, int depth, int my_node, float my_g) {
  constexpr int V = Elem<T>::kVec;
  constexpr int U = NV <= 2 ? 4 : (NV <= 4 ? 2 : 1);  // levels whose loads are in flight together
  for (int level0 = 0; level0 <= depth; level0 += U) {
    Row<T, NV> r[U];
    float g[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int level = level0 + u;
      const int node = __shfl_sync(kFullMask, my_node, level & 31);
      g[u] = __shfl_sync(kFullMask, my_g, level & 31);
      if (level <= depth) {
        load_row<T, NV>(r[u], w_out + static_cast<int64_t>(node) * hidden, lane, nvec);
      } else {
        g[u] = 0.f;
#pragma unroll
        for (int c = 0; c < NV; ++c) r[u].v[c] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int c = 0; c < NV; ++c) {
        float w[V];
        Elem<T>::unpack(r[u].v[c], w);
#pragma unroll
        for (int e = 0; e < V; ++e) yf[c][e] = fmaf(g[u], w[e], yf[c][e]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// kSingle / kSpeculative: one warp per token, all trees, one launch.
// The speculative variant serves few tokens (latency-bound, few warps), so it may use every register.
template <typename T, int NV, bool SPECULATIVE>
__global__ void __launch_bounds__(kThreads, SPECULATIVE ? 1 : MinBlocks<NV>::value) single_kernel(const Params p) {
  constexpr int V = Elem<T>::kVec;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const T* __restrict__ w_out = static_cast<const T*>(p.w_out);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int lane = threadIdx.x & 31;
  const int nvec = p.hidden / V;
  const int64_t n_nodes = nodes_per_tree(p.depth);
  const int64_t first_leaf = (int64_t{1} << p.depth) - 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); m < p.tokens; m += stride) {
    float xf[NV][V];
    load_x<T, NV>(xf, x + m * p.ldx, lane, nvec);
    float yf[NV][V];
#pragma unroll
    for (int c = 0; c < NV; ++c)
#pragma unroll
      for (int e = 0; e < V; ++e) yf[c][e] = 0.f;
    for (int t = 0; t < p.trees; ++t) {
      const int64_t base = t * n_nodes;
      int my_node = 0;
      float my_logit = 0.f;
      int n;
      if (SPECULATIVE) {
        n = route_speculative<T, NV>(xf, w_in + base * p.hidden, b_in + base, w_out + base * p.hidden, p.hidden, nvec,
                                     lane, p.depth, my_node, my_logit);
      } else {
        n = route<T, NV>(xf, w_in + base * p.hidden, b_in + base, p.hidden, nvec, lane, 0, p.depth + 1, p.depth, 0,
                         my_node, my_logit);
      }
      accumulate_out<T, NV>(yf, w_out + base * p.hidden, p.hidden, nvec, lane, p.depth, my_node, gelu(my_logit));
      if (lane == 0) p.leaves[m * p.trees + t] = n - first_leaf;
    }
    store_y<T, NV>(y + m * p.hidden, yf, lane, nvec);
  }
}

// ---------------------------------------------------------------------------------------------------
// kBucketed, step 1: route the top `split` levels of the (single) tree; record the bucket (node at level
// `split`), the GELU of the top logits, and a histogram of buckets (per block in shared memory, then
// one global atomic per bucket and block).
template <typename T, int NV>
__global__ void __launch_bounds__(kThreads, MinBlocks<NV>::value) route_top_kernel(const Params p) {
  constexpr int V = Elem<T>::kVec;
  extern __shared__ int hist[];
  const int n_buckets = 1 << p.split;
  for (int i = threadIdx.x; i < n_buckets; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const int lane = threadIdx.x & 31;
  const int nvec = p.hidden / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); m < p.tokens; m += stride) {
    float xf[NV][V];
    load_x<T, NV>(xf, x + m * p.ldx, lane, nvec);
    int my_node = 0;
    float my_logit = 0.f;
    const int n = route<T, NV>(xf, w_in, b_in, p.hidden, nvec, lane, 0, p.split, p.depth, 0, my_node, my_logit);
    if (lane < p.split) p.g_top[m * p.split + lane] = gelu(my_logit);
    if (lane == 0) {
      const int b = n - (n_buckets - 1);
      p.bucket[m] = b;
      atomicAdd(&hist[b], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n_buckets; i += blockDim.x)
    if (hist[i] != 0) atomicAdd(&p.counts[i], hist[i]);
}

// kBucketed, step 2: exclusive scan of the bucket counts (each block redoes it: at most 1024 entries),
// then scatter token ids to order[offset[bucket] + rank]. Ranks come from one atomic per bucket and warp
// (lanes with the same bucket are found with __match_any_sync); order within a bucket is arbitrary and
// does not change any output, since every token is computed on its own.
__global__ void __launch_bounds__(kThreads) scatter_kernel(const Params p) {
  extern __shared__ int offset[];
  const int n_buckets = 1 << p.split;
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    const int per_lane = (n_buckets + 31) / 32;
    const int begin = min(lane * per_lane, n_buckets), end = min(begin + per_lane, n_buckets);
    int total = 0;
    for (int i = begin; i < end; ++i) total += p.counts[i];
    int inclusive = total;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int other = __shfl_up_sync(kFullMask, inclusive, d);
      if (lane >= d) inclusive += other;
    }
    int running = inclusive - total;
    for (int i = begin; i < end; ++i) {
      offset[i] = running;
      running += p.counts[i];
    }
  }
  __syncthreads();
  int* cursor = p.counts + n_buckets;
  const unsigned lower_lanes = (1u << lane) - 1u;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < p.tokens;
       base += stride) {
    const int64_t m = base + lane;
    const bool valid = m < p.tokens;
    const int b = valid ? p.bucket[m] : -1 - lane;  // invalid lanes: a group of their own
    const unsigned peers = __match_any_sync(kFullMask, b);
    const int leader = __ffs(peers) - 1;
    int first = 0;
    if (valid && lane == leader) first = atomicAdd(&cursor[b], __popc(peers));
    first = __shfl_sync(kFullMask, first, leader);
    if (valid) p.order[offset[b] + first + __popc(peers & lower_lanes)] = static_cast<int>(m);
  }
}

// kBucketed, step 3: each block finishes a contiguous run of the sorted tokens (so an SM works on one or
// two subtrees at a time): levels split..depth, then the output over all levels.
template <typename T, int NV>
__global__ void __launch_bounds__(kThreads, MinBlocks<NV>::value) finish_kernel(const Params p, int64_t chunk) {
  constexpr int V = Elem<T>::kVec;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const T* __restrict__ w_out = static_cast<const T*>(p.w_out);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int lane = threadIdx.x & 31;
  const int nvec = p.hidden / V;
  const int split = p.split;
  const int bucket_base = (1 << split) - 1;  // heap index of the first node at level `split`
  const int64_t first_leaf = (int64_t{1} << p.depth) - 1;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = min(begin + chunk, p.tokens);
  for (int64_t pos = begin + (threadIdx.x >> 5); pos < end; pos += kWarps) {
    const int64_t m = p.order[pos];
    const int node_at_split = bucket_base + p.bucket[m];
    float xf[NV][V];
    load_x<T, NV>(xf, x + m * p.ldx, lane, nvec);
    // the path above the bucket node is implied by it: ancestor at level l = ((node + 1) >> (split - l)) - 1
    int my_node = 0;
    float my_g = 0.f, my_logit = 0.f;
    if (lane < split) {
      my_node = ((node_at_split + 1) >> (split - lane)) - 1;
      my_g = p.g_top[m * split + lane];
    }
    const int n = route<T, NV>(xf, w_in, b_in, p.hidden, nvec, lane, split, p.depth + 1, p.depth, node_at_split,
                               my_node, my_logit);
    if (lane >= split) my_g = gelu(my_logit);
    float yf[NV][V];
#pragma unroll
    for (int c = 0; c < NV; ++c)
#pragma unroll
      for (int e = 0; e < V; ++e) yf[c][e] = 0.f;
    accumulate_out<T, NV>(yf, w_out, p.hidden, nvec, lane, p.depth, my_node, my_g);
    store_y<T, NV>(y + m * p.hidden, yf, lane, nvec);
    if (lane == 0) p.leaves[m] = n - first_leaf;
  }
}

// ---------------------------------------------------------------------------------------------------
// kGeneral: any hidden size, row stride and alignment. Lanes stride over the row with scalar loads;
// routing writes each visited row and its GELU to scratch, then the output pass reads them back (the
// same warp, ordered by __syncwarp), so nothing is limited by registers.
template <typename T>
__global__ void __launch_bounds__(kThreads) general_kernel(const Params p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const T* __restrict__ w_out = static_cast<const T*>(p.w_out);
  T* __restrict__ y = static_cast<T*>(p.y);
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

// ---------------------------------------------------------------------------------------------------
// kTensorCore (bf16/fp16, one tree, depth 6..11, hidden % 16 == 0): the bucketed scheme with every dot
// product on tensor cores (mma.sync m16n8k16, fp32 accumulation). The tree is cut into two blocks of
// levels: the top `split` = depth - 5 levels (at most 63 nodes) and the 6 levels below (the 63-node
// subtree of the bucket node). All tokens share the top block, and after the counting sort all tokens
// of a tile share one subtree, so each block is a small dense product computed in full:
//   step 1 (tiles of 32 tokens in order):  L = X W_top^T + b  (32 x 64), route the top levels from L
//   step 2: counting sort by bucket (scatter_kernel above)
//   step 3 (tiles of <= 32 tokens of one bucket): L = X W_sub^T + b, route the 6 levels from L, then
//           Y = G W_out[path rows + subtree rows], G the GELU values (zero where not visited)
// Dense costs 64 dot products per token and block instead of 6, cheap on tensor cores. G is split into
// hi + lo halves in the input dtype (two products) so that the output keeps fp32-accurate GELU values.
// Measured on H100 (benchmarks/results_cuda.md) this is slower than kSingle (about 205 vs 135 us, bf16,
// 32768 tokens): each tile waits on a chain of 13 weight-chunk loads with only 8 warps per SM, and re-reads
// its rows for every 32 tokens. It is therefore opt-in (HF_FFF_CUDA_STRATEGY=tensor_core), never automatic.
namespace tc {
constexpr int kTok = 32;          // tokens per tile
constexpr int kThreads = 128;     // 4 warps: 2 along tokens x 2 along nodes / output columns
constexpr int kBlockLevels = 6;   // levels per subtree block: 63 nodes + 1 zero row = 64 columns
constexpr int kNodes = 64;
constexpr int kOutSlots = 80;     // 63 subtree rows + up to 6 path rows, padded to a multiple of 16
constexpr int kChunk = 128;       // x / w_in columns (step 1, 3) and output columns (step 3) per stage
constexpr int kPad = 8;           // row padding (16 bytes): consecutive rows land in different banks
constexpr int kWStride = kChunk + kPad;
constexpr int kChunkRows = kOutSlots;  // >= kNodes
constexpr int kLStride = kNodes + 1;
constexpr int kGStride = kOutSlots + kPad;
constexpr int kMaxHidden = 2048;

__host__ __device__ constexpr size_t region0_bytes(int hidden) {  // x tile, later logits + G (aliased)
  const size_t x_bytes = size_t(kTok) * (hidden + kPad) * 2;
  const size_t alias = size_t(kTok) * kLStride * 4 + 2 * size_t(kTok) * kGStride * 2;
  return x_bytes > alias ? x_bytes : alias;
}
__host__ __device__ constexpr size_t smem_bytes(int hidden) {
  return region0_bytes(hidden) + size_t(2) * kChunkRows * kWStride * 2;
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy that bypasses L1; src_bytes 0 writes zeros (padding rows).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
};

// Global heap index of slot j of the subtree rooted at `root`: j at local level l has root * 2^l + j.
__device__ __forceinline__ int subtree_node(int root, int j) {
  const int level = 31 - __clz(j + 1);
  return (root << level) + j;
}

// Copy columns [k0, k0 + width) of `rows` (global row index, or -1 for a zero row) into a stage buffer.
template <typename T>
__device__ __forceinline__ void load_rows(T* stage, const T* base, const int* rows, int n_rows, int hidden, int k0,
                                          int width) {
  const int pieces = width / 8;
  for (int i = threadIdx.x; i < n_rows * pieces; i += kThreads) {
    const int r = i / pieces, c = (i - r * pieces) * 8;
    const int row = rows[r];
    cp_async16(stage + r * kWStride + c, base + (row >= 0 ? static_cast<int64_t>(row) * hidden + k0 + c : 0), row >= 0);
  }
}

// Step 1 (FINISH = false) and step 3 (FINISH = true).
template <typename T, bool FINISH>
__global__ void __launch_bounds__(kThreads) tc_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float bias_s[kNodes];
  __shared__ int rows_in[kNodes];
  __shared__ int rows_out[kOutSlots];
  __shared__ int tok_s[kTok];
  __shared__ int tile_s[3];  // FINISH: bucket, first sorted position, end of the bucket

  const int hidden = p.hidden, xs_stride = hidden + kPad;
  T* xs = reinterpret_cast<T*>(smem);
  float* ls = reinterpret_cast<float*>(smem);  // after the logits product, x is dead
  T* g_hi = reinterpret_cast<T*>(smem + size_t(kTok) * kLStride * 4);
  T* g_lo = g_hi + kTok * kGStride;
  T* wbuf = reinterpret_cast<T*>(smem + region0_bytes(hidden));
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const T* __restrict__ w_out = static_cast<const T*>(p.w_out);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = p.split;
  const int levels = FINISH ? kBlockLevels : split;  // levels of this block
  const int n_buckets = 1 << split;

  // --- which tokens and which subtree ---------------------------------------------------------------
  int root, count;
  int64_t first;
  if (FINISH) {
    if (warp == 0) {  // find this tile's bucket (buckets hold ceil(count / kTok) tiles each, in order):
      // lane l owns buckets 2l and 2l + 1 (at most 64), a warp scan gives each bucket's first tile
      int c[2], tiles[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int b = 2 * lane + i;
        c[i] = b < n_buckets ? p.counts[b] : 0;
        tiles[i] = (c[i] + kTok - 1) / kTok;
      }
      int tile_end = tiles[0] + tiles[1], token_end = c[0] + c[1];
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int t = __shfl_up_sync(kFullMask, tile_end, d), e = __shfl_up_sync(kFullMask, token_end, d);
        if (lane >= d) tile_end += t, token_end += e;
      }
      const int tile_begin = tile_end - tiles[0] - tiles[1], token_begin = token_end - c[0] - c[1];
      const int tile = blockIdx.x;
      const unsigned owner = __ballot_sync(kFullMask, tile >= tile_begin && tile < tile_end);
      if (owner == 0) {
        if (lane == 0) tile_s[0] = -1;
      } else if (lane == __ffs(owner) - 1) {
        const bool second = tile >= tile_begin + tiles[0];
        const int bucket_tile = tile - tile_begin - (second ? tiles[0] : 0);
        const int bucket_start = token_begin + (second ? c[0] : 0);
        tile_s[0] = 2 * lane + (second ? 1 : 0);
        tile_s[1] = bucket_start + bucket_tile * kTok;       // first sorted position of the tile
        tile_s[2] = bucket_start + c[second ? 1 : 0];        // end of the bucket
      }
    }
    __syncthreads();
    if (tile_s[0] < 0) return;  // the grid is an upper bound on the number of tiles
    const int b = tile_s[0];
    root = (n_buckets - 1) + b;
    first = tile_s[1];
    count = min(kTok, tile_s[2] - static_cast<int>(first));
    if (tid < kTok) tok_s[tid] = tid < count ? p.order[first + tid] : -1;
  } else {
    root = 0;
    first = static_cast<int64_t>(blockIdx.x) * kTok;
    count = static_cast<int>(p.tokens - first < kTok ? p.tokens - first : kTok);
    if (tid < kTok) tok_s[tid] = tid < count ? static_cast<int>(first + tid) : -1;
  }
  const int block_nodes = (1 << levels) - 1;
  if (tid < kNodes) {
    const int node = tid < block_nodes ? subtree_node(root, tid) : -1;
    rows_in[tid] = node;
    bias_s[tid] = node >= 0 ? Elem<T>::load(b_in + node) : 0.f;
  }
  if (FINISH && tid < kOutSlots) {
    int row = -1;
    if (tid < kNodes - 1) row = subtree_node(root, tid);
    else if (tid - (kNodes - 1) < split) row = ((root + 1) >> (split - (tid - (kNodes - 1)))) - 1;  // path above
    rows_out[tid] = row;
  }
  __syncthreads();

  // --- L = X W^T over k chunks (x tile once, w_in chunks double-buffered) ----------------------------
  {
    const int pieces = hidden / 8;
    for (int i = tid; i < kTok * pieces; i += kThreads) {
      const int r = i / pieces, c = (i - r * pieces) * 8;
      const int m = tok_s[r];
      cp_async16(xs + r * xs_stride + c, x + (m >= 0 ? static_cast<int64_t>(m) * p.ldx + c : 0), m >= 0);
    }
  }
  load_rows<T>(wbuf, w_in, rows_in, kNodes, hidden, 0, min(kChunk, hidden));
  cp_async_commit();
  const int m0 = (warp & 1) * 16, n0 = (warp >> 1) * 32;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  const int k_chunks = (hidden + kChunk - 1) / kChunk;
  for (int c = 0; c < k_chunks; ++c) {
    if (c + 1 < k_chunks)
      load_rows<T>(wbuf + ((c + 1) & 1) * kChunkRows * kWStride, w_in, rows_in, kNodes, hidden, (c + 1) * kChunk,
                   min(kChunk, hidden - (c + 1) * kChunk));
    cp_async_commit();
    cp_async_wait_one();
    __syncthreads();
    const T* wb = wbuf + (c & 1) * kChunkRows * kWStride;
    const int width = min(kChunk, hidden - c * kChunk);
    for (int kk = 0; kk < width; kk += 16) {
      unsigned a[4];
      ldmatrix_x4(a, xs + (m0 + (lane & 15)) * xs_stride + c * kChunk + kk + 8 * (lane >> 4));
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        unsigned b[4];
        ldmatrix_x4(b, wb + (n0 + np * 16 + (lane & 7) + 8 * (lane >> 4)) * kWStride + kk + 8 * ((lane >> 3) & 1));
        Mma<T>::run(acc[2 * np], a, b[0], b[1]);
        Mma<T>::run(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
  }
  cp_async_wait_all();

  // --- logits to shared memory (over the dead x tile), then route ------------------------------------
  {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int col = n0 + nt * 8 + 2 * t;
      ls[(m0 + g) * kLStride + col] = acc[nt][0] + bias_s[col];
      ls[(m0 + g) * kLStride + col + 1] = acc[nt][1] + bias_s[col + 1];
      ls[(m0 + g + 8) * kLStride + col] = acc[nt][2] + bias_s[col];
      ls[(m0 + g + 8) * kLStride + col + 1] = acc[nt][3] + bias_s[col + 1];
    }
  }
  if (FINISH)
    for (int i = tid; i < kTok * kGStride; i += kThreads) g_hi[i] = g_lo[i] = Mma<T>::from(0.f);
  __syncthreads();

  if (warp == 0) {  // one thread per token walks its block of levels in the logits
    const int t = lane;
    const int m = tok_s[t];
    int j = 0;
    if (m >= 0) {
      for (int level = 0; level < levels; ++level) {
        const float logit = ls[t * kLStride + j];
        const float g = gelu(logit);
        if (FINISH) {
          const T hi = Mma<T>::from(g);
          g_hi[t * kGStride + j] = hi;
          g_lo[t * kGStride + j] = Mma<T>::from(g - Mma<T>::to(hi));
        } else {
          p.g_top[static_cast<int64_t>(m) * split + level] = g;
        }
        if (!FINISH || level + 1 < levels) j = 2 * j + 1 + (logit > 0.f ? 1 : 0);
      }
      if (FINISH) {
        for (int l = 0; l < split; ++l) {  // the path above the bucket: GELU values from step 1
          const float g = p.g_top[static_cast<int64_t>(m) * split + l];
          const T hi = Mma<T>::from(g);
          g_hi[t * kGStride + kNodes - 1 + l] = hi;
          g_lo[t * kGStride + kNodes - 1 + l] = Mma<T>::from(g - Mma<T>::to(hi));
        }
        p.leaves[m] = subtree_node(root, j) - ((int64_t{1} << p.depth) - 1);
      }
    }
    if (!FINISH) {  // bucket = node reached at level `split`; one atomic per bucket and warp
      const int b = m >= 0 ? j - (n_buckets - 1) : -1 - lane;
      if (m >= 0) p.bucket[m] = b;
      const unsigned peers = __match_any_sync(kFullMask, b);
      if (m >= 0 && lane == __ffs(peers) - 1) atomicAdd(&p.counts[b], __popc(peers));
    }
  }
  if (!FINISH) return;
  __syncthreads();

  // --- Y = G W_out[rows_out] over output column chunks --------------------------------------------
  unsigned a_hi[kOutSlots / 16][4], a_lo[kOutSlots / 16][4];
#pragma unroll
  for (int ks = 0; ks < kOutSlots / 16; ++ks) {
    ldmatrix_x4(a_hi[ks], g_hi + (m0 + (lane & 15)) * kGStride + ks * 16 + 8 * (lane >> 4));
    ldmatrix_x4(a_lo[ks], g_lo + (m0 + (lane & 15)) * kGStride + ks * 16 + 8 * (lane >> 4));
  }
  T* __restrict__ y = static_cast<T*>(p.y);
  const int c0 = (warp >> 1) * 64;  // this warp's 64 columns of each chunk
  const int n_chunks = (hidden + kChunk - 1) / kChunk;
  load_rows<T>(wbuf, w_out, rows_out, kOutSlots, hidden, 0, min(kChunk, hidden));
  cp_async_commit();
  for (int c = 0; c < n_chunks; ++c) {
    if (c + 1 < n_chunks)
      load_rows<T>(wbuf + ((c + 1) & 1) * kChunkRows * kWStride, w_out, rows_out, kOutSlots, hidden,
                   (c + 1) * kChunk, min(kChunk, hidden - (c + 1) * kChunk));
    cp_async_commit();
    cp_async_wait_one();
    __syncthreads();
    const T* wb = wbuf + (c & 1) * kChunkRows * kWStride;
    const int width = min(kChunk, hidden - c * kChunk);
    if (c0 < width) {
      float out[8][4];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) out[i][j] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kOutSlots / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          unsigned b[4];
          ldmatrix_x4_trans(b, wb + (ks * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * kWStride + c0 + np * 16 + 8 * (lane >> 4));
          Mma<T>::run(out[2 * np], a_hi[ks], b[0], b[1]);
          Mma<T>::run(out[2 * np], a_lo[ks], b[0], b[1]);
          Mma<T>::run(out[2 * np + 1], a_hi[ks], b[2], b[3]);
          Mma<T>::run(out[2 * np + 1], a_lo[ks], b[2], b[3]);
        }
      }
      const int g = lane >> 2, t = lane & 3;
      const int tok_a = tok_s[m0 + g], tok_b = tok_s[m0 + g + 8];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int col = c0 + nt * 8 + 2 * t;
        if (col < width) {
          const int64_t h = static_cast<int64_t>(c) * kChunk + col;
          if (tok_a >= 0)
            *reinterpret_cast<unsigned*>(y + static_cast<int64_t>(tok_a) * hidden + h) = Elem<T>::pack2(out[nt][0], out[nt][1]);
          if (tok_b >= 0)
            *reinterpret_cast<unsigned*>(y + static_cast<int64_t>(tok_b) * hidden + h) = Elem<T>::pack2(out[nt][2], out[nt][3]);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait_all();
}
}  // namespace tc

// ---------------------------------------------------------------------------------------------------
// Launch.
template <typename Kernel>
int blocks_per_sm(Kernel kernel, size_t smem) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem));
  return blocks > 0 ? blocks : 1;
}

// One warp per token up to one full wave of resident blocks, then a grid-stride loop.
template <typename Kernel>
int64_t token_grid(Kernel kernel, const Params& p, size_t smem, int& cached_per_sm) {
  if (cached_per_sm == 0) cached_per_sm = blocks_per_sm(kernel, smem);
  const int64_t wanted = (p.tokens + kWarps - 1) / kWarps;
  const int64_t wave = static_cast<int64_t>(cached_per_sm) * p.num_sms;
  return wanted < wave ? wanted : wave;
}

template <typename T, int NV>
void launch_fast(const Params& p, cudaStream_t stream) {
  switch (p.strategy) {
    case kSingle: {
      static int per_sm = 0;  // occupancy of this instantiation (same on every device of one build)
      const auto kernel = single_kernel<T, NV, false>;
      kernel<<<token_grid(kernel, p, 0, per_sm), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    case kSpeculative: {
      static int per_sm = 0;
      const auto kernel = single_kernel<T, NV, true>;
      kernel<<<token_grid(kernel, p, 0, per_sm), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    case kBucketed: {
      const int n_buckets = 1 << p.split;
      const size_t hist_bytes = sizeof(int) * n_buckets;
      C10_CUDA_CHECK(cudaMemsetAsync(p.counts, 0, 2 * hist_bytes, stream));
      static int route_per_sm = 0, finish_per_sm = 0;
      const auto route_kernel = route_top_kernel<T, NV>;
      route_kernel<<<token_grid(route_kernel, p, hist_bytes, route_per_sm), kThreads, hist_bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t scatter_blocks = (p.tokens + kThreads - 1) / kThreads;
      const int64_t scatter_cap = static_cast<int64_t>(p.num_sms) * 8;
      scatter_kernel<<<scatter_blocks < scatter_cap ? scatter_blocks : scatter_cap, kThreads, hist_bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto finish = finish_kernel<T, NV>;
      const int64_t blocks = token_grid(finish, p, 0, finish_per_sm);
      const int64_t chunk = (p.tokens + blocks - 1) / blocks;
      finish<<<(p.tokens + chunk - 1) / chunk, kThreads, 0, stream>>>(p, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    default:
      TORCH_CHECK(false, "hf_fff CUDA: unknown strategy (", std::to_string(p.strategy), ")");
  }
}

// Raise a kernel's dynamic shared memory limit once per device (needed above 48 KB).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, int (&done)[64]) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 64 || done[device] >= static_cast<int>(bytes)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  done[device] = static_cast<int>(bytes);
}

template <typename T>
void launch_tensor_core(const Params& p, cudaStream_t stream) {
  const size_t smem = tc::smem_bytes(p.hidden);
  static int route_done[64] = {}, finish_done[64] = {};
  const auto route = tc::tc_kernel<T, false>;
  const auto finish = tc::tc_kernel<T, true>;
  allow_smem(route, smem, route_done);
  allow_smem(finish, smem, finish_done);
  const int n_buckets = 1 << p.split;
  C10_CUDA_CHECK(cudaMemsetAsync(p.counts, 0, 2 * sizeof(int) * n_buckets, stream));
  const int64_t tiles = (p.tokens + tc::kTok - 1) / tc::kTok;
  route<<<tiles, tc::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t scatter_blocks = (p.tokens + kThreads - 1) / kThreads;
  const int64_t scatter_cap = static_cast<int64_t>(p.num_sms) * 8;
  scatter_kernel<<<scatter_blocks < scatter_cap ? scatter_blocks : scatter_cap, kThreads, sizeof(int) * n_buckets, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // sum over buckets of ceil(count / kTok) <= tokens / kTok + buckets: extra blocks exit at once
  finish<<<tiles + n_buckets, tc::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(const Params& p, cudaStream_t stream) {
  if (p.tokens == 0) return;
  if (p.strategy == kGeneral) {
    static int per_sm = 0;
    const auto kernel = general_kernel<T>;
    kernel<<<token_grid(kernel, p, 0, per_sm), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (p.strategy == kTensorCore) {
    if constexpr (std::is_same<T, float>::value) {
      TORCH_CHECK(false, "hf_fff CUDA: the tensor-core strategy takes float16 or bfloat16");
    } else {
      launch_tensor_core<T>(p, stream);
    }
    return;
  }
  switch (p.vectors) {
    case 1: launch_fast<T, 1>(p, stream); break;
    case 2: launch_fast<T, 2>(p, stream); break;
    case 3: launch_fast<T, 3>(p, stream); break;
    case 4: launch_fast<T, 4>(p, stream); break;
    case 6: launch_fast<T, 6>(p, stream); break;
    case 8: launch_fast<T, 8>(p, stream); break;
    default: TORCH_CHECK(false, "hf_fff CUDA: unsupported vectors per lane (", std::to_string(p.vectors), ")");
  }
}

}  // namespace
}  // namespace hf_fff_cuda

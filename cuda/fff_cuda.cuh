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
// * GELU (erff) is off the serial chain: each lane evaluates its own level's GELU once, after routing.
// * Weights (12.6 MB at bf16) are read through L1/L2 with ld.global.nc; x and y stream past L1 with
//   evict-first hints so that they do not push the weights out.
// * kBucketed (many tokens, one tree): the deep levels of a random walk read 3 KB of rows per token and
//   level from L2 (0.6 GB at 32768 tokens), more than L2 can serve quickly. Routing only the top
//   `split` levels first, then sorting tokens by the node they reached (a counting sort: histogram,
//   scan, scatter) makes the tokens an SM finishes share one subtree, whose rows stay in its L1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

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

// route() that fetches both children's rows before reducing the current dot product: the next level's
// operands are in flight during the reduction, which shortens each level to about one L2 round trip.
template <typename T, int NV>
__device__ __forceinline__ int route_speculative(const float (&xf)[NV][Elem<T>::kVec], const T* __restrict__ w_in,
                                                 const T* __restrict__ b_in, int hidden, int nvec, int lane,
                                                 int depth, int& my_node, float& my_logit) {
  int n = 0;
  Row<T, NV> cur;
  load_row<T, NV>(cur, w_in, lane, nvec);
  float bias = Elem<T>::load(b_in);
  for (int level = 0; level <= depth; ++level) {
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
        n = route_speculative<T, NV>(xf, w_in + base * p.hidden, b_in + base, p.hidden, nvec, lane, p.depth, my_node,
                                     my_logit);
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

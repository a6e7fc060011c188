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
// * Strategies for other sizes (the automatic choice is choose_strategy in fff_cuda.cpp):
//   - kCluster / kSubtree (few tokens): a cluster of 8 blocks, or one block, per token computes the
//     logits of a whole subtree (6 or 5 levels) per round, so a depth-11 walk waits on 2 or 3 rounds of
//     row fetches instead of 12.
//   - kBucketed / kSorted (many tokens, one tree): route the top `split` levels, sort tokens by the node
//     reached (counting sort: histogram, scan, scatter), then finish each bucket together: through L1
//     (kBucketed) or with the bucket's rows held in shared memory (kSorted).
//   - kTensorCore / kSortedTensor (opt-in): the bucketed schemes with dense tensor-core products.
//   Measured with Nsight Compute, the CUDA-core walks at 32768 tokens are bound by instruction issue
//   (a widening and an FMA per weight element), not by L2: sorting removes the deep rows' L2 traffic but
//   pays off only where rows are wide or registers scarce (fp32, fp16; see results_cuda.md).
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

// Keep x widened in registers: without this the compiler may keep x packed and widen it again at every
// level (one more instruction per element and level, about 12% of kSorted's finishing instructions at bf16).
template <int NV, int V>
__device__ __forceinline__ void pin_x(float (&xf)[NV][V]) {
#pragma unroll
  for (int c = 0; c < NV; ++c)
#pragma unroll
    for (int e = 0; e < V; ++e) asm volatile("" : "+f"(xf[c][e]));
}

// x as raw 16-byte vectors, for loading the next token's x while the current one is computed.
template <typename T, int NV>
__device__ __forceinline__ void load_x_raw(uint4 (&raw)[NV], const T* row, int lane, int nvec) {
  const uint4* p = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    const int v = c * 32 + lane;
    raw[c] = v < nvec ? __ldcs(p + v) : make_uint4(0u, 0u, 0u, 0u);
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
// Routing only (no output rows): fewer registers than the whole walk, so more warps hide its latency.
template <int NV>
struct RouteMinBlocks {
  static constexpr int value = NV <= 6 ? 4 : 2;
};

template <typename T, int NV>
__global__ void __launch_bounds__(kThreads, RouteMinBlocks<NV>::value) route_top_kernel(const Params p) {
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

// Exclusive prefix sums of counts[0, n) into offsets[0, n) by one warp (every lane calls it; n <= 1024):
// each lane sums a run of n / 32 counts, a warp scan offsets the runs. Returns this lane's inclusive sum,
// so lane 31 holds the total.
__device__ __forceinline__ int warp_exclusive_scan(const int* counts, int n, int* offsets, int lane) {
  const int per_lane = (n + 31) / 32;
  const int begin = min(lane * per_lane, n), end = min(begin + per_lane, n);
  int total = 0;
  for (int i = begin; i < end; ++i) total += counts[i];
  int inclusive = total;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += other;
  }
  int running = inclusive - total;
  for (int i = begin; i < end; ++i) {
    offsets[i] = running;
    running += counts[i];
  }
  return inclusive;
}

// The bucket holding sorted position pos: the last b with offsets[b] <= pos (offsets ascending, n_buckets long).
__device__ __forceinline__ int bucket_at(const int* offsets, int n_buckets, int64_t pos) {
  int b = 0;
  for (int lo = 0, hi = n_buckets - 1; lo <= hi;) {
    const int mid = (lo + hi) >> 1;
    if (offsets[mid] <= pos) b = mid, lo = mid + 1;
    else hi = mid - 1;
  }
  return b;
}

// kBucketed, step 2: exclusive scan of the bucket counts (each block redoes it: at most 1024 entries),
// then scatter token ids to order[offset[bucket] + rank]. Ranks come from one atomic per bucket and warp
// (lanes with the same bucket are found with __match_any_sync); order within a bucket is arbitrary and
// does not change any output, since every token is computed on its own.
__global__ void __launch_bounds__(kThreads) scatter_kernel(const Params p) {
  extern __shared__ int offset[];
  const int n_buckets = 1 << p.split;
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) warp_exclusive_scan(p.counts, n_buckets, offset, lane);
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
    const int node = tid < block_nodes ? tc::subtree_node(root, tid) : -1;
    rows_in[tid] = node;
    bias_s[tid] = node >= 0 ? Elem<T>::load(b_in + node) : 0.f;
  }
  if (FINISH && tid < kOutSlots) {
    int row = -1;
    if (tid < kNodes - 1) row = tc::subtree_node(root, tid);
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
        p.leaves[m] = tc::subtree_node(root, j) - ((int64_t{1} << p.depth) - 1);
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
// kSubtree: few tokens, where a call is one chain of dependent row fetches and the GPU is mostly idle.
// One block of 16 warps per token goes down in rounds of up to 5 levels: the block computes the logits of
// all 31 nodes of the subtree below the current node at once (two rows per warp, every load in flight
// together), then one thread routes through them in shared memory. Depth 11 costs 3 dependent rounds of
// fetches instead of 12 (4x the w_in reads, which at this size nobody else wants). During routing, warp 0
// pulls the visited w_out rows into L1, and the output pass gives each thread one 16-byte vector of the
// row, over all levels. Logits and the output sum are computed exactly as kSingle computes them (same
// lane layout, reduction and order), so both strategies give the same bits.
namespace st {
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kRound = 5;                        // levels per round
constexpr int kRoundNodes = (1 << kRound) - 1;   // 31: at most two per warp
constexpr int kMaxLevels = 32;                   // depth <= 30
}  // namespace st

template <typename T, int NV>
__device__ __forceinline__ void load_x_shared(float (&xf)[NV][Elem<T>::kVec], const T* row, int lane, int nvec) {
  const uint4* p = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    const int v = c * 32 + lane;
    Elem<T>::unpack(v < nvec ? __ldg(p + v) : make_uint4(0u, 0u, 0u, 0u), xf[c]);  // every warp reads it: keep
  }
}

// yv += g(level) * w_out row vector, levels [first, end) with their vectors in raw[0, end - first), in
// level order (the order kSingle sums in). Shared by the few-token kernels (kSubtree, kCluster).
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
__global__ void __launch_bounds__(st::kThreads, 1) subtree_kernel(const Params p) {
  constexpr int V = Elem<T>::kVec;
  constexpr bool kBothInFlight = NV <= 4;  // two rows of registers per lane fit under 128 registers
  __shared__ float logit_s[st::kRoundNodes];
  __shared__ int path_node[st::kMaxLevels];  // heap index within the tree, per level
  __shared__ float path_logit[st::kMaxLevels];
  __shared__ float path_g[st::kMaxLevels];
  __shared__ int next_s;
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const T* __restrict__ w_out = static_cast<const T*>(p.w_out);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nvec = p.hidden / V;
  const int depth = p.depth;
  const int64_t m = blockIdx.x;
  const int64_t n_nodes = nodes_per_tree(depth);
  const int64_t first_leaf = (int64_t{1} << depth) - 1;

  float xf[NV][V];
  load_x_shared<T, NV>(xf, static_cast<const T*>(p.x) + m * p.ldx, lane, nvec);
  float yv[V];
#pragma unroll
  for (int e = 0; e < V; ++e) yv[e] = 0.f;

  for (int t = 0; t < p.trees; ++t) {
    const T* tw_in = w_in + t * n_nodes * p.hidden;
    const T* tb_in = b_in + t * n_nodes;
    const T* tw_out = w_out + t * n_nodes * p.hidden;
    int n = 0;  // node at the first level of the round (block-uniform)
    int done = 0;  // levels below this one are in yv already
    for (int level0 = 0; level0 <= depth; level0 += st::kRound) {
      const int r = min(st::kRound, depth + 1 - level0);
      const int count = (1 << r) - 1;
      // the previous round's w_out rows (levels done..level0-1) load together with this round's w_in rows
      uint4 out_raw[st::kRound];
      if (tid < nvec) {
#pragma unroll
        for (int u = 0; u < st::kRound; ++u)
          if (done + u < level0) out_raw[u] = __ldg(reinterpret_cast<const uint4*>(tw_out + static_cast<int64_t>(path_node[done + u]) * p.hidden) + tid);
      }
      if (kBothInFlight) {
        Row<T, NV> rows[2];
        float bias[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int j = warp + k * st::kWarps;
          if (j < count) {
            const int node = tc::subtree_node(n, j);
            load_row<T, NV>(rows[k], tw_in + static_cast<int64_t>(node) * p.hidden, lane, nvec);
            bias[k] = Elem<T>::load(tb_in + node);
          }
        }
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int j = warp + k * st::kWarps;
          if (j < count) {
            const float logit = warp_sum(partial_dot<T, NV>(xf, rows[k])) + bias[k];
            if (lane == 0) logit_s[j] = logit;
          }
        }
      } else {
#pragma unroll 1
        for (int j = warp; j < count; j += st::kWarps) {
          const int node = tc::subtree_node(n, j);
          Row<T, NV> row;
          load_row<T, NV>(row, tw_in + static_cast<int64_t>(node) * p.hidden, lane, nvec);
          const float logit = warp_sum(partial_dot<T, NV>(xf, row)) + Elem<T>::load(tb_in + node);
          if (lane == 0) logit_s[j] = logit;
        }
      }
      if (tid < nvec) accumulate_levels<T, st::kRound>(yv, out_raw, path_g, done, level0);
      done = level0;
      __syncthreads();
      if (warp == 0) {
        if (lane == 0) {
          int j = 0;
          for (int d = 0; d < r; ++d) {
            const float logit = logit_s[j];
            path_node[level0 + d] = tc::subtree_node(n, j);
            path_logit[level0 + d] = logit;
            if (level0 + d < depth) j = 2 * j + 1 + (logit > 0.f ? 1 : 0);  // left on <= 0 and NaN
          }
          next_s = tc::subtree_node(n, j);  // the node below the round's last level (unused after the leaf)
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
      uint4 out_raw[st::kRound];
#pragma unroll
      for (int u = 0; u < st::kRound; ++u)
        if (done + u <= depth) out_raw[u] = __ldg(reinterpret_cast<const uint4*>(tw_out + static_cast<int64_t>(path_node[done + u]) * p.hidden) + tid);
      accumulate_levels<T, st::kRound>(yv, out_raw, path_g, done, depth + 1);
    }
    __syncthreads();  // the next tree reuses the path arrays
  }
  if (tid < nvec) __stcs(reinterpret_cast<uint4*>(static_cast<T*>(p.y) + m * p.hidden) + tid, Elem<T>::pack(yv));
}

// ---------------------------------------------------------------------------------------------------
// kCluster (Hopper, few tokens): one token per cluster of 8 blocks on 8 SMs, 64 warps in all. A round
// covers 6 levels: the 63 nodes below the current one, one row per warp, computed at once; each warp sends
// its logit to all 8 blocks through distributed shared memory, one cluster barrier later every block walks
// the 6 levels itself (same logits, same path, no second exchange). Depth 11 is 2 rounds of fetches, each
// block reading 8 rows instead of a whole round's 63. While a round computes, each block also loads its
// slice of the previous round's w_out rows (the output: block r owns columns r/8 of the row). Logits and
// the output sum are those of kSingle, bit for bit.
namespace cl {
constexpr int kBlocks = 8;                       // cluster size (portable maximum)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRound = 6;                        // levels per round: 63 nodes <= kBlocks * kWarps
constexpr int kRoundNodes = (1 << kRound) - 1;
constexpr int kMaxLevels = 32;
}  // namespace cl

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define HF_FFF_HAS_CLUSTERS 1
#else
#define HF_FFF_HAS_CLUSTERS 0
#endif

__device__ __forceinline__ void cluster_arrive_relaxed() {
#if HF_FFF_HAS_CLUSTERS
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_arrive() {
#if HF_FFF_HAS_CLUSTERS
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if HF_FFF_HAS_CLUSTERS
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r = 0;
#if HF_FFF_HAS_CLUSTERS
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return r;
}
// Store v into the shared variable at `local` of block `rank` of this cluster.
__device__ __forceinline__ void store_remote(float* local, unsigned rank, float v) {
#if HF_FFF_HAS_CLUSTERS
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(local));
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(remote), "f"(v) : "memory");
#endif
}

template <typename T, int NV>
__global__ void __launch_bounds__(cl::kThreads) cluster_kernel(const Params p) {
  constexpr int V = Elem<T>::kVec;
  __shared__ float logit_s[2][cl::kRoundNodes + 1];  // by round parity: a block may run one round ahead
  __shared__ int path_node[cl::kMaxLevels];
  __shared__ float path_g[cl::kMaxLevels];
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const T* __restrict__ w_out = static_cast<const T*>(p.w_out);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const unsigned rank = cluster_rank();
  const int nvec = p.hidden / V;
  const int per_block = (nvec + cl::kBlocks - 1) / cl::kBlocks;  // output vectors of this block
  const int my_vec = static_cast<int>(rank) * per_block + tid;
  const bool outputs = tid < per_block && my_vec < nvec;
  const int depth = p.depth;
  const int64_t m = blockIdx.x / cl::kBlocks;
  const int64_t n_nodes = nodes_per_tree(depth);
  const int64_t first_leaf = (int64_t{1} << depth) - 1;
  const int my_j = static_cast<int>(rank) * cl::kWarps + warp;  // this warp's node in each round

  cluster_arrive_relaxed();  // every block of the cluster has started before the first remote store
  float xf[NV][V];
  load_x_shared<T, NV>(xf, static_cast<const T*>(p.x) + m * p.ldx, lane, nvec);
  float yv[V];
#pragma unroll
  for (int e = 0; e < V; ++e) yv[e] = 0.f;
  bool first_exchange = true;
  int parity = 0;

  for (int t = 0; t < p.trees; ++t) {
    const T* tw_in = w_in + t * n_nodes * p.hidden;
    const T* tb_in = b_in + t * n_nodes;
    const T* tw_out = w_out + t * n_nodes * p.hidden;
    int n = 0, done = 0;
    for (int level0 = 0; level0 <= depth; level0 += cl::kRound) {
      const int r = min(cl::kRound, depth + 1 - level0);
      const int count = (1 << r) - 1;
      uint4 out_raw[cl::kRound];  // this block's slice of the previous round's w_out rows
      if (outputs) {
#pragma unroll
        for (int u = 0; u < cl::kRound; ++u)
          if (done + u < level0)
            out_raw[u] = __ldg(reinterpret_cast<const uint4*>(tw_out + static_cast<int64_t>(path_node[done + u]) * p.hidden) + my_vec);
      }
      float logit = 0.f;
      if (level0 + r > depth && my_j < count && lane * 128 < per_block * 16) {
        // last round: pull this block's slice of every candidate's w_out row into L1 for the output pass
        const int node = tc::subtree_node(n, my_j);
        prefetch_l1(reinterpret_cast<const char*>(tw_out + static_cast<int64_t>(node) * p.hidden) +
                    static_cast<int64_t>(rank) * per_block * 16 + lane * 128);
      }
      if (my_j < count) {
        const int node = tc::subtree_node(n, my_j);
        Row<T, NV> row;
        load_row<T, NV>(row, tw_in + static_cast<int64_t>(node) * p.hidden, lane, nvec);
        logit = warp_sum(partial_dot<T, NV>(xf, row)) + Elem<T>::load(tb_in + node);
      }
      if (outputs) accumulate_levels<T, cl::kRound>(yv, out_raw, path_g, done, level0);
      done = level0;
      if (first_exchange) {
        cluster_wait();
        first_exchange = false;
      }
      if (my_j < count && lane < cl::kBlocks) store_remote(&logit_s[parity][my_j], lane, logit);
      cluster_arrive();
      cluster_wait();
      if (tid == 0) {  // every block walks the same logits to the same path
        int j = 0;
        for (int d = 0; d < r; ++d) {
          const float l = logit_s[parity][j];
          path_node[level0 + d] = tc::subtree_node(n, j);
          path_g[level0 + d] = l;  // the logit for now: GELU below, off the serial walk
          if (level0 + d < depth) j = 2 * j + 1 + (l > 0.f ? 1 : 0);  // left on <= 0 and NaN
        }
        logit_s[parity][cl::kRoundNodes] = __int_as_float(tc::subtree_node(n, j));  // next round's root
      }
      __syncthreads();
      if (tid < r) path_g[level0 + tid] = gelu(path_g[level0 + tid]);
      __syncwarp();  // warp 0 writes these GELU values and its first lanes (the output threads) read them
      n = __float_as_int(logit_s[parity][cl::kRoundNodes]);
      parity ^= 1;
    }
    if (rank == 0 && tid == 0) p.leaves[m * p.trees + t] = path_node[depth] - first_leaf;
    if (outputs) {  // the last round's levels
      uint4 out_raw[cl::kRound];
#pragma unroll
      for (int u = 0; u < cl::kRound; ++u)
        if (done + u <= depth)
          out_raw[u] = __ldg(reinterpret_cast<const uint4*>(tw_out + static_cast<int64_t>(path_node[done + u]) * p.hidden) + my_vec);
      accumulate_levels<T, cl::kRound>(yv, out_raw, path_g, done, depth + 1);
    }
    __syncthreads();  // path arrays are rewritten by the next tree
  }
  if (outputs) __stcs(reinterpret_cast<uint4*>(static_cast<T*>(p.y) + m * p.hidden) + my_vec, Elem<T>::pack(yv));
}

// kSorted, step 1 with the top levels' rows in shared memory: one block of 1024 threads per SM stages the
// w_in rows and biases of levels [0, top) once (2^top - 1 rows, up to ~190 KB), then its warps route
// tokens through them; levels [top, split) still read rows through L1/L2. At fp32 the top 7 levels are
// 381 KB of rows that do not stay in L1, so step 1 was bound by L2 reads (21 KB per token).
template <typename T, int NV>
struct RouteSharedThreads {  // 64 registers per thread at 1024 threads: enough for x of 24 floats per lane
  static constexpr int value = NV * Elem<T>::kVec <= 24 ? 1024 : 512;
};
constexpr int64_t kRouteSharedBudget = 200 * 1024;  // below the 227 KB a block may have on H100

__host__ __device__ inline int64_t route_shared_bytes(int top, int split, int64_t hidden, int64_t element_size) {
  const int64_t rows = (int64_t{1} << top) - 1;
  return rows * hidden * element_size + 4 * rows + 4 * (int64_t{1} << split);
}

template <typename T, int NV>
__device__ __forceinline__ void load_row_shared(Row<T, NV>& r, const T* row, int lane, int nvec) {
  const uint4* p = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    const int v = c * 32 + lane;
    r.v[c] = v < nvec ? p[v] : make_uint4(0u, 0u, 0u, 0u);
  }
}

template <typename T, int NV>
__global__ void __launch_bounds__(RouteSharedThreads<T, NV>::value, 1) route_top_shared_kernel(const Params p, int top) {
  constexpr int V = Elem<T>::kVec;
  constexpr int kRouteSharedThreads = RouteSharedThreads<T, NV>::value;
  extern __shared__ __align__(16) unsigned char smem[];
  const int hidden = p.hidden, split = p.split;
  const int rows = (1 << top) - 1;
  const int n_buckets = 1 << split;
  T* rows_s = reinterpret_cast<T*>(smem);
  float* bias_s = reinterpret_cast<float*>(rows_s + static_cast<int64_t>(rows) * hidden);
  int* hist = reinterpret_cast<int*>(bias_s + rows);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const int tid = threadIdx.x, lane = tid & 31;
  const int nvec = hidden / V;
  const int nvec16 = static_cast<int>(hidden * sizeof(T) / 16);
  for (int i = tid; i < rows * nvec16; i += kRouteSharedThreads)  // the top rows are contiguous in w_in
    tc::cp_async16(reinterpret_cast<uint4*>(rows_s) + i, reinterpret_cast<const uint4*>(w_in) + i, true);
  tc::cp_async_commit();
  for (int i = tid; i < rows; i += kRouteSharedThreads) bias_s[i] = Elem<T>::load(b_in + i);
  for (int i = tid; i < n_buckets; i += kRouteSharedThreads) hist[i] = 0;
  tc::cp_async_wait_all();
  __syncthreads();
  constexpr int kW = kRouteSharedThreads / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kW;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kW + (tid >> 5); m < p.tokens; m += stride) {
    float xf[NV][V];
    load_x<T, NV>(xf, x + m * p.ldx, lane, nvec);
    pin_x(xf);
    int n = 0, my_node = 0;
    float my_logit = 0.f;
    for (int level = 0; level < top; ++level) {  // same arithmetic as route(), rows from shared memory
      Row<T, NV> r;
      load_row_shared<T, NV>(r, rows_s + static_cast<int64_t>(n) * hidden, lane, nvec);
      const float logit = warp_sum(partial_dot<T, NV>(xf, r)) + bias_s[n];
      if (lane == level) {
        my_node = n;
        my_logit = logit;
      }
      if (level < p.depth) n = 2 * n + 1 + (logit > 0.f ? 1 : 0);
    }
    n = route<T, NV>(xf, w_in, b_in, hidden, nvec, lane, top, split, p.depth, n, my_node, my_logit);
    if (lane < split) p.g_top[m * split + lane] = gelu(my_logit);
    if (lane == 0) {
      const int b = n - (n_buckets - 1);
      p.bucket[m] = b;
      atomicAdd(&hist[b], 1);
    }
  }
  __syncthreads();
  for (int i = tid; i < n_buckets; i += kRouteSharedThreads)
    if (hist[i] != 0) atomicAdd(&p.counts[i], hist[i]);
}

// ---------------------------------------------------------------------------------------------------
// kSorted, step 3 (after route_top_kernel and scatter_kernel of kBucketed): the bucket's rows live in
// shared memory. Every token of bucket b went through the same `split` nodes above it and goes on inside
// the subtree below b, so a block that finishes a run of b's tokens needs only
//   w_in and b_in of the subtree (sub = 2^(depth - split + 1) - 1 rows), and
//   w_out of the subtree and of the split ancestors,
// 203 KB at bf16, width 768, depth 11, split 6 (212 KB at fp32 with split 7). One block per SM stages
// them once per bucket with cp.async, then its warps walk tokens with every row read from shared memory:
// x is the only global read per token (prefetched one token ahead where registers allow) and y the only
// write, so the deep rows' L2 traffic of kSingle (0.6 GB at 32768 tokens, bf16) is gone; what remains is
// the CUDA-core arithmetic, which bounds it (about 1100 instructions per token at bf16). Blocks take
// contiguous runs of the sorted order (one or two buckets each). Same arithmetic and order as kSingle:
// same bits.
template <typename T, int NV>
struct SortedThreads {  // 85 registers per thread while x is at most 24 floats per lane, else 128
  static constexpr int value = NV * Elem<T>::kVec <= 24 ? 768 : 512;
};
// Loading the next token's x while the current one is computed costs 4 NV registers; wide rows need them.
template <int NV>
struct SortedPrefetch {
  static constexpr bool value = NV <= 4;
};

__host__ __device__ inline int64_t sorted_subtree_rows(int depth, int split) { return (int64_t{2} << (depth - split)) - 1; }


template <typename T, int NV>
__global__ void __launch_bounds__(SortedThreads<T, NV>::value, 1) sorted_finish_kernel(const Params p, int64_t chunk) {
  constexpr int V = Elem<T>::kVec;
  constexpr int kThr = SortedThreads<T, NV>::value, kW = kThr / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  const int hidden = p.hidden, split = p.split, depth = p.depth;
  const int sub = static_cast<int>(sorted_subtree_rows(depth, split));
  const int n_buckets = 1 << split;
  T* rows_in = reinterpret_cast<T*>(smem);
  T* rows_out = rows_in + static_cast<int64_t>(sub) * hidden;  // sub subtree rows, then the split ancestors
  float* bias_s = reinterpret_cast<float*>(rows_out + static_cast<int64_t>(sub + split) * hidden);
  int* offs = reinterpret_cast<int*>(bias_s + sub);  // n_buckets + 1 exclusive prefix sums of the counts
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const T* __restrict__ w_out = static_cast<const T*>(p.w_out);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nvec = hidden / V;
  const int64_t first_leaf = (int64_t{1} << depth) - 1;

  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = min(begin + chunk, p.tokens);
  if (begin >= end) return;  // block-uniform
  if (warp == 0) {  // bucket offsets, and their end
    const int inclusive = warp_exclusive_scan(p.counts, n_buckets, offs, lane);
    if (lane == 31) offs[n_buckets] = inclusive;
  }
  __syncthreads();
  int b = bucket_at(offs, n_buckets, begin);
  const int nvec16 = static_cast<int>(hidden * sizeof(T) / 16);
  for (int64_t pos = begin; pos < end; ++b) {
    const int64_t seg_end = min(end, static_cast<int64_t>(offs[b + 1]));
    if (seg_end <= pos) continue;  // an empty bucket
    const int root = n_buckets - 1 + b;  // heap index of the bucket node
    __syncthreads();                     // the previous bucket's rows are no longer read
    const int staged = 2 * sub + split;
    for (int i = tid; i < staged * nvec16; i += kThr) {
      const int r = i / nvec16, c = i - r * nvec16;
      const T* src;
      if (r < sub) src = w_in + static_cast<int64_t>(tc::subtree_node(root, r)) * hidden;
      else if (r < 2 * sub) src = w_out + static_cast<int64_t>(tc::subtree_node(root, r - sub)) * hidden;
      else src = w_out + static_cast<int64_t>(((root + 1) >> (split - (r - 2 * sub))) - 1) * hidden;  // ancestor
      tc::cp_async16(reinterpret_cast<uint4*>(rows_in) + i, reinterpret_cast<const uint4*>(src) + c, true);
    }
    tc::cp_async_commit();
    for (int i = tid; i < sub; i += kThr) bias_s[i] = Elem<T>::load(b_in + tc::subtree_node(root, i));
    tc::cp_async_wait_all();
    __syncthreads();

    constexpr bool kPrefetch = SortedPrefetch<NV>::value;
    int64_t q = pos + warp;
    uint4 x_next[kPrefetch ? NV : 1];
    if constexpr (kPrefetch) {
      if (q < seg_end) load_x_raw<T, NV>(x_next, x + static_cast<int64_t>(p.order[q]) * p.ldx, lane, nvec);
    }
    for (; q < seg_end; q += kW) {
      const int64_t m = p.order[q];
      float xf[NV][V];
      if constexpr (kPrefetch) {
#pragma unroll
        for (int c = 0; c < NV; ++c) Elem<T>::unpack(x_next[c], xf[c]);
        if (q + kW < seg_end) load_x_raw<T, NV>(x_next, x + static_cast<int64_t>(p.order[q + kW]) * p.ldx, lane, nvec);
      } else {
        load_x<T, NV>(xf, x + m * p.ldx, lane, nvec);
      }
      pin_x(xf);
      // lane l keeps level l's row slot in rows_out and its GELU value; the top levels come from step 1
      int my_slot = 0;
      float my_g = 0.f, my_logit = 0.f;
      if (lane < split) {
        my_slot = sub + lane;
        my_g = p.g_top[m * split + lane];
      }
      int j = 0;
      for (int level = split; level <= depth; ++level) {
        Row<T, NV> r;
        load_row_shared<T, NV>(r, rows_in + static_cast<int64_t>(j) * hidden, lane, nvec);
        const float logit = warp_sum(partial_dot<T, NV>(xf, r)) + bias_s[j];
        if (lane == level) {
          my_slot = j;
          my_logit = logit;
        }
        if (level < depth) j = 2 * j + 1 + (logit > 0.f ? 1 : 0);
      }
      if (lane >= split) my_g = gelu(my_logit);
      float yf[NV][V];
#pragma unroll
      for (int c = 0; c < NV; ++c)
#pragma unroll
        for (int e = 0; e < V; ++e) yf[c][e] = 0.f;
      for (int level = 0; level <= depth; ++level) {
        const int slot = __shfl_sync(kFullMask, my_slot, level);
        const float g = __shfl_sync(kFullMask, my_g, level);
        Row<T, NV> r;
        load_row_shared<T, NV>(r, rows_out + static_cast<int64_t>(slot) * hidden, lane, nvec);
#pragma unroll
        for (int c = 0; c < NV; ++c) {
          float w[V];
          Elem<T>::unpack(r.v[c], w);
#pragma unroll
          for (int e = 0; e < V; ++e) yf[c][e] = fmaf(g, w[e], yf[c][e]);
        }
      }
      store_y<T, NV>(y + m * hidden, yf, lane, nvec);
      if (lane == 0) p.leaves[m] = tc::subtree_node(root, j) - first_leaf;
    }
    pos = seg_end;
  }
}

// ---------------------------------------------------------------------------------------------------
// kSortedTensor, step 3 (float16 / bfloat16): kSorted's finishing block with both products on tensor cores.
// On CUDA cores every weight element costs a widening and an FMA, and kSorted's finishing kernel was
// issue-bound (about 1100 instructions per token). Here each warp takes 16 tokens of one bucket at a time:
//   logits  L (16 x 32) = X (16 x H, fragments read straight from global memory) W_sub^T (shared) + b,
//   route   one lane per token walks the subtree's 5 levels in L (fp32 logits) and writes its GELU
//           values into G (16 x slots: the subtree nodes, then the split ancestors; zero elsewhere),
//   output  Y (16 x H) = G W_out[slots] (shared), 64 columns at a time, G split into hi + lo halves in
//           the input dtype so that the coefficients keep fp32 accuracy,
// with mma.sync m16n8k16 and fp32 accumulation: about 110 instructions per token. The bucket's subtree
// is at most 5 levels deep (split >= depth - 4), so its rows (32 + up to 48 slots, rows padded by 16 bytes
// so that ldmatrix hits distinct banks) and 16 warps' tiles fit in one block's shared memory (216 KB at
// width 768). Logits are summed in another order than kSorted's, so a near-tie can route differently;
// the tests treat a logit within 1e-5 of sum |x w| of zero as either way, as for kTensorCore.
namespace stc {
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTok = 16;           // tokens per warp group: the mma M
constexpr int kIn = 32;            // logit columns: up to 31 subtree nodes, zero-padded
constexpr int kMaxSlotSteps = 3;   // output slots <= 48 (k steps of 16)
constexpr int kPad = 8;            // elements of row padding (16 bytes)
constexpr int kLStride = kIn + 1;  // fp32 logit tile row
}  // namespace stc

template <typename T>
__global__ void __launch_bounds__(stc::kThreads, 1) sorted_tc_finish_kernel(const Params p, int64_t chunk) {
  using namespace tc;
  extern __shared__ __align__(16) unsigned char smem[];
  const int hidden = p.hidden, split = p.split, depth = p.depth;
  const int sub = (2 << (depth - split)) - 1;
  const int slots = sorted_tc_slots(sub, split);
  const int n_steps = slots / 16;
  const int n_buckets = 1 << split;
  const int stride = hidden + stc::kPad;
  const int gstride = slots + stc::kPad;
  T* rows_in = reinterpret_cast<T*>(smem);                      // [kIn][stride]
  T* rows_out = rows_in + stc::kIn * stride;                      // [slots][stride]
  T* g_tiles = rows_out + slots * stride;                         // per warp: hi, lo [kTok][gstride]
  float* l_tiles = reinterpret_cast<float*>(g_tiles + stc::kWarps * 2 * stc::kTok * gstride);  // [kTok][kLStride]
  float* bias_s = l_tiles + stc::kWarps * stc::kTok * stc::kLStride;  // [kIn]
  int* offs = reinterpret_cast<int*>(bias_s + stc::kIn);             // [n_buckets + 1]
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const T* __restrict__ w_out = static_cast<const T*>(p.w_out);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gq = lane >> 2, tq = lane & 3;  // mma fragment row group and column pair
  const int64_t first_leaf = (int64_t{1} << depth) - 1;
  T* g_hi = g_tiles + warp * 2 * stc::kTok * gstride;
  T* g_lo = g_hi + stc::kTok * gstride;
  float* lt = l_tiles + warp * stc::kTok * stc::kLStride;

  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = min(begin + chunk, p.tokens);
  if (begin >= end) return;  // block-uniform
  if (warp == 0) {  // bucket offsets, and their end
    const int inclusive = warp_exclusive_scan(p.counts, n_buckets, offs, lane);
    if (lane == 31) offs[n_buckets] = inclusive;
  }
  __syncthreads();
  int b = bucket_at(offs, n_buckets, begin);
  const int pieces = hidden / 8;  // 16-byte pieces per row
  for (int64_t pos = begin; pos < end; ++b) {
    const int64_t seg_end = min(end, static_cast<int64_t>(offs[b + 1]));
    if (seg_end <= pos) continue;
    const int root = n_buckets - 1 + b;
    __syncthreads();  // the previous bucket's rows are no longer read
    for (int i = tid; i < (stc::kIn + slots) * pieces; i += stc::kThreads) {
      const int r = i / pieces, c = (i - r * pieces) * 8;
      const T* src = nullptr;
      if (r < stc::kIn) {
        if (r < sub) src = w_in + static_cast<int64_t>(subtree_node(root, r)) * hidden;
      } else if (r - stc::kIn < sub) {
        src = w_out + static_cast<int64_t>(subtree_node(root, r - stc::kIn)) * hidden;
      } else if (r - stc::kIn < sub + split) {
        src = w_out + static_cast<int64_t>(((root + 1) >> (split - (r - stc::kIn - sub))) - 1) * hidden;  // ancestor
      }
      cp_async16(rows_in + r * stride + c, src != nullptr ? src + c : w_in, src != nullptr);  // zero rows pad
    }
    cp_async_commit();
    if (tid < stc::kIn) bias_s[tid] = tid < sub ? Elem<T>::load(b_in + subtree_node(root, tid)) : 0.f;
    cp_async_wait_all();
    __syncthreads();

    const int64_t n_groups = (seg_end - pos + stc::kTok - 1) / stc::kTok;
    for (int64_t group = warp; group < n_groups; group += stc::kWarps) {
      const int64_t q0 = pos + group * stc::kTok;
      const int64_t m_a = q0 + gq < seg_end ? p.order[q0 + gq] : -1;          // token of fragment row gq
      const int64_t m_b = q0 + gq + 8 < seg_end ? p.order[q0 + gq + 8] : -1;  // and of row gq + 8
      const unsigned* xa = reinterpret_cast<const unsigned*>(x + (m_a >= 0 ? m_a : 0) * p.ldx);
      const unsigned* xb = reinterpret_cast<const unsigned*>(x + (m_b >= 0 ? m_b : 0) * p.ldx);
      // --- logits: L = X W_sub^T ------------------------------------------------------------------
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
      // x fragments come straight from global memory, kKc k steps at a time, the next batch in flight while
      // the current one multiplies (one batch per global round trip instead of one k step)
      constexpr int kKc = 6;
      unsigned cur[kKc][4], nxt[kKc][4];
      auto load_batch = [&](unsigned (&a)[kKc][4], int k_first) {
#pragma unroll
        for (int u = 0; u < kKc; ++u) {
          const int kk = k_first + 16 * u;
          const int k2 = (kk >> 1) + tq;  // the element pair (kk + 2 tq, kk + 2 tq + 1)
          const bool in = kk < hidden;
          a[u][0] = in && m_a >= 0 ? __ldg(xa + k2) : 0u;
          a[u][1] = in && m_b >= 0 ? __ldg(xb + k2) : 0u;
          a[u][2] = in && m_a >= 0 ? __ldg(xa + k2 + 4) : 0u;
          a[u][3] = in && m_b >= 0 ? __ldg(xb + k2 + 4) : 0u;
        }
      };
      load_batch(cur, 0);
      for (int k0 = 0; k0 < hidden; k0 += 16 * kKc) {
        if (k0 + 16 * kKc < hidden) load_batch(nxt, k0 + 16 * kKc);
#pragma unroll
        for (int u = 0; u < kKc; ++u) {
          const int kk = k0 + 16 * u;
          if (kk < hidden) {
#pragma unroll
            for (int np = 0; np < 2; ++np) {
              unsigned bf[4];
              ldmatrix_x4(bf, rows_in + (np * 16 + (lane & 7) + 8 * (lane >> 4)) * stride + kk + 8 * ((lane >> 3) & 1));
              Mma<T>::run(acc[2 * np], cur[u], bf[0], bf[1]);
              Mma<T>::run(acc[2 * np + 1], cur[u], bf[2], bf[3]);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kKc; ++u)
#pragma unroll
          for (int i = 0; i < 4; ++i) cur[u][i] = nxt[u][i];
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int col = nt * 8 + 2 * tq;
        lt[gq * stc::kLStride + col] = acc[nt][0] + bias_s[col];
        lt[gq * stc::kLStride + col + 1] = acc[nt][1] + bias_s[col + 1];
        lt[(gq + 8) * stc::kLStride + col] = acc[nt][2] + bias_s[col];
        lt[(gq + 8) * stc::kLStride + col + 1] = acc[nt][3] + bias_s[col + 1];
      }
      for (int i = lane; i < stc::kTok * gstride * 2 / 8; i += 32)  // G hi and lo back to zero
        reinterpret_cast<uint4*>(g_hi)[i] = make_uint4(0u, 0u, 0u, 0u);
      __syncwarp();
      // --- route: lane i walks token i of the group ------------------------------------------------
      if (lane < stc::kTok && q0 + lane < seg_end) {
        const int64_t m = p.order[q0 + lane];
        int j = 0;
        for (int level = split; level <= depth; ++level) {
          const float logit = lt[lane * stc::kLStride + j];
          const float g = gelu(logit);
          const T h = Mma<T>::from(g);
          g_hi[lane * gstride + j] = h;
          g_lo[lane * gstride + j] = Mma<T>::from(g - Mma<T>::to(h));
          if (level < depth) j = 2 * j + 1 + (logit > 0.f ? 1 : 0);  // left on <= 0 and NaN
        }
        for (int l = 0; l < split; ++l) {  // the ancestors' GELU values, from step 1
          const float g = p.g_top[m * split + l];
          const T h = Mma<T>::from(g);
          g_hi[lane * gstride + sub + l] = h;
          g_lo[lane * gstride + sub + l] = Mma<T>::from(g - Mma<T>::to(h));
        }
        p.leaves[m] = subtree_node(root, j) - first_leaf;
      }
      __syncwarp();
      // --- output: Y = G W_out[slots], 64 columns at a time -----------------------------------------
      unsigned a_hi[stc::kMaxSlotSteps][4], a_lo[stc::kMaxSlotSteps][4];
#pragma unroll
      for (int ks = 0; ks < stc::kMaxSlotSteps; ++ks) {
        if (ks < n_steps) {
          ldmatrix_x4(a_hi[ks], g_hi + (lane & 15) * gstride + ks * 16 + 8 * (lane >> 4));
          ldmatrix_x4(a_lo[ks], g_lo + (lane & 15) * gstride + ks * 16 + 8 * (lane >> 4));
        }
      }
      for (int c0 = 0; c0 < hidden; c0 += 64) {
        float out[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) out[i][j] = 0.f;
#pragma unroll
        for (int ks = 0; ks < stc::kMaxSlotSteps; ++ks) {
          if (ks < n_steps) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
              if (c0 + np * 16 < hidden) {
                unsigned bf[4];
                ldmatrix_x4_trans(bf, rows_out + (ks * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * stride + c0 + np * 16 + 8 * (lane >> 4));
                Mma<T>::run(out[2 * np], a_hi[ks], bf[0], bf[1]);
                Mma<T>::run(out[2 * np], a_lo[ks], bf[0], bf[1]);
                Mma<T>::run(out[2 * np + 1], a_hi[ks], bf[2], bf[3]);
                Mma<T>::run(out[2 * np + 1], a_lo[ks], bf[2], bf[3]);
              }
            }
          }
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int col = c0 + nt * 8 + 2 * tq;
          if (col < hidden) {
            if (m_a >= 0) *reinterpret_cast<unsigned*>(y + m_a * hidden + col) = Elem<T>::pack2(out[nt][0], out[nt][1]);
            if (m_b >= 0) *reinterpret_cast<unsigned*>(y + m_b * hidden + col) = Elem<T>::pack2(out[nt][2], out[nt][3]);
          }
        }
      }
      __syncwarp();  // this warp's tiles are rewritten by its next group
    }
    pos = seg_end;
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

// Raise a kernel's dynamic shared memory limit once per device (needed above 48 KB).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, int (&done)[64]) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 64 || done[device] >= static_cast<int>(bytes)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  done[device] = static_cast<int>(bytes);
}

// Step 2 of every bucketed strategy: one thread per token (at most 8 blocks per SM, grid-stride beyond),
// the bucket offsets in shared memory.
inline void launch_scatter(const Params& p, cudaStream_t stream) {
  const int64_t blocks = (p.tokens + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(p.num_sms) * 8;
  scatter_kernel<<<blocks < cap ? blocks : cap, kThreads, sizeof(int) * (size_t{1} << p.split), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Steps 1 and 2 of the sorted strategies: route the top `split` levels (their rows in shared memory as far
// as they fit), then the counting sort.
template <typename T, int NV>
void launch_route_and_sort(const Params& p, cudaStream_t stream) {
  const int n_buckets = 1 << p.split;
  const size_t hist_bytes = sizeof(int) * n_buckets;
  C10_CUDA_CHECK(cudaMemsetAsync(p.counts, 0, 2 * hist_bytes, stream));
  int top = p.split;  // the deepest top block of levels whose rows fit beside the histogram
  while (top > 0 && route_shared_bytes(top, p.split, p.hidden, sizeof(T)) > kRouteSharedBudget) --top;
  if (top >= 2) {
    const auto route_kernel = route_top_shared_kernel<T, NV>;
    const size_t route_smem = static_cast<size_t>(route_shared_bytes(top, p.split, p.hidden, sizeof(T)));
    static int route_done[64] = {};
    allow_smem(route_kernel, route_smem, route_done);
    const int64_t wanted = (p.tokens + 31) / 32;
    route_kernel<<<wanted < p.num_sms ? wanted : p.num_sms, RouteSharedThreads<T, NV>::value, route_smem, stream>>>(p, top);
  } else {
    static int route_per_sm = 0;
    const auto route_kernel = route_top_kernel<T, NV>;
    route_kernel<<<token_grid(route_kernel, p, hist_bytes, route_per_sm), kThreads, hist_bytes, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_scatter(p, stream);
}

// Contiguous runs of the sorted tokens, at least 64 per block so that staging a bucket's rows pays off.
inline int64_t sorted_chunk(const Params& p, int per_sm) {
  const int64_t max_blocks = static_cast<int64_t>(per_sm) * p.num_sms;
  const int64_t wanted = (p.tokens + 63) / 64;
  const int64_t blocks = wanted < max_blocks ? wanted : max_blocks;
  return (p.tokens + blocks - 1) / blocks;
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
      launch_scatter(p, stream);
      const auto finish = finish_kernel<T, NV>;
      const int64_t blocks = token_grid(finish, p, 0, finish_per_sm);
      const int64_t chunk = (p.tokens + blocks - 1) / blocks;
      finish<<<(p.tokens + chunk - 1) / chunk, kThreads, 0, stream>>>(p, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    case kCluster: {
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(static_cast<unsigned>(p.tokens * cl::kBlocks));
      config.blockDim = dim3(cl::kThreads);
      config.stream = stream;
      cudaLaunchAttribute attribute[1];
      attribute[0].id = cudaLaunchAttributeClusterDimension;
      attribute[0].val.clusterDim.x = cl::kBlocks;
      attribute[0].val.clusterDim.y = 1;
      attribute[0].val.clusterDim.z = 1;
      config.attrs = attribute;
      config.numAttrs = 1;
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, cluster_kernel<T, NV>, p));
      break;
    }
    case kSubtree: {
      subtree_kernel<T, NV><<<p.tokens, st::kThreads, 0, stream>>>(p);  // one block per token
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    case kSorted: {
      launch_route_and_sort<T, NV>(p, stream);
      const auto finish = sorted_finish_kernel<T, NV>;
      constexpr int threads = SortedThreads<T, NV>::value;
      const size_t smem = static_cast<size_t>(sorted_smem_bytes(p.depth, p.split, p.hidden, sizeof(T)));
      static int smem_done[64] = {};
      allow_smem(finish, smem, smem_done);
      static size_t occupancy_smem = 0;  // blocks per SM for the last shared-memory size asked (host cache)
      static int per_sm = 0;
      if (occupancy_smem != smem) {
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, finish, threads, smem));
        occupancy_smem = smem;
      }
      TORCH_CHECK(per_sm > 0, "hf_fff CUDA: the sorted strategy's rows do not fit in shared memory; use a deeper split");
      const int64_t chunk = sorted_chunk(p, per_sm);
      finish<<<(p.tokens + chunk - 1) / chunk, threads, smem, stream>>>(p, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    default:
      TORCH_CHECK(false, "hf_fff CUDA: unknown strategy (", std::to_string(p.strategy), ")");
  }
}

template <typename T>
void launch_sorted_tensor(const Params& p, cudaStream_t stream) {
  launch_route_and_sort<T, 3>(p, stream);  // NV only sizes step 1's registers: take hidden <= 768's
  const auto finish = sorted_tc_finish_kernel<T>;
  const size_t smem = static_cast<size_t>(sorted_tc_smem_bytes(p.depth, p.split, p.hidden));
  static int smem_done[64] = {};
  allow_smem(finish, smem, smem_done);
  const int64_t chunk = sorted_chunk(p, 1);
  finish<<<(p.tokens + chunk - 1) / chunk, stc::kThreads, smem, stream>>>(p, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  launch_scatter(p, stream);
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
  if (p.strategy == kTensorCore || p.strategy == kSortedTensor) {
    if constexpr (std::is_same<T, float>::value) {
      TORCH_CHECK(false, "hf_fff CUDA: the tensor-core strategies take float16 or bfloat16");
    } else if (p.strategy == kTensorCore) {
      launch_tensor_core<T>(p, stream);
    } else {
      launch_sorted_tensor<T>(p, stream);
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

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
//   - kSorted (many tokens, one tree, fp32): route the top `split` levels, sort tokens by the node
//     reached (counting sort: histogram, scan, scatter; kSorted's in the routing kernel itself, a cooperative
//     launch), then finish each bucket together with the bucket's rows held in shared
//     memory (two tokens of the bucket per warp, reading the rows they share once, and on Hopper
//     two buckets' rows in turn, refilled by tensor copies while the warps work).
//   - kStaged (many tokens): the one-warp walk with two tokens per warp and the top levels' rows held in
//     shared memory, routing dot products on tensor cores at 16 bits (latency, not issue or L2, bounds the
//     walk at 32768 tokens once its instructions are trimmed: more chains in flight is what pays).
//   See benchmarks/results_cuda.md for the profiles behind each choice.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdlib>
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

// Zero a register array: accumulators of the output rows and of the mma tiles (fully unrolled, so the array
// stays in registers).
template <int N>
__device__ __forceinline__ void zero(float (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) a[i] = 0.f;
}
template <int N, int M>
__device__ __forceinline__ void zero(float (&a)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i) zero(a[i]);
}

// ---------------------------------------------------------------------------------------------------
// Fast path: a row is NV 16-byte vectors per lane; vector c of lane l covers elements
// [(32 c + l) * kVec, (32 c + l + 1) * kVec). Vectors past the row end (nvec = hidden / kVec) read as 0.
template <typename T, int NV>
struct Row {
  uint4 v[NV];
};

// Rows come from global memory through the read-only path, or from shared memory where a block staged them.
enum class From { kGlobal, kShared };

// Vectors [0, AlwaysInside) of every lane lie inside the row: vectors_for() (fff_cuda.cpp) picks the smallest
// NV of {1, 2, 3, 4, 6, 8} that covers the row, so only the last one (NV <= 4) or two (NV = 6, 8) may not.
template <int NV>
struct AlwaysInside {
  static constexpr int value = NV <= 4 ? NV - 1 : NV - 2;
};

// Vectors past the row end read as zeros. Only the last one or two vectors of a lane can be past it, so only
// those loads are predicated and zero-filled: doing so for every vector cost 10-16 instructions per row (about
// 15% of kSorted's finishing instructions at bf16). `at` points at this lane's first vector of the row.
template <int NV, From kFrom = From::kGlobal>
__device__ __forceinline__ void load_lane_row(uint4 (&r)[NV], const uint4* at, int lane, int nvec) {
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    const bool inside = c < AlwaysInside<NV>::value || c * 32 + lane < nvec;
    if constexpr (kFrom == From::kGlobal) r[c] = inside ? __ldg(at + c * 32) : make_uint4(0u, 0u, 0u, 0u);
    else r[c] = inside ? at[c * 32] : make_uint4(0u, 0u, 0u, 0u);
  }
}

template <typename T, int NV, From kFrom = From::kGlobal>
__device__ __forceinline__ void load_row(Row<T, NV>& r, const T* row, int lane, int nvec) {
  load_lane_row<NV, kFrom>(r.v, reinterpret_cast<const uint4*>(row) + lane, lane, nvec);
}

// This lane's first vector of row n, from its first vector of row 0 (`lane_base` = matrix + lane vectors): node
// indices and row lengths are non-negative 32-bit values, so this is one 32 x 32 + 64-bit multiply-add, where
// forming the row's address from a signed 64-bit product and then adding the lane cost about 8 more
// instructions per row visited.
__device__ __forceinline__ const uint4* lane_row(const uint4* lane_base, int n, int nvec) {
  return lane_base + static_cast<uint64_t>(static_cast<uint32_t>(n)) * static_cast<uint32_t>(nvec);
}

// A row's 16-byte vectors (nvec). kFull: the row is exactly NV vectors per lane (hidden = 32 NV kVec, as at width
// 768 for every dtype), and a compile-time nvec lets the compiler drop every bounds test and zero fill of
// load_lane_row, load_x and store_y (the kernels that take kFull are instantiated both ways; with_full() picks).
template <typename T, int NV, bool kFull>
__device__ __forceinline__ int row_vectors(int hidden) {
  return kFull ? NV * 32 : hidden / Elem<T>::kVec;
}

// Row n of a matrix of rows of `hidden` elements (the same 32-bit reasoning as lane_row).
template <typename T>
__device__ __forceinline__ const T* row_at(const T* base, int n, int hidden) {
  return base + static_cast<uint64_t>(static_cast<uint32_t>(n)) * static_cast<uint32_t>(hidden);
}

// x widened to fp32. Read once by default (evict first); kReused keeps it cached for the few-token kernels,
// whose warps all read the same token's x.
enum class XUse { kOnce, kReused };

template <typename T, int NV, XUse kUse = XUse::kOnce>
__device__ __forceinline__ void load_x(float (&xf)[NV][Elem<T>::kVec], const T* row, int lane, int nvec) {
  const uint4* p = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    const int v = c * 32 + lane;
    if constexpr (kUse == XUse::kOnce) {  // (two spellings of one load: each compiles to the code measured)
      const uint4 raw = v < nvec ? __ldcs(p + v) : make_uint4(0u, 0u, 0u, 0u);
      Elem<T>::unpack(raw, xf[c]);
    } else {
      Elem<T>::unpack(v < nvec ? __ldg(p + v) : make_uint4(0u, 0u, 0u, 0u), xf[c]);
    }
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
// level < depth, else the node itself). dot(row) is x . row, the same in every lane; the rows come from global
// memory, or (kShared) from a copy in shared memory laid out the same way.
template <typename T, int NV, From kFrom, typename Dot>
__device__ __forceinline__ int walk_levels(Dot dot, const T* __restrict__ w_in, const T* __restrict__ b_in, int nvec,
                                           int lane, int level_begin, int level_end, int depth, int n, int& my_node,
                                           float& my_logit) {
  const uint4* w_lane = reinterpret_cast<const uint4*>(w_in) + lane;
  for (int level = level_begin; level < level_end; ++level) {
    Row<T, NV> r;
    load_lane_row<NV, kFrom>(r.v, lane_row(w_lane, n, nvec), lane, nvec);
    const float bias = Elem<T>::load(b_in + n);
    const float logit = dot(r) + bias;
    if (lane == level) {
      my_node = n;
      my_logit = logit;
    }
    if (level < depth) n = 2 * n + 1 + (logit > 0.f ? 1 : 0);  // left on <= 0 (and on NaN, as torch)
  }
  return n;
}

// walk_levels with x widened to fp32 in registers and the CUDA-core dot (global rows).
template <typename T, int NV>
__device__ __forceinline__ int route(const float (&xf)[NV][Elem<T>::kVec], const T* __restrict__ w_in,
                                     const T* __restrict__ b_in, int nvec, int lane, int level_begin, int level_end,
                                     int depth, int n, int& my_node, float& my_logit) {
  return walk_levels<T, NV, From::kGlobal>([&](const Row<T, NV>& r) { return warp_sum(partial_dot<T, NV>(xf, r)); },
                                           w_in, b_in, nvec, lane, level_begin, level_end, depth, n, my_node, my_logit);
}

__device__ __forceinline__ void prefetch_l1(const void* ptr) { asm volatile("prefetch.global.L1 [%0];\n" ::"l"(ptr)); }

// Bring `n_rows` consecutive rows into this SM's L1 (128-byte lines spread over the lanes).
template <typename T>
__device__ __forceinline__ void prefetch_rows(const T* base, int64_t first_row, int n_rows, int hidden, int lane) {
  const char* start = reinterpret_cast<const char*>(base + first_row * hidden);
  const int64_t bytes = static_cast<int64_t>(n_rows) * hidden * sizeof(T);
  for (int64_t off = static_cast<int64_t>(lane) * 128; off < bytes; off += 32 * 128) prefetch_l1(start + off);
}

// y += g * row for one level's w_out row (already loaded).
template <typename T, int NV>
__device__ __forceinline__ void axpy_row(float (&yf)[NV][Elem<T>::kVec], float g, const Row<T, NV>& r) {
  constexpr int V = Elem<T>::kVec;
#pragma unroll
  for (int c = 0; c < NV; ++c) {
    float w[V];
    Elem<T>::unpack(r.v[c], w);
#pragma unroll
    for (int e = 0; e < V; ++e) yf[c][e] = fmaf(g, w[e], yf[c][e]);
  }
}

// y += sum over levels [level_begin, level_end) of g(level) * w_out[node(level)], where lane `level` holds node
// and g, in level order (so splitting the levels over calls leaves the sum bitwise the same).
// U levels per step: their U * NV loads are independent and in flight together; the levels that do not fill a
// last step go one at a time (a guarded step would cost each row a predicated load and zeroing).
template <typename T, int NV, From kFrom = From::kGlobal>
__device__ __forceinline__ void accumulate_out(float (&yf)[NV][Elem<T>::kVec], const T* __restrict__ w_out, int nvec,
                                               int lane, int level_begin, int level_end, int my_node, float my_g) {
  constexpr int U = NV <= 2 ? 4 : (NV <= 4 ? 2 : 1);  // levels whose loads are in flight together
  const uint4* w_lane = reinterpret_cast<const uint4*>(w_out) + lane;
  int level0 = level_begin;
  for (; level0 + U <= level_end; level0 += U) {
    Row<T, NV> r[U];
    float g[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int node = __shfl_sync(kFullMask, my_node, level0 + u);
      g[u] = __shfl_sync(kFullMask, my_g, level0 + u);
      load_lane_row<NV, kFrom>(r[u].v, lane_row(w_lane, node, nvec), lane, nvec);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) axpy_row<T, NV>(yf, g[u], r[u]);
  }
  for (; level0 < level_end; ++level0) {
    const int node = __shfl_sync(kFullMask, my_node, level0);
    const float g = __shfl_sync(kFullMask, my_g, level0);
    Row<T, NV> r;
    load_lane_row<NV, kFrom>(r.v, lane_row(w_lane, node, nvec), lane, nvec);
    axpy_row<T, NV>(yf, g, r);
  }
}

// ---------------------------------------------------------------------------------------------------
// Shared memory: asynchronous 16-byte copies into it, and the heap indices of a subtree staged there.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy that bypasses L1; src_bytes 0 writes zeros (padding rows and columns).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Global heap index of slot j of the subtree rooted at `root`: j at local level l has root * 2^l + j.
__device__ __forceinline__ int subtree_node(int root, int j) {
  const int level = 31 - __clz(j + 1);
  return (root << level) + j;
}

// ---------------------------------------------------------------------------------------------------
// kSingle: one warp per token, all trees, one launch.
// Blocks per SM the walk is compiled for. At width 768 the bf16 walk fits 80 registers (3 blocks) as long as x is
// left for the compiler to keep packed (widened again at each level); pinning it widened spilled (125 -> 157 us
// at 32768 tokens). The fp16 walk spills at 80 registers either way, so it gets 104 at 2 blocks (151 -> 135 us).
template <typename T, int NV>
struct SingleMinBlocks {
  static constexpr int value = std::is_same<T, __half>::value && NV == 3 ? 2 : MinBlocks<NV>::value;
};

template <typename T, int NV>
__global__ void __launch_bounds__(kThreads, SingleMinBlocks<T, NV>::value) single_kernel(const Params p) {
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

// Bucket offsets (exclusive scan of the counts, and the total at [n_buckets]) into shared memory, by warp 0.
__device__ __forceinline__ void bucket_offsets(const Params& p, int n_buckets, int* offs) {
  if (threadIdx.x < 32) {
    const int total = warp_exclusive_scan(p.counts, n_buckets, offs, threadIdx.x);
    if (threadIdx.x == 31) offs[n_buckets] = total;
  }
}

// This block's run of positions: [begin, end), `run` positions per block.
struct Run {
  int64_t begin, end;
};
__device__ __forceinline__ Run block_run(const Params& p, int64_t run) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * run;
  return {begin, begin + run < p.tokens ? begin + run : p.tokens};
}

// A block's buckets, in order: positions [pos, end) of its run in bucket b (empty buckets skipped).
struct Segment {
  int b;
  int64_t pos, end;
};
// Past the run's end (pos >= r.end) a segment is empty, {b, r.end, r.end}, and stays so: offs is not read past it.
__device__ __forceinline__ Segment settle(const int* offs, const Run& r, int b, int64_t pos) {
  if (pos >= r.end) return {b, r.end, r.end};
  while (offs[b + 1] <= pos) ++b;  // ends at b < n_buckets: offs[n_buckets] = total >= r.end > pos
  return {b, pos, min(r.end, static_cast<int64_t>(offs[b + 1]))};
}
__device__ __forceinline__ Segment first_segment(const int* offs, int n_buckets, const Run& r) {
  return settle(offs, r, bucket_at(offs, n_buckets, r.begin), r.begin);
}
__device__ __forceinline__ Segment next_segment(const int* offs, const Run& r, const Segment& s) {
  return settle(offs, r, s.b + 1, s.end);
}

// Step 2 after a step 1 that ranked each token within its bucket among its block's tokens (kSorted's shared-
// memory routing, kTensorCore): order[offset[bucket] + block_base[block][bucket] + rank] = token, no
// atomics. Token m was routed by block (m / per) % blocks.
__global__ void __launch_bounds__(kThreads) scatter_ranked_kernel(const Params p, int64_t per, int64_t blocks) {
  extern __shared__ int offset[];
  const int n_buckets = 1 << p.split;
  if (threadIdx.x < 32) warp_exclusive_scan(p.counts, n_buckets, offset, threadIdx.x & 31);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; m < p.tokens; m += stride) {
    const int b = p.bucket[m];
    p.order[offset[b] + p.block_base[(m / per) % blocks * n_buckets + b] + p.rank[m]] = static_cast<int>(m);
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
  load_x<T, NV, XUse::kReused>(xf, static_cast<const T*>(p.x) + m * p.ldx, lane, nvec);
  float yv[V];
  zero(yv);

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
            const int node = subtree_node(n, j);
            load_row<T, NV>(rows[k], row_at(tw_in, node, p.hidden), lane, nvec);
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
          const int node = subtree_node(n, j);
          Row<T, NV> row;
          load_row<T, NV>(row, row_at(tw_in, node, p.hidden), lane, nvec);
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
          path_node[level0 + d] = subtree_node(n, j);
          path_g[level0 + d] = l;  // the logit for now: GELU below, off the serial walk
          if (level0 + d < depth) j = 2 * j + 1 + (l > 0.f ? 1 : 0);  // left on <= 0 and NaN
        }
        logit_s[parity][cl::kRoundNodes] = __int_as_float(subtree_node(n, j));  // next round's root
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
  return rows * hidden * element_size + 4 * rows + 2 * 4 * (int64_t{1} << split);  // rows, biases, hist, offsets
}

// kFusedSort (launched cooperatively, one block per SM): the counting sort's steps run in the same kernel behind two
// grid-wide barriers instead of a memset before and a scatter kernel after: block 0 zeroes the counts while the rows
// stage; after the first barrier every block adds its histogram to them (its first rank per bucket, kept in shared
// memory); after the second it scatters its own tokens. The barriers cost about what the two launches did, so the
// gain is small (H200, fp32 32768 tokens: -1.3 to -1.6 us; benchmarks/results_cuda.md, item 20).
template <typename T, int NV, bool kFull, bool kFusedSort>
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
  const int nvec = row_vectors<T, NV, kFull>(hidden);
  const int nvec16 = static_cast<int>(hidden * sizeof(T) / 16);
  for (int i = tid; i < rows * nvec16; i += kRouteSharedThreads)  // the top rows are contiguous in w_in
    cp_async16(reinterpret_cast<uint4*>(rows_s) + i, reinterpret_cast<const uint4*>(w_in) + i, true);
  cp_async_commit();
  for (int i = tid; i < rows; i += kRouteSharedThreads) bias_s[i] = Elem<T>::load(b_in + i);
  for (int i = tid; i < n_buckets; i += kRouteSharedThreads) hist[i] = 0;
  if (kFusedSort && blockIdx.x == 0)
    for (int i = tid; i < n_buckets; i += kRouteSharedThreads) p.counts[i] = 0;  // read after the first grid barrier
  cp_async_wait_all();
  __syncthreads();
  // Each block routes one contiguous run of ceil(tokens / blocks) tokens, its warps taking every kW-th: the SMs get
  // equal shares (with warps striding over the whole grid, 100 of 132 blocks routed 256 tokens and 32 routed 224 at
  // 32768 tokens: -1.0 us measured on an H200, benchmarks/results_cuda.md item 21).
  constexpr int kW = kRouteSharedThreads / 32;
  const int64_t per_block = (p.tokens + gridDim.x - 1) / gridDim.x;
  const int64_t run_begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t run_end = run_begin + per_block < p.tokens ? run_begin + per_block : p.tokens;
  for (int64_t m = run_begin + (tid >> 5); m < run_end; m += kW) {
    float xf[NV][V];
    load_x<T, NV>(xf, x + m * p.ldx, lane, nvec);
    pin_x(xf);
    int n = 0, my_node = 0;
    float my_logit = 0.f;
    for (int level = 0; level < top; ++level) {  // same arithmetic as route(), rows from shared memory
      Row<T, NV> r;
      load_row<T, NV, From::kShared>(r, rows_s + static_cast<int64_t>(n) * hidden, lane, nvec);
      const float logit = warp_sum(partial_dot<T, NV>(xf, r)) + bias_s[n];
      if (lane == level) {
        my_node = n;
        my_logit = logit;
      }
      if (level < p.depth) n = 2 * n + 1 + (logit > 0.f ? 1 : 0);
    }
    n = route<T, NV>(xf, w_in, b_in, nvec, lane, top, split, p.depth, n, my_node, my_logit);
    if (lane < split) p.g_top[m * split + lane] = gelu(my_logit);
    if (lane == 0) {
      const int b = n - (n_buckets - 1);
      p.bucket[m] = b;
      p.rank[m] = atomicAdd(&hist[b], 1);  // rank among this block's tokens of the bucket
    }
  }
  if constexpr (kFusedSort) {
    namespace cg = cooperative_groups;
    cg::grid_group grid = cg::this_grid();
    grid.sync();  // the counts are zero and every block's histogram complete
    for (int i = tid; i < n_buckets; i += kRouteSharedThreads)  // hist becomes this block's first rank in each bucket
      hist[i] = hist[i] != 0 ? atomicAdd(&p.counts[i], hist[i]) : 0;
    grid.sync();  // the counts are final
    int* const offset = hist + n_buckets;
    if (tid < 32) warp_exclusive_scan(p.counts, n_buckets, offset, lane);
    __syncthreads();
    for (int64_t m = run_begin + tid; m < run_end; m += kRouteSharedThreads) {  // this block's tokens
      const int b = p.bucket[m];
      p.order[offset[b] + hist[b] + p.rank[m]] = static_cast<int>(m);
    }
  } else {
    __syncthreads();
    for (int i = tid; i < n_buckets; i += kRouteSharedThreads)  // this block's first rank in each bucket
      p.block_base[static_cast<int64_t>(blockIdx.x) * n_buckets + i] = hist[i] != 0 ? atomicAdd(&p.counts[i], hist[i]) : 0;
  }
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
// the CUDA-core arithmetic (about 1860 warp instructions per token at bf16 by Nsight Compute, ~9% fewer
// since the row loads were trimmed: benchmarks/results_cuda.md, item 14). Blocks take contiguous runs of
// the sorted order (one or two buckets each under uniform routing). Routing far from
// uniform (an encoder's own FFF inputs) leaves many small buckets, each of which would cost a run a restage
// of ~200 KB behind two barriers: at 16-bit, buckets under kSortedStageMin tokens are left to a second pass
// that reads their rows through L1/L2. Same arithmetic and order as kSingle: same bits.
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

// Copy bucket `root`'s rows into shared memory with the whole block: rows_in holds the subtree's w_in rows (sub,
// heap order below the bucket node), then its w_out rows (sub), then the w_out rows of the split ancestors (level
// order); bias_s the subtree's biases. The caller puts a barrier before (the previous rows are no longer read) and
// after.
template <typename T>
__device__ __forceinline__ void stage_bucket_rows(T* rows_in, float* bias_s, const T* __restrict__ w_in,
                                                  const T* __restrict__ b_in, const T* __restrict__ w_out, int root,
                                                  int sub, int split, int hidden) {
  const int nvec16 = static_cast<int>(hidden * sizeof(T) / 16);
  const int staged = 2 * sub + split;
  for (int i = threadIdx.x; i < staged * nvec16; i += blockDim.x) {
    const int r = i / nvec16, c = i - r * nvec16;
    const T* src;
    if (r < sub) src = w_in + static_cast<int64_t>(subtree_node(root, r)) * hidden;
    else if (r < 2 * sub) src = w_out + static_cast<int64_t>(subtree_node(root, r - sub)) * hidden;
    else src = w_out + static_cast<int64_t>(((root + 1) >> (split - (r - 2 * sub))) - 1) * hidden;  // ancestor
    cp_async16(reinterpret_cast<uint4*>(rows_in) + i, reinterpret_cast<const uint4*>(src) + c, true);
  }
  cp_async_commit();
  for (int i = threadIdx.x; i < sub; i += blockDim.x) bias_s[i] = Elem<T>::load(b_in + subtree_node(root, i));
  cp_async_wait_all();
}

// A finishing block's shared memory: the bucket's rows in stage_bucket_rows' layout, the subtree's biases and the
// n_buckets + 1 bucket offsets (exclusive prefix sums of the counts; sorted_smem_bytes in fff_cuda.h).
template <typename T>
struct SortedSmem {
  T* rows_in;   // sub subtree w_in rows
  T* rows_out;  // sub subtree w_out rows, then the split ancestors'
  float* bias;  // sub
  int* offs;    // n_buckets + 1
  __device__ SortedSmem(unsigned char* smem, int sub, int split, int hidden)
      : rows_in(reinterpret_cast<T*>(smem)),
        rows_out(rows_in + static_cast<int64_t>(sub) * hidden),
        bias(reinterpret_cast<float*>(rows_out + static_cast<int64_t>(sub + split) * hidden)),
        offs(reinterpret_cast<int*>(bias + sub)) {}
};

// Go through this block's run of the sorted tokens bucket by bucket: stage the bucket's rows (behind a barrier,
// since the previous bucket's are no longer read, and before one), then finish(pos, seg_end, root) for the run's
// positions [pos, seg_end) in that bucket, whose node is `root`. With skip_small, buckets of fewer than
// kSortedStageMin tokens are passed over (returned: whether there was one). s.offs must be filled.
template <typename T, typename Finish>
__device__ __forceinline__ void for_each_staged_bucket(const Params& p, const Run& r, const SortedSmem<T>& s, int sub,
                                                       Finish finish) {
  const int n_buckets = 1 << p.split;
  for (Segment seg = first_segment(s.offs, n_buckets, r); seg.pos < r.end; seg = next_segment(s.offs, r, seg)) {
    const int root = n_buckets - 1 + seg.b;  // heap index of the bucket node
    __syncthreads();
    stage_bucket_rows<T>(s.rows_in, s.bias, static_cast<const T*>(p.w_in), static_cast<const T*>(p.b_in),
                         static_cast<const T*>(p.w_out), root, sub, p.split, p.hidden);
    __syncthreads();
    finish(seg.pos, seg.end, root);
  }
}

template <typename T, int NV>
__global__ void __launch_bounds__(SortedThreads<T, NV>::value, 1) sorted_finish_kernel(const Params p, int64_t chunk) {
  constexpr int V = Elem<T>::kVec;
  constexpr int kThr = SortedThreads<T, NV>::value, kW = kThr / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  const int hidden = p.hidden, split = p.split, depth = p.depth;
  const int sub = static_cast<int>(sorted_subtree_rows(depth, split));
  const int n_buckets = 1 << split;
  const SortedSmem<T> s(smem, sub, split, hidden);
  const T* rows_in = s.rows_in;
  const T* rows_out = s.rows_out;
  const float* bias_s = s.bias;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nvec = hidden / V;
  const int64_t first_leaf = (int64_t{1} << depth) - 1;

  const Run r = block_run(p, chunk);
  if (r.begin >= r.end) return;  // block-uniform
  bucket_offsets(p, n_buckets, s.offs);
  __syncthreads();
  for_each_staged_bucket(p, r, s, sub, [&](int64_t pos, int64_t seg_end, int root) {
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
        Row<T, NV> row;
        load_row<T, NV, From::kShared>(row, rows_in + static_cast<int64_t>(j) * hidden, lane, nvec);
        const float logit = warp_sum(partial_dot<T, NV>(xf, row)) + bias_s[j];
        if (lane == level) {
          my_slot = j;
          my_logit = logit;
        }
        if (level < depth) j = 2 * j + 1 + (logit > 0.f ? 1 : 0);
      }
      if (lane >= split) my_g = gelu(my_logit);
      float yf[NV][V];
      zero(yf);
      for (int level = 0; level <= depth; ++level) {
        const int slot = __shfl_sync(kFullMask, my_slot, level);
        const float g = __shfl_sync(kFullMask, my_g, level);
        Row<T, NV> row;
        load_row<T, NV, From::kShared>(row, rows_out + static_cast<int64_t>(slot) * hidden, lane, nvec);
        axpy_row<T, NV>(yf, g, row);
      }
      store_y<T, NV>(y + m * hidden, yf, lane, nvec);
      if (lane == 0) p.leaves[m] = subtree_node(root, j) - first_leaf;
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// kStaged: the single walk with the top levels' rows of every tree copied into shared memory once per block,
// (16-bit types) the routing dot products on tensor cores, and (one tree) two tokens per warp.
// Why (Nsight Compute, bf16, 32768 tokens; results_cuda.md item 15): the single walk issues ~2500 warp
// instructions per token at 0.65 per scheduler cycle with L2 at 66% of its peak: each warp waits on its token's
// chain of 12 dependent row fetches. Shared memory for levels 0..staged_in-1 of w_in and 0..staged_out-1 of w_out
// (6 and 6 at bf16 width 768: 189 KB) cuts the L2 reads by 14% and the chain's L2 round trips by two; the tensor-core
// dot cuts the instructions by a fifth and keeps x packed, which lets the two-token walk fit a 1024-thread block
// (64 chains per SM instead of 24): 125 -> 109 us.
template <typename T, int NV>
struct StagedThreads {
  static constexpr int value = kThreads * SingleMinBlocks<T, NV>::value;
};

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
template <typename T>
struct Mma16816;
template <>
struct Mma16816<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint4& a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  }
};
template <>
struct Mma16816<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint4& a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  }
};

// This lane's share of x . row: the warp's shares sum to the dot product (row_dot, pair_sum). x and the row are
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

// x . row, the same in every lane.
template <typename T, int NV>
__device__ __forceinline__ float row_dot(const uint4 (&xr)[NV], const Row<T, NV>& r, int lane) {
  return warp_sum(row_dot_share<T, NV>(xr, r, lane));
}

// warp_sum of a and of b in 6 shuffles instead of 10: the first step sends each half-warp the other half's share
// of one of them (lanes 0-15 go on summing a, lanes 16-31 b), the last swaps the halves' sums. Each sum goes
// through warp_sum's own additions (pairs at distance 16, 8, 4, 2, 1), so it has warp_sum's bits, in every lane.
__device__ __forceinline__ void pair_sum(float& a, float& b, int lane) {
  const bool upper = lane & 16;
  float v = (upper ? b : a) + __shfl_xor_sync(kFullMask, upper ? a : b, 16);
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  const float other = __shfl_xor_sync(kFullMask, v, 16);
  a = upper ? other : v;
  b = upper ? v : other;
}

// walk_levels with x as raw packed vectors and row_dot (tensor cores at 16 bits).
template <typename T, int NV, From kFrom = From::kGlobal>
__device__ __forceinline__ int route_raw(const uint4 (&xr)[NV], const T* __restrict__ w_in, const T* __restrict__ b_in,
                                         int nvec, int lane, int level_begin, int level_end, int depth, int n,
                                         int& my_node, float& my_logit) {
  return walk_levels<T, NV, kFrom>([&](const Row<T, NV>& r) { return row_dot<T, NV>(xr, r, lane); }, w_in, b_in, nvec,
                                   lane, level_begin, level_end, depth, n, my_node, my_logit);
}

// Walk levels [level_begin, level_end) for two tokens from nodes na, nb (walk_levels for a pair): logits(na, nb, la,
// lb) sets both tokens' logits at their nodes (x . row + bias, the same in every lane); lane `level` records each
// token's node and logit at that level.
template <typename Logits>
__device__ __forceinline__ void walk_pair_levels(Logits logits, int lane, int level_begin, int level_end, int depth,
                                                 int& na, int& nb, int& node_a, float& logit_a, int& node_b,
                                                 float& logit_b) {
  for (int level = level_begin; level < level_end; ++level) {
    float la, lb;
    logits(na, nb, la, lb);
    if (lane == level) {
      node_a = na;
      logit_a = la;
      node_b = nb;
      logit_b = lb;
    }
    if (level < depth) {
      na = 2 * na + 1 + (la > 0.f ? 1 : 0);
      nb = 2 * nb + 1 + (lb > 0.f ? 1 : 0);
    }
  }
}

// route_raw() for two tokens at once: their row fetches are independent, so each level waits one round trip for
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
  static constexpr int value = !std::is_same<T, float>::value && NV <= 3 ? 1024 : StagedThreads<T, NV>::value;
};

// Tokens ma and mb (mb == ma for an odd last token): route both together, then accumulate and store each.
// Levels [0, in_end) of w_in and [0, out_end) of w_out come from the shared-memory copies s_in / s_out.
template <typename T, int NV>
__device__ __forceinline__ void walk_pair(const Params& p, int64_t ma, int64_t mb, const T* s_in, const T* s_out,
                                          int in_end, int out_end, int lane, int nvec) {
  constexpr int V = Elem<T>::kVec;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w_in = static_cast<const T*>(p.w_in);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const T* __restrict__ w_out = static_cast<const T*>(p.w_out);
  T* __restrict__ y = static_cast<T*>(p.y);
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

// kStaged, one tree: two tokens per warp (route_pair), the top levels' rows in shared memory. (Issuing the copy
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

// ---------------------------------------------------------------------------------------------------
// kSorted's finishing step with two tokens of one bucket per warp (fp32, width <= 768). The one-token finishing
// kernel is latency-bound at fp32 (Nsight Compute, H200, split 8, 32768 tokens: 0.47 warp instructions issued per
// scheduler cycle with 0.8 of 3.9 warps eligible, DRAM at 53%) and reads 16 rows of shared memory per token (depth
// 11, split 8: 4 w_in rows of the subtree, 12 w_out rows). Two tokens of one bucket share every row above their first
// different branch: the split ancestors' w_out rows and the bucket node's rows always, a row one level down half
// the time, and so on, so a warp reads such a row once for both (the test is warp-uniform: both tokens' nodes are
// the same in every lane): about 20 rows per pair instead of 32. The pair's two chains also overlap their
// latencies (pair_sum: both warp sums in 6 shuffles). Measured (benchmarks/results_cuda.md, item 16): the
// finishing step 92.1 -> 82.8 us at split 8, fp32 32768 tokens 154.7 -> 145.7 us. At 16 bits it was no faster
// (117.7-120.5 against 117.8-119.1 us at bf16), so they keep the one-token kernel and its small-bucket pass.
// Each warp takes the next two positions of the bucket's run; an odd run's last token pairs with itself.
// Arithmetic per token is kSorted's (CUDA-core dot, warp_sum's bits, the same output order): the same bits.
template <typename T, int NV>
struct SortedPair {
  static constexpr bool value = std::is_same<T, float>::value && NV <= 6;
};
constexpr int kSortedPairThreads = 512;  // 128 registers: x or y of two tokens (48) and two rows in flight
constexpr int kPairMaxDepth = 15;        // levels 0..15 in lanes 0..15 (token a) and 16..31 (token b)

// x . row of both tokens (summed over the warp) for rows na and nb of a shared-memory copy: a coinciding row is read
// once.
template <typename T, int NV>
__device__ __forceinline__ void pair_dots(const float (&xa)[NV][Elem<T>::kVec], const float (&xb)[NV][Elem<T>::kVec],
                                          const uint4* w_lane, int na, int nb, int lane, int nvec, float& la,
                                          float& lb) {
  Row<T, NV> ra;
  load_lane_row<NV, From::kShared>(ra.v, lane_row(w_lane, na, nvec), lane, nvec);
  la = partial_dot<T, NV>(xa, ra);
  if (na == nb) {
    lb = partial_dot<T, NV>(xb, ra);
  } else {
    Row<T, NV> rb;
    load_lane_row<NV, From::kShared>(rb.v, lane_row(w_lane, nb, nvec), lane, nvec);
    lb = partial_dot<T, NV>(xb, rb);
  }
  pair_sum(la, lb, lane);
}

// Both rows' loads in flight together: an empty asm that takes every register of both (the compiler would otherwise
// load the second row into the first one's registers once they are consumed, one shared-memory wait per row).
template <int NV>
__device__ __forceinline__ void pin_rows(uint4 (&a)[NV], uint4 (&b)[NV]) {
#pragma unroll
  for (int c = 0; c < NV; ++c)
    asm volatile("" : "+r"(a[c].x), "+r"(a[c].y), "+r"(a[c].z), "+r"(a[c].w), "+r"(b[c].x), "+r"(b[c].y), "+r"(b[c].z),
                 "+r"(b[c].w));
}

// bias(a) in the pair walk: the bias of subtree node a (heap order below the bucket node), from the staged copy in
// shared memory (SharedBias), from registers (ShuffledBias) or from global memory (GlobalBias); the pipelined kernel
// uses the last two, its buffers holding rows only.
struct SharedBias {
  const float* s;
  __device__ __forceinline__ float operator()(int a) const { return s[a]; }
};
// ShuffledBias: lane j holds the bias of subtree node j (sub <= 32), loaded once per bucket; every lane must call it
// (warp-uniform a), as the pair walk does.
struct ShuffledBias {
  float mine;
  __device__ __forceinline__ float operator()(int a) const { return __shfl_sync(kFullMask, mine, a); }
};
template <typename T>
struct GlobalBias {
  const T* __restrict__ b_in;
  int root;
  __device__ __forceinline__ float operator()(int a) const { return Elem<T>::load(b_in + subtree_node(root, a)); }
};

// kSorted step 3, two tokens of one bucket per warp, the bucket's rows in shared memory: the subtree's w_in rows and
// biases, and the w_out rows of the subtree and of the split ancestors. x of both tokens is in registers already and
// g_a / g_b hold their top levels' GELU values in lanes < split.
// out_ready() is called between the walk and the output (the pipelined kernel waits there for the output rows).
template <typename T, int NV, typename Bias, typename OutReady>
__device__ __forceinline__ void finish_pair_staged(const Params& p, int64_t ma, int64_t mb,
                                                   const float (&xa)[NV][Elem<T>::kVec],
                                                   const float (&xb)[NV][Elem<T>::kVec], float g_a, float g_b,
                                                   const T* rows_in, const T* rows_out, int out_first, int top_slot,
                                                   const Bias& bias, int root, int lane, int nvec,
                                                   const OutReady& out_ready) {
  constexpr int V = Elem<T>::kVec;
  const int split = p.split, depth = p.depth;
  // lane l keeps level l's row slot in rows_out and its GELU value; the top levels come from step 1. Slots count rows
  // of rows_out: out_first is the subtree's first w_out row, top_slot this lane's split ancestor's (lanes < split).
  int slot_a = top_slot, slot_b = top_slot;
  float logit_a = 0.f, logit_b = 0.f;
  int ja = 0, jb = 0;
  const uint4* in_lane = reinterpret_cast<const uint4*>(rows_in) + lane;
  const auto logits = [&](int a, int b, float& la, float& lb) {
    pair_dots<T, NV>(xa, xb, in_lane, a, b, lane, nvec, la, lb);
    la += bias(a);
    lb += bias(b);
  };
  walk_pair_levels(logits, lane, split, depth + 1, depth, ja, jb, slot_a, logit_a, slot_b, logit_b);
  out_ready();
  float ya[NV][V], yb[NV][V];
  zero(ya);
  zero(yb);
  const uint4* out_lane = reinterpret_cast<const uint4*>(rows_out) + lane;
  // One GELU evaluation for both tokens: lane l < 16 takes token a's level l, lane 16 + l token b's (depth <= 15,
  // kPairMaxDepth: launch_sorted_finish sends deeper trees to the one-token kernel);
  // the top levels' values come from step 1 in lanes < split, moved the same way for token b.
  const bool upper = lane >= 16;
  const int level_of_lane = lane & 15;
  const float logit_b_up = __shfl_up_sync(kFullMask, logit_b, 16), g_b_up = __shfl_up_sync(kFullMask, g_b, 16);
  float g = gelu(upper ? logit_b_up : logit_a);
  if (level_of_lane < split) g = upper ? g_b_up : g_a;
  if (lane >= split) {
    slot_a += out_first;
    slot_b += out_first;
  }
  // The split ancestors' rows are the same for both tokens (one bucket): read once, no test. Two levels per step:
  // x is dead here, which leaves the registers for both rows' reads to be in flight together (the level order of
  // the sums is kept: same bits). Measured on an H200: fp32 32768 tokens 137.8 -> 137.0 us (benchmarks/
  // results_cuda.md, item 21).
  int level0 = 0;
  for (; level0 + 2 <= split; level0 += 2) {
    const int s0 = __shfl_sync(kFullMask, slot_a, level0), s1 = __shfl_sync(kFullMask, slot_a, level0 + 1);
    const float ga0 = __shfl_sync(kFullMask, g, level0), gb0 = __shfl_sync(kFullMask, g, level0 + 16);
    const float ga1 = __shfl_sync(kFullMask, g, level0 + 1), gb1 = __shfl_sync(kFullMask, g, level0 + 17);
    Row<T, NV> r0, r1;
    load_lane_row<NV, From::kShared>(r0.v, lane_row(out_lane, s0, nvec), lane, nvec);
    load_lane_row<NV, From::kShared>(r1.v, lane_row(out_lane, s1, nvec), lane, nvec);
    pin_rows(r0.v, r1.v);  // both reads issued before the first use (else the compiler reuses r0's registers)
    axpy_row<T, NV>(ya, ga0, r0);
    axpy_row<T, NV>(yb, gb0, r0);
    axpy_row<T, NV>(ya, ga1, r1);
    axpy_row<T, NV>(yb, gb1, r1);
  }
  for (int level = level0; level < split; ++level) {
    const int sa = __shfl_sync(kFullMask, slot_a, level);
    const float ga = __shfl_sync(kFullMask, g, level), gb = __shfl_sync(kFullMask, g, level + 16);
    Row<T, NV> ra;
    load_lane_row<NV, From::kShared>(ra.v, lane_row(out_lane, sa, nvec), lane, nvec);
    axpy_row<T, NV>(ya, ga, ra);
    axpy_row<T, NV>(yb, gb, ra);
  }
  for (int level = split; level <= depth; ++level) {
    const int sa = __shfl_sync(kFullMask, slot_a, level), sb = __shfl_sync(kFullMask, slot_b, level);
    const float ga = __shfl_sync(kFullMask, g, level), gb = __shfl_sync(kFullMask, g, level + 16);
    Row<T, NV> ra;
    load_lane_row<NV, From::kShared>(ra.v, lane_row(out_lane, sa, nvec), lane, nvec);
    axpy_row<T, NV>(ya, ga, ra);
    if (sa == sb) {
      axpy_row<T, NV>(yb, gb, ra);
    } else {
      Row<T, NV> rb;
      load_lane_row<NV, From::kShared>(rb.v, lane_row(out_lane, sb, nvec), lane, nvec);
      axpy_row<T, NV>(yb, gb, rb);
    }
  }
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t first_leaf = (int64_t{1} << depth) - 1;
  store_y<T, NV>(y + ma * p.hidden, ya, lane, nvec);
  if (mb != ma) store_y<T, NV>(y + mb * p.hidden, yb, lane, nvec);
  if (lane == 0) {
    p.leaves[ma] = subtree_node(root, ja) - first_leaf;
    p.leaves[mb] = subtree_node(root, jb) - first_leaf;
  }
}

// No wait: the barrier-staged kernel's rows are in before its warps start a bucket.
struct RowsReady {
  __device__ __forceinline__ void operator()() const {}
};

// The pair at sorted positions q and q + 1 of a bucket segment ending at seg_end (an odd segment's last token pairs
// with itself): its tokens' x and top levels' GELU values, then finish_pair_staged. in_ready() is called once those
// loads are issued and before the first row is read, out_ready() before the first output row: the pipelined kernel
// waits there for the bucket's rows, so that the x loads are in flight while the rows still arrive.
template <typename T, int NV, typename Bias, typename InReady = RowsReady, typename OutReady = RowsReady>
__device__ __forceinline__ void finish_pair_at(const Params& p, int64_t q, int64_t seg_end, const T* rows_in,
                                               const T* rows_out, int out_first, int top_slot, const Bias& bias,
                                               int root, int lane, int nvec, const InReady& in_ready = {},
                                               const OutReady& out_ready = {}) {
  constexpr int V = Elem<T>::kVec;
  const int64_t ma = p.order[q], mb = q + 1 < seg_end ? p.order[q + 1] : ma;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  float xa[NV][V], xb[NV][V];
  load_x<T, NV>(xa, x + ma * p.ldx, lane, nvec);
  load_x<T, NV>(xb, x + mb * p.ldx, lane, nvec);
  pin_x(xa);
  pin_x(xb);
  const float ga = lane < p.split ? p.g_top[ma * p.split + lane] : 0.f;
  const float gb = lane < p.split ? p.g_top[mb * p.split + lane] : 0.f;
  in_ready();
  finish_pair_staged<T, NV>(p, ma, mb, xa, xb, ga, gb, rows_in, rows_out, out_first, top_slot, bias, root, lane, nvec,
                            out_ready);
}

// kSorted's finishing step with two tokens per warp, one bucket's rows at a time (sorted_finish_kernel's staging:
// the whole block waits at a barrier while they are copied). Each warp takes the next two positions of the bucket's
// run. Every bucket is staged, small ones too, as the one-token kernel does at fp32 (its small-bucket pass, item 13,
// cost the fp32 staged loop registers and time).
template <typename T, int NV, bool kFull>
__global__ void __launch_bounds__(kSortedPairThreads, 1) sorted_pair_finish_kernel(const Params p, int64_t chunk) {
  constexpr int kW = kSortedPairThreads / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  const int sub = static_cast<int>(sorted_subtree_rows(p.depth, p.split));
  const SortedSmem<T> s(smem, sub, p.split, p.hidden);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nvec = row_vectors<T, NV, kFull>(p.hidden);
  const Run r = block_run(p, chunk);
  if (r.begin >= r.end) return;  // block-uniform
  bucket_offsets(p, 1 << p.split, s.offs);
  __syncthreads();
  for_each_staged_bucket(p, r, s, sub, [&](int64_t pos, int64_t seg_end, int root) {
    for (int64_t q = pos + 2 * warp; q < seg_end; q += 2 * kW)
      finish_pair_at<T, NV>(p, q, seg_end, s.rows_in, s.rows_out, 0, sub + lane, SharedBias{s.bias}, root, lane, nvec);
  });
}

// ---------------------------------------------------------------------------------------------------
// kSorted's finishing step, pipelined (fp32, two tokens per warp; Hopper, where the layout below fits: fp32 width 768
// at split 8 takes 226 KB, and the rows can be copied by tensor copies; elsewhere the barrier-staged kernel above).
// That kernel idles every warp while a bucket's rows are copied (115 KB from L2 at fp32 split 8, ~2.9 times per block)
// and while the last pairs of a bucket finish: Nsight Compute put its barrier stall at 0.91 of ~8.7 cycles per
// instruction. Here two buffers take turns: while the warps finish bucket k from one, bucket k + 1's rows are already
// in the other, and the warp that finishes bucket k last refills its buffer with bucket k + 2's (one tensor copy per
// row, completing on the buffer's `full` and `full_out` mbarriers), so no warp waits on a copy unless it runs a whole
// bucket ahead. Warps take the pairs of a bucket dynamically (a shared counter), so the ones that finish early go on to
// the next bucket instead of idling, and a warp issues its pair's x loads before it waits for the rows (which matters
// at the start, where every block's first fill comes cold from memory). Same arithmetic per pair: same bits. Measured
// on an H200 (benchmarks/results_cuda.md, items 19-20 and 22): fp32 32768 tokens 141.0 -> 138.2 us, then 136.4 ->
// 132.2 us for the waits after the x loads.
// Why tensor copies (cp.async.bulk.tensor with a tensor map), and nothing written to shared memory by the threads
// after the start (the biases come from registers, the counters only grow): compute-sanitizer racecheck does not take
// mbarrier phases as ordering, so it reports hazards for any shared-memory write that only an mbarrier orders against
// the reads, whether by plain stores, cp.async or raw bulk copies; tensor copies it reports clean (a probe of all
// five ways, benchmarks/results_cuda.md item 20).
//
// Shared memory, in rows of `hidden` elements: row 0 the root's w_out row (every bucket's level-0 ancestor), then per
// buffer the subtree's w_in rows (sub), its w_out rows (sub) and the w_out rows of ancestor levels 1..split-1; then the
// bucket offsets, four pair counters (taken in turn by successive buckets) and per buffer a done counter, and per
// buffer the `full` (w_in rows), `empty` and `full_out` (w_out rows) mbarriers.
namespace sp {
struct Layout {
  int64_t buffer_rows, offs, counters, barriers, bytes;  // offsets in bytes (buffer_rows in rows)
};
__host__ __device__ inline Layout layout(int depth, int split, int64_t hidden, int64_t element_size) {
  const int64_t sub = (int64_t{2} << (depth - split)) - 1;
  Layout l;
  l.buffer_rows = 2 * sub + split - 1;
  l.offs = (1 + 2 * l.buffer_rows) * hidden * element_size;
  l.counters = l.offs + 4 * ((int64_t{1} << split) + 1);
  l.barriers = (l.counters + 24 + 7) / 8 * 8;  // past taken[4] and done[2]: full[2], empty[2], full_out[2]
  l.bytes = l.barriers + 48;
  return l;
}

// (Hopper's tensor copies and transaction-count barriers: the host runs this kernel on compute capability 9.0 or later
// only, Params::major >= 9; other builds compile the helpers empty and the kernel traps.)
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count) {
#if HF_FFF_HAS_CLUSTERS
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
#endif
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity) {
#if HF_FFF_HAS_CLUSTERS
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}
// Expect `bytes` more of tensor copies in the current phase, without arriving.
__device__ __forceinline__ void mbarrier_expect(uint64_t* bar, unsigned bytes) {
#if HF_FFF_HAS_CLUSTERS
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
// Arrive once (release: this thread's shared-memory accesses before it, and those of the threads it synchronised
// with, are ordered before what the threads that wait for the phase do next).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if HF_FFF_HAS_CLUSTERS
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
// One row of a (rows, hidden) matrix through its tensor map (tensor_row_map in the launcher: a 3-D view with a box of
// one row) into shared memory (128-byte aligned), completing on `bar`.
__device__ __forceinline__ void tensor_row_copy(void* dst, const CUtensorMap* map, int row, uint64_t* bar) {
#if HF_FFF_HAS_CLUSTERS
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(smem_addr(dst)), "l"(map), "r"(0), "r"(0), "r"(row), "r"(smem_addr(bar))
      : "memory");
#endif
}
// Order this thread's earlier shared-memory accesses (generic proxy) before later tensor copies (async proxy).
__device__ __forceinline__ void fence_proxy_async() {
#if HF_FFF_HAS_CLUSTERS
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace sp

// Fill a buffer (`rows`) with bucket `root`'s rows, one tensor copy per row issued by the warp's lanes; root_row (the
// first fill only, else null): also copy the root's w_out row there. Two barriers, so that a warp can walk its pair
// while the output rows still arrive: bar_in completes when the subtree's w_in rows are in (what the walk reads),
// bar_out when the w_out rows are (the root's, the subtree's and the ancestors': what the output reads).
template <typename T>
__device__ __forceinline__ void fill_bucket_buffer(const Params& p, T* rows, uint64_t* bar_in, uint64_t* bar_out,
                                                   int root, int sub, T* root_row, int lane, const CUtensorMap* map_in,
                                                   const CUtensorMap* map_out) {
  const int split = p.split, hidden = p.hidden;
  const unsigned row_bytes = static_cast<unsigned>(hidden * sizeof(T));
  // copies c = 0.. of the list: the subtree's w_in rows, [the root's w_out row], its w_out rows, the ancestors'
  const int first = root_row != nullptr ? 1 : 0;
  const int n_out = first + sub + split - 1;
  if (lane == 0) {
    sp::fence_proxy_async();
    sp::mbarrier_expect(bar_in, row_bytes * static_cast<unsigned>(sub));
    sp::mbarrier_expect(bar_out, row_bytes * static_cast<unsigned>(n_out));
  }
  __syncwarp();  // the expected bytes are set before any copy can complete
  for (int c = lane; c < sub + n_out; c += 32) {
    if (c < sub) {
      sp::tensor_row_copy(rows + c * static_cast<int64_t>(hidden), map_in, subtree_node(root, c), bar_in);
      continue;
    }
    if (c < sub + first) {
      sp::tensor_row_copy(root_row, map_out, 0, bar_out);
      continue;
    }
    const int r = c - first;
    T* const dst = rows + r * static_cast<int64_t>(hidden);
    if (r < 2 * sub) sp::tensor_row_copy(dst, map_out, subtree_node(root, r - sub), bar_out);
    else sp::tensor_row_copy(dst, map_out, ((root + 1) >> (split - (r - 2 * sub + 1))) - 1, bar_out);  // ancestor
  }
  __syncwarp();
  if (lane == 0) {
    sp::mbarrier_arrive(bar_in);
    sp::mbarrier_arrive(bar_out);
  }
}

template <typename T, int NV, bool kFull>
__global__ void __launch_bounds__(kSortedPairThreads, 1)
    sorted_pipelined_finish_kernel(const Params p, int64_t chunk, const __grid_constant__ CUtensorMap map_in,
                                   const __grid_constant__ CUtensorMap map_out) {
  constexpr int kW = kSortedPairThreads / 32;
  extern __shared__ __align__(128) unsigned char smem[];  // tensor copies land on 128-byte boundaries
  const int split = p.split, n_buckets = 1 << split, hidden = p.hidden;
  const int sub = static_cast<int>(sorted_subtree_rows(p.depth, split));
  const sp::Layout L = sp::layout(p.depth, split, hidden, sizeof(T));
  T* const rows = reinterpret_cast<T*>(smem);
  const auto buffer = [&](int s) { return rows + (1 + s * L.buffer_rows) * static_cast<int64_t>(hidden); };
  int* const offs = reinterpret_cast<int*>(smem + L.offs);
  int* const taken = reinterpret_cast<int*>(smem + L.counters);  // [4] pair tickets of bucket k, in taken[k % 4]
  int* const done = taken + 4;                                    // [2] done tickets, per buffer
  uint64_t* const full = reinterpret_cast<uint64_t*>(smem + L.barriers);  // [2] the buffer's w_in rows are in
  uint64_t* const empty = full + 2;                                       // [2] every warp is done with the buffer
  uint64_t* const full_out = empty + 2;                                   // [2] the buffer's w_out rows are in
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nvec = row_vectors<T, NV, kFull>(hidden);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const Run r = block_run(p, chunk);
  if (r.begin >= r.end) return;  // block-uniform
  bucket_offsets(p, n_buckets, offs);
  if (threadIdx.x == 0) {
    sp::mbarrier_init(&full[0], 1);
    sp::mbarrier_init(&full[1], 1);
    sp::mbarrier_init(&empty[0], kW);
    sp::mbarrier_init(&empty[1], kW);
    sp::mbarrier_init(&full_out[0], 1);
    sp::mbarrier_init(&full_out[1], 1);
    taken[0] = taken[1] = taken[2] = taken[3] = done[0] = done[1] = 0;
#if HF_FFF_HAS_CLUSTERS
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
    __trap();
#endif
  }
  __syncthreads();  // the last plain shared-memory writes: from here on only tensor copies and atomics write
  Segment seg = first_segment(offs, n_buckets, r);
  const auto fill = [&](int buf, const Segment& which, T* root_row) {
    fill_bucket_buffer<T>(p, buffer(buf), &full[buf], &full_out[buf], n_buckets - 1 + which.b, sub, root_row, lane,
                          &map_in, &map_out);
  };
  // The first two buckets; the second once the first is in (all blocks start at once, cold). The first fill also copies
  // the root's w_out row, which every bucket reads: every warp waits for bucket 0's rows (full_out[0] included) before
  // it goes on to bucket 1, so it sees that row whichever buffer it reads next.
  if (warp == 0) {
    fill(0, seg, rows);
    const Segment second = next_segment(offs, r, seg);
    sp::mbarrier_wait(&full[0], 0);
    sp::mbarrier_wait(&full_out[0], 0);
    if (second.pos < r.end) fill(1, second, nullptr);
  }
  // The pair and done counters only grow (a reset would be a plain store that only the mbarriers order): a bucket of
  // `pairs` pairs draws pairs + kW pair tickets (every warp draws one past the end) and kW done tickets of its buffer.
  // A warp draws bucket k's first ticket before it waits for the bucket's rows, so it may draw while slower warps still
  // draw bucket k - 2's (same buffer) but not bucket k - 4's (it waited for bucket k - 2's rows, which the refill
  // copies only after every warp is done with bucket k - 4): four pair counters, in turn. before[j]: the tickets drawn
  // from bucket k + j's counter before it (four scalars turned at each bucket: an indexed array would live in memory).
  int before_0 = 0, before_1 = 0, before_2 = 0, before_3 = 0;
  for (int k = 0; seg.pos < r.end; ++k, seg = next_segment(offs, r, seg)) {
    const int buf = k & 1;
    const int root = n_buckets - 1 + seg.b;
    const T* rows_in = buffer(buf);
    const int out_first = 1 + buf * L.buffer_rows + sub;  // the subtree's first w_out row, in rows of `rows`
    const int top_slot = lane == 0 ? 0 : out_first + sub + lane - 1;  // ancestor of level `lane` (lanes < split)
    // The biases from registers (lane j: subtree node j), loaded once per bucket: read from global memory at every
    // level they cost 10 us at 32768 tokens (a bucket's lines do not stay in L1 beside the x stream).
    const float bias_of_lane = lane < sub ? Elem<T>::load(b_in + subtree_node(root, lane)) : 0.f;
    // A warp waits for the bucket's rows only once its pair's x loads are issued: for the w_in rows before the walk,
    // for the w_out rows before the output (a phase stays complete until every warp is done with the buffer, so the
    // waits after the first return at once). Measured on an H200 against waiting for all rows before drawing a pair:
    // fp32 32768 tokens 136.4 -> 132.2 us, the finishing kernel 79.9 -> 75.1 us under an L2 flush
    // (benchmarks/results_cuda.md, item 22); each block has only ~3 buckets, so their cold first fills weigh.
    const unsigned parity = (k >> 1) & 1;
    const auto in_ready = [&] { sp::mbarrier_wait(&full[buf], parity); };
    const auto out_ready = [&] { sp::mbarrier_wait(&full_out[buf], parity); };
    for (;;) {
      int i = 0;
      if (lane == 0) i = atomicAdd(&taken[k & 3], 1) - before_0;
      const int64_t q = seg.pos + 2 * static_cast<int64_t>(__shfl_sync(kFullMask, i, 0));
      if (q >= seg.end) break;
      if (sub <= 32)
        finish_pair_at<T, NV>(p, q, seg.end, rows_in, rows, out_first, top_slot, ShuffledBias{bias_of_lane}, root,
                              lane, nvec, in_ready, out_ready);
      else
        finish_pair_at<T, NV>(p, q, seg.end, rows_in, rows, out_first, top_slot, GlobalBias<T>{b_in, root}, root, lane,
                              nvec, in_ready, out_ready);
    }
    // A warp that drew no pair of this bucket has not waited for its rows: it waits before it arrives on `empty`, so
    // that it cannot arrive again for the bucket two ahead (whose fill follows this phase) before every other warp
    // arrived for this one.
    in_ready();
    out_ready();
    const int tickets = static_cast<int>((seg.end - seg.pos + 1) / 2) + kW;
    const int next_use = before_0 + tickets;  // bucket k + 4's counter
    before_0 = before_1;
    before_1 = before_2;
    before_2 = before_3;
    before_3 = next_use;
    // The last warp done with this bucket refills its buffer with the bucket two ahead. Every warp arrives on the
    // buffer's `empty` barrier once its lanes stopped reading the buffer (release), and the refilling warp waits for
    // that phase (acquire) before it copies: the done counter only elects which warp refills.
    __syncwarp();
    int last = 0;
    if (lane == 0) {
      sp::mbarrier_arrive(&empty[buf]);
      last = atomicAdd(&done[buf], 1) % kW == kW - 1;
    }
    if (__shfl_sync(kFullMask, last, 0)) {
      sp::mbarrier_wait(&empty[buf], (k >> 1) & 1);  // complete already: every warp arrived before its count
      const Segment ahead = next_segment(offs, r, next_segment(offs, r, seg));
      if (ahead.pos < r.end) fill(buf, ahead, nullptr);
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

// The driver's cuTensorMapEncodeTiled, through the runtime (no link against libcuda); null where unavailable.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encoder;
}

// A float32 (rows, hidden) matrix as the 3-D tensor (inner, hidden / inner, rows) with a box of one whole row, for
// sp::tensor_row_copy: a box side holds at most 256 elements and its innermost extent a multiple of 16 bytes, so inner
// is the largest multiple of 4 up to 256 that divides hidden. False where no such view or encoder exists.
inline bool tensor_row_map(CUtensorMap* map, const void* base, int64_t rows, int64_t hidden) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr || hidden % 4 != 0 || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  int64_t inner = 0;
  for (int64_t d = 4; d <= 256 && d <= hidden; d += 4)
    if (hidden % d == 0) inner = d;
  if (inner == 0 || hidden / inner > 256) return false;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(hidden / inner),
                              static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(inner * 4), static_cast<cuuint64_t>(hidden * 4)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(inner), static_cast<cuuint32_t>(hidden / inner), 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, const_cast<void*>(base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Calls f(std::true_type{}) when a row is exactly NV vectors per lane (the kFull instantiation of the kernels that
// have one applies), else f(std::false_type{}).
template <typename T, int NV, typename F>
void with_full(const Params& p, F&& f) {
  if (p.hidden == NV * 32 * Elem<T>::kVec) f(std::true_type{});
  else f(std::false_type{});
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

// Host cache of a persistent kernel's launch: shared-memory limit raised per device, blocks per SM for the last
// shared-memory size asked.
struct PersistentLaunch {
  int smem_done[64] = {};
  size_t smem = ~size_t{0};
  int per_sm = 0;
};

// Raise the kernel's shared-memory limit and return how many of its `threads`-thread blocks fit on an SM with `smem`
// bytes each (0: none), both remembered in `cache`.
template <typename Kernel>
int persistent_blocks_per_sm(Kernel kernel, int threads, size_t smem, PersistentLaunch& cache) {
  allow_smem(kernel, smem, cache.smem_done);
  if (cache.smem != smem) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&cache.per_sm, kernel, threads, smem));
    cache.smem = smem;
  }
  return cache.per_sm;
}

// At most one wave of `threads`-thread blocks, each warp taking `per_warp` tokens per round (kStaged: the rows
// take most of the shared memory, so one block per SM).
template <typename Kernel>
void launch_persistent(Kernel kernel, int threads, int per_warp, size_t smem, PersistentLaunch& cache, const Params& p,
                       cudaStream_t stream) {
  persistent_blocks_per_sm(kernel, threads, smem, cache);
  TORCH_CHECK(cache.per_sm > 0, "hf_fff CUDA: the staged strategy's rows do not fit in shared memory");
  const int64_t per_block = static_cast<int64_t>(threads / 32) * per_warp;
  const int64_t wanted = (p.tokens + per_block - 1) / per_block;
  const int64_t wave = static_cast<int64_t>(cache.per_sm) * p.num_sms;
  kernel<<<wanted < wave ? wanted : wave, threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Step 2 after a ranking step 1 whose block (m / per) % blocks routed token m.
inline void launch_scatter_ranked(const Params& p, int64_t per, int64_t blocks, cudaStream_t stream) {
  const int64_t grid = (p.tokens + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(p.num_sms) * 8;
  scatter_ranked_kernel<<<grid < cap ? grid : cap, kThreads, sizeof(int) * (size_t{1} << p.split), stream>>>(p, per, blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A cooperative launch (every block resident at once, for grid-wide barriers); its error, unchecked.
template <typename... Args>
cudaError_t launch_cooperative(void (*kernel)(Args...), int64_t blocks, int threads, size_t smem, cudaStream_t stream,
                               Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeCooperative;
  attribute[0].val.cooperative = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// Steps 1 and 2 of the sorted strategies: route the top `split` levels (their rows in shared memory as far
// as they fit), then the counting sort: fused into step 1 (a cooperative launch, one block per SM) where the device
// can launch it so, else a memset before step 1 and a scatter kernel after.
template <typename T, int NV>
void launch_route_and_sort(const Params& p, cudaStream_t stream) {
  const int n_buckets = 1 << p.split;
  const size_t hist_bytes = sizeof(int) * n_buckets;
  int top = p.split;  // the deepest top block of levels whose rows fit beside the histogram
  while (top > 0 && route_shared_bytes(top, p.split, p.hidden, sizeof(T)) > kRouteSharedBudget) --top;
  if (top >= 2) {
    const size_t route_smem = static_cast<size_t>(route_shared_bytes(top, p.split, p.hidden, sizeof(T)));
    const int64_t wanted = (p.tokens + 31) / 32;
    const int64_t blocks = wanted < p.num_sms ? wanted : p.num_sms;  // <= num_sms rows of block_base
    const int threads = RouteSharedThreads<T, NV>::value;
    with_full<T, NV>(p, [&](auto full) {
      constexpr bool kFull = decltype(full)::value;
      const auto fused_sort_kernel = route_top_shared_kernel<T, NV, kFull, true>;
      static PersistentLaunch fused_cache;
      // HF_FFF_CUDA_NO_COOPERATIVE (tests): take the separate launches, which a full GPU never needs otherwise
      if (std::getenv("HF_FFF_CUDA_NO_COOPERATIVE") == nullptr &&
          persistent_blocks_per_sm(fused_sort_kernel, threads, route_smem, fused_cache) >= 1) {  // one block per SM fits
        const cudaError_t err = launch_cooperative(fused_sort_kernel, blocks, threads, route_smem, stream, p, top);
        if (err == cudaSuccess) return;
        // Fewer SMs at hand than the device has (MPS, green contexts): the blocks cannot all be resident at once,
        // so the separate launches below. Any other error is raised.
        if (err != cudaErrorCooperativeLaunchTooLarge) C10_CUDA_CHECK(err);
        (void)cudaGetLastError();  // clears it
      }
      C10_CUDA_CHECK(cudaMemsetAsync(p.counts, 0, 2 * hist_bytes, stream));
      const auto route_kernel = route_top_shared_kernel<T, NV, kFull, false>;
      static int route_done[64] = {};
      allow_smem(route_kernel, route_smem, route_done);
      route_kernel<<<blocks, threads, route_smem, stream>>>(p, top);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_scatter_ranked(p, (p.tokens + blocks - 1) / blocks, blocks, stream);  // step 1's runs per block
    });
  } else {
    TORCH_CHECK(false, "hf_fff CUDA: the sorted strategy needs split >= 2 and three rows of w_in in shared memory");
  }
}

// Contiguous runs of the sorted tokens, at least 64 per block so that staging a bucket's rows pays off.
inline int64_t sorted_chunk(const Params& p, int per_sm) {
  const int64_t max_blocks = static_cast<int64_t>(per_sm) * p.num_sms;
  const int64_t wanted = (p.tokens + 63) / 64;
  const int64_t blocks = wanted < max_blocks ? wanted : max_blocks;
  return (p.tokens + blocks - 1) / blocks;
}

// kSorted's step 3: one block per SM (the bucket's rows fill its shared memory), each a contiguous run of the sorted
// tokens; the kernel takes (p, chunk, extra...).
template <typename Kernel, typename... Extra>
void launch_sorted_kernel(Kernel finish, int threads, size_t smem, PersistentLaunch& cache, const Params& p,
                          cudaStream_t stream, const Extra&... extra) {
  const int per_sm = persistent_blocks_per_sm(finish, threads, smem, cache);
  TORCH_CHECK(per_sm > 0, "hf_fff CUDA: the sorted strategy's rows do not fit in shared memory; use a deeper split");
  const int64_t chunk = sorted_chunk(p, per_sm);
  finish<<<(p.tokens + chunk - 1) / chunk, threads, smem, stream>>>(p, chunk, extra...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// kSorted's finishing step: two tokens per warp where SortedPair says so and the tree is at most 16 levels deep
// (finish_pair_staged evaluates both tokens' GELU values in one pass, token b's level l in lane 16 + l), pipelined on
// Hopper where two buckets' rows fit and tensor maps of the weights can be made, else staged behind barriers; one
// token per warp otherwise (every depth the binding takes, <= 30).
template <typename T, int NV>
void launch_sorted_finish(const Params& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(sorted_smem_bytes(p.depth, p.split, p.hidden, sizeof(T)));
  if constexpr (SortedPair<T, NV>::value) {
    if (p.depth <= kPairMaxDepth) {
      const int64_t pipelined = sp::layout(p.depth, p.split, p.hidden, sizeof(T)).bytes;
      const bool pipeline = p.major >= 9 && pipelined <= p.smem_limit;
      with_full<T, NV>(p, [&](auto full) {
        constexpr bool kFull = decltype(full)::value;
        CUtensorMap map_in = {}, map_out = {};
        const int64_t n_rows = static_cast<int64_t>(p.trees) * ((int64_t{2} << p.depth) - 1);
        if (pipeline && p.hidden % 32 == 0 &&  // rows on 128-byte boundaries
            tensor_row_map(&map_in, p.w_in, n_rows, p.hidden) && tensor_row_map(&map_out, p.w_out, n_rows, p.hidden)) {
          static PersistentLaunch cache;
          launch_sorted_kernel(sorted_pipelined_finish_kernel<T, NV, kFull>, kSortedPairThreads,
                               static_cast<size_t>(pipelined), cache, p, stream, map_in, map_out);
        } else {
          static PersistentLaunch cache;
          launch_sorted_kernel(sorted_pair_finish_kernel<T, NV, kFull>, kSortedPairThreads, smem, cache, p, stream);
        }
      });
      return;
    }
  }
  static PersistentLaunch cache;
  launch_sorted_kernel(sorted_finish_kernel<T, NV>, SortedThreads<T, NV>::value, smem, cache, p, stream);
}

template <typename T, int NV>
void launch_fast(const Params& p, cudaStream_t stream) {
  switch (p.strategy) {
    case kSingle: {
      static int per_sm = 0;  // occupancy of this instantiation (same on every device of one build)
      const auto kernel = single_kernel<T, NV>;
      kernel<<<token_grid(kernel, p, 0, per_sm), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    case kStaged: {
      const size_t smem = static_cast<size_t>(staged_smem_bytes(p.trees, p.staged_in, p.staged_out, p.hidden, sizeof(T)));
      with_full<T, NV>(p, [&](auto full) {
        static PersistentLaunch cache;
        launch_persistent(staged_pair_kernel<T, NV, decltype(full)::value>, PairThreads<T, NV>::value, 2, smem, cache,
                          p, stream);
      });
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
      if constexpr (std::is_same<T, float>::value) {
        launch_route_and_sort<T, NV>(p, stream);
        launch_sorted_finish<T, NV>(p, stream);
      } else {
        TORCH_CHECK(false, "hf_fff CUDA: the sorted strategy takes float32 only");
      }
      break;
    }
    default:
      TORCH_CHECK(false, "hf_fff CUDA: unknown strategy (", std::to_string(p.strategy), ")");
  }
}

// Calls f(std::integral_constant<int, NV>{}) with NV = p.vectors, the fast path's 16-byte vectors per lane: the
// smallest of {1, 2, 3, 4, 6, 8} that covers a row (vectors_for in fff_cuda.cpp), which load_lane_row relies on.
template <typename F>
void with_vectors(const Params& p, F&& f) {
  switch (p.vectors) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "hf_fff CUDA: unsupported vectors per lane (", std::to_string(p.vectors), ")");
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
  with_vectors(p, [&](auto nv) { launch_fast<T, decltype(nv)::value>(p, stream); });
}

}  // namespace
}  // namespace hf_fff_cuda

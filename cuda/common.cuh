// Device helpers that every forward strategy family uses (element types and math are in primitives.cuh): the
// one-warp walk's building blocks (rows as 16-byte vectors per lane, x and y, dot products, routing, output
// accumulation), the two-token walk's shared steps, and thin wrappers of the PTX instructions the kernels issue (asynchronous copies, thread-block clusters, mbarriers,
// tensor copies).
//
// The FFF function, per token and tree: walk depth + 1 levels from the root; at node n, logit = x . w_in[n] + b_in[n]
// (fp32 accumulation), go to 2n + 1 if logit <= 0 (and on NaN, as torch) else 2n + 2; y += GELU(logit) * w_out[n]
// (exact erf GELU). The one-warp walk, which most kernels build on:
// * One warp per token. The token's x sits in registers as fp32 (24 floats per lane at width 768); each visited row
//   is read with 16-byte loads, one per lane per 512 bytes. The dot product ends in a butterfly shuffle reduction,
//   which leaves the bitwise same sum in every lane, so the routing branch is warp-uniform.
// * The walk is split into a routing pass (w_in rows only: the serial chain) and an output pass (w_out rows of all
//   levels, independent loads several levels at a time). Lane l keeps level l's node and logit, so the per-level
//   state lives in registers without local memory (depth <= 31).
// * GELU (erfc form) is off the serial chain: each lane evaluates its own level's GELU once, after routing.
// * Weights (12.6 MB at bf16, width 768, depth 11) are read through L1/L2 with ld.global.nc; x and y stream past L1
//   with evict-first hints so that they do not push the weights out.
// Every strategy sums in this order, so that all of them give the same bits (the tests check it), except staged at
// 16 bits, whose tensor-core dot sums in another order.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fff_cuda.h"
#include "primitives.cuh"

// Hopper's instructions (thread-block clusters, mbarrier transaction counts, tensor copies) exist from sm_90; the
// host uses the kernels that need them on such devices only (Params::major >= 9), and other builds compile their
// wrappers empty.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define HF_FFF_HOPPER 1
#else
#define HF_FFF_HOPPER 0
#endif

namespace hf_fff_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Blocks per SM asked of the register allocator: one warp per token is latency-bound (a serial chain of
// dependent row fetches), so occupancy matters more than unrolling; wide rows need their registers.
template <int NV>
struct MinBlocks {
  static constexpr int value = NV <= 2 ? 4 : (NV <= 4 ? 3 : 2);
};

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

// The kernels' one parameter prologue: Params' tensors as restrict-qualified pointers of the element type, as locals
// named x, w_in, b_in, w_out and y. (Local pointers, not members of a struct: nvcc's alias analysis takes
// __restrict__ on the former, and a struct of them changed the register allocation of 20 kernels.)
#define HF_FFF_TENSORS(T, p)                                                         \
  [[maybe_unused]] const T* __restrict__ x = static_cast<const T*>((p).x);         \
  [[maybe_unused]] const T* __restrict__ w_in = static_cast<const T*>((p).w_in);   \
  [[maybe_unused]] const T* __restrict__ b_in = static_cast<const T*>((p).b_in);   \
  [[maybe_unused]] const T* __restrict__ w_out = static_cast<const T*>((p).w_out); \
  [[maybe_unused]] T* __restrict__ y = static_cast<T*>((p).y)

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
// 15% of the sorted finishing instructions at bf16). `at` points at this lane's first vector of the row.
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
// level (one more instruction per element and level, about 12% of the sorted finishing instructions at bf16).
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

// Blocks per SM the walk is compiled for. At width 768 the bf16 walk fits 80 registers (3 blocks) as long as x is
// left for the compiler to keep packed (widened again at each level); pinning it widened spilled (125 -> 157 us
// at 32768 tokens). The fp16 walk spills at 80 registers either way, so it gets 104 at 2 blocks (151 -> 135 us).
template <typename T, int NV>
struct SingleMinBlocks {
  static constexpr int value = std::is_same<T, __half>::value && NV == 3 ? 2 : MinBlocks<NV>::value;
};

// ---------------------------------------------------------------------------------------------------
// Two tokens per warp (staged.cuh, sorted.cuh): both tokens' chains in flight together.
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

// Global heap index of slot j of the subtree rooted at `root`: j at local level l has root * 2^l + j.
__device__ __forceinline__ int subtree_node(int root, int j) {
  const int level = 31 - __clz(j + 1);
  return (root << level) + j;
}

// ---------------------------------------------------------------------------------------------------
// PTX wrappers. Asynchronous 16-byte copies into shared memory (sm_80 and later; smem_addr, cp_async_commit and
// cp_async_wait are in primitives.cuh):
// 16-byte global -> shared copy that bypasses L1; src_bytes 0 writes zeros (padding rows and columns).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}

// Thread-block clusters (few_tokens.cuh's cluster kernel):
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if HF_FFF_HOPPER
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_arrive() {
#if HF_FFF_HOPPER
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if HF_FFF_HOPPER
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r = 0;
#if HF_FFF_HOPPER
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return r;
}
// Store v into the shared variable at `local` of block `rank` of this cluster.
__device__ __forceinline__ void store_remote(float* local, unsigned rank, float v) {
#if HF_FFF_HOPPER
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(local));
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(remote), "f"(v) : "memory");
#endif
}

// mbarriers with transaction counts and tensor copies (sorted.cuh's pipelined finishing kernel):
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count) {
#if HF_FFF_HOPPER
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
#endif
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity) {
#if HF_FFF_HOPPER
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
#if HF_FFF_HOPPER
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
// Arrive once (release: this thread's shared-memory accesses before it, and those of the threads it synchronised
// with, are ordered before what the threads that wait for the phase do next).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if HF_FFF_HOPPER
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
// One row of a (rows, hidden) matrix through its tensor map (tensor_row_map in the launcher: a 3-D view with a box of
// one row) into shared memory (128-byte aligned), completing on `bar`.
__device__ __forceinline__ void tensor_row_copy(void* dst, const CUtensorMap* map, int row, uint64_t* bar) {
#if HF_FFF_HOPPER
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(smem_addr(dst)), "l"(map), "r"(0), "r"(0), "r"(row), "r"(smem_addr(bar))
      : "memory");
#endif
}
// Order this thread's earlier shared-memory accesses (generic proxy) before later tensor copies (async proxy).
__device__ __forceinline__ void fence_proxy_async() {
#if HF_FFF_HOPPER
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace
}  // namespace hf_fff_cuda

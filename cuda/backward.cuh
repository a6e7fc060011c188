// Kernels of the fused FFF backward (the design is in backward.h). Deterministic: every sum is taken in a
// fixed order (warp butterflies, tokens in sorted order, chunk partials in chunk order); no atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "backward.h"
#include "primitives.cuh"

namespace hf_fff_cuda {
namespace bwd {

constexpr int kTokenWarps = 8;                 // token pass: tokens (warps) per block
constexpr int kColumns = kBackwardColumns;     // weight pass: threads per block (a column pair each); fixup: columns
constexpr int kPairGroup = kBackwardPairGroup; // weight pass: tokens whose x / grad_y pairs are in flight together
constexpr int kFixupBatch = 8;                 // fixup: chunk partials loaded before they are added in order
constexpr int kNodeWarps = 8;                  // zeroing: nodes (warps) per block

// The .cu files are compiled without torch headers; a CUDA error becomes a C++ exception, which pybind11
// hands to Python as a RuntimeError.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("hf_fff CUDA backward: ") + what + ": " + cudaGetErrorString(status));
  }
}
#define HF_FFF_BWD_LAUNCH_CHECK(what) ::hf_fff_cuda::bwd::check_cuda(cudaGetLastError(), what)

// A kernel launched with more than the default 48 KB of dynamic shared memory must be allowed it first.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int64_t bytes, const char* what) {
  if (bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), what);
  }
}

// Exact GELU (primitives.cuh) and its derivative Phi(z) + z phi(z) from one erfc: the erfc form keeps Phi accurate
// for z << 0, where 1 + erf(z / sqrt 2) cancels. z * Phi(z) has gelu(z)'s bits (the halving is exact either way).
struct GeluAndGrad {
  float value, grad;
};
__device__ __forceinline__ GeluAndGrad gelu_and_grad(float z) {
  const float cdf = 0.5f * erfcf(-z * 0.70710678118654752f);
  const float pdf = 0.39894228040143268f * expf(-0.5f * z * z);
  return {z * cdf, fmaf(z, pdf, cdf)};
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* row, int vector, float (&f)[Elem<T>::kVec]) {
  Elem<T>::unpack(__ldg(reinterpret_cast<const uint4*>(row) + vector), f);
}

// A visited row's coefficients from the lane's partial dot products z = x . w_in and dg = grad_y . w_out:
// lane 0 stores them for the weight pass (at index `at` of the token's coefficients); every lane gets c_in,
// the weight of this row of w_in in grad_x.
template <typename T>
__device__ __forceinline__ float row_coefficients(float z, float dg, const T* b_in, int64_t row, float* coef_in,
                                                  float* coef_out, int at, int lane) {
  z = warp_sum(z) + Elem<T>::load(b_in + row);
  dg = warp_sum(dg);
  const GeluAndGrad g = gelu_and_grad(z);
  const float c_in = dg * g.grad;
  if (lane == 0) {
    coef_in[at] = c_in;
    coef_out[at] = g.value;
  }
  return c_in;
}

// Row of the weights visited at `level` by a token that reached `leaf` of `tree`.
__device__ __forceinline__ int64_t path_row(int tree, int level, int leaf, int depth) {
  return tree * nodes_per_tree(depth) + ((int64_t{1} << level) - 1) + (leaf >> (depth - level));
}

// ---------------------------------------------------------------------------------------------------
// Leaf keys for the sort: (tokens, trees) int64 -> (trees, tokens) int32, masked into the tree so that a
// corrupt leaf can only give wrong rows of the right tree, never an out-of-bounds access.
__global__ void keys_kernel(const int64_t* __restrict__ leaves, int* __restrict__ keys, int64_t* __restrict__ ids,
                            int64_t tokens, int trees, int depth) {
  const int64_t total = tokens * trees;
  const int64_t mask = (int64_t{1} << depth) - 1;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t token = i / trees, tree = i % trees;
    keys[tree * tokens + token] = static_cast<int>(leaves[i] & mask);
    ids[tree * tokens + token] = token;
  }
}

// ---------------------------------------------------------------------------------------------------
// Token pass. One warp per token (taken in tree 0's sorted order: warps of a block then walk nearly the
// same rows, which stay in L1). kPerLane > 0: the row fits in 32 * kPerLane columns and x, grad_y, the
// current w_in row and grad_x live in registers (lane holds columns lane + 32 k). kPerLane == 0: any width,
// coefficients first (rows read from global / L1), then grad_x column block by column block.
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kTokenWarps * 32, kPerLane > 24 ? 1 : (kPerLane > 8 ? 2 : 3)) token_pass_kernel(const BackwardParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t position = blockIdx.x * int64_t{kTokenWarps} + (threadIdx.x >> 5);
  if (position >= p.tokens) return;  // whole warps only: no block-wide barrier below
  const int64_t token = p.order[position];
  const int hidden = p.hidden, depth = p.depth, levels = depth + 1, trees = p.trees;
  const T* x = static_cast<const T*>(p.x) + token * hidden;
  const T* grad_y = static_cast<const T*>(p.grad_y) + token * hidden;
  const T* w_in = static_cast<const T*>(p.w_in);
  const T* w_out = static_cast<const T*>(p.w_out);
  const T* b_in = static_cast<const T*>(p.b_in);
  T* grad_x = static_cast<T*>(p.grad_x) + token * hidden;
  float* coef_in = p.coef_in + token * trees * levels;
  float* coef_out = p.coef_out + token * trees * levels;

  if constexpr (kPerLane > 0) {
    float xr[kPerLane], gr[kPerLane], gx[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int c = lane + 32 * k;
      xr[k] = c < hidden ? Elem<T>::load(x + c) : 0.f;
      gr[k] = c < hidden ? Elem<T>::load(grad_y + c) : 0.f;
      gx[k] = 0.f;
    }
    for (int tree = 0; tree < trees; ++tree) {
      const int leaf = p.leaf_keys[tree * p.tokens + token];
      for (int level = 0; level < levels; ++level) {
        const int64_t row = path_row(tree, level, leaf, depth);
        const T* wi = w_in + row * hidden;
        const T* wo = w_out + row * hidden;
        float wr[kPerLane];
        float z = 0.f, dg = 0.f;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          const int c = lane + 32 * k;
          wr[k] = c < hidden ? Elem<T>::load(wi + c) : 0.f;
          const float wo_c = c < hidden ? Elem<T>::load(wo + c) : 0.f;
          z = fmaf(xr[k], wr[k], z);
          dg = fmaf(gr[k], wo_c, dg);
        }
        const float c_in = row_coefficients(z, dg, b_in, row, coef_in, coef_out, tree * levels + level, lane);
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) gx[k] = fmaf(c_in, wr[k], gx[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int c = lane + 32 * k;
      if (c < hidden) Elem<T>::store(grad_x + c, gx[k]);
    }
  } else {
    // Coefficients: lane 0 keeps them in global scratch, read back by the whole warp after __syncwarp
    // (which orders the warp's memory accesses).
    for (int tree = 0; tree < trees; ++tree) {
      const int leaf = p.leaf_keys[tree * p.tokens + token];
      for (int level = 0; level < levels; ++level) {
        const int64_t row = path_row(tree, level, leaf, depth);
        const T* wi = w_in + row * hidden;
        const T* wo = w_out + row * hidden;
        float z = 0.f, dg = 0.f;
#pragma unroll 4
        for (int c = lane; c < hidden; c += 32) {
          z = fmaf(Elem<T>::load(x + c), Elem<T>::load(wi + c), z);
          dg = fmaf(Elem<T>::load(grad_y + c), Elem<T>::load(wo + c), dg);
        }
        row_coefficients(z, dg, b_in, row, coef_in, coef_out, tree * levels + level, lane);
      }
    }
    __syncwarp();
    constexpr int kBlock = 8;  // columns per lane per pass
    for (int c0 = 0; c0 < hidden; c0 += 32 * kBlock) {
      float gx[kBlock];
#pragma unroll
      for (int k = 0; k < kBlock; ++k) gx[k] = 0.f;
      for (int tree = 0; tree < trees; ++tree) {
        const int leaf = p.leaf_keys[tree * p.tokens + token];
        for (int level = 0; level < levels; ++level) {
          const float c_in = coef_in[tree * levels + level];
          const T* wi = w_in + path_row(tree, level, leaf, depth) * hidden;
#pragma unroll
          for (int k = 0; k < kBlock; ++k) {
            const int c = c0 + lane + 32 * k;
            if (c < hidden) gx[k] = fmaf(c_in, Elem<T>::load(wi + c), gx[k]);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kBlock; ++k) {
        const int c = c0 + lane + 32 * k;
        if (c < hidden) Elem<T>::store(grad_x + c, gx[k]);
      }
    }
  }
}

// Pieces of the 16-byte token passes below. A lane holds vectors lane + 32 k (k < kVecs) of each row, unpacked to
// fp32 in registers (every index is an unrolled loop counter).
template <typename T, int kVecs>
using LaneVectors = float[kVecs][Elem<T>::kVec];

// The token's x and grad_y vectors; its grad_x sums start at zero.
template <typename T, int kVecs>
__device__ __forceinline__ void load_token(const T* x, const T* grad_y, int vectors, int lane,
                                           LaneVectors<T, kVecs>& xr, LaneVectors<T, kVecs>& gr,
                                           LaneVectors<T, kVecs>& gx) {
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int v = lane + 32 * k;
#pragma unroll
    for (int e = 0; e < Elem<T>::kVec; ++e) xr[k][e] = gr[k][e] = gx[k][e] = 0.f;
    if (v < vectors) {
      load_vec(x, v, xr[k]);
      load_vec(grad_y, v, gr[k]);
    }
  }
}

// grad_x += c_in * w_in[row], from the w_in vectors the level's dot loop kept in wr.
template <typename T, int kVecs>
__device__ __forceinline__ void accumulate_grad_x(float c_in, const LaneVectors<T, kVecs>& wr,
                                                  LaneVectors<T, kVecs>& gx) {
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
#pragma unroll
    for (int e = 0; e < Elem<T>::kVec; ++e) gx[k][e] = fmaf(c_in, wr[k][e], gx[k][e]);
  }
}

template <typename T, int kVecs>
__device__ __forceinline__ void store_grad_x(T* grad_x, int vectors, int lane, const LaneVectors<T, kVecs>& gx) {
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const int v = lane + 32 * k;
    if (v < vectors) reinterpret_cast<uint4*>(grad_x)[v] = Elem<T>::pack(gx[k]);
  }
}

// Token pass with 16-byte loads: hidden is a multiple of the vector width, the rows are 16-byte aligned and
// a row is at most 32 * kVecs vectors (lane holds vectors lane + 32 k). Same arithmetic as above, with an
// eighth of the load instructions at 16 bits.
template <typename T, int kVecs>
__global__ void __launch_bounds__(kTokenWarps * 32, kVecs * Elem<T>::kVec > 24 ? 1 : 2)
    token_pass_vec_kernel(const BackwardParams p) {
  constexpr int kE = Elem<T>::kVec;
  const int lane = threadIdx.x & 31;
  const int64_t position = blockIdx.x * int64_t{kTokenWarps} + (threadIdx.x >> 5);
  if (position >= p.tokens) return;
  const int64_t token = p.order[position];
  const int hidden = p.hidden, depth = p.depth, levels = depth + 1, trees = p.trees;
  const int vectors = hidden / kE;
  const T* x = static_cast<const T*>(p.x) + token * hidden;
  const T* grad_y = static_cast<const T*>(p.grad_y) + token * hidden;
  const T* b_in = static_cast<const T*>(p.b_in);
  float* coef_in = p.coef_in + token * trees * levels;
  float* coef_out = p.coef_out + token * trees * levels;

  LaneVectors<T, kVecs> xr, gr, gx;
  load_token<T, kVecs>(x, grad_y, vectors, lane, xr, gr, gx);
  for (int tree = 0; tree < trees; ++tree) {
    const int leaf = p.leaf_keys[tree * p.tokens + token];
    for (int level = 0; level < levels; ++level) {
      const int64_t row = path_row(tree, level, leaf, depth);
      const T* wi = static_cast<const T*>(p.w_in) + row * hidden;
      const T* wo = static_cast<const T*>(p.w_out) + row * hidden;
      LaneVectors<T, kVecs> wr;
      float z = 0.f, dg = 0.f;
#pragma unroll
      for (int k = 0; k < kVecs; ++k) {
        const int v = lane + 32 * k;
        float wo_v[kE];
#pragma unroll
        for (int e = 0; e < kE; ++e) wr[k][e] = wo_v[e] = 0.f;
        if (v < vectors) {
          load_vec(wi, v, wr[k]);
          load_vec(wo, v, wo_v);
        }
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          z = fmaf(xr[k][e], wr[k][e], z);
          dg = fmaf(gr[k][e], wo_v[e], dg);
        }
      }
      const float c_in = row_coefficients(z, dg, b_in, row, coef_in, coef_out, tree * levels + level, lane);
      accumulate_grad_x<T, kVecs>(c_in, wr, gx);
    }
  }
  store_grad_x<T, kVecs>(static_cast<T*>(p.grad_x) + token * hidden, vectors, lane, gx);
}

// Token pass with the rows staged in shared memory: cp.async copies the next level's w_in and w_out rows while this
// level's sums, GELU and butterflies run, without registers to hold them (the kernel above waits on each level's
// loads before it can start the level). A lane copies exactly the 16-byte vectors it later reads (lane + 32 k), so no
// lane waits on another's copy. Same arithmetic as above: same bits. Taken for 16-bit types only: on an H100 it took
// the bf16 backward from 538 to 512 us at 32768 tokens (134 -> 122 at 4096), but the fp32 one from 509 to 577 (its
// rows are twice the bytes: 96 KB of stages per block).
template <typename T, int kVecs>
__global__ void __launch_bounds__(kTokenWarps * 32, kVecs * Elem<T>::kVec > 24 ? 1 : 2)
    token_pass_staged_kernel(const BackwardParams p) {
  extern __shared__ uint4 staged_rows[];  // per warp: two stages of (w_in row, w_out row)
  constexpr int kE = Elem<T>::kVec;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t position = blockIdx.x * int64_t{kTokenWarps} + warp;
  if (position >= p.tokens) return;  // whole warps only: no block-wide barrier below
  const int64_t token = p.order[position];
  const int hidden = p.hidden, depth = p.depth, levels = depth + 1, trees = p.trees;
  const int vectors = hidden / kE;
  const int steps = trees * levels;  // step s visits level s % levels of tree s / levels
  uint4* stages = staged_rows + int64_t{warp} * 4 * vectors;
  const uint4* w_in = static_cast<const uint4*>(p.w_in);
  const uint4* w_out = static_cast<const uint4*>(p.w_out);
  const T* b_in = static_cast<const T*>(p.b_in);
  float* coef_in = p.coef_in + token * trees * levels;
  float* coef_out = p.coef_out + token * trees * levels;
  auto step_row = [&](int step) {
    const int tree = step / levels, level = step - tree * levels;
    return path_row(tree, level, p.leaf_keys[tree * p.tokens + token], depth);
  };
  auto stage_rows = [&](int step) {
    const int64_t row = step_row(step) * vectors;
    uint4* into = stages + (step & 1) * 2 * vectors;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int v = lane + 32 * k;
      if (v < vectors) {
        cp_async_ca<16>(into + v, w_in + row + v);
        cp_async_ca<16>(into + vectors + v, w_out + row + v);
      }
    }
    cp_async_commit();
  };
  stage_rows(0);

  const T* x = static_cast<const T*>(p.x) + token * hidden;
  const T* grad_y = static_cast<const T*>(p.grad_y) + token * hidden;
  LaneVectors<T, kVecs> xr, gr, gx;
  load_token<T, kVecs>(x, grad_y, vectors, lane, xr, gr, gx);
  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) {
      __syncwarp();  // the reads of the stage refilled here (at the step before) are done
      stage_rows(step + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    const uint4* rows = stages + (step & 1) * 2 * vectors;
    LaneVectors<T, kVecs> wr;
    float z = 0.f, dg = 0.f;
    // The vector kernel's dot loop with the rows read from the stage. Written out: through a shared helper (rows as
    // a callback or as pointers) nvcc allocates this kernel's registers differently, and the timed code is this one.
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int v = lane + 32 * k;
      float wo_v[kE];
#pragma unroll
      for (int e = 0; e < kE; ++e) wr[k][e] = wo_v[e] = 0.f;
      if (v < vectors) {
        Elem<T>::unpack(rows[v], wr[k]);
        Elem<T>::unpack(rows[vectors + v], wo_v);
      }
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        z = fmaf(xr[k][e], wr[k][e], z);
        dg = fmaf(gr[k][e], wo_v[e], dg);
      }
    }
    const float c_in = row_coefficients(z, dg, b_in, step_row(step), coef_in, coef_out, step, lane);
    accumulate_grad_x<T, kVecs>(c_in, wr, gx);
  }
  store_grad_x<T, kVecs>(static_cast<T*>(p.grad_x) + token * hidden, vectors, lane, gx);
}

// ---------------------------------------------------------------------------------------------------
// Weight pass: block (column tile, chunk, tree). A thread owns the column pair 2q, 2q + 1 of the hidden + 1 columns,
// column `hidden` being the bias (its "x" is 1 and it has no grad_y side), so that each token's coefficient reads
// and node-boundary bookkeeping serve two columns: on an H100 that took the weight pass at 32768 fp32 tokens from 173
// to 158 us and the bf16 backward 4-7% faster than one column per thread. kPaired: hidden even and rows 2-element
// aligned, so a pair is one load or store. kMaxLevels >= depth + 1 bounds the per-level running sums kept in
// registers (indexed only by unrolled loop counters).

// Where partial sums of (tree, chunk, level, slot) start in partial_in / partial_out (in rows of their width).
__device__ __forceinline__ int64_t partial_index(const BackwardParams& p, int tree, int64_t chunk, int level, int slot) {
  return ((tree * int64_t{p.chunks} + chunk) * (p.depth + 1) + level) * 2 + slot;
}

// Gradient element `col` of a visited row: a weight column, or the bias for col == hidden.
template <typename T>
__device__ __forceinline__ void write_row(const BackwardParams& p, int64_t row, int col, float sum_in, float sum_out) {
  const int hidden = p.hidden;
  if (col < hidden) {
    Elem<T>::store(static_cast<T*>(p.grad_w_in) + row * hidden + col, sum_in);
    Elem<T>::store(static_cast<T*>(p.grad_w_out) + row * hidden + col, sum_out);
  } else if (col == hidden) {
    Elem<T>::store(static_cast<T*>(p.grad_b_in) + row, sum_in);
  }
}

// x and grad_y of columns col, col + 1 of one token row: (1, 0) for the bias column's x, zeros past it.
template <typename T, bool kPaired>
__device__ __forceinline__ void load_pair(const T* x_row, const T* g_row, int col, int hidden, float2& xv, float2& gv) {
  if constexpr (kPaired) {  // col even, hidden even: both columns exist, or col is the bias
    if (col < hidden) {
      xv = Elem<T>::load2(x_row, col / 2);
      gv = Elem<T>::load2(g_row, col / 2);
    } else {
      xv = make_float2(1.f, 0.f);
      gv = make_float2(0.f, 0.f);
    }
  } else {
    xv.x = col < hidden ? Elem<T>::load(x_row + col) : (col == hidden ? 1.f : 0.f);
    gv.x = col < hidden ? Elem<T>::load(g_row + col) : 0.f;
    xv.y = col + 1 < hidden ? Elem<T>::load(x_row + col + 1) : (col + 1 == hidden ? 1.f : 0.f);
    gv.y = col + 1 < hidden ? Elem<T>::load(g_row + col + 1) : 0.f;
  }
}

template <typename T, int kMaxLevels, bool kPaired>
__global__ void __launch_bounds__(kColumns) weight_pass_kernel(const BackwardParams p) {
  extern __shared__ float smem[];
  const int chunk_size = p.chunk, depth = p.depth, levels = depth + 1, hidden = p.hidden, trees = p.trees;
  const int tree = blockIdx.z;
  const int64_t chunk = blockIdx.y;
  const int col = 2 * (blockIdx.x * kColumns + threadIdx.x);  // this thread's columns: col and col + 1
  const int64_t start = chunk * chunk_size;
  const int len = static_cast<int>(min(int64_t{chunk_size}, p.tokens - start));
  const int stride = backward_coef_stride(levels);                       // levels padded for 16-byte reads
  float* s_coef_in = smem;                                                 // (chunk, stride)
  float* s_coef_out = s_coef_in + chunk_size * stride;                     // (chunk, stride)
  int* s_leaf = reinterpret_cast<int*>(s_coef_out + chunk_size * stride);  // (chunk)
  int* s_token = s_leaf + chunk_size;                                      // (chunk)
  int* s_first = s_token + chunk_size;  // (chunk): the highest level whose node ends at the token (levels: none)
  float2* s_x = reinterpret_cast<float2*>(s_first + chunk_size);           // (kPairGroup, kColumns): own pair only
  float2* s_g = s_x + kPairGroup * kColumns;

  const int* sorted_leaf = p.sorted_leaf + tree * p.tokens;
  const int64_t* order = p.order + tree * p.tokens;
  for (int i = threadIdx.x; i < len; i += kColumns) {
    s_leaf[i] = sorted_leaf[start + i];
    s_token[i] = static_cast<int>(order[start + i]);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < len * levels; i += kColumns) {
    const int at = i / levels, level = i - at * levels;
    const int64_t source = (s_token[at] * int64_t{trees} + tree) * levels + level;
    s_coef_in[at * stride + level] = p.coef_in[source];
    s_coef_out[at * stride + level] = p.coef_out[source];
  }
  // Found once per block rather than by every thread: every level ends at the chunk's last token; elsewhere those
  // at and below the highest leaf bit that differs from the next token's (node(l) = leaf >> (depth - l)).
  for (int at = threadIdx.x; at < len; at += kColumns) {
    int first = 0;
    if (at < len - 1) {
      const int diff = s_leaf[at] ^ s_leaf[at + 1];
      first = diff ? depth - (31 - __clz(diff)) : levels;
    }
    s_first[at] = first;
  }
  __syncthreads();
  if (col > hidden) return;  // no barrier below

  // Leaves just outside the chunk: a node whose run reaches past either end is flushed to a partial slot.
  const int prev_leaf = start > 0 ? sorted_leaf[start - 1] : -1;
  const int next_leaf = start + len < p.tokens ? sorted_leaf[start + len] : -1;
  const T* x = static_cast<const T*>(p.x);
  const T* grad_y = static_cast<const T*>(p.grad_y);
  const int in_width = hidden + 1;

  float sum_in[kMaxLevels][2], sum_out[kMaxLevels][2];
#pragma unroll
  for (int l = 0; l < kMaxLevels; ++l) sum_in[l][0] = sum_in[l][1] = sum_out[l][0] = sum_out[l][1] = 0.f;

  for (int g0 = 0; g0 < len; g0 += kPairGroup) {
    // All of the group's loads in flight at once, then parked in this thread's shared-memory slots so that the
    // token loop below needs no unrolling.
    float2 xs[kPairGroup], gs[kPairGroup];
#pragma unroll
    for (int j = 0; j < kPairGroup; ++j) {
      const int64_t row = (g0 + j < len ? s_token[g0 + j] : s_token[0]) * int64_t{hidden};
      load_pair<T, kPaired>(x + row, grad_y + row, col, hidden, xs[j], gs[j]);
    }
#pragma unroll
    for (int j = 0; j < kPairGroup; ++j) {
      s_x[j * kColumns + threadIdx.x] = xs[j];
      s_g[j * kColumns + threadIdx.x] = gs[j];
    }
    const int group_len = min(kPairGroup, len - g0);
    for (int j = 0; j < group_len; ++j) {
      const int at = g0 + j;
      const float2 xv = s_x[j * kColumns + threadIdx.x], gv = s_g[j * kColumns + threadIdx.x];
      const float4* ci = reinterpret_cast<const float4*>(s_coef_in + at * stride);
      const float4* co = reinterpret_cast<const float4*>(s_coef_out + at * stride);
#pragma unroll
      for (int l = 0; l < kMaxLevels; l += 4) {
        if (l < levels) {  // padding coefficients are never read into a level that exists
          const float4 a = ci[l / 4], b = co[l / 4];
          const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            sum_in[l + u][0] = fmaf(av[u], xv.x, sum_in[l + u][0]);
            sum_in[l + u][1] = fmaf(av[u], xv.y, sum_in[l + u][1]);
            sum_out[l + u][0] = fmaf(bv[u], gv.x, sum_out[l + u][0]);
            sum_out[l + u][1] = fmaf(bv[u], gv.y, sum_out[l + u][1]);
          }
        }
      }
      const int first = s_first[at];
      if (first == levels) continue;  // the same for every thread of the block
      const int leaf = s_leaf[at];
      const bool last = at == len - 1;
#pragma unroll
      for (int l = 0; l < kMaxLevels; ++l) {
        if (l < levels && l >= first) {
          const int shift = depth - l;
          const int node = leaf >> shift;
          const bool started_before = prev_leaf >= 0 && (prev_leaf >> shift) == node;
          const bool runs_past = last && next_leaf >= 0 && (next_leaf >> shift) == node;
          if (!started_before && !runs_past) {
            const int64_t row = path_row(tree, l, leaf, depth);
            if (kPaired && col < hidden) {
              Elem<T>::store2(static_cast<T*>(p.grad_w_in) + row * hidden, col / 2, sum_in[l][0], sum_in[l][1]);
              Elem<T>::store2(static_cast<T*>(p.grad_w_out) + row * hidden, col / 2, sum_out[l][0], sum_out[l][1]);
            } else {
              write_row<T>(p, row, col, sum_in[l][0], sum_out[l][0]);
              write_row<T>(p, row, col + 1, sum_in[l][1], sum_out[l][1]);
            }
          } else {
            const int64_t slot = partial_index(p, tree, chunk, l, started_before ? 0 : 1);
            p.partial_in[slot * in_width + col] = sum_in[l][0];
            if (col + 1 <= hidden) p.partial_in[slot * in_width + col + 1] = sum_in[l][1];
            if (col < hidden) p.partial_out[slot * hidden + col] = sum_out[l][0];
            if (col + 1 < hidden) p.partial_out[slot * hidden + col + 1] = sum_out[l][1];
          }
          sum_in[l][0] = sum_in[l][1] = sum_out[l][0] = sum_out[l][1] = 0.f;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Fixup: block (column tile, chunk, tree * levels). The chunk in which a node starts and whose run reaches
// past it owns that node: it adds its slot 1 and the slot 0 of every following chunk the run covers, in
// chunk order, and writes the row.
template <typename T>
__global__ void __launch_bounds__(kColumns) fixup_kernel(const BackwardParams p) {
  const int depth = p.depth, levels = depth + 1, hidden = p.hidden;
  const int tree = blockIdx.z / levels, level = blockIdx.z % levels;
  const int64_t chunk = blockIdx.y;
  const int col = blockIdx.x * kColumns + threadIdx.x;
  if (col > hidden) return;
  const int64_t tokens = p.tokens;
  const int64_t start = chunk * p.chunk, end = min(start + p.chunk, tokens);
  const int* sorted_leaf = p.sorted_leaf + tree * tokens;
  const int shift = depth - level;
  const int node = sorted_leaf[end - 1] >> shift;
  const bool runs_past = end < tokens && (sorted_leaf[end] >> shift) == node;
  const bool started_before = start > 0 && (sorted_leaf[start - 1] >> shift) == node;
  if (!runs_past || started_before) return;
  // The run's end: the first position past `end` whose leaf lies beyond the node's leaves.
  const int past = (node + 1) << shift;
  int64_t lo = end, hi = tokens;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (sorted_leaf[mid] < past) lo = mid + 1; else hi = mid;
  }
  const int64_t last_chunk = (lo - 1) / p.chunk;

  const int in_width = hidden + 1;
  const bool has_out = col < hidden;
  const int64_t own = partial_index(p, tree, chunk, level, 1);
  float sum_in = p.partial_in[own * in_width + col];
  float sum_out = has_out ? p.partial_out[own * hidden + col] : 0.f;
  for (int64_t c0 = chunk + 1; c0 <= last_chunk; c0 += kFixupBatch) {
    float in_part[kFixupBatch], out_part[kFixupBatch];
#pragma unroll
    for (int j = 0; j < kFixupBatch; ++j) {
      const bool real = c0 + j <= last_chunk;
      const int64_t slot = partial_index(p, tree, real ? c0 + j : chunk, level, 0);
      in_part[j] = real ? p.partial_in[slot * in_width + col] : 0.f;
      out_part[j] = real && has_out ? p.partial_out[slot * hidden + col] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kFixupBatch; ++j) {
      if (c0 + j <= last_chunk) {
        sum_in += in_part[j];
        sum_out += out_part[j];
      }
    }
  }
  write_row<T>(p, path_row(tree, level, sorted_leaf[end - 1], depth), col, sum_in, sum_out);
}

// ---------------------------------------------------------------------------------------------------
// Rows no token visited: their gradients are zero. The passes write every visited row whole, so the outputs need no
// zeroing beforehand. One warp per node: the node (tree, level, n) covers leaves [n << shift, (n + 1) << shift),
// and some token visited it iff the tree's sorted leaves hold one in that range.
template <typename T>
__global__ void zero_unvisited_kernel(const BackwardParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t per_tree = nodes_per_tree(p.depth);
  const int64_t node = blockIdx.x * int64_t{kNodeWarps} + (threadIdx.x >> 5);
  if (node >= per_tree * p.trees) return;
  const int tree = static_cast<int>(node / per_tree);
  const int64_t heap = node - tree * per_tree;  // level l holds heap indices [2^l - 1, 2^(l+1) - 1)
  const int level = 63 - __clzll(heap + 1);
  const int shift = p.depth - level;
  const int64_t first_leaf = (heap + 1 - (int64_t{1} << level)) << shift;
  const int64_t past_leaf = first_leaf + (int64_t{1} << shift);
  const int* sorted_leaf = p.sorted_leaf + tree * p.tokens;
  int64_t lo = 0, hi = p.tokens;  // the first sorted position whose leaf is >= first_leaf
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (sorted_leaf[mid] < first_leaf) lo = mid + 1; else hi = mid;
  }
  if (lo < p.tokens && sorted_leaf[lo] < past_leaf) return;  // visited: the passes write it
  T* w_in_row = static_cast<T*>(p.grad_w_in) + node * p.hidden;
  T* w_out_row = static_cast<T*>(p.grad_w_out) + node * p.hidden;
  for (int c = lane; c < p.hidden; c += 32) {
    Elem<T>::store(w_in_row + c, 0.f);
    Elem<T>::store(w_out_row + c, 0.f);
  }
  if (lane == 0) Elem<T>::store(static_cast<T*>(p.grad_b_in) + node, 0.f);
}

// ---------------------------------------------------------------------------------------------------
template <typename T, int kPerLane>
void launch_token_pass(const BackwardParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.tokens + kTokenWarps - 1) / kTokenWarps;
  token_pass_kernel<T, kPerLane><<<static_cast<unsigned>(blocks), kTokenWarps * 32, 0, stream>>>(p);
  HF_FFF_BWD_LAUNCH_CHECK("token pass launch");
}

template <typename T, int kVecs>
void launch_token_pass_vec(const BackwardParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.tokens + kTokenWarps - 1) / kTokenWarps;
  if constexpr (sizeof(T) == 2) {
    // per warp two stages of a w_in and a w_out row
    const int64_t smem = int64_t{kTokenWarps} * 4 * p.hidden * sizeof(T);
    auto kernel = token_pass_staged_kernel<T, kVecs>;
    allow_dynamic_smem(kernel, smem, "token pass shared memory");
    kernel<<<static_cast<unsigned>(blocks), kTokenWarps * 32, smem, stream>>>(p);
  } else {
    token_pass_vec_kernel<T, kVecs><<<static_cast<unsigned>(blocks), kTokenWarps * 32, 0, stream>>>(p);
  }
  HF_FFF_BWD_LAUNCH_CHECK("token pass launch");
}

inline bool is_aligned_to(const void* pointer, size_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}
inline bool is_aligned16(const void* pointer) { return is_aligned_to(pointer, 16); }

template <typename T, int kMaxLevels>
void launch_weight_pass(const BackwardParams& p, cudaStream_t stream) {
  const size_t pair_bytes = 2 * sizeof(T);
  const bool paired = p.hidden % 2 == 0 && is_aligned_to(p.x, pair_bytes) && is_aligned_to(p.grad_y, pair_bytes) &&
                      is_aligned_to(p.grad_w_in, pair_bytes) && is_aligned_to(p.grad_w_out, pair_bytes);
  const int64_t smem = backward_weight_smem_bytes(p.chunk, p.depth + 1);
  auto kernel = paired ? weight_pass_kernel<T, kMaxLevels, true> : weight_pass_kernel<T, kMaxLevels, false>;
  allow_dynamic_smem(kernel, smem, "weight pass shared memory");
  const dim3 grid(backward_weight_tiles(p.hidden), p.chunks, p.trees);
  kernel<<<grid, kColumns, smem, stream>>>(p);
  HF_FFF_BWD_LAUNCH_CHECK("weight pass launch");
}

template <typename T>
void launch_backward(const BackwardParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return;
  const int hidden = p.hidden, levels = p.depth + 1;
  constexpr int kE = Elem<T>::kVec;
  const bool aligned = hidden % kE == 0 && is_aligned16(p.x) && is_aligned16(p.grad_y) && is_aligned16(p.w_in) &&
                       is_aligned16(p.w_out) && is_aligned16(p.grad_x);
  const int vectors_per_lane = (hidden / kE + 31) / 32;
  if (aligned && vectors_per_lane <= 1) launch_token_pass_vec<T, 1>(p, stream);
  else if (aligned && vectors_per_lane <= 2) launch_token_pass_vec<T, 2>(p, stream);
  else if (aligned && vectors_per_lane <= 3) launch_token_pass_vec<T, 3>(p, stream);
  else if (aligned && vectors_per_lane <= 4) launch_token_pass_vec<T, 4>(p, stream);
  else if (aligned && vectors_per_lane <= 6) launch_token_pass_vec<T, 6>(p, stream);
  else if (aligned && vectors_per_lane <= 8) launch_token_pass_vec<T, 8>(p, stream);
  else if (hidden <= 128) launch_token_pass<T, 4>(p, stream);
  else if (hidden <= 256) launch_token_pass<T, 8>(p, stream);
  else if (hidden <= 512) launch_token_pass<T, 16>(p, stream);
  else if (hidden <= 768) launch_token_pass<T, 24>(p, stream);
  else if (hidden <= 1024) launch_token_pass<T, 32>(p, stream);
  else launch_token_pass<T, 0>(p, stream);

  // The running sums take 2 * kMaxLevels registers per thread whether the levels exist or not: a bound of 12
  // for depths 9 to 11 (UltraFastBERT-1x11's) instead of 16 leaves bf16 at 80 registers instead of 137, 5 blocks
  // per SM instead of 3 (bf16 weight pass at 32768 tokens 311 -> 245 us on an H100; fp32 unchanged).
  if (levels <= 4) launch_weight_pass<T, 4>(p, stream);
  else if (levels <= 8) launch_weight_pass<T, 8>(p, stream);
  else if (levels <= 12) launch_weight_pass<T, 12>(p, stream);
  else if (levels <= 16) launch_weight_pass<T, 16>(p, stream);
  else launch_weight_pass<T, 32>(p, stream);

  if (p.chunks > 1) {
    const dim3 grid(backward_column_tiles(hidden), p.chunks, p.trees * levels);
    fixup_kernel<T><<<grid, kColumns, 0, stream>>>(p);
    HF_FFF_BWD_LAUNCH_CHECK("fixup launch");
  }
  const int64_t nodes = nodes_per_tree(p.depth) * p.trees;
  zero_unvisited_kernel<T><<<static_cast<unsigned>((nodes + kNodeWarps - 1) / kNodeWarps), kNodeWarps * 32, 0,
                             stream>>>(p);
  HF_FFF_BWD_LAUNCH_CHECK("zeroing launch");
}

}  // namespace bwd
}  // namespace hf_fff_cuda

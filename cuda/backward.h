// Interface of the fused CUDA backward of the FFF op (kernels in backward.cuh, instantiated per dtype in
// fff_cuda_backward.cu; binding in fff_cuda_backward.cpp).
//
// Given grad_y and x (M, H), the weights (T*N, H), bias (T*N,) and the leaves (M, T) that the forward reached,
// it computes grad_x (M, H), grad_weight_in, grad_bias_in and grad_weight_out, deterministically (fixed
// summation order, no atomics), in fp32 accumulation, with O(M * T * levels) scratch and no (M, levels, H)
// temporaries. Four steps after a stable sort of each tree's tokens by leaf (CUB's radix sort over the leaf bits):
//   1. token pass (one warp per token, tokens in tree 0's sorted order so that neighbouring warps share
//      rows in L1): along each tree's path recompute z = x.w_in[row] + b and dg = grad_y.w_out[row], store
//      coef_in = dg * GELU'(z) and coef_out = GELU(z) per (token, tree, level), and accumulate
//      grad_x = sum coef_in * w_in[row] in registers. At 16 bits, a level's rows are copied into shared memory
//      (cp.async) while the level before is computed.
//   2. weight pass: a block owns `chunk` consecutive tokens of one tree's sorted order and a tile of
//      columns, two per thread. Sorted by leaf means sorted by node at every level (node(l) = leaf >> (depth - l)),
//      so each node's tokens are one run of the sorted order at every level. The block walks its tokens once,
//      keeping per level the running sums coef_in * x (and coef_in alone, the bias, as the virtual column
//      H) and coef_out * grad_y of the current node; when a node's run ends it is flushed: straight to the
//      gradient when the whole run lies in the chunk, else to the chunk's partial slot for that level
//      (slot 0: the node the chunk starts inside of; slot 1: the node that starts in the chunk and runs past it).
//   3. fixup: the chunk where a spanning node starts adds its slot 1 and the following chunks' slot 0 in
//      chunk order and writes the gradient row.
//   4. zeroing: the outputs are not pre-zeroed; a warp per node finds in the sorted leaves whether any token
//      visited it, and zeroes the row if none did.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_runtime_api.h>

#ifndef __CUDACC__
#include <ATen/core/Tensor.h>

#include <tuple>
#endif

#ifdef __CUDACC__
#define HF_FFF_BWD_HOST_DEVICE __host__ __device__
#else
#define HF_FFF_BWD_HOST_DEVICE
#endif

namespace hf_fff_cuda {

constexpr int kBackwardMaxLevels = 31;  // depth <= 30 (leaves are int32 heap offsets below 2^30)
constexpr int kBackwardColumns = 128;   // threads per block of the weight pass (a column pair each) and of the fixup
constexpr int kBackwardPairGroup = 8;   // weight pass: tokens whose x / grad_y pairs are in flight together

struct BackwardParams {
  const void* grad_y;  // (tokens, hidden) contiguous
  const void* x;       // (tokens, hidden) contiguous
  const void* w_in;    // (trees * N, hidden) contiguous, N = 2^(depth+1) - 1
  const void* b_in;    // (trees * N,)
  const void* w_out;   // (trees * N, hidden) contiguous
  const int* leaf_keys;     // (trees, tokens): each token's leaf per tree, masked to [0, 2^depth)
  const int* sorted_leaf;   // (trees, tokens): each tree's leaves in ascending order (stable sort)
  const int64_t* order;     // (trees, tokens): the token at each position of that order
  void* grad_x;             // (tokens, hidden), written
  void* grad_w_in;          // (trees * N, hidden): visited rows written by the passes, the others zeroed
  void* grad_b_in;          // (trees * N,), likewise
  void* grad_w_out;         // (trees * N, hidden), likewise
  float* coef_in;           // scratch (tokens, trees, levels): dg * GELU'(z)
  float* coef_out;          // scratch (tokens, trees, levels): GELU(z)
  float* partial_in;        // scratch (trees, chunks, levels, 2, hidden + 1): chunk partials, column hidden = bias
  float* partial_out;       // scratch (trees, chunks, levels, 2, hidden)
  int64_t tokens;
  int hidden;
  int depth;
  int trees;
  int chunk;   // tokens per weight-pass block
  int chunks;  // ceil(tokens / chunk)
};

// Tokens per weight-pass block. The block stages `chunk * levels` coefficient pairs in shared memory, which caps
// the chunk at 256 tokens (128 past 16 levels); a block walks its chunk token by token, so shorter chunks
// (more, shorter blocks) balance better until the fixup's partials outweigh them: on an H100 at 32768 fp32
// tokens (one column per thread then), 192-token chunks took the weight pass from 214 to 173 us (fixup 26 -> 33 us)
// and 128-token ones to 171 (fixup 48), so the chunk stops at kLargestChunk. A smaller call takes smaller chunks,
// down to kSmallestChunk, so that the grid (column tiles x chunks x trees blocks) still gives every SM
// kWeightBlocksPerSm blocks: with 256-token chunks, 4096 tokens made 112 blocks of 4 warps for 132 SMs. The chunk
// fixes the summation order, so the gradients depend on it (and on the GPU's SM count) but never vary from run to run.
constexpr int kWeightBlocksPerSm = 4;
constexpr int kSmallestChunk = 32;
constexpr int kLargestChunk = 192;

inline int backward_chunk(int levels, int64_t tokens, int64_t blocks_per_chunk, int sms) {
  const int64_t largest = levels > 16 ? 128 : kLargestChunk;
  const int64_t wanted_chunks = (int64_t{kWeightBlocksPerSm} * sms + blocks_per_chunk - 1) / blocks_per_chunk;
  const int64_t even = (tokens + wanted_chunks - 1) / wanted_chunks;
  const int64_t rounded = (even + kSmallestChunk - 1) / kSmallestChunk * kSmallestChunk;
  return static_cast<int>(std::clamp<int64_t>(rounded, kSmallestChunk, largest));
}

// Column tiles of the fixup: kBackwardColumns columns each, over hidden + 1 columns (the last one is the bias).
inline int backward_column_tiles(int hidden) { return (hidden + kBackwardColumns) / kBackwardColumns; }

// Column tiles of the weight pass: kBackwardColumns column pairs each, over the hidden + 1 columns.
inline int backward_weight_tiles(int hidden) {
  const int pairs = (hidden + 2) / 2;
  return (pairs + kBackwardColumns - 1) / kBackwardColumns;
}

// Blocks of the weight pass per chunk: its column tiles times the trees.
inline int64_t backward_blocks_per_chunk(int hidden, int64_t trees) {
  return int64_t{backward_weight_tiles(hidden)} * trees;
}

inline int64_t backward_chunk_count(int64_t tokens, int chunk) { return (tokens + chunk - 1) / chunk; }

// Weight pass: a token's coefficients in shared memory, padded to a multiple of 4 for 16-byte reads.
HF_FFF_BWD_HOST_DEVICE inline int backward_coef_stride(int levels) { return (levels + 3) & ~3; }

// Shared memory of the weight pass: coefficient pairs, leaves, token ids and first ending levels of its chunk, and
// the x / grad_y pairs of a token group per thread.
inline int64_t backward_weight_smem_bytes(int chunk, int levels) {
  const int64_t per_token = 2 * backward_coef_stride(levels) * 4 + 3 * 4;
  const int64_t staging = int64_t{2} * kBackwardPairGroup * kBackwardColumns * 8;  // float2 x and grad_y per thread
  return int64_t{chunk} * per_token + staging;
}

void launch_backward_f32(const BackwardParams& p, cudaStream_t stream);
void launch_backward_f16(const BackwardParams& p, cudaStream_t stream);
void launch_backward_bf16(const BackwardParams& p, cudaStream_t stream);

// Leaf keys for the sort: keys (trees, tokens) int32 = leaves (tokens, trees) masked to [0, 2^depth), and ids (trees,
// tokens) = each token's index, the values the sort carries.
void launch_backward_keys(const int64_t* leaves, int* keys, int64_t* ids, int64_t tokens, int trees, int depth,
                          cudaStream_t stream);

// The stable sort of each tree's tokens by leaf (keys and ids as launch_backward_keys writes them).
struct BackwardSort {
  const int* keys;
  int* sorted_keys;    // (trees, tokens)
  const int64_t* ids;
  int64_t* order;      // (trees, tokens)
  const int* offsets;  // (trees + 1,): tree t's tokens are [offsets[t], offsets[t + 1]) of the flat arrays
  int64_t tokens;
  int trees;
  int depth;
  void* scratch;        // nullptr: only size the scratch
  size_t scratch_bytes;
};
constexpr int kBlockSortThreads = 512;
constexpr int kBlockSortItems = 8;
constexpr int kBlockSortTokens = kBlockSortThreads * kBlockSortItems;
// Returns the scratch bytes needed (when `scratch` is null) or used.
size_t launch_backward_sort(const BackwardSort& sort, cudaStream_t stream);

#ifndef __CUDACC__
// Python binding (fff_cuda_backward.cpp): the four gradients of fff_forward along the saved leaves.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fff_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                      const at::Tensor& weight_in,
                                                                      const at::Tensor& bias_in,
                                                                      const at::Tensor& weight_out, int64_t depth,
                                                                      const at::Tensor& leaves);
#endif

}  // namespace hf_fff_cuda

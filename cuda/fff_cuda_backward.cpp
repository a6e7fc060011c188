// Python binding of the fused CUDA backward (backward.h): argument checks, output and scratch allocation,
// the per-tree stable sort of tokens by leaf, and the launches on the current stream (so that CUDA graphs
// and torch.compile see an ordinary stream-ordered op).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "backward.h"
#include "binding.h"

namespace hf_fff_cuda {

namespace {

void check_backward_arguments(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight_in,
                              const at::Tensor& bias_in, const at::Tensor& weight_out, int64_t depth,
                              const at::Tensor& leaves) {
  TORCH_CHECK(depth >= 0 && depth < kBackwardMaxLevels, "hf_fff CUDA backward: depth must be in [0, ",
              num(kBackwardMaxLevels - 1), "], got ", num(depth));
  const std::pair<const char*, const at::Tensor*> tensors[] = {{"grad_y", &grad_y},       {"x", &x},
                                                              {"weight_in", &weight_in}, {"bias_in", &bias_in},
                                                              {"weight_out", &weight_out}, {"leaves", &leaves}};
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(tensor->is_cuda(), "hf_fff CUDA backward: ", name, " must be a CUDA tensor");
    TORCH_CHECK(tensor->device() == x.device(), "hf_fff CUDA backward: ", name, " is on ", tensor->device().str(),
                ", x on ", x.device().str());
    TORCH_CHECK(tensor->is_contiguous(), "hf_fff CUDA backward: ", name, " must be contiguous");
  }
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "hf_fff CUDA backward: takes float32, float16 or bfloat16, got ", c10::toString(dtype));
  for (const at::Tensor* t : {&grad_y, &weight_in, &bias_in, &weight_out}) {
    TORCH_CHECK(t->scalar_type() == dtype, "hf_fff CUDA backward: grad_y, x and the weights must share one dtype, got ",
                c10::toString(t->scalar_type()), " and ", c10::toString(dtype));
  }
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1, "hf_fff CUDA backward: x must be (tokens, hidden), got ", dims(x.sizes()));
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "hf_fff CUDA backward: grad_y ", dims(grad_y.sizes()), " must match x ", dims(x.sizes()));
  const int64_t tokens = x.size(0), hidden = x.size(1);
  const int64_t n_nodes = (int64_t{2} << depth) - 1;
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == hidden && weight_in.size(0) > 0 &&
                  weight_in.size(0) % n_nodes == 0,
              "hf_fff CUDA backward: weight_in must be (trees * ", num(n_nodes), ", ", num(hidden), "), got ",
              dims(weight_in.sizes()));
  TORCH_CHECK(weight_out.sizes() == weight_in.sizes(), "hf_fff CUDA backward: weight_out ", dims(weight_out.sizes()),
              " must match weight_in ", dims(weight_in.sizes()));
  TORCH_CHECK(bias_in.dim() == 1 && bias_in.size(0) == weight_in.size(0), "hf_fff CUDA backward: bias_in must be (",
              num(weight_in.size(0)), ",), got ", dims(bias_in.sizes()));
  const int64_t trees = weight_in.size(0) / n_nodes;
  TORCH_CHECK(leaves.scalar_type() == at::kLong && leaves.dim() == 2 && leaves.size(0) == tokens &&
                  leaves.size(1) == trees,
              "hf_fff CUDA backward: leaves must be int64 (", num(tokens), ", ", num(trees), "), got ",
              c10::toString(leaves.scalar_type()), " ", dims(leaves.sizes()));
  // Launch limits: token ids are int32 in the weight pass, and the sort counts tokens x trees in int32; the
  // fixup's grid has trees * levels blocks in z.
  TORCH_CHECK(tokens * trees < std::numeric_limits<int>::max() && hidden < std::numeric_limits<int>::max() / 2 &&
                  trees * (depth + 1) <= 65535,
              "hf_fff CUDA backward: too large (tokens ", num(tokens), ", hidden ", num(hidden), ", trees ", num(trees),
              ", depth ", num(depth), ")");
}

// Each tree's tokens sorted by leaf. Returns (keys, sorted leaves, order), each (trees, tokens): the leaves masked
// into the tree in token order (int32), the same sorted (int32), and the token at each sorted position (int64).
// Stable: equal leaves keep token order, so the summation order (and the bits) never vary. CUB's radix sort passes
// over the leaf's `depth` bits alone, where torch's stable sort passes over all 32 bits of the key: on an H100 the
// whole fp32 backward of 32768 tokens went from 558 to 534 us. Scratch freed here is reused only by work queued
// after the sort on the same stream (the caching allocator's stream order).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_tokens_by_leaf(const at::Tensor& leaves, int64_t tokens, int trees,
                                                                   int depth, cudaStream_t stream) {
  const auto int32 = leaves.options().dtype(at::kInt);
  const auto int64 = leaves.options().dtype(at::kLong);
  at::Tensor keys = at::empty({trees, tokens}, int32);
  at::Tensor ids = at::empty({trees, tokens}, int64);
  launch_backward_keys(leaves.data_ptr<int64_t>(), keys.data_ptr<int>(), ids.data_ptr<int64_t>(), tokens, trees, depth,
                       stream);
  at::Tensor sorted_leaf = at::empty({trees, tokens}, int32);
  at::Tensor order = at::empty({trees, tokens}, int64);
  at::Tensor offsets = trees > 1 ? at::arange(int64_t{0}, (trees + 1) * tokens, tokens, int32) : at::Tensor();
  BackwardSort sort{keys.data_ptr<int>(),
                    sorted_leaf.data_ptr<int>(),
                    ids.data_ptr<int64_t>(),
                    order.data_ptr<int64_t>(),
                    trees > 1 ? offsets.data_ptr<int>() : nullptr,
                    tokens,
                    trees,
                    depth,
                    nullptr,
                    0};
  sort.scratch_bytes = launch_backward_sort(sort, stream);  // sizes the scratch
  at::Tensor scratch = at::empty({static_cast<int64_t>(std::max<size_t>(sort.scratch_bytes, 1))},
                                 leaves.options().dtype(at::kByte));
  sort.scratch = scratch.data_ptr();
  launch_backward_sort(sort, stream);
  return {keys, sorted_leaf, order};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fff_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                      const at::Tensor& weight_in,
                                                                      const at::Tensor& bias_in,
                                                                      const at::Tensor& weight_out, int64_t depth,
                                                                      const at::Tensor& leaves) {
  check_backward_arguments(grad_y, x, weight_in, bias_in, weight_out, depth, leaves);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int64_t tokens = x.size(0);
  const int hidden = static_cast<int>(x.size(1));
  const int levels = static_cast<int>(depth) + 1;
  const int trees = static_cast<int>(leaves.size(1));

  at::Tensor grad_x = at::empty_like(x);
  if (tokens == 0) {
    return {grad_x, at::zeros_like(weight_in), at::zeros_like(bias_in), at::zeros_like(weight_out)};
  }
  // Not pre-zeroed: the passes write every visited row whole and a kernel zeroes the rest (at 4096 fp32 tokens
  // on an H100 that took the backward from 150 to 145 us; 538 vs 544 at 32768).
  at::Tensor grad_w_in = at::empty_like(weight_in);
  at::Tensor grad_b_in = at::empty_like(bias_in);
  at::Tensor grad_w_out = at::empty_like(weight_out);

  // Checked before anything is launched: the weight pass's grid has one block row per chunk.
  const int chunk = backward_chunk(levels, tokens, backward_blocks_per_chunk(hidden, trees), sm_count(x.get_device()));
  const int64_t chunks = backward_chunk_count(tokens, chunk);
  TORCH_CHECK(chunks <= 65535, "hf_fff CUDA backward: at most ", num(int64_t{65535} * chunk), " tokens per call, got ",
              num(tokens));

  const auto fp32 = x.options().dtype(at::kFloat);
  auto [keys, sorted_leaf, order] = sort_tokens_by_leaf(leaves, tokens, trees, static_cast<int>(depth), stream);

  at::Tensor coef_in = at::empty({tokens, trees, levels}, fp32);
  at::Tensor coef_out = at::empty({tokens, trees, levels}, fp32);
  // Partial slots are only needed when a node can span chunks; one chunk writes every row directly.
  const int64_t slots = chunks > 1 ? int64_t{trees} * chunks * levels * 2 : 0;
  at::Tensor partial_in = at::empty({slots * (hidden + 1)}, fp32);
  at::Tensor partial_out = at::empty({slots * hidden}, fp32);

  BackwardParams p{};
  p.grad_y = grad_y.data_ptr();
  p.x = x.data_ptr();
  p.w_in = weight_in.data_ptr();
  p.b_in = bias_in.data_ptr();
  p.w_out = weight_out.data_ptr();
  p.leaf_keys = keys.data_ptr<int>();
  p.sorted_leaf = sorted_leaf.data_ptr<int>();
  p.order = order.data_ptr<int64_t>();
  p.grad_x = grad_x.data_ptr();
  p.grad_w_in = grad_w_in.data_ptr();
  p.grad_b_in = grad_b_in.data_ptr();
  p.grad_w_out = grad_w_out.data_ptr();
  p.coef_in = coef_in.data_ptr<float>();
  p.coef_out = coef_out.data_ptr<float>();
  p.partial_in = partial_in.data_ptr<float>();
  p.partial_out = partial_out.data_ptr<float>();
  p.tokens = tokens;
  p.hidden = hidden;
  p.depth = static_cast<int>(depth);
  p.trees = trees;
  p.chunk = chunk;
  p.chunks = static_cast<int>(chunks);
  switch (x.scalar_type()) {
    case at::kFloat: launch_backward_f32(p, stream); break;
    case at::kHalf: launch_backward_f16(p, stream); break;
    default: launch_backward_bf16(p, stream); break;
  }
  return {grad_x, grad_w_in, grad_b_in, grad_w_out};
}

}  // namespace hf_fff_cuda

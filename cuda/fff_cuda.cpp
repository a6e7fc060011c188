// Python binding of the CUDA FFF kernels: checks, output allocation, strategy choice, launch on the
// current stream (so that CUDA-graph capture and torch.compile see an ordinary stream-ordered op).
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <optional>
#include <string>

#include <limits>
#include <tuple>

#include "backward.h"
#include "fff_cuda.h"

namespace hf_fff_cuda {
namespace {

constexpr int kMaxDepth = 30;        // node indices are int32 heap indices; lane l records level l (<= 31)
constexpr int kMaxVectors = 8;       // fast path keeps x in registers: up to 8 16-byte vectors per lane
constexpr int kMaxSplit = 10;        // bucket histogram lives in shared memory (2^10 ints)
constexpr int kBucketMinDepth = 6;
// Automatic choice between the fast strategies (H100, width 768, depth 11; benchmarks/results_cuda.md).
// One tree, many tokens: the staged strategy (two tokens per warp, top levels in shared memory, tensor-core routing
// dot products for 16-bit types) from 8192 tokens at 16 bits (run 22, bf16: 36.7 vs 43.8 us for the single walk
// at 8192, 109.2 vs 122.8 at 32768, where the sorted strategy takes 122.6; fp16 at 32768: 114.7 vs 121.9 sorted),
// and at fp32 from 4096 tokens (37.6 vs 41.9 us) until the sorted strategy wins (16384: 108.1 vs 111.5; 32768: 170.7
// vs 208.1).
// Below that the single walk: the staged block's copy of ~190 KB of rows and its 64 tokens per block cost more
// than they save on few tokens. The sorted strategy pays a fixed ~40 us (four launches, each block staging up to
// 200 KB of rows); inside the compiled 256 x 128 encoder, where the layer's input is still in L2, it lost to the
// single walk at bf16. The tensor-core strategies are never faster than all of these; opt-in.
constexpr int64_t kStagedMinTokens16 = 8192;
constexpr int64_t kStagedMinTokens32 = 4096;
constexpr int64_t kSortedMinTokens32 = 16384;
constexpr int64_t kSubtreeMaxBlocksPerSm = 1;  // 128 tokens: 14.3 vs 16.9 us; 512: 36.7 vs 16.4 us (bf16)
constexpr int64_t kClusterMaxTokens = 16;      // 8 SMs per token: 16 tokens fill an H100

int vectors_for(int64_t hidden, int64_t element_size) {
  const int64_t per_vector = 16 / element_size;
  const int64_t per_lane = (hidden / per_vector + 31) / 32;
  for (int nv : {1, 2, 3, 4, 6, 8})
    if (per_lane <= nv) return nv;
  return 0;
}

// A device attribute per device index, read once (the binding asks on every call). Template parameter so
// that each attribute keeps its own cache.
template <cudaDeviceAttr kAttribute>
int device_attribute(int device) {
  static std::atomic<int> cache[64] = {};
  if (device < 0 || device >= 64) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, kAttribute, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

int sm_count(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }
// Largest dynamic shared memory a block may ask for (227 KB on H100).
int64_t max_smem_optin(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }
// Compute capability major version: thread-block clusters need 9 (Hopper) or later.
int cc_major(int device) { return device_attribute<cudaDevAttrComputeCapabilityMajor>(device); }

// Error messages are assembled from strings only: on the device image (torch 2.11), streaming an integer
// into a TORCH_CHECK message from an extension crashed inside libstdc++ (std::ostream::_M_insert<long>,
// seen 2026-11-23), so numbers go through std::to_string.
std::string num(int64_t v) { return std::to_string(v); }

std::string dims(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Level whose nodes become the buckets: deep enough that each bucket's subtree (both weight matrices)
// fits in an SM's L1 (about 192 KB), shallow enough that the top levels, which every
// token reads, stay few.
int auto_split(int depth, int64_t hidden, int64_t element_size) {
  const int64_t budget = 192 * 1024;  // fp32 width 768 depth 11 -> split 7, the best measured
  int split = 1;
  while (split < depth && ((int64_t{2} << (depth - split)) - 2) * 2 * hidden * element_size > budget) ++split;
  return std::min(split, kMaxSplit);
}

// kSorted: one level below the shallowest split whose bucket rows fit in one block's shared memory (that one fills
// it to the brim, 203-212 KB at width 768, leaving L1 ~40 KB of the SM's 256 for x, y and the rows being staged;
// a level deeper halves the rows), or the shallowest itself when it is the deepest allowed, or 0 when none fits.
// Measured at width 768, depth 11, 32768 tokens: fp32 split 8 (115 KB) 145.7 us against 151.6 for split 7 (208 KB)
// on an H200 (and 167.3 against 170.7 on an H100 before); bf16 split 7 (104 KB) and 6 (199 KB) alike, 118-120 us.
int sorted_split(int depth, int64_t hidden, int64_t element_size, int64_t smem_limit) {
  const int deepest = std::min(depth, kMaxSplit);
  for (int split = 1; split <= deepest; ++split)
    if (sorted_smem_bytes(depth, split, hidden, element_size) <= smem_limit) return std::min(split + 1, deepest);
  return 0;
}

// kSortedTensor: the bucket's subtree is at most 5 levels (32 logit columns) and its output slots at most 48.
bool sorted_tensor_ok(bool half_precision, int64_t hidden, int depth, int split, int64_t trees, bool fast,
                      int64_t smem_limit) {
  if (!(fast && half_precision && trees == 1 && hidden % 16 == 0 && split >= 1 && split <= depth && split <= kMaxSplit))
    return false;
  const int sub = (2 << (depth - split)) - 1;
  return depth - split + 1 <= 5 && sub + split <= 48 && sorted_tc_smem_bytes(depth, split, hidden) <= smem_limit;
}

int sorted_tensor_split(int depth) { return std::max(1, depth - 4); }

// kStaged: the deepest number of top levels (of w_in and of w_out alike) whose rows for every tree fit in one
// block's shared memory, at most depth + 1 (0 when not even the roots fit: the walk then reads every row from
// global memory, as kSingle).
int staged_levels(int64_t trees, int depth, int64_t hidden, int64_t element_size, int64_t smem_limit) {
  int levels = 0;
  while (levels < depth + 1 && levels < 24 &&
         staged_smem_bytes(trees, levels + 1, levels + 1, hidden, element_size) <= smem_limit)
    ++levels;
  return levels;
}

// The tensor-core path: 16-bit floats, one tree, two blocks of levels (top depth - 5, then 6); any width the
// fast path takes (hidden % 8 == 0, 16-byte aligned rows) whose blocks' rows fit in shared memory (<= 960
// on H100).
bool tensor_core_ok(bool half_precision, int64_t hidden, int depth, int64_t trees, bool fast, int64_t smem_limit) {
  constexpr int64_t kStatic = 1024;  // the kernels' static shared memory (bucket offsets, biases, counters)
  return fast && half_precision && trees == 1 && depth >= 6 && depth <= 11 &&
         tc_logits_smem_bytes(hidden) + kStatic <= smem_limit && tc_output_smem_bytes(hidden) + kStatic <= smem_limit;
}

int choose_strategy(int64_t tokens, int64_t hidden, int depth, int64_t trees, at::ScalarType dtype, bool fast,
                    int num_sms, int64_t smem_limit, int major) {
  if (!fast) return kGeneral;
  const int64_t element_size = c10::elementSize(dtype);
  if (trees == 1 && depth >= kBucketMinDepth) {
    if (element_size == 2 && tokens >= kStagedMinTokens16) return kStaged;
    if (element_size == 4 && tokens >= kSortedMinTokens32 && sorted_split(depth, hidden, element_size, smem_limit) > 0)
      return kSorted;
    if (element_size == 4 && tokens >= kStagedMinTokens32) return kStaged;
  }
  if (major >= 9 && tokens <= kClusterMaxTokens) return kCluster;
  if (tokens <= kSubtreeMaxBlocksPerSm * static_cast<int64_t>(num_sms)) return kSubtree;
  return kSingle;
}

void check_inputs(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
                  int64_t depth) {
  TORCH_CHECK(depth >= 0 && depth <= kMaxDepth, "hf_fff CUDA: depth must be in [0, ", num(kMaxDepth), "], got ", num(depth));
  TORCH_CHECK(x.is_cuda() && w_in.is_cuda() && b_in.is_cuda() && w_out.is_cuda(),
              "hf_fff CUDA: x and the weights must be CUDA tensors");
  TORCH_CHECK(x.device() == w_in.device() && x.device() == b_in.device() && x.device() == w_out.device(),
              "hf_fff CUDA: x and the weights must be on one device");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "hf_fff CUDA: dtype must be float32, float16 or bfloat16, got ", c10::toString(dtype));
  TORCH_CHECK(w_in.scalar_type() == dtype && b_in.scalar_type() == dtype && w_out.scalar_type() == dtype,
              "hf_fff CUDA: x and the weights must share one dtype");
  TORCH_CHECK(x.dim() == 2, "hf_fff CUDA: x must be (tokens, hidden), got ", dims(x.sizes()));
  const int64_t n_nodes = (int64_t{2} << depth) - 1;
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(1) == x.size(1) && w_in.size(0) > 0 && w_in.size(0) % n_nodes == 0,
              "hf_fff CUDA: weight_in must be (trees * ", num(n_nodes), ", ", num(x.size(1)), "), got ", dims(w_in.sizes()));
  TORCH_CHECK(w_out.sizes() == w_in.sizes(), "hf_fff CUDA: weight_out must have the shape of weight_in ",
              dims(w_in.sizes()), ", got ", dims(w_out.sizes()));
  TORCH_CHECK(b_in.dim() == 1 && b_in.size(0) == w_in.size(0), "hf_fff CUDA: bias_in must be (", num(w_in.size(0)),
              ",), got ", dims(b_in.sizes()));
  TORCH_CHECK(x.size(1) > 0 && x.size(1) <= std::numeric_limits<int>::max(), "hf_fff CUDA: bad hidden size ",
              num(x.size(1)));
  TORCH_CHECK(x.size(0) < std::numeric_limits<int>::max(), "hf_fff CUDA: at most 2^31 - 2 tokens per call");
  TORCH_CHECK(w_in.size(0) < std::numeric_limits<int>::max(), "hf_fff CUDA: at most 2^31 - 1 weight rows");
}

}  // namespace

// strategy: kAuto or a forced Strategy; split: bucket level for kBucketed (0: automatic). out /
// leaves_out: optional preallocated outputs (contiguous, right shape and dtype), e.g. poisoned by tests.
std::tuple<at::Tensor, at::Tensor> fff_forward(const at::Tensor& x_arg, const at::Tensor& w_in_arg,
                                               const at::Tensor& b_in_arg, const at::Tensor& w_out_arg, int64_t depth,
                                               int64_t strategy, int64_t split, const std::optional<at::Tensor>& out,
                                               const std::optional<at::Tensor>& leaves_out) {
  check_inputs(x_arg, w_in_arg, b_in_arg, w_out_arg, depth);
  TORCH_CHECK(strategy >= kAuto && strategy <= kSortedPipelined, "hf_fff CUDA: unknown strategy ", num(strategy));
  const c10::cuda::CUDAGuard device_guard(x_arg.device());
  // Rows of x may be strided (a slice of a wider tensor): only the column stride must be 1.
  const at::Tensor x = x_arg.size(1) == 1 || x_arg.stride(1) == 1 ? x_arg : x_arg.contiguous();
  const at::Tensor w_in = w_in_arg.contiguous();
  const at::Tensor b_in = b_in_arg.contiguous();
  const at::Tensor w_out = w_out_arg.contiguous();

  const int64_t tokens = x.size(0), hidden = x.size(1);
  const int64_t n_nodes = (int64_t{2} << depth) - 1;
  const int64_t trees = w_in.size(0) / n_nodes;
  at::Tensor y, leaves;
  if (out.has_value()) {
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.device() == x.device() &&
                    y.is_contiguous(),
                "hf_fff CUDA: out must be a contiguous ", c10::toString(x.scalar_type()), " tensor of shape ", dims(x.sizes()), " on ", x.device().str());
  } else {
    y = at::empty({tokens, hidden}, x.options());
  }
  if (leaves_out.has_value()) {
    leaves = *leaves_out;
    TORCH_CHECK(leaves.dim() == 2 && leaves.size(0) == tokens && leaves.size(1) == trees &&
                    leaves.scalar_type() == at::kLong && leaves.device() == x.device() && leaves.is_contiguous(),
                "hf_fff CUDA: leaves_out must be a contiguous int64 tensor of shape (", num(tokens), ", ", num(trees), ")");
  } else {
    leaves = at::empty({tokens, trees}, x.options().dtype(at::kLong));
  }
  if (tokens == 0) return {y, leaves};

  const int64_t element_size = x.element_size();
  const int64_t per_vector = 16 / element_size;
  const int64_t ldx = tokens == 1 ? hidden : x.stride(0);
  const int vectors = vectors_for(hidden, element_size);
  const bool fast = vectors > 0 && hidden % per_vector == 0 && ldx % per_vector == 0 && aligned16(x.data_ptr()) &&
                    aligned16(w_in.data_ptr()) && aligned16(w_out.data_ptr()) && aligned16(y.data_ptr());
  const int num_sms = sm_count(x.get_device());
  const int64_t smem_limit = max_smem_optin(x.get_device());
  const int major = cc_major(x.get_device());

  Params p{};
  p.x = x.data_ptr();
  p.ldx = ldx;
  p.w_in = w_in.data_ptr();
  p.b_in = b_in.data_ptr();
  p.w_out = w_out.data_ptr();
  p.y = y.data_ptr();
  p.leaves = leaves.data_ptr<int64_t>();
  p.tokens = tokens;
  p.hidden = static_cast<int>(hidden);
  p.depth = static_cast<int>(depth);
  p.trees = static_cast<int>(trees);
  p.vectors = vectors;
  p.num_sms = num_sms;
  p.smem_limit = smem_limit;
  p.major = major;
  p.strategy = strategy == kAuto
                   ? choose_strategy(tokens, hidden, static_cast<int>(depth), trees, x.scalar_type(), fast, num_sms,
                                     smem_limit, major)
                   : static_cast<int>(strategy);
  if (p.strategy != kGeneral)
    TORCH_CHECK(fast, "hf_fff CUDA: strategy ", num(p.strategy), " needs hidden % ", num(per_vector),
                " == 0, 16-byte aligned rows and hidden <= ", num(kMaxVectors * 32 * per_vector), "; use strategy ",
                num(kGeneral));

  if (p.strategy == kCluster) {
    TORCH_CHECK(major >= 9, "hf_fff CUDA: the cluster strategy needs thread-block clusters (compute capability 9.0 or "
                "later), this device has ", num(major), ".x");
    TORCH_CHECK(tokens <= std::numeric_limits<int>::max() / 8, "hf_fff CUDA: the cluster strategy takes at most 2^28 tokens");
  }
  if (p.strategy == kTensorCore)
    TORCH_CHECK(tensor_core_ok(element_size == 2, hidden, static_cast<int>(depth), trees, fast, smem_limit),
                "hf_fff CUDA: the tensor-core strategy needs float16/bfloat16, one tree, depth 6..11 and a width whose "
                "rows fit in shared memory (", num(tc_logits_smem_bytes(hidden)), " bytes needed, ", num(smem_limit), " here)");

  if (p.strategy == kStaged) {  // split: levels to stage (0: as many as fit)
    const int fit = staged_levels(trees, static_cast<int>(depth), hidden, element_size, smem_limit);
    TORCH_CHECK(split >= 0 && split <= fit, "hf_fff CUDA: the staged strategy holds at most ", num(fit),
                " top levels per matrix here (depth + 1 and the device's ", num(smem_limit),
                " bytes of shared memory per block), asked for ", num(split));
    p.staged_in = p.staged_out = split > 0 ? static_cast<int>(split) : fit;
  }

  at::Tensor scratch_int, scratch_float;  // kept alive until the launches are enqueued (stream-ordered reuse)
  if (p.strategy == kBucketed || is_sorted_strategy(p.strategy) || p.strategy == kTensorCore ||
      p.strategy == kSortedTensor) {
    TORCH_CHECK(trees == 1, "hf_fff CUDA: the bucketed strategies take one tree, got ", num(trees));
    TORCH_CHECK(depth >= 1, "hf_fff CUDA: the bucketed strategies need depth >= 1");
    if (p.strategy == kTensorCore)
      p.split = static_cast<int>(depth) - 5;  // the lower block is always 6 levels (63 nodes)
    else if (split > 0)
      p.split = static_cast<int>(split);
    else if (is_sorted_strategy(p.strategy))
      p.split = sorted_split(static_cast<int>(depth), hidden, element_size, smem_limit);
    else if (p.strategy == kSortedTensor)
      p.split = sorted_tensor_split(static_cast<int>(depth));
    else
      p.split = auto_split(static_cast<int>(depth), hidden, element_size);
    TORCH_CHECK(p.split >= 1 && p.split <= depth && p.split <= kMaxSplit, "hf_fff CUDA: split must be in [1, min(depth, ",
                num(kMaxSplit), ")], got ", num(p.split), is_sorted_strategy(p.strategy) ? " (or no split's rows fit in shared memory)" : "");
    if (p.strategy == kSortedTensor)
      TORCH_CHECK(sorted_tensor_ok(element_size == 2, hidden, static_cast<int>(depth), p.split, trees, fast, smem_limit),
                  "hf_fff CUDA: the sorted tensor-core strategy needs float16/bfloat16, hidden % 16 == 0, at most 5 "
                  "levels below the split (split >= depth - 4) and its rows in shared memory; got split ", num(p.split));
    if (is_sorted_strategy(p.strategy))
      TORCH_CHECK(sorted_smem_bytes(static_cast<int>(depth), p.split, hidden, element_size) <= smem_limit,
                  "hf_fff CUDA: with split ", num(p.split), " the sorted strategy needs ",
                  num(sorted_smem_bytes(static_cast<int>(depth), p.split, hidden, element_size)),
                  " bytes of shared memory per block, more than the device's ", num(smem_limit), "; use a deeper split");
    const int64_t n_buckets = int64_t{1} << p.split;
    // Strategies whose step 1 ranks tokens within their bucket (kSorted, kSortedTensor, kTensorCore) keep the
    // ranks (tokens) and each step-1 block's first rank per bucket (at most num_sms blocks); kTensorCore also
    // the subtree GELU values (tokens x 6).
    const bool tensor = p.strategy == kTensorCore;
    const bool ranked = p.strategy != kBucketed;
    const int64_t ranks = ranked ? tokens : 0, bases = ranked ? kMaxRankedBlocksPerSm * num_sms * n_buckets : 0;
    const int64_t subs = tensor ? tokens * 6 : 0;
    scratch_int = at::empty({2 * tokens + ranks + 2 * n_buckets + bases}, x.options().dtype(at::kInt));
    scratch_float = at::empty({tokens * p.split + subs}, x.options().dtype(at::kFloat));
    p.bucket = scratch_int.data_ptr<int>();
    p.order = p.bucket + tokens;
    p.rank = ranked ? p.order + tokens : nullptr;
    p.counts = p.order + tokens + ranks;
    p.block_base = ranked ? p.counts + 2 * n_buckets : nullptr;
    p.g_top = scratch_float.data_ptr<float>();
    p.g_sub = tensor ? p.g_top + tokens * p.split : nullptr;
  } else if (p.strategy == kGeneral) {
    const int64_t records = tokens * trees * (depth + 1);
    scratch_int = at::empty({records}, x.options().dtype(at::kInt));
    scratch_float = at::empty({records}, x.options().dtype(at::kFloat));
    p.rec_row = scratch_int.data_ptr<int>();
    p.rec_g = scratch_float.data_ptr<float>();
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (x.scalar_type()) {
    case at::kFloat: launch_f32(p, stream); break;
    case at::kHalf: launch_f16(p, stream); break;
    default: launch_bf16(p, stream); break;
  }
  return {y, leaves};
}

// What fff_forward(strategy=0) would run for this problem: (strategy, split), for benchmarks and tests (for the
// staged strategy, split is the number of top levels held in shared memory).
// dtype: "float32", "float16" or "bfloat16".
std::tuple<int64_t, int64_t> plan(int64_t tokens, int64_t hidden, int64_t depth, int64_t trees, const std::string& dtype_name,
                                  int64_t num_sms, int64_t smem_limit, int64_t major) {
  const at::ScalarType dtype = dtype_name == "float32" ? at::kFloat : dtype_name == "float16" ? at::kHalf : at::kBFloat16;
  TORCH_CHECK(dtype_name == "float32" || dtype_name == "float16" || dtype_name == "bfloat16", "hf_fff CUDA: plan takes "
              "float32, float16 or bfloat16, got ", dtype_name);
  const int64_t element_size = c10::elementSize(dtype);
  const int vectors = vectors_for(hidden, element_size);
  const bool fast = vectors > 0 && hidden % (16 / element_size) == 0;
  const int s = choose_strategy(tokens, hidden, static_cast<int>(depth), trees, dtype, fast, static_cast<int>(num_sms),
                                smem_limit, static_cast<int>(major));
  const int split = s == kBucketed ? auto_split(static_cast<int>(depth), hidden, element_size)
                    : s == kSorted       ? sorted_split(static_cast<int>(depth), hidden, element_size, smem_limit)
                    : s == kSortedTensor ? sorted_tensor_split(static_cast<int>(depth))
                    : s == kStaged       ? staged_levels(trees, static_cast<int>(depth), hidden, element_size, smem_limit)
                                         : 0;
  return {s, split};
}

}  // namespace hf_fff_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("fff_forward", &hf_fff_cuda::fff_forward,
        "FFF forward (CUDA): x (M, H), weight_in (T*N, H), bias_in (T*N,), weight_out (T*N, H) -> (y, leaves)",
        py::arg("x"), py::arg("weight_in"), py::arg("bias_in"), py::arg("weight_out"), py::arg("depth"),
        py::arg("strategy") = 0, py::arg("split") = 0, py::arg("out") = py::none(), py::arg("leaves_out") = py::none());
  m.def("fff_backward", &hf_fff_cuda::fff_backward, "FFF backward (CUDA): (grad_y, x, weight_in, bias_in, weight_out, depth, leaves) -> (grad_x, grad_weight_in, grad_bias_in, grad_weight_out)", py::arg("grad_y"), py::arg("x"), py::arg("weight_in"), py::arg("bias_in"), py::arg("weight_out"), py::arg("depth"), py::arg("leaves"));
  m.def("plan", &hf_fff_cuda::plan, "(strategy, split) that fff_forward picks for a problem", py::arg("tokens"),
        py::arg("hidden"), py::arg("depth"), py::arg("trees"), py::arg("dtype"), py::arg("num_sms"),
        py::arg("smem_limit") = 232448, py::arg("major") = 9);
  m.attr("AUTO") = int(hf_fff_cuda::kAuto);
  m.attr("SINGLE") = int(hf_fff_cuda::kSingle);
  m.attr("SPECULATIVE") = int(hf_fff_cuda::kSpeculative);
  m.attr("BUCKETED") = int(hf_fff_cuda::kBucketed);
  m.attr("GENERAL") = int(hf_fff_cuda::kGeneral);
  m.attr("TENSOR_CORE") = int(hf_fff_cuda::kTensorCore);
  m.attr("SUBTREE") = int(hf_fff_cuda::kSubtree);
  m.attr("SORTED") = int(hf_fff_cuda::kSorted);
  m.attr("CLUSTER") = int(hf_fff_cuda::kCluster);
  m.attr("SORTED_TENSOR") = int(hf_fff_cuda::kSortedTensor);
  m.attr("STAGED") = int(hf_fff_cuda::kStaged);
  m.attr("SORTED_PIPELINED") = int(hf_fff_cuda::kSortedPipelined);
}

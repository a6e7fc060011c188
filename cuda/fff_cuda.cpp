// Python binding of the CUDA FFF kernels: tensor checks, output and scratch allocation, and the launch on the
// current stream (so that CUDA-graph capture and torch.compile see an ordinary stream-ordered op). The strategy
// choice and each strategy's checks live with the kernels (plan() in fff_cuda.h; dispatch.cuh), which nvcc compiles
// without torch; their std::runtime_error reaches Python as RuntimeError.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "backward.h"
#include "binding.h"
#include "fff_cuda.h"

namespace hf_fff_cuda {
namespace {

constexpr int kMaxDepth = 30;   // node indices are int32 heap indices; lane l records level l (<= 31)

// The fast paths' 16-byte vectors of a row per lane (0: the row is too wide for them).
int vectors_for(int64_t hidden, int64_t element_size) {
  const int64_t per_vector = 16 / element_size;
  const int64_t per_lane = (hidden / per_vector + 31) / 32;
  for (int nv : {1, 2, 3, 4, 6, 8})
    if (per_lane <= nv) return nv;
  return 0;
}

// Largest dynamic shared memory a block may ask for (227 KB on H100).
int64_t max_smem_optin(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }
// Compute capability major version: thread-block clusters need 9 (Hopper) or later.
int cc_major(int device) { return device_attribute<cudaDevAttrComputeCapabilityMajor>(device); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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

// The problem as plan() sees it. strategy: kAuto or an id of strategies.h; option: HF_FFF_CUDA_SPLIT's value.
Params problem_params(int64_t tokens, int64_t hidden, int64_t depth, int64_t trees, int64_t element_size,
                      int64_t strategy, int num_sms, int64_t smem_limit, int major) {
  Params p{};
  p.tokens = tokens;
  p.hidden = static_cast<int>(hidden);
  p.depth = static_cast<int>(depth);
  p.trees = static_cast<int>(trees);
  p.strategy = static_cast<int>(strategy);
  p.vectors = vectors_for(hidden, element_size);
  p.num_sms = num_sms;
  p.smem_limit = smem_limit;
  p.major = major;
  return p;
}

}  // namespace

// strategy: 0 (auto) or an id of strategies.h; split: the strategy's setting (sorted: the bucket level, staged: the
// top levels held in shared memory; 0: automatic). out / leaves_out: optional preallocated outputs (contiguous, right
// shape and dtype), e.g. poisoned by tests.
std::tuple<at::Tensor, at::Tensor> fff_forward(const at::Tensor& x_arg, const at::Tensor& w_in_arg,
                                               const at::Tensor& b_in_arg, const at::Tensor& w_out_arg, int64_t depth,
                                               int64_t strategy, int64_t split, const std::optional<at::Tensor>& out,
                                               const std::optional<at::Tensor>& leaves_out) {
  check_inputs(x_arg, w_in_arg, b_in_arg, w_out_arg, depth);
  TORCH_CHECK(strategy == kAuto || std::strcmp(strategy_name(static_cast<int>(strategy)), "unknown") != 0,
              "hf_fff CUDA: unknown strategy ", num(strategy));
  const c10::cuda::CUDAGuard device_guard(x_arg.device());
  // Rows of x may be strided (a slice of a wider tensor): only the column stride must be 1.
  const at::Tensor x = x_arg.size(1) == 1 || x_arg.stride(1) == 1 ? x_arg : x_arg.contiguous();
  const at::Tensor w_in = w_in_arg.contiguous();
  const at::Tensor b_in = b_in_arg.contiguous();
  const at::Tensor w_out = w_out_arg.contiguous();

  const int64_t tokens = x.size(0), hidden = x.size(1);
  const int64_t trees = w_in.size(0) / ((int64_t{2} << depth) - 1);
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
  const int device = x.get_device();
  Params p = problem_params(tokens, hidden, depth, trees, element_size, strategy, sm_count(device),
                            max_smem_optin(device), cc_major(device));
  const bool fast = p.vectors > 0 && hidden % per_vector == 0 && ldx % per_vector == 0 && aligned16(x.data_ptr()) &&
                    aligned16(w_in.data_ptr()) && aligned16(w_out.data_ptr()) && aligned16(y.data_ptr());
  p.x = x.data_ptr();
  p.ldx = ldx;
  p.w_in = w_in.data_ptr();
  p.b_in = b_in.data_ptr();
  p.w_out = w_out.data_ptr();
  p.y = y.data_ptr();
  p.leaves = leaves.data_ptr<int64_t>();
  const Plan chosen = plan(p, Problem{element_size, fast, split});

  // Kept alive until the launches are enqueued (the caching allocator reuses them in stream order). None for the
  // strategies without scratch: the few-token calls are host-bound, and an allocation is a visible part of them.
  at::Tensor scratch_int, scratch_float;
  if (chosen.ints > 0) scratch_int = at::empty({chosen.ints}, x.options().dtype(at::kInt));
  if (chosen.floats > 0) scratch_float = at::empty({chosen.floats}, x.options().dtype(at::kFloat));
  bind_scratch(p, chosen.ints > 0 ? scratch_int.data_ptr<int>() : nullptr,
               chosen.floats > 0 ? scratch_float.data_ptr<float>() : nullptr);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (x.scalar_type()) {
    case at::kFloat: launch_f32(p, stream); break;
    case at::kHalf: launch_f16(p, stream); break;
    default: launch_bf16(p, stream); break;
  }
  return {y, leaves};
}

// What fff_forward(strategy=0) would run for this problem: (strategy, setting), for benchmarks and tests (the
// setting: sorted's bucket level, staged's top levels held in shared memory, else 0). dtype: "float32", "float16"
// or "bfloat16".
std::tuple<int64_t, int64_t> plan_auto(int64_t tokens, int64_t hidden, int64_t depth, int64_t trees,
                                       const std::string& dtype_name, int64_t num_sms, int64_t smem_limit,
                                       int64_t major) {
  TORCH_CHECK(dtype_name == "float32" || dtype_name == "float16" || dtype_name == "bfloat16", "hf_fff CUDA: plan takes "
              "float32, float16 or bfloat16, got ", dtype_name);
  const int64_t element_size = dtype_name == "float32" ? 4 : 2;
  Params p = problem_params(tokens, hidden, depth, trees, element_size, kAuto, static_cast<int>(num_sms), smem_limit,
                            static_cast<int>(major));
  const bool fast = p.vectors > 0 && hidden % (16 / element_size) == 0;
  const Plan chosen = plan(p, Problem{element_size, fast, 0});
  return {p.strategy, chosen.setting};
}

}  // namespace hf_fff_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("fff_forward", &hf_fff_cuda::fff_forward,
        "FFF forward (CUDA): x (M, H), weight_in (T*N, H), bias_in (T*N,), weight_out (T*N, H) -> (y, leaves)",
        py::arg("x"), py::arg("weight_in"), py::arg("bias_in"), py::arg("weight_out"), py::arg("depth"),
        py::arg("strategy") = 0, py::arg("split") = 0, py::arg("out") = py::none(), py::arg("leaves_out") = py::none());
  m.def("fff_backward", &hf_fff_cuda::fff_backward, "FFF backward (CUDA): (grad_y, x, weight_in, bias_in, weight_out, depth, leaves) -> (grad_x, grad_weight_in, grad_bias_in, grad_weight_out)", py::arg("grad_y"), py::arg("x"), py::arg("weight_in"), py::arg("bias_in"), py::arg("weight_out"), py::arg("depth"), py::arg("leaves"));
  m.def("plan", &hf_fff_cuda::plan_auto, "(strategy, setting) that fff_forward picks for a problem", py::arg("tokens"),
        py::arg("hidden"), py::arg("depth"), py::arg("trees"), py::arg("dtype"), py::arg("num_sms"),
        py::arg("smem_limit") = 232448, py::arg("major") = 9);
  // strategies.h as {name: id}, auto included: the table the Python backend also parses from the header
  py::dict strategies;
  strategies["auto"] = int(hf_fff_cuda::kAuto);
#define HF_FFF_STRATEGY_ATTR(enumerator, name, id, purpose) strategies[#name] = id;
  HF_FFF_STRATEGIES(HF_FFF_STRATEGY_ATTR)
#undef HF_FFF_STRATEGY_ATTR
  m.attr("STRATEGIES") = strategies;
}

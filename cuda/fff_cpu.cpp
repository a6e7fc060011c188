// Torch binding of the CPU FFF kernel (hf_fff's "cpp" backend): argument checks, output allocation,
// threads. The arithmetic lives in fff_cpu_kernel.h (torch-free, tested on its own for every ISA by
// cpu_test/fff_cpu_kernel_test.cpp); docs/cpu_design.md explains the design and the measurements.
//
// Threads: one OpenMP region per phase, each thread on a contiguous share of the tokens (or, for the
// weight gradients, of the columns). A token's result does not depend on its share, so the thread count
// never changes any output. Calls too small to repay waking a second thread stay on the calling thread.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dropout_cpu_kernel.h"
#include "fff_cpu_kernel.h"

namespace {

namespace core = hf_fff_cpu;

constexpr int64_t kMaxDepth = 30;  // ops.py rejects deeper trees; re-checked here for direct calls
// Below this many multiply-adds per thread a call stays on fewer threads. A second thread costs more
// than its share of small calls on these 2-vCPU VMs: milliseconds when its vCPU is idle or taken by
// another process (measured, docs/cpu_design.md's threshold table: forced onto 2 threads after an idle
// pause, 64-256 BERT tokens took milliseconds instead of a fraction of one; 1024 tokens broke even; 4096
// tokens gained). 2^23 puts the forward's switch at about 900 tokens of the BERT layer (768 x depth 11:
// 18 K multiply-adds per token).
constexpr int64_t kMinMacsPerThread = int64_t{1} << 23;

static_assert(sizeof(c10::BFloat16) == sizeof(core::bf16) && sizeof(c10::Half) == sizeof(core::f16));

// The kernel's element type for a torch scalar type (same bits, torch-free type).
template <typename scalar_t>
struct CoreType {
  using type = scalar_t;
};
template <>
struct CoreType<c10::BFloat16> {
  using type = core::bf16;
};
template <>
struct CoreType<c10::Half> {
  using type = core::f16;
};

template <typename scalar_t>
auto* data(const at::Tensor& t) {
  using S = typename CoreType<scalar_t>::type;
  return reinterpret_cast<const S*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
auto* mutable_data(at::Tensor& t) {
  using S = typename CoreType<scalar_t>::type;
  return reinterpret_cast<S*>(t.mutable_data_ptr<scalar_t>());
}

// Threads for `work` units (multiply-adds unless said otherwise) split into at most `parts` pieces, each
// thread getting at least `min_per_thread` of them; `requested` > 0 forces a count (benchmarks measure the
// threshold with it).
int64_t threads_for(int64_t work, int64_t parts, int64_t requested, int64_t min_per_thread = kMinMacsPerThread) {
  const int64_t available = requested > 0 ? requested : at::get_num_threads();
  const int64_t by_work = requested > 0 ? available : work / min_per_thread;
  return std::max<int64_t>(1, std::min({available, by_work, parts}));
}

// fn(me, team) on `team` threads (the calling thread alone when team == 1 or already inside a region).
template <typename Fn>
void run_team(int64_t team, Fn&& fn) {
#ifdef _OPENMP
  if (team > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(team)
    fn(static_cast<int64_t>(omp_get_thread_num()), static_cast<int64_t>(omp_get_num_threads()));
    return;
  }
#endif
  fn(int64_t{0}, int64_t{1});
}

// Contiguous share `me` of `count` items split `team` ways.
std::pair<int64_t, int64_t> share(int64_t count, int64_t team, int64_t me) {
  const int64_t per = (count + team - 1) / team;
  const int64_t begin = std::min(count, me * per);
  return {begin, std::min(count, begin + per)};
}

// Error messages are assembled from strings only: on the GPU machine's image (torch 2.11) streaming an
// integer into a TORCH_CHECK message from an extension crashed inside libstdc++, so numbers are turned
// into strings first.
std::string num(int64_t v) { return std::to_string(v); }

std::string dims(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu(), "fff_cpu: ", name, " must be on the CPU, got ", t.device().str());
  TORCH_CHECK(t.is_contiguous(), "fff_cpu: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fff_cpu: all tensors must share x's dtype ", c10::toString(x.scalar_type()),
              ", got ", c10::toString(t.scalar_type()), " for ", name);
}

// Checks the layer's arguments; returns the number of trees.
int64_t check_inputs(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& bias_in, const at::Tensor& weight_out,
                     int64_t depth) {
  TORCH_CHECK(depth >= 0 && depth <= kMaxDepth, "fff_cpu: depth must be in [0, ", num(kMaxDepth), "], got ", num(depth));
  TORCH_CHECK(x.dim() == 2, "fff_cpu: x must be 2-D (tokens, hidden), got ", num(x.dim()), "-D");
  TORCH_CHECK(weight_in.dim() == 2 && weight_out.dim() == 2 && bias_in.dim() == 1,
              "fff_cpu: weight_in and weight_out must be 2-D and bias_in 1-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fff_cpu: x must have a floating-point dtype, got ",
              c10::toString(x.scalar_type()));
  check_tensor(x, "x", x);
  check_tensor(weight_in, "weight_in", x);
  check_tensor(bias_in, "bias_in", x);
  check_tensor(weight_out, "weight_out", x);
  const int64_t nodes = (int64_t{2} << depth) - 1;
  TORCH_CHECK(weight_in.size(1) == x.size(1), "fff_cpu: weight_in has width ", num(weight_in.size(1)), " but x has ", num(x.size(1)));
  TORCH_CHECK(weight_in.size(0) > 0 && weight_in.size(0) % nodes == 0, "fff_cpu: weight_in must have trees * ", num(nodes),
              " rows for depth ", num(depth), ", got ", num(weight_in.size(0)));
  TORCH_CHECK(weight_out.sizes() == weight_in.sizes(), "fff_cpu: weight_out must have weight_in's shape ", dims(weight_in.sizes()),
              ", got ", dims(weight_out.sizes()));
  TORCH_CHECK(bias_in.size(0) == weight_in.size(0), "fff_cpu: bias_in must have ", num(weight_in.size(0)), " entries, got ",
              num(bias_in.size(0)));
  return weight_in.size(0) / nodes;
}

template <typename S>
core::Layer<S> layer_of(const S* weight_in, const S* bias_in, const S* weight_out, int64_t hidden, int64_t trees, int64_t depth) {
  return core::Layer<S>{weight_in, bias_in, weight_out, hidden, trees, depth};
}

std::tuple<at::Tensor, at::Tensor> fff_forward(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& bias_in,
                                               const at::Tensor& weight_out, int64_t depth, int64_t threads) {
  const int64_t trees = check_inputs(x, weight_in, bias_in, weight_out, depth);
  const int64_t tokens = x.size(0), hidden = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor leaves = at::empty({tokens, trees}, x.options().dtype(at::kLong));
  if (tokens == 0) return {y, leaves};
  const int64_t team = threads_for(tokens * 2 * trees * (depth + 1) * hidden, tokens, threads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fff_cpu_forward", [&] {
    const auto layer = layer_of(data<scalar_t>(weight_in), data<scalar_t>(bias_in), data<scalar_t>(weight_out), hidden, trees, depth);
    const auto* x_data = data<scalar_t>(x);
    auto* y_data = mutable_data<scalar_t>(y);
    int64_t* leaves_data = leaves.mutable_data_ptr<int64_t>();
    run_team(team, [&](int64_t me, int64_t size) {
      const auto [begin, end] = share(tokens, size, me);
      core::forward_tokens(layer, x_data, begin, end, y_data, leaves_data);
    });
  });
  return {y, leaves};
}

void check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& leaves, int64_t trees, int64_t depth) {
  check_tensor(grad_y, "grad_y", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "fff_cpu: grad_y must have x's shape ", dims(x.sizes()), ", got ", dims(grad_y.sizes()));
  TORCH_CHECK(leaves.device().is_cpu() && leaves.scalar_type() == at::kLong && leaves.is_contiguous(),
              "fff_cpu: leaves must be a contiguous int64 CPU tensor");
  TORCH_CHECK(leaves.dim() == 2 && leaves.size(0) == x.size(0) && leaves.size(1) == trees, "fff_cpu: leaves must have shape (",
              num(x.size(0)), ", ", num(trees), "), got ", dims(leaves.sizes()));
  // Leaves index rows: an out-of-range one would read and write outside the weights.
  const int64_t* values = leaves.const_data_ptr<int64_t>();
  const int64_t count = leaves.numel(), leaf_count = int64_t{1} << depth;
  bool in_range = true;
  for (int64_t i = 0; i < count; ++i) in_range &= values[i] >= 0 && values[i] < leaf_count;
  TORCH_CHECK(in_range, "fff_cpu: leaves must be in [0, ", num(leaf_count), ") for depth ", num(depth));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fff_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                         const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                                         const at::Tensor& weight_out, int64_t depth,
                                                                         const at::Tensor& leaves, int64_t threads) {
  const int64_t trees = check_inputs(x, weight_in, bias_in, weight_out, depth);
  check_backward_inputs(grad_y, x, leaves, trees, depth);
  const int64_t tokens = x.size(0), hidden = x.size(1), visited = trees * (depth + 1);
  at::Tensor grad_x = at::empty_like(x), grad_weight_in = at::empty_like(weight_in), grad_bias_in = at::empty_like(bias_in),
             grad_weight_out = at::empty_like(weight_out);
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Per visited row of every token: dL/dlogit and GELU(logit), (tokens, trees * (depth + 1)).
  at::Tensor grad_logit = at::empty({tokens, visited}, x.options().dtype(acc_type));
  at::Tensor act = at::empty({tokens, visited}, x.options().dtype(acc_type));
  const int64_t work = tokens * visited * hidden;  // multiply-adds of each of the five row passes
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fff_cpu_backward", [&] {
    using S = typename CoreType<scalar_t>::type;
    using A = core::Acc<S>;
    const auto layer = layer_of(data<scalar_t>(weight_in), data<scalar_t>(bias_in), data<scalar_t>(weight_out), hidden, trees, depth);
    const S* x_data = data<scalar_t>(x);
    const S* grad_y_data = data<scalar_t>(grad_y);
    const int64_t* leaves_data = leaves.const_data_ptr<int64_t>();
    A* grad_logit_data = grad_logit.mutable_data_ptr<A>();
    A* act_data = act.mutable_data_ptr<A>();
    S* grad_x_data = mutable_data<scalar_t>(grad_x);
    run_team(threads_for(3 * work, tokens, threads), [&](int64_t me, int64_t size) {
      const auto [begin, end] = share(tokens, size, me);
      core::backward_tokens(layer, grad_y_data, x_data, leaves_data, begin, end, grad_logit_data, act_data, grad_x_data);
    });
    const core::WeightPlan<S> plan = core::plan_weights(layer, grad_y_data, x_data, leaves_data, tokens, grad_logit_data, act_data);
    core::backward_bias(layer, plan, mutable_data<scalar_t>(grad_bias_in));
    const int64_t column_chunks = (hidden + 4 * core::kLanes<A> - 1) / (4 * core::kLanes<A>);
    S* grad_weight_in_data = mutable_data<scalar_t>(grad_weight_in);
    S* grad_weight_out_data = mutable_data<scalar_t>(grad_weight_out);
    run_team(threads_for(2 * work + weight_in.numel(), column_chunks, threads), [&](int64_t me, int64_t size) {
      const auto [begin, end] = core::column_share<S>(hidden, size, me);
      core::backward_weights(layer, plan, begin, end, grad_weight_in_data, grad_weight_out_data);
    });
  });
  return {grad_x, grad_weight_in, grad_bias_in, grad_weight_out};
}

// Elements per thread below which dropout stays on the calling thread (a memory-bound pass of ~1 ns an
// element: a second thread pays off from a few hundred thousand elements).
constexpr int64_t kMinDropoutElementsPerThread = int64_t{1} << 18;

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, int64_t threads) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "fff_cpu dropout: x must be a contiguous CPU tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fff_cpu dropout: x must have a floating-point dtype, got ",
              c10::toString(x.scalar_type()));
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fff_cpu dropout: p must be in [0, 1), got ", std::to_string(p));
  at::Tensor out = at::empty_like(x);
  const int64_t count = x.numel();
  if (count == 0) return out;
  // round(p * 2^32) reaches 2^32 for p within 2^-33 of 1; the clamp keeps the threshold in 32 bits.
  const double scaled = std::min(std::nearbyint(p * 4294967296.0), 4294967295.0);
  const core::DropoutKey key{static_cast<uint64_t>(seed), static_cast<uint32_t>(scaled)};
  const int64_t team = threads_for(count, count, threads, kMinDropoutElementsPerThread);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fff_cpu_dropout", [&] {
    using S = typename CoreType<scalar_t>::type;
    using A = core::Acc<S>;
    const S* in = data<scalar_t>(x);
    S* result = mutable_data<scalar_t>(out);
    const A scale = static_cast<A>(1.0 / (1.0 - p));
    run_team(team, [&](int64_t me, int64_t size) {
      const auto [begin, end] = share(count, size, me);
      core::dropout_range(in, result, begin, end, key, scale);
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_fff CPU kernels: the FFF conditional matmul (forward and backward) and hashed dropout";
  m.attr("isa") = core::isa_name();
  m.attr("vector_bytes") = core::kVectorBytes;
  m.def("fff_forward", &fff_forward,
        "x (M, H), weight_in (T*N, H), bias_in (T*N,), weight_out (T*N, H), depth -> (y, leaves); threads > 0 forces a thread count",
        pybind11::arg("x"), pybind11::arg("weight_in"), pybind11::arg("bias_in"), pybind11::arg("weight_out"), pybind11::arg("depth"),
        pybind11::arg("threads") = 0);
  m.def("fff_backward", &fff_backward,
        "grad_y (M, H), x, weight_in, bias_in, weight_out, depth, leaves (M, T) -> (grad_x, grad_weight_in, grad_bias_in, "
        "grad_weight_out); threads > 0 forces a thread count",
        pybind11::arg("grad_y"), pybind11::arg("x"), pybind11::arg("weight_in"), pybind11::arg("bias_in"), pybind11::arg("weight_out"),
        pybind11::arg("depth"), pybind11::arg("leaves"), pybind11::arg("threads") = 0);
  m.def("dropout", &dropout,
        "x, p in [0, 1), seed -> x with each element kept (scaled by 1 / (1 - p)) or zeroed by a hash of (seed, its index); "
        "threads > 0 forces a thread count",
        pybind11::arg("x"), pybind11::arg("p"), pybind11::arg("seed"), pybind11::arg("threads") = 0);
}

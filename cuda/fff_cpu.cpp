// CPU kernel of the FFF conditional matmul (hf_fff::fff_forward's "cpp" backend).
//
// Per token and tree it walks depth + 1 nodes from the root: logit = x . weight_in[row] + bias_in[row],
// go left on logit <= 0, right otherwise, and y += GELU(logit) * weight_out[row] (exact erf GELU).
// The Python reference `hf_fff.backends.reference.fff_forward` is the contract; this file only makes
// it fast:
//
// * Two phases per token. Routing (phase 1) is a chain of dependent dot products, one per level.
//   Output (phase 2) is a sum of K = trees * (depth + 1) rows whose addresses are all known by then,
//   so it is computed chunk by chunk over the hidden size with y held in registers and the K rows
//   streamed side by side (the memory system overlaps the K independent row reads).
// * Tokens are walked in small groups, level by level: the dot products of different tokens are
//   independent, so the out-of-order core overlaps their cache misses (deep tree levels are cold:
//   a 768-wide fp32 row is 3 KB and a depth-11 tree has 4095 of them per matrix).
// * Inner loops use GCC/Clang vector extensions (64-byte values, four accumulators), compiled with
//   -O3 -march=native into the widest SIMD of the machine: no intrinsics, any vector ISA. (Plain
//   loops left to the auto-vectoriser turned the row sum into gather instructions.)
// * One OpenMP parallel region per call over contiguous token ranges; small calls (a single token)
//   run on the calling thread, because waking the thread team costs more than the work.
// * Accumulation in float (double for double inputs); bf16 / fp16 values are widened on load.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kMaxDepth = 30;          // ops.py rejects deeper trees; re-checked here for direct calls
constexpr int64_t kTokenGroup = 8;         // tokens routed in lockstep (enough independent work to overlap misses)
constexpr int64_t kMinMacsPerThread = 1 << 18;  // below this a thread's share is cheaper than waking it

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

#if !defined(__GNUC__)
#error "fff_cpu.cpp uses GCC/Clang vector extensions; build with GCC or Clang (hf_fff then falls back to torch)"
#endif

// A 64-byte SIMD value of the accumulation type (16 floats or 8 doubles): one AVX-512 register, two
// AVX2 registers, four NEON registers; the compiler picks the instructions for -march=native.
template <typename acc_t>
using Vec __attribute__((vector_size(64))) = acc_t;
template <typename acc_t>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(acc_t));

// Widen stored values to the accumulation type, one value or one Vec at a time. bf16 is the top half
// of an fp32, so a shift suffices (and vectorises); fp16 goes through c10's conversion.
inline float widen(float value) { return value; }
inline double widen(double value) { return value; }
inline float widen(c10::BFloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}
inline float widen(c10::Half value) { return static_cast<float>(value); }

template <typename scalar_t, typename acc_t>
inline Vec<acc_t> load_vec(const scalar_t* source) {
  Vec<acc_t> result;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&result, source, sizeof(result));  // unaligned load
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    using Half16 __attribute__((vector_size(32))) = uint16_t;
    using Word16 __attribute__((vector_size(64))) = uint32_t;
    Half16 halves;
    std::memcpy(&halves, source, sizeof(halves));
    const Word16 words = __builtin_convertvector(halves, Word16) << 16;
    std::memcpy(&result, &words, sizeof(result));
  } else {
    for (int64_t k = 0; k < kLanes<acc_t>; ++k) {
      result[k] = widen(source[k]);
    }
  }
  return result;
}

template <typename acc_t>
inline acc_t sum_lanes(Vec<acc_t> v) {
  acc_t total = 0;
  for (int64_t k = 0; k < kLanes<acc_t>; ++k) {
    total += v[k];
  }
  return total;
}

// x . w over `hidden` values; four independent accumulators hide the FMA latency.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline acc_t dot(const acc_t* x, const scalar_t* w, int64_t hidden) {
  constexpr int64_t L = kLanes<acc_t>;
  Vec<acc_t> a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t h = 0;
  for (; h + 4 * L <= hidden; h += 4 * L) {
    a0 += load_vec<acc_t, acc_t>(x + h) * load_vec<scalar_t, acc_t>(w + h);
    a1 += load_vec<acc_t, acc_t>(x + h + L) * load_vec<scalar_t, acc_t>(w + h + L);
    a2 += load_vec<acc_t, acc_t>(x + h + 2 * L) * load_vec<scalar_t, acc_t>(w + h + 2 * L);
    a3 += load_vec<acc_t, acc_t>(x + h + 3 * L) * load_vec<scalar_t, acc_t>(w + h + 3 * L);
  }
  for (; h + L <= hidden; h += L) {
    a0 += load_vec<acc_t, acc_t>(x + h) * load_vec<scalar_t, acc_t>(w + h);
  }
  acc_t tail = 0;
  for (; h < hidden; ++h) {
    tail += x[h] * widen(w[h]);
  }
  return sum_lanes<acc_t>((a0 + a1) + (a2 + a3)) + tail;
}

template <typename acc_t>
inline acc_t gelu_erf(acc_t z) {
  return acc_t(0.5) * z * (acc_t(1) + std::erf(z * acc_t(M_SQRT1_2)));
}

inline void store(float value, float* out) { *out = value; }
inline void store(double value, double* out) { *out = value; }
inline void store(float value, c10::BFloat16* out) { *out = c10::BFloat16(value); }  // round to nearest even
inline void store(float value, c10::Half* out) { *out = c10::Half(value); }

template <typename scalar_t, typename acc_t>
inline void store_vec(Vec<acc_t> value, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(out, &value, sizeof(value));
  } else {
    for (int64_t k = 0; k < kLanes<acc_t>; ++k) {
      store(value[k], out + k);
    }
  }
}

// out[h] = sum_r coef[r] * rows[r][h]. The output block stays in registers while the rows stream by,
// so y is written once and each row is read once, in order.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline void weighted_row_sum(const scalar_t* const* rows, const acc_t* coef, int64_t count, int64_t hidden, scalar_t* out) {
  constexpr int64_t L = kLanes<acc_t>;
  int64_t h = 0;
  for (; h + 4 * L <= hidden; h += 4 * L) {
    Vec<acc_t> a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* row = rows[r] + h;
      const acc_t c = coef[r];
      a0 += c * load_vec<scalar_t, acc_t>(row);
      a1 += c * load_vec<scalar_t, acc_t>(row + L);
      a2 += c * load_vec<scalar_t, acc_t>(row + 2 * L);
      a3 += c * load_vec<scalar_t, acc_t>(row + 3 * L);
    }
    store_vec<scalar_t, acc_t>(a0, out + h);
    store_vec<scalar_t, acc_t>(a1, out + h + L);
    store_vec<scalar_t, acc_t>(a2, out + h + 2 * L);
    store_vec<scalar_t, acc_t>(a3, out + h + 3 * L);
  }
  for (; h + L <= hidden; h += L) {
    Vec<acc_t> a0 = {};
    for (int64_t r = 0; r < count; ++r) {
      a0 += coef[r] * load_vec<scalar_t, acc_t>(rows[r] + h);
    }
    store_vec<scalar_t, acc_t>(a0, out + h);
  }
  for (; h < hidden; ++h) {
    acc_t value = 0;
    for (int64_t r = 0; r < count; ++r) {
      value += coef[r] * widen(rows[r][h]);
    }
    store(value, out + h);
  }
}

template <typename scalar_t>
struct FffProblem {
  const scalar_t* x;
  const scalar_t* weight_in;
  const scalar_t* bias_in;
  const scalar_t* weight_out;
  scalar_t* y;
  int64_t* leaves;
  int64_t hidden;
  int64_t trees;
  int64_t depth;
  int64_t nodes;  // per tree

  int64_t levels() const { return depth + 1; }
  int64_t visited() const { return trees * levels(); }  // rows per token
};

// Per-thread scratch, sized once per call.
template <typename scalar_t>
struct Scratch {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> x_wide;            // (group, hidden) widened inputs (unused for float / double)
  std::vector<acc_t> coef;              // (group, visited) logits, then their GELU
  std::vector<const scalar_t*> rows;    // (group, visited) weight_out rows to sum
  std::vector<int64_t> node;            // (group,) current node within the tree

  explicit Scratch(const FffProblem<scalar_t>& p)
      : x_wide(std::is_same_v<scalar_t, acc_t> ? 0 : kTokenGroup * p.hidden),
        coef(kTokenGroup * p.visited()),
        rows(kTokenGroup * p.visited()),
        node(kTokenGroup) {}
};

// Tokens [begin, begin + count), count <= kTokenGroup.
template <typename scalar_t>
void fff_token_group(const FffProblem<scalar_t>& p, int64_t begin, int64_t count, Scratch<scalar_t>& s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = p.hidden;
  const int64_t K = p.visited();

  const acc_t* x_of[kTokenGroup];
  for (int64_t g = 0; g < count; ++g) {
    const scalar_t* x_row = p.x + (begin + g) * H;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      x_of[g] = x_row;
    } else {
      acc_t* wide = s.x_wide.data() + g * H;
      for (int64_t h = 0; h < H; ++h) {
        wide[h] = widen(x_row[h]);
      }
      x_of[g] = wide;
    }
  }

  // Phase 1: route every token of the group through every tree, level by level.
  for (int64_t t = 0; t < p.trees; ++t) {
    const int64_t tree_start = t * p.nodes;
    std::fill_n(s.node.data(), count, int64_t{0});
    for (int64_t level = 0; level < p.levels(); ++level) {
      for (int64_t g = 0; g < count; ++g) {
        const int64_t row = tree_start + s.node[g];
        const acc_t logit = dot(x_of[g], p.weight_in + row * H, H) + widen(p.bias_in[row]);
        const int64_t slot = g * K + t * p.levels() + level;
        s.coef[slot] = logit;
        s.rows[slot] = p.weight_out + row * H;
        if (level < p.depth) {
          s.node[g] = 2 * s.node[g] + (logit > acc_t(0) ? 2 : 1);  // left on <= 0, right on > 0
        }
      }
    }
    for (int64_t g = 0; g < count; ++g) {
      p.leaves[(begin + g) * p.trees + t] = s.node[g] - ((int64_t{1} << p.depth) - 1);
    }
  }

  // Phase 2: y = sum over visited rows of GELU(logit) * weight_out[row].
  for (int64_t g = 0; g < count; ++g) {
    acc_t* coef = s.coef.data() + g * K;
    for (int64_t k = 0; k < K; ++k) {
      coef[k] = gelu_erf(coef[k]);
    }
    weighted_row_sum(s.rows.data() + g * K, coef, K, H, p.y + (begin + g) * H);
  }
}

template <typename scalar_t>
void fff_token_range(const FffProblem<scalar_t>& p, int64_t begin, int64_t end) {
  Scratch<scalar_t> scratch(p);
  for (int64_t group = begin; group < end; group += kTokenGroup) {
    fff_token_group(p, group, std::min(kTokenGroup, end - group), scratch);
  }
}

int64_t threads_for(int64_t tokens, int64_t macs_per_token) {
  const int64_t available = at::get_num_threads();
  const int64_t by_work = (tokens * macs_per_token) / kMinMacsPerThread;
  return std::max<int64_t>(1, std::min({available, by_work, tokens}));
}

template <typename scalar_t>
void fff_run(const FffProblem<scalar_t>& p, int64_t tokens) {
  const int64_t threads = threads_for(tokens, 2 * p.visited() * p.hidden);
#ifdef _OPENMP
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
    {
      // Contiguous ranges: equal work per token, and neighbouring tokens share nothing worth interleaving.
      const int64_t team = omp_get_num_threads();
      const int64_t me = omp_get_thread_num();
      const int64_t per_thread = (tokens + team - 1) / team;
      const int64_t begin = std::min(tokens, me * per_thread);
      const int64_t end = std::min(tokens, begin + per_thread);
      fff_token_range(p, begin, end);
    }
    return;
  }
#endif
  fff_token_range(p, 0, tokens);
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& bias_in, const at::Tensor& weight_out, int64_t depth) {
  TORCH_CHECK(depth >= 0 && depth <= kMaxDepth, "fff_cpu: depth must be in [0, ", kMaxDepth, "], got ", depth);
  TORCH_CHECK(x.dim() == 2, "fff_cpu: x must be 2-D (tokens, hidden), got ", x.dim(), "-D");
  TORCH_CHECK(weight_in.dim() == 2 && weight_out.dim() == 2 && bias_in.dim() == 1,
              "fff_cpu: weight_in and weight_out must be 2-D and bias_in 1-D");
  for (const at::Tensor* t : {&x, &weight_in, &bias_in, &weight_out}) {
    TORCH_CHECK(t->device().is_cpu(), "fff_cpu: all tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), "fff_cpu: all tensors must be contiguous");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "fff_cpu: all tensors must share x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
  }
  const int64_t nodes = (int64_t{1} << (depth + 1)) - 1;
  TORCH_CHECK(weight_in.size(1) == x.size(1), "fff_cpu: weight_in has width ", weight_in.size(1), " but x has ", x.size(1));
  TORCH_CHECK(weight_in.size(0) > 0 && weight_in.size(0) % nodes == 0, "fff_cpu: weight_in must have trees * ", nodes,
              " rows for depth ", depth, ", got ", weight_in.size(0));
  TORCH_CHECK(weight_out.sizes() == weight_in.sizes(), "fff_cpu: weight_out must have weight_in's shape ", weight_in.sizes(),
              ", got ", weight_out.sizes());
  TORCH_CHECK(bias_in.size(0) == weight_in.size(0), "fff_cpu: bias_in must have ", weight_in.size(0), " entries, got ",
              bias_in.size(0));
}

std::tuple<at::Tensor, at::Tensor> fff_forward(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& bias_in,
                                               const at::Tensor& weight_out, int64_t depth) {
  check_inputs(x, weight_in, bias_in, weight_out, depth);
  const int64_t tokens = x.size(0);
  const int64_t nodes = (int64_t{1} << (depth + 1)) - 1;
  const int64_t trees = weight_in.size(0) / nodes;
  at::Tensor y = at::empty_like(x);
  at::Tensor leaves = at::empty({tokens, trees}, x.options().dtype(at::kLong));
  if (tokens == 0) {
    return {y, leaves};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fff_cpu_forward", [&] {
    const FffProblem<scalar_t> problem{
        x.const_data_ptr<scalar_t>(), weight_in.const_data_ptr<scalar_t>(), bias_in.const_data_ptr<scalar_t>(),
        weight_out.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), leaves.mutable_data_ptr<int64_t>(),
        x.size(1), trees, depth, nodes};
    fff_run(problem, tokens);
  });
  return {y, leaves};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_fff CPU kernel of the FFF conditional matmul";
  m.def("fff_forward", &fff_forward, "x (M, H), weight_in (T*N, H), bias_in (T*N,), weight_out (T*N, H), depth -> (y, leaves)",
        pybind11::arg("x"), pybind11::arg("weight_in"), pybind11::arg("bias_in"), pybind11::arg("weight_out"),
        pybind11::arg("depth"));
}

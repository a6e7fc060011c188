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
// * Many tokens, one tree: the tree is cut into subtrees that fit a core's L2 cache; tokens are routed
//   through the top levels, sorted by subtree, and finished subtree by subtree (see subtree_split).
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
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kMaxDepth = 30;          // ops.py rejects deeper trees; re-checked here for direct calls
constexpr int64_t kTokenGroup = 8;         // tokens routed in lockstep (enough independent work to overlap misses)
constexpr int64_t kMinMacsPerThread = 1 << 18;  // below this a thread's share is cheaper than waking it
constexpr int64_t kSubtreeBytes = 512 << 10;     // a subtree's rows must fit half of a typical 1 MB L2
constexpr int64_t kMinTokensPerSubtree = 4;      // fewer tokens per subtree: too little reuse to pay for the sort

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

// What every token carries between the phases: its logits (then their GELU) and the weight_out rows
// of its visited nodes, K = trees * (depth + 1) of each, in (tree, level) order. The node a token is
// at in each tree lives in the leaves output until it is turned into a leaf index.
template <typename scalar_t>
struct Walk {
  using acc_t = acc_type<scalar_t>;
  const FffProblem<scalar_t>& p;
  std::vector<acc_t> coef;            // (tokens, K)
  std::vector<const scalar_t*> rows;  // (tokens, K)
  std::vector<acc_t> x_wide;          // (threads, kTokenGroup, hidden) widened inputs; unused for float / double

  Walk(const FffProblem<scalar_t>& problem, int64_t tokens, int64_t threads)
      : p(problem),
        coef(tokens * problem.visited()),
        rows(tokens * problem.visited()),
        x_wide(std::is_same_v<scalar_t, acc_t> ? 0 : threads * kTokenGroup * problem.hidden) {}

  int64_t& node(int64_t token, int64_t tree) const { return p.leaves[token * p.trees + tree]; }

  // Inputs of a group of tokens in the accumulation type (a view of x itself when no widening is needed).
  void inputs(const int64_t* tokens, int64_t count, int64_t thread, const acc_t** x_of) {
    for (int64_t g = 0; g < count; ++g) {
      const scalar_t* x_row = p.x + tokens[g] * p.hidden;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        x_of[g] = x_row;
      } else {
        acc_t* wide = x_wide.data() + (thread * kTokenGroup + g) * p.hidden;
        for (int64_t h = 0; h < p.hidden; ++h) {
          wide[h] = widen(x_row[h]);
        }
        x_of[g] = wide;
      }
    }
  }

  // Phase 1: move a group of tokens down tree `tree` through levels [from, to), in lockstep.
  void route(const int64_t* tokens, int64_t count, const acc_t* const* x_of, int64_t tree, int64_t from, int64_t to) {
    const int64_t H = p.hidden, K = p.visited();
    const int64_t tree_start = tree * p.nodes;
    for (int64_t level = from; level < to; ++level) {
      for (int64_t g = 0; g < count; ++g) {
        int64_t& at = node(tokens[g], tree);
        const int64_t row = tree_start + at;
        const acc_t logit = dot(x_of[g], p.weight_in + row * H, H) + widen(p.bias_in[row]);
        const int64_t slot = tokens[g] * K + tree * p.levels() + level;
        coef[slot] = logit;
        rows[slot] = p.weight_out + row * H;
        if (level < p.depth) {
          at = 2 * at + (logit > acc_t(0) ? 2 : 1);  // left on <= 0, right on > 0
        }
      }
    }
  }

  // Phase 2: y = sum over the visited rows of GELU(logit) * weight_out[row]; nodes become leaf indices.
  void finish(int64_t token) {
    const int64_t K = p.visited();
    acc_t* token_coef = coef.data() + token * K;
    for (int64_t k = 0; k < K; ++k) {
      token_coef[k] = gelu_erf(token_coef[k]);
    }
    weighted_row_sum(rows.data() + token * K, token_coef, K, p.hidden, p.y + token * p.hidden);
    for (int64_t t = 0; t < p.trees; ++t) {
      node(token, t) -= (int64_t{1} << p.depth) - 1;
    }
  }

  // Every tree, every level, then the output, for a list of tokens (in groups of kTokenGroup).
  void whole(const int64_t* tokens, int64_t count, int64_t thread) {
    const acc_t* x_of[kTokenGroup];
    for (int64_t start = 0; start < count; start += kTokenGroup) {
      const int64_t group = std::min(kTokenGroup, count - start);
      inputs(tokens + start, group, thread, x_of);
      for (int64_t t = 0; t < p.trees; ++t) {
        route(tokens + start, group, x_of, t, 0, p.levels());
      }
      for (int64_t g = 0; g < group; ++g) {
        finish(tokens[start + g]);
      }
    }
  }

  // Levels [0, split) of the single tree for a list of tokens, starting from the root.
  void top(const int64_t* tokens, int64_t count, int64_t split, int64_t thread) {
    const acc_t* x_of[kTokenGroup];
    for (int64_t start = 0; start < count; start += kTokenGroup) {
      const int64_t group = std::min(kTokenGroup, count - start);
      inputs(tokens + start, group, thread, x_of);
      route(tokens + start, group, x_of, 0, 0, split);
    }
  }

  // Levels [split, depth] of the single tree, then the output, for a list of tokens.
  void bottom(const int64_t* tokens, int64_t count, int64_t split, int64_t thread) {
    const acc_t* x_of[kTokenGroup];
    for (int64_t start = 0; start < count; start += kTokenGroup) {
      const int64_t group = std::min(kTokenGroup, count - start);
      inputs(tokens + start, group, thread, x_of);
      route(tokens + start, group, x_of, 0, split, p.levels());
      for (int64_t g = 0; g < group; ++g) {
        finish(tokens[start + g]);
      }
    }
  }
};

// Thread `me` of `team` takes a contiguous share: equal work per token.
inline std::pair<int64_t, int64_t> share(int64_t tokens, int64_t team, int64_t me) {
  const int64_t per_thread = (tokens + team - 1) / team;
  const int64_t begin = std::min(tokens, me * per_thread);
  return {begin, std::min(tokens, begin + per_thread)};
}

int64_t threads_for(int64_t tokens, int64_t macs_per_token) {
  const int64_t available = at::get_num_threads();
  const int64_t by_work = (tokens * macs_per_token) / kMinMacsPerThread;
  return std::max<int64_t>(1, std::min({available, by_work, tokens}));
}

// Level at which a single tree is cut into subtrees small enough to stay in a core's L2 cache (both
// matrices), or 0 when cutting does not pay: several trees, too few tokens per subtree, or a tree
// that fits whole. Tokens are then routed through the top levels, sorted by the subtree they reached,
// and finished subtree by subtree, so each deep row is read from memory about once per call instead
// of once per token (a 768 x depth-11 tree is 25 MB in fp32; its depth-5 subtrees are 378 KB).
template <typename scalar_t>
int64_t subtree_split(const FffProblem<scalar_t>& p, int64_t tokens) {
  if (p.trees != 1) {
    return 0;
  }
  const int64_t node_bytes = 2 * p.hidden * static_cast<int64_t>(sizeof(scalar_t));
  int64_t subtree_levels = 0;
  while (subtree_levels < p.levels() && ((int64_t{2} << subtree_levels) - 1) * node_bytes <= kSubtreeBytes) {
    ++subtree_levels;
  }
  const int64_t split = p.levels() - subtree_levels;
  if (split == 0 || tokens < (kMinTokensPerSubtree << split)) {
    return 0;
  }
  return split;
}

// Token indices ordered by the node they reached at level `split` (a counting sort).
template <typename scalar_t>
void sort_by_subtree(const Walk<scalar_t>& walk, int64_t tokens, int64_t split, std::vector<int64_t>& order) {
  const int64_t first = (int64_t{1} << split) - 1;  // heap index of the first node at that level
  std::vector<int64_t> start((int64_t{1} << split) + 1, 0);
  for (int64_t m = 0; m < tokens; ++m) {
    ++start[walk.node(m, 0) - first + 1];
  }
  for (size_t b = 1; b < start.size(); ++b) {
    start[b] += start[b - 1];
  }
  for (int64_t m = 0; m < tokens; ++m) {
    order[start[walk.node(m, 0) - first]++] = m;
  }
}

template <typename scalar_t>
void fff_run(const FffProblem<scalar_t>& p, int64_t tokens) {
  const int64_t threads = threads_for(tokens, 2 * p.visited() * p.hidden);
  const int64_t split = subtree_split(p, tokens);
  Walk<scalar_t> walk(p, tokens, threads);
  std::fill_n(p.leaves, tokens * p.trees, int64_t{0});  // every token starts at the root of every tree
  std::vector<int64_t> natural(tokens), order(split ? tokens : 0);
  for (int64_t m = 0; m < tokens; ++m) {
    natural[m] = m;
  }

  // The whole call as phases run by every thread of a team on its share of the tokens.
  auto run_share = [&](int64_t team, int64_t me, auto&& barrier, auto&& serial) {
    const auto [begin, end] = share(tokens, team, me);
    if (split == 0) {
      walk.whole(natural.data() + begin, end - begin, me);
      return;
    }
    walk.top(natural.data() + begin, end - begin, split, me);
    barrier();
    serial([&] { sort_by_subtree(walk, tokens, split, order); });
    walk.bottom(order.data() + begin, end - begin, split, me);
  };

#ifdef _OPENMP
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
    {
      auto barrier = [] {
#pragma omp barrier
      };
      auto serial = [](auto&& fn) {
#pragma omp single
        fn();  // the implicit barrier at the end of `single` publishes the order to every thread
      };
      run_share(omp_get_num_threads(), omp_get_thread_num(), barrier, serial);
    }
    return;
  }
#endif
  run_share(1, 0, [] {}, [](auto&& fn) { fn(); });
}

// Error messages are assembled from strings only: on the GPU machine's image (torch 2.11) streaming an
// integer into a TORCH_CHECK message from an extension crashed inside libstdc++ (seen 2026-11-23 with the
// CUDA binding and then this file), so numbers, dtypes and devices are turned into strings first.
std::string num(int64_t v) { return std::to_string(v); }

std::string dims(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& bias_in, const at::Tensor& weight_out, int64_t depth) {
  TORCH_CHECK(depth >= 0 && depth <= kMaxDepth, "fff_cpu: depth must be in [0, ", num(kMaxDepth), "], got ", num(depth));
  TORCH_CHECK(x.dim() == 2, "fff_cpu: x must be 2-D (tokens, hidden), got ", num(x.dim()), "-D");
  TORCH_CHECK(weight_in.dim() == 2 && weight_out.dim() == 2 && bias_in.dim() == 1,
              "fff_cpu: weight_in and weight_out must be 2-D and bias_in 1-D");
  for (const at::Tensor* t : {&x, &weight_in, &bias_in, &weight_out}) {
    TORCH_CHECK(t->device().is_cpu(), "fff_cpu: all tensors must be on the CPU, got ", t->device().str());
    TORCH_CHECK(t->is_contiguous(), "fff_cpu: all tensors must be contiguous");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "fff_cpu: all tensors must share x's dtype ",
                c10::toString(x.scalar_type()), ", got ", c10::toString(t->scalar_type()));
  }
  const int64_t nodes = (int64_t{1} << (depth + 1)) - 1;
  TORCH_CHECK(weight_in.size(1) == x.size(1), "fff_cpu: weight_in has width ", num(weight_in.size(1)), " but x has ",
              num(x.size(1)));
  TORCH_CHECK(weight_in.size(0) > 0 && weight_in.size(0) % nodes == 0, "fff_cpu: weight_in must have trees * ", num(nodes),
              " rows for depth ", num(depth), ", got ", num(weight_in.size(0)));
  TORCH_CHECK(weight_out.sizes() == weight_in.sizes(), "fff_cpu: weight_out must have weight_in's shape ",
              dims(weight_in.sizes()), ", got ", dims(weight_out.sizes()));
  TORCH_CHECK(bias_in.size(0) == weight_in.size(0), "fff_cpu: bias_in must have ", num(weight_in.size(0)), " entries, got ",
              num(bias_in.size(0)));
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

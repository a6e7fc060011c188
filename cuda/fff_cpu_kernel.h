// Torch-free core of the CPU FFF kernel: forward and fused backward on raw pointers.
//
// The FFF function (hf_fff/backends/reference.py is the contract): per token and tree, walk depth + 1
// nodes from the root, logit = x . weight_in[row] + bias_in[row], go to child 2n+1 if logit <= 0 else
// 2n+2, and y = sum over the visited rows of GELU(logit) * weight_out[row] (exact erf GELU).
//
// This header holds only arithmetic and ordering; threads, allocation of outputs and argument checks
// live in the caller (fff_cpu.cpp for torch, cpu_test/fff_cpu_kernel_test.cpp for the ISA tests). Every
// function takes a token range, so that a caller can split the work between threads; the result of a
// token never depends on the range it was computed in (tests check bit equality).
//
// Design (docs/cpu_design.md has the measurements behind it):
// * SIMD through GCC/Clang vector extensions whose width is the target's register width: 64 bytes with
//   AVX-512, 32 with AVX/AVX2, 16 otherwise (SSE2, NEON). A vector wider than the registers is split by
//   the compiler into several, and its accumulators then live on the stack (3.7x slower on AVX2).
// * Node-batched routing: the tokens of a call are kept sorted by the node they are at; at every level
//   the tokens that share a node are computed four at a time against that node's row, which is loaded
//   once per four tokens and stays in L1 (a token's x is reused from L1 too). The leftovers of each
//   node (1-3 tokens) are pooled and computed four at a time, each against its own row, so that deep
//   levels, where most nodes hold one token, still keep four independent dot products in flight.
// * The output of a token is a weighted sum of its K = trees * (depth + 1) weight_out rows, computed in
//   register-held chunks of y with the K rows streamed side by side; tokens are finished in leaf order,
//   so consecutive tokens share most of their rows in cache.
// * Backward: per token (the two dot products of every visited row, then grad_x as a weighted sum of
//   weight_in rows), then per row: with the tokens sorted by (tree, leaf) the tokens that visited a node
//   are contiguous at every level, so each weight-gradient row is one weighted sum of x (or grad_y) rows:
//   no atomics, no (tokens, levels, hidden) temporaries, and a fixed summation order (deterministic).
//   Callers split those row sums between threads by columns.
// * Accumulation in float (double for double); bf16 widens with a shift, fp16 with F16C or NEON where
//   present (else a scalar conversion); outputs round to nearest even.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if !defined(__GNUC__)
#error "fff_cpu_kernel.h uses GCC/Clang vector extensions; build with GCC or Clang"
#endif

namespace hf_fff_cpu {

// ---------------------------------------------------------------------------------------------------
// Element types and conversions

// 16-bit storage types with the layout of c10::BFloat16 / c10::Half (the raw bits).
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

template <typename S>
using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) {  // inf / nan
    return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  }
  if (exponent == 0) {  // zero / subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// Round to nearest even, as c10::Half(float).
inline uint16_t float_to_half(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return sign | 0x7E00u;   // nan
  if (magnitude >= 0x477FF000u) return sign | 0x7C00u;  // rounds to 65520 or more: inf
  if (magnitude < 0x38800000u) {                        // below 2^-14: a subnormal half (or zero)
    const float units = bits_to_float(magnitude) * 0x1p24f;  // exact: a power-of-two scaling
    return sign | static_cast<uint16_t>(std::nearbyint(units));  // 1024 encodes 2^-14, the smallest normal
  }
  const uint32_t rebased = magnitude - 0x38000000u;  // exponent bias 127 -> 15
  const uint32_t rounded = rebased + 0xFFFu + ((rebased >> 13) & 1u);
  return sign | static_cast<uint16_t>(rounded >> 13);
}

// Round to nearest even, as c10::BFloat16(float); nan stays nan.
inline uint16_t float_to_bfloat(float value) {
  const uint32_t bits = float_to_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(bf16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
inline float widen(f16 v) { return half_to_float(v.bits); }

inline void narrow(float v, float* out) { *out = v; }
inline void narrow(double v, double* out) { *out = v; }
inline void narrow(float v, bf16* out) { out->bits = float_to_bfloat(v); }
inline void narrow(float v, f16* out) { out->bits = float_to_half(v); }

// ---------------------------------------------------------------------------------------------------
// SIMD values: one register of the target

#if defined(__AVX512F__)
inline constexpr int64_t kVectorBytes = 64;
#elif defined(__AVX__)
inline constexpr int64_t kVectorBytes = 32;
#else
inline constexpr int64_t kVectorBytes = 16;  // SSE2 (x86-64 baseline), NEON, anything else
#endif

template <typename A>
using Vec __attribute__((vector_size(kVectorBytes))) = A;
template <typename A>
inline constexpr int64_t kLanes = kVectorBytes / static_cast<int64_t>(sizeof(A));

inline const char* isa_name() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#elif defined(__AVX__)
  return "avx";
#elif defined(__aarch64__)
  return "neon";
#elif defined(__SSE2__)
  return "sse2";
#else
  return "generic";
#endif
}

// kLanes<Acc<S>> values of S at p, widened to the accumulation type.
template <typename S>
inline Vec<Acc<S>> load(const S* p) {
  using A = Acc<S>;
  Vec<A> result;
  if constexpr (std::is_same_v<S, A>) {
    std::memcpy(&result, p, sizeof(result));  // unaligned load
  } else if constexpr (std::is_same_v<S, bf16>) {
    using Narrow __attribute__((vector_size(kVectorBytes / 2))) = uint16_t;
    using Wide __attribute__((vector_size(kVectorBytes))) = uint32_t;
    Narrow halves;
    std::memcpy(&halves, p, sizeof(halves));
    const Wide words = __builtin_convertvector(halves, Wide) << 16;
    std::memcpy(&result, &words, sizeof(result));
  } else {
    static_assert(std::is_same_v<S, f16>);
#if defined(__AVX512F__)
    // The masked form: GCC 12's plain _mm512_cvtph_ps trips -Wmaybe-uninitialized on its undefined source.
    const __m512 wide = _mm512_mask_cvtph_ps(_mm512_setzero_ps(), __mmask16(0xFFFF), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    std::memcpy(&result, &wide, sizeof(result));
#elif defined(__AVX__) && defined(__F16C__)
    const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&result, &wide, sizeof(result));
#elif defined(__aarch64__) && defined(__ARM_NEON)
    const float32x4_t wide = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(&p->bits)));
    std::memcpy(&result, &wide, sizeof(result));
#else
    for (int64_t k = 0; k < kLanes<A>; ++k) result[k] = half_to_float(p[k].bits);
#endif
  }
  return result;
}

template <typename S>
inline void store(Vec<Acc<S>> value, S* out) {
  if constexpr (std::is_same_v<S, Acc<S>>) {
    std::memcpy(out, &value, sizeof(value));
  } else {
    for (int64_t k = 0; k < kLanes<Acc<S>>; ++k) narrow(value[k], out + k);
  }
}

template <typename A>
inline A sum_lanes(Vec<A> v) {
  A total = 0;
  for (int64_t k = 0; k < kLanes<A>; ++k) total += v[k];
  return total;
}

// ---------------------------------------------------------------------------------------------------
// Arithmetic kernels

template <typename A>
inline A gelu(A z) {
  return A(0.5) * z * (A(1) + std::erf(z * A(M_SQRT1_2)));
}

// The exact GELU and its derivative Phi(z) + z phi(z) from one erf (the backward needs both per visited row; the
// compiler cannot merge two erf calls itself, math functions may set errno). The same expressions as gelu().
template <typename A>
inline void gelu_and_derivative(A z, A& value, A& derivative) {
  const A one_plus_erf = A(1) + std::erf(z * A(M_SQRT1_2));
  value = A(0.5) * z * one_plus_erf;
  const A cdf = A(0.5) * one_plus_erf;
  const A pdf = std::exp(A(-0.5) * z * z) * A(0.3989422804014327);  // 1 / sqrt(2 pi)
  derivative = cdf + z * pdf;
}

inline constexpr int kBlock = 4;  // tokens per dot-product block (8 vector accumulators: fits 16 registers)

// out[j] = x[j] . rows[kShared ? 0 : j] over `hidden` values, for B tokens. Two accumulators per token
// (even and odd chunks) give 2B independent FMA chains. Every token's sum is formed in the same order
// whatever B and kShared are, so a token's logit never depends on which tokens it was batched with.
template <int B, bool kShared, typename S, typename A = Acc<S>>
inline void dots(const A* const* x, const S* const* rows, int64_t hidden, A* out) {
  using V = Vec<A>;
  constexpr int64_t L = kLanes<A>;
  V even[B], odd[B];
  for (int j = 0; j < B; ++j) even[j] = odd[j] = V{};
  int64_t h = 0;
  for (; h + 2 * L <= hidden; h += 2 * L) {
    if constexpr (kShared) {
      const V w0 = load(rows[0] + h), w1 = load(rows[0] + h + L);
      for (int j = 0; j < B; ++j) {
        even[j] += load(x[j] + h) * w0;
        odd[j] += load(x[j] + h + L) * w1;
      }
    } else {
      for (int j = 0; j < B; ++j) {
        even[j] += load(x[j] + h) * load(rows[j] + h);
        odd[j] += load(x[j] + h + L) * load(rows[j] + h + L);
      }
    }
  }
  if (h + L <= hidden) {
    for (int j = 0; j < B; ++j) even[j] += load(x[j] + h) * load(rows[kShared ? 0 : j] + h);
    h += L;
  }
  for (int j = 0; j < B; ++j) {
    const S* row = rows[kShared ? 0 : j];
    A tail = 0;
    for (int64_t k = h; k < hidden; ++k) tail += x[j][k] * widen(row[k]);
    out[j] = sum_lanes<A>(even[j] + odd[j]) + tail;
  }
}

// Dots of `count` (< kBlock) tokens, each against its own row.
template <typename S, typename A = Acc<S>>
inline void dots_few(const A* const* x, const S* const* rows, int count, int64_t hidden, A* out) {
  switch (count) {
    case 1: dots<1, false>(x, rows, hidden, out); break;
    case 2: dots<2, false>(x, rows, hidden, out); break;
    case 3: dots<3, false>(x, rows, hidden, out); break;
    default: break;
  }
}

// out[h] = sum_r coef[r] * rows[r][h] for h in [begin, end) (rows and out indexed from column 0). The
// output chunk stays in registers while the rows stream by; each column's sum runs over r in order, with
// the same operations in the vector and the scalar parts, so any column split gives the same bits.
template <typename R, typename O, typename A>
inline void weighted_sum(const R* const* rows, const A* coef, int64_t count, int64_t begin, int64_t end, O* out) {
  using V = Vec<A>;
  constexpr int64_t L = kLanes<A>;
  int64_t h = begin;
  for (; h + 4 * L <= end; h += 4 * L) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t r = 0; r < count; ++r) {
      const R* row = rows[r] + h;
      const A c = coef[r];
      a0 += c * load(row);
      a1 += c * load(row + L);
      a2 += c * load(row + 2 * L);
      a3 += c * load(row + 3 * L);
    }
    store<O>(a0, out + h);
    store<O>(a1, out + h + L);
    store<O>(a2, out + h + 2 * L);
    store<O>(a3, out + h + 3 * L);
  }
  for (; h + L <= end; h += L) {
    V a0 = {};
    for (int64_t r = 0; r < count; ++r) a0 += coef[r] * load(rows[r] + h);
    store<O>(a0, out + h);
  }
  for (; h < end; ++h) {
    A value = 0;
    for (int64_t r = 0; r < count; ++r) value += coef[r] * widen(rows[r][h]);
    narrow(value, out + h);
  }
}

template <typename O>
inline void zero_columns(O* row, int64_t begin, int64_t end) {
  for (int64_t h = begin; h < end; ++h) narrow(Acc<O>(0), row + h);
}

// ---------------------------------------------------------------------------------------------------
// The layer and the per-token walk

template <typename S>
struct Layer {
  const S* weight_in;   // (trees * nodes, hidden)
  const S* bias_in;     // (trees * nodes,)
  const S* weight_out;  // (trees * nodes, hidden)
  int64_t hidden;
  int64_t trees;
  int64_t depth;

  int64_t levels() const { return depth + 1; }
  int64_t nodes() const { return (int64_t{2} << depth) - 1; }  // per tree
  int64_t visited() const { return trees * levels(); }        // rows per token, K
  int64_t first_leaf() const { return (int64_t{1} << depth) - 1; }
};

// Token ids `tokens[0..count)` reordered by their leaf in tree `tree` (stable: ties keep their order).
inline void sort_by_leaf(const int64_t* leaves, int64_t trees, int64_t tree, int64_t depth, const int64_t* tokens, int64_t count,
                         int64_t* sorted) {
  const int64_t leaf_count = int64_t{1} << depth;
  if (leaf_count <= 4 * count + 1024) {  // counting sort
    std::vector<int64_t> start(leaf_count + 1, 0);
    for (int64_t i = 0; i < count; ++i) ++start[leaves[tokens[i] * trees + tree] + 1];
    for (int64_t b = 1; b <= leaf_count; ++b) start[b] += start[b - 1];
    for (int64_t i = 0; i < count; ++i) sorted[start[leaves[tokens[i] * trees + tree]]++] = tokens[i];
    return;
  }
  std::copy(tokens, tokens + count, sorted);
  std::stable_sort(sorted, sorted + count,
                   [&](int64_t a, int64_t b) { return leaves[a * trees + tree] < leaves[b * trees + tree]; });
}

// Inputs of a token range in the accumulation type: views of the rows themselves, or widened copies.
template <typename S>
class WideRows {
 public:
  using A = Acc<S>;
  WideRows(const S* rows, int64_t begin, int64_t end, int64_t hidden) : rows_(rows), begin_(begin), hidden_(hidden) {
    if constexpr (!std::is_same_v<S, A>) {
      wide_.resize((end - begin) * hidden);
      for (int64_t i = 0; i < (end - begin) * hidden; ++i) wide_[i] = widen(rows[begin * hidden + i]);
    }
  }
  const A* operator[](int64_t token) const {
    if constexpr (std::is_same_v<S, A>) {
      return rows_ + token * hidden_;
    } else {
      return wide_.data() + (token - begin_) * hidden_;
    }
  }

 private:
  const S* rows_;
  int64_t begin_, hidden_;
  std::vector<A> wide_;
};

// Dot products of tokens against rows, batched: full blocks of tokens sharing a row at once, leftovers
// pooled and computed kBlock at a time against their own rows. Each result lands in *target.
template <typename S>
class DotBatcher {
 public:
  using A = Acc<S>;
  explicit DotBatcher(int64_t hidden) : hidden_(hidden) {}

  // Tokens xs[0..count) all against `row`.
  void shared(const A* const* xs, int64_t count, const S* row, A* const* targets) {
    int64_t i = 0;
    for (; i + kBlock <= count; i += kBlock) {
      A result[kBlock];
      dots<kBlock, true>(xs + i, &row, hidden_, result);
      for (int j = 0; j < kBlock; ++j) *targets[i + j] = result[j];
    }
    for (; i < count; ++i) own(xs[i], row, targets[i]);
  }

  void own(const A* x, const S* row, A* target) {
    x_[pending_] = x;
    rows_[pending_] = row;
    targets_[pending_] = target;
    if (++pending_ == kBlock) flush();
  }

  void flush() {
    A result[kBlock];
    if (pending_ == kBlock) {
      dots<kBlock, false>(x_, rows_, hidden_, result);
    } else {
      dots_few(x_, rows_, pending_, hidden_, result);
    }
    for (int j = 0; j < pending_; ++j) *targets_[j] = result[j];
    pending_ = 0;
  }

 private:
  int64_t hidden_;
  int pending_ = 0;
  const A* x_[kBlock];
  const S* rows_[kBlock];
  A* targets_[kBlock];
};

// Walks `order` (tokens sorted by node) and calls fn(node, first, last) for every run of tokens at one node.
template <typename NodeOf, typename Fn>
inline void for_each_run(const int64_t* order, int64_t count, NodeOf&& node_of, Fn&& fn) {
  for (int64_t first = 0; first < count;) {
    const int64_t node = node_of(order[first]);
    int64_t last = first + 1;
    while (last < count && node_of(order[last]) == node) ++last;
    fn(node, first, last);
    first = last;
  }
}

// ---------------------------------------------------------------------------------------------------
// Cache blocking

#ifndef HF_FFF_CHUNK_KB
#define HF_FFF_CHUNK_KB 256
#endif
inline constexpr int64_t kChunkBytes = int64_t{HF_FFF_CHUNK_KB} << 10;    // inputs of a chunk of tokens: stay in L2 across levels
#ifndef HF_FFF_SUBTREE_KB
#define HF_FFF_SUBTREE_KB 512
#endif
inline constexpr int64_t kSubtreeBytes = int64_t{HF_FFF_SUBTREE_KB} << 10;  // both matrices' rows of a bottom subtree: stay in L2

// Tokens per chunk: the chunk's inputs (x, and grad_y in the backward) fit in kChunkBytes.
template <typename A>
inline int64_t chunk_tokens(int64_t hidden, int64_t inputs) {
  return std::max<int64_t>(4 * kBlock, kChunkBytes / std::max<int64_t>(1, inputs * hidden * static_cast<int64_t>(sizeof(A))));
}

// Level at which a tree is cut into bottom subtrees whose rows fit a core's L2, or 0 when cutting does
// not pay (a tree that fits whole, or fewer than 4 tokens per subtree on average). Routing then runs in
// two stages: chunks of tokens through the top levels, a sort by subtree, chunks of that order through
// the bottom levels; so a deep row is read from memory about once per call, not once per token.
template <typename S>
inline int64_t subtree_split(const Layer<S>& layer, int64_t tokens) {
  const int64_t node_bytes = 2 * layer.hidden * static_cast<int64_t>(sizeof(S));
  int64_t bottom_levels = 0;
  while (bottom_levels < layer.levels() && ((int64_t{2} << bottom_levels) - 1) * node_bytes <= kSubtreeBytes) ++bottom_levels;
  const int64_t split = layer.levels() - std::max<int64_t>(bottom_levels, 1);
  return split > 0 && tokens >= (int64_t{4} << split) ? split : 0;
}

// ---------------------------------------------------------------------------------------------------
// Forward

// The routing state of a token range in one call: logits and rows per (token, tree, level), the node
// each token is at in the current tree, and the batcher.
template <typename S>
class Router {
 public:
  using A = Acc<S>;
  Router(const Layer<S>& layer, const WideRows<S>& inputs, int64_t begin, int64_t count)
      : layer_(layer), inputs_(inputs), begin_(begin), count_(count), K_(layer.visited()), logit(count * K_), row_of(count * K_),
        node(count), scratch_(count), xs_(count), targets_(count), batcher_(layer.hidden) {}

  // Moves the tokens order[0..n) (local indices, sorted by node) of tree `tree` through levels [from, to),
  // keeping order sorted by node: at each level the runs of tokens at one node are computed together,
  // then split into the left and right children (left first, stable).
  void route(int64_t* order, int64_t n, int64_t tree, int64_t from, int64_t to) {
    const int64_t H = layer_.hidden, L = layer_.levels(), tree_row = tree * layer_.nodes();
    auto node_of = [&](int64_t i) { return node[i]; };
    for (int64_t level = from; level < to; ++level) {
      const int64_t slot = tree * L + level;
      for_each_run(order, n, node_of, [&](int64_t at, int64_t first, int64_t last) {
        for (int64_t p = first; p < last; ++p) {
          xs_[p] = inputs_[begin_ + order[p]];
          targets_[p] = &logit[order[p] * K_ + slot];
          row_of[order[p] * K_ + slot] = tree_row + at;
        }
        batcher_.shared(xs_.data() + first, last - first, layer_.weight_in + (tree_row + at) * H, targets_.data() + first);
      });
      batcher_.flush();
      for (int64_t p = 0; p < n; ++p) {
        const int64_t k = order[p] * K_ + slot;
        logit[k] += widen(layer_.bias_in[row_of[k]]);
      }
      if (level == layer_.depth) break;
      int64_t out = 0;
      for_each_run(order, n, node_of, [&](int64_t at, int64_t first, int64_t last) {
        for (int right = 0; right < 2; ++right) {
          for (int64_t p = first; p < last; ++p) {
            if ((logit[order[p] * K_ + slot] > A(0)) == static_cast<bool>(right)) scratch_[out++] = order[p];
          }
        }
        for (int64_t p = first; p < last; ++p) node[order[p]] = 2 * at + (logit[order[p] * K_ + slot] > A(0) ? 2 : 1);
      });
      std::copy(scratch_.begin(), scratch_.begin() + n, order);
    }
  }

  // order[0..count) reordered by node (all tokens at `level`; a counting sort).
  void sort_by_node(int64_t* order, int64_t level) {
    const int64_t first = (int64_t{1} << level) - 1, buckets = int64_t{1} << level;
    std::vector<int64_t> start(buckets + 1, 0);
    for (int64_t p = 0; p < count_; ++p) ++start[node[order[p]] - first + 1];
    for (int64_t b = 1; b <= buckets; ++b) start[b] += start[b - 1];
    for (int64_t p = 0; p < count_; ++p) scratch_[start[node[order[p]] - first]++] = order[p];
    std::copy(scratch_.begin(), scratch_.begin() + count_, order);
  }

 private:
  const Layer<S>& layer_;
  const WideRows<S>& inputs_;
  int64_t begin_, count_, K_;

 public:
  std::vector<A> logit;         // (token, tree, level), local token index
  std::vector<int64_t> row_of;  // the weight row behind each logit
  std::vector<int64_t> node;    // node of each token in the tree being routed

 private:
  std::vector<int64_t> scratch_;
  std::vector<const A*> xs_;
  std::vector<A*> targets_;
  DotBatcher<S> batcher_;
};

// y and leaves of tokens [begin, end): x (M, hidden), y (M, hidden), leaves (M, trees), all indexed by
// the global token number.
template <typename S>
void forward_tokens(const Layer<S>& layer, const S* x, int64_t begin, int64_t end, S* y, int64_t* leaves) {
  using A = Acc<S>;
  const int64_t count = end - begin;
  if (count <= 0) return;
  const int64_t H = layer.hidden, K = layer.visited();
  const WideRows<S> inputs(x, begin, end, H);
  Router<S> router(layer, inputs, begin, count);
  const int64_t chunk = chunk_tokens<A>(H, 1), split = subtree_split(layer, count);
  std::vector<int64_t> order(count);
  auto route_chunks = [&](int64_t tree, int64_t from, int64_t to) {
    for (int64_t c = 0; c < count; c += chunk) router.route(order.data() + c, std::min(chunk, count - c), tree, from, to);
  };

  for (int64_t t = 0; t < layer.trees; ++t) {
    std::iota(order.begin(), order.end(), int64_t{0});
    std::fill(router.node.begin(), router.node.end(), int64_t{0});
    if (split == 0) {
      route_chunks(t, 0, layer.levels());
    } else {
      route_chunks(t, 0, split);
      router.sort_by_node(order.data(), split);
      route_chunks(t, split, layer.levels());
    }
    for (int64_t i = 0; i < count; ++i) leaves[(begin + i) * layer.trees + t] = router.node[i] - layer.first_leaf();
  }

  // Outputs, in the last tree's order (neighbours share most of their rows, which stay in cache).
  std::vector<const S*> rows(K);
  std::vector<A> coef(K);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t i = order[p];
    for (int64_t k = 0; k < K; ++k) {
      coef[k] = gelu(router.logit[i * K + k]);
      rows[k] = layer.weight_out + router.row_of[i * K + k] * H;
    }
    weighted_sum(rows.data(), coef.data(), K, 0, H, y + (begin + i) * H);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward

// Row of tree `tree`, level `level` on the path to leaf `leaf`.
inline int64_t path_row(int64_t leaf, int64_t tree, int64_t level, int64_t depth) {
  return tree * ((int64_t{2} << depth) - 1) + (int64_t{1} << level) - 1 + (leaf >> (depth - level));
}

// Per-token part of the backward for tokens [begin, end): for every visited row k of token m,
// grad_logit[m, k] = (grad_y . weight_out[row]) * GELU'(logit) and act[m, k] = GELU(logit) (both (M, K),
// kept for backward_weights), and grad_x[m] = sum_k grad_logit[m, k] * weight_in[row]. Tokens go in
// leaf order, in chunks whose inputs stay in L2: within a chunk, the tokens at one node are contiguous
// at every level and are computed together.
template <typename S>
void backward_tokens(const Layer<S>& layer, const S* grad_y, const S* x, const int64_t* leaves, int64_t begin, int64_t end,
                     Acc<S>* grad_logit, Acc<S>* act, S* grad_x) {
  using A = Acc<S>;
  const int64_t count = end - begin;
  if (count <= 0) return;
  const int64_t H = layer.hidden, T = layer.trees, L = layer.levels(), K = layer.visited(), D = layer.depth;
  const WideRows<S> inputs(x, begin, end, H), grads(grad_y, begin, end, H);
  std::vector<int64_t> tokens(count), order(count);
  std::iota(tokens.begin(), tokens.end(), begin);
  std::vector<A> logit(count * K);
  std::vector<const A*> xs(count), gs(count);
  std::vector<A*> logit_targets(count), grad_targets(count);
  DotBatcher<S> batcher(H);
  const int64_t chunk = chunk_tokens<A>(H, 2);

  for (int64_t t = 0; t < T; ++t) {
    sort_by_leaf(leaves, T, t, D, tokens.data(), count, order.data());
    for (int64_t c = 0; c < count; c += chunk) {
      const int64_t n = std::min(chunk, count - c);
      const int64_t* chunk_order = order.data() + c;
      for (int64_t level = 0; level < L; ++level) {
        const int64_t slot = t * L + level;
        auto node_of = [&](int64_t m) { return leaves[m * T + t] >> (D - level); };
        for_each_run(chunk_order, n, node_of, [&](int64_t, int64_t first, int64_t last) {
          const int64_t row = path_row(leaves[chunk_order[first] * T + t], t, level, D);
          for (int64_t p = first; p < last; ++p) {
            const int64_t m = chunk_order[p];
            xs[p] = inputs[m];
            gs[p] = grads[m];
            logit_targets[p] = &logit[(m - begin) * K + slot];
            grad_targets[p] = &grad_logit[m * K + slot];
          }
          batcher.shared(xs.data() + first, last - first, layer.weight_in + row * H, logit_targets.data() + first);
          batcher.shared(gs.data() + first, last - first, layer.weight_out + row * H, grad_targets.data() + first);
        });
        batcher.flush();
      }
    }
  }

  std::vector<const S*> rows(K);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t m = order[p];
    A* grad = grad_logit + m * K;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t level = 0; level < L; ++level) {
        const int64_t k = t * L + level, row = path_row(leaves[m * T + t], t, level, D);
        const A z = logit[(m - begin) * K + k] + widen(layer.bias_in[row]);
        A derivative;
        gelu_and_derivative(z, act[m * K + k], derivative);
        grad[k] *= derivative;
        rows[k] = layer.weight_in + row * H;
      }
    }
    weighted_sum(rows.data(), grad, K, 0, H, grad_x + m * H);
  }
}

// What backward_weights and backward_bias share between threads: for every tree, the tokens sorted by
// leaf (their x and grad_y rows, and their coefficients gathered in that order), and the runs of tokens
// that visited each node.
template <typename S>
struct WeightPlan {
  using A = Acc<S>;
  struct Run {
    int64_t row, first, last;  // positions [first, last) in the tree's sorted order
  };
  int64_t tokens = 0;
  std::vector<const S*> xs, gs;          // (trees, M)
  std::vector<A> in_coef, out_coef;      // (trees, levels, M): grad_logit and act, in sorted order
  std::vector<std::vector<Run>> runs;    // per (tree, level)
};

template <typename S>
WeightPlan<S> plan_weights(const Layer<S>& layer, const S* grad_y, const S* x, const int64_t* leaves, int64_t tokens,
                           const Acc<S>* grad_logit, const Acc<S>* act) {
  const int64_t H = layer.hidden, T = layer.trees, L = layer.levels(), K = layer.visited(), D = layer.depth;
  WeightPlan<S> plan;
  plan.tokens = tokens;
  plan.xs.resize(T * tokens);
  plan.gs.resize(T * tokens);
  plan.in_coef.resize(T * L * tokens);
  plan.out_coef.resize(T * L * tokens);
  plan.runs.resize(T * L);
  std::vector<int64_t> natural(tokens), order(tokens);
  std::iota(natural.begin(), natural.end(), int64_t{0});
  for (int64_t t = 0; t < T; ++t) {
    sort_by_leaf(leaves, T, t, D, natural.data(), tokens, order.data());
    for (int64_t p = 0; p < tokens; ++p) {
      plan.xs[t * tokens + p] = x + order[p] * H;
      plan.gs[t * tokens + p] = grad_y + order[p] * H;
    }
    for (int64_t level = 0; level < L; ++level) {
      const int64_t slot = t * L + level;
      for (int64_t p = 0; p < tokens; ++p) {
        plan.in_coef[slot * tokens + p] = grad_logit[order[p] * K + slot];
        plan.out_coef[slot * tokens + p] = act[order[p] * K + slot];
      }
      auto node_of = [&](int64_t m) { return leaves[m * T + t] >> (D - level); };
      for_each_run(order.data(), tokens, node_of, [&](int64_t node, int64_t first, int64_t last) {
        plan.runs[slot].push_back({path_row(0, t, level, D) + node, first, last});
      });
    }
  }
  return plan;
}

// Weight-gradient rows of G consecutive levels [level, level + G) of tree `tree`, columns [h, h + W)
// (W = one vector, or 1 for the scalar tail): one pass over the tokens in leaf order with the 2G row
// sums in registers; a level's sum is stored when its run of tokens ends. The token values come from
// `x_block` / `g_block` ((M, W), this tree's leaf order: a sequential stream, which the prefetcher
// keeps ahead even though the end-of-run branch mispredicts at the deep levels). Each element is the
// sum over the run's tokens in order, c * x added one at a time: the same bits whatever the column split.
template <int G, typename V, typename S>
inline void weight_rows(const WeightPlan<S>& plan, int64_t hidden, int64_t tree, int64_t level, int64_t levels, int64_t h,
                        const Acc<S>* x_block, const Acc<S>* g_block, S* grad_weight_in, S* grad_weight_out) {
  using A = Acc<S>;
  constexpr int64_t W = sizeof(V) / sizeof(A);
  const int64_t M = plan.tokens;
  const A* in_coef[G];
  const A* out_coef[G];
  const typename WeightPlan<S>::Run* run[G];
  V acc_in[G], acc_out[G];
  for (int g = 0; g < G; ++g) {
    const int64_t slot = tree * levels + level + g;
    in_coef[g] = plan.in_coef.data() + slot * M;
    out_coef[g] = plan.out_coef.data() + slot * M;
    run[g] = plan.runs[slot].data();
    acc_in[g] = acc_out[g] = V{};
  }
  auto store_value = [&](V value, S* row) {
    if constexpr (W > 1) {
      store<S>(value, row + h);
    } else {
      narrow(value, row + h);
    }
  };
  for (int64_t p = 0; p < M; ++p) {
    V x, gy;
    std::memcpy(&x, x_block + p * W, sizeof(V));
    std::memcpy(&gy, g_block + p * W, sizeof(V));
    for (int g = 0; g < G; ++g) {
      acc_in[g] += in_coef[g][p] * x;
      acc_out[g] += out_coef[g][p] * gy;
      if (p + 1 == run[g]->last) {
        store_value(acc_in[g], grad_weight_in + run[g]->row * hidden);
        store_value(acc_out[g], grad_weight_out + run[g]->row * hidden);
        acc_in[g] = acc_out[g] = V{};
        ++run[g];
      }
    }
  }
}

// All levels of tree `tree` for columns [h, h + W), four levels per pass over the tokens: a token's x
// and grad_y values are loaded once for four rows of each matrix.
template <typename V, typename S>
inline void weight_columns(const WeightPlan<S>& plan, int64_t hidden, int64_t tree, int64_t levels, int64_t h, const Acc<S>* x_block,
                           const Acc<S>* g_block, S* grad_weight_in, S* grad_weight_out) {
  for (int64_t level = 0; level < levels; level += 4) {
    auto pass = [&](auto group) {
      weight_rows<decltype(group)::value, V>(plan, hidden, tree, level, levels, h, x_block, g_block, grad_weight_in, grad_weight_out);
    };
    switch (std::min<int64_t>(4, levels - level)) {
      case 4: pass(std::integral_constant<int, 4>{}); break;
      case 3: pass(std::integral_constant<int, 3>{}); break;
      case 2: pass(std::integral_constant<int, 2>{}); break;
      default: pass(std::integral_constant<int, 1>{}); break;
    }
  }
}

// Columns [col_begin, col_end) of grad_weight_in and grad_weight_out (every row, visited or not):
// grad_weight_in[row] = sum over the tokens m that visited row of grad_logit[m, k] * x[m], and
// grad_weight_out[row] = sum of act[m, k] * grad_y[m], summed in leaf order (never depends on threads).
template <typename S>
void backward_weights(const Layer<S>& layer, const WeightPlan<S>& plan, int64_t col_begin, int64_t col_end, S* grad_weight_in,
                      S* grad_weight_out) {
  using A = Acc<S>;
  constexpr int64_t W = kLanes<A>;
  const int64_t H = layer.hidden, T = layer.trees, L = layer.levels(), M = plan.tokens;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t level = 0; level < L; ++level) {  // rows no token visited: zero
      const int64_t level_row = path_row(0, t, level, layer.depth);
      int64_t next = level_row;
      auto zero_until = [&](int64_t row) {
        for (; next < row; ++next) {
          zero_columns(grad_weight_in + next * H, col_begin, col_end);
          zero_columns(grad_weight_out + next * H, col_begin, col_end);
        }
      };
      for (const auto& run : plan.runs[t * L + level]) {
        zero_until(run.row);
        next = run.row + 1;
      }
      zero_until(level_row + (int64_t{1} << level));
    }
  }
  if (M == 0 || col_begin >= col_end) return;
  // One vector of columns at a time: that slice of every token's x and grad_y, widened, gathered in leaf
  // order into a buffer that stays in L2 for the passes (the gather itself is branch-free, so many of
  // its scattered reads are in flight at once). The last, partial vector is zero-padded; its padding is
  // never stored.
  std::vector<A> x_block(M * W), g_block(M * W), x_column(M), g_column(M);
  for (int64_t t = 0; t < T; ++t) {
    const S* const* xs = plan.xs.data() + t * M;
    const S* const* gs = plan.gs.data() + t * M;
    for (int64_t h = col_begin; h < col_end; h += W) {
      const int64_t width = std::min(W, col_end - h);
      for (int64_t p = 0; p < M; ++p) {
        if (width == W) {
          const Vec<A> x = load(xs[p] + h), g = load(gs[p] + h);
          std::memcpy(x_block.data() + p * W, &x, sizeof(x));
          std::memcpy(g_block.data() + p * W, &g, sizeof(g));
        } else {
          for (int64_t lane = 0; lane < W; ++lane) {
            x_block[p * W + lane] = lane < width ? widen(xs[p][h + lane]) : A(0);
            g_block[p * W + lane] = lane < width ? widen(gs[p][h + lane]) : A(0);
          }
        }
      }
      if (width == W) {
        weight_columns<Vec<A>>(plan, H, t, L, h, x_block.data(), g_block.data(), grad_weight_in, grad_weight_out);
        continue;
      }
      for (int64_t c = h; c < col_end; ++c) {  // one column at a time, from that column's lanes
        for (int64_t p = 0; p < M; ++p) {
          x_column[p] = x_block[p * W + (c - h)];
          g_column[p] = g_block[p * W + (c - h)];
        }
        weight_columns<A>(plan, H, t, L, c, x_column.data(), g_column.data(), grad_weight_in, grad_weight_out);
      }
    }
  }
}

// grad_bias_in[row] = sum of grad_logit over the tokens that visited row (zero elsewhere), in leaf order.
template <typename S>
void backward_bias(const Layer<S>& layer, const WeightPlan<S>& plan, S* grad_bias_in) {
  using A = Acc<S>;
  const int64_t L = layer.levels(), M = plan.tokens;
  for (int64_t row = 0; row < layer.trees * layer.nodes(); ++row) narrow(A(0), grad_bias_in + row);
  for (int64_t slot = 0; slot < layer.trees * L; ++slot) {
    for (const auto& run : plan.runs[slot]) {
      A total = 0;
      for (int64_t p = run.first; p < run.last; ++p) total += plan.in_coef[slot * M + p];
      narrow(total, grad_bias_in + run.row);
    }
  }
}

// Column ranges for splitting backward_weights between `parts` workers: boundaries on multiples of the
// widest chunk weighted_sum uses (not needed for equal bits, but keeps each worker's chunks whole).
template <typename S>
inline std::pair<int64_t, int64_t> column_share(int64_t hidden, int64_t parts, int64_t part) {
  const int64_t chunk = 4 * kLanes<Acc<S>>;
  const int64_t chunks = (hidden + chunk - 1) / chunk;
  const int64_t per_part = (chunks + parts - 1) / parts;
  const int64_t begin = std::min(hidden, part * per_part * chunk);
  return {begin, std::min(hidden, begin + per_part * chunk)};
}

}  // namespace hf_fff_cpu

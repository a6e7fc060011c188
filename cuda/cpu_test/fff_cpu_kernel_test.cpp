// Torch-free correctness test of cuda/fff_cpu_kernel.h for whatever ISA it is compiled for.
//
//   g++ -std=c++17 -O2 -march=x86-64-v3 -I cuda cuda/cpu_test/fff_cpu_kernel_test.cpp -o test && ./test
//
// For every dtype (fp32, fp64, bf16, fp16) and a grid of shapes (odd widths, 1..8 trees, depth 0..13,
// 0 and 1 tokens, BERT size) it draws a random layer, runs the kernel's forward and backward, and checks
// them against a double-precision scalar reference of its own, computed along the kernel's leaves:
//   * routing: every branch whose double logit is clear of rounding doubt goes the way of its sign;
//   * y, grad_x, grad_weight_in, grad_bias_in, grad_weight_out: norm-wise relative error within the
//     dtype's tolerance; rows no token visited have exactly zero weight gradients;
//   * splitting: forward over one range equals forward over pieces, and the weight gradients computed
//     in one column range equal those computed in three, bit for bit.
// The hashed dropout (dropout_cpu_kernel.h) is checked too: its vector path against its scalar hash.
// Prints one line per case and exits non-zero on the first failure set (after running everything).

#include "dropout_cpu_kernel.h"
#include "fff_cpu_kernel.h"

#include <cinttypes>
#include <cstdio>
#include <random>
#include <string>

using namespace hf_fff_cpu;

namespace {

int failures = 0;

void fail(const std::string& what) {
  std::printf("  FAIL: %s\n", what.c_str());
  ++failures;
}

template <typename S>
S from_double(double v) {
  S out;
  narrow(static_cast<Acc<S>>(v), &out);
  return out;
}

template <typename S>
struct Tolerance;
template <>
struct Tolerance<float> {
  static constexpr double value = 1e-5, route = 1e-5;
  static constexpr const char* name = "fp32";
};
template <>
struct Tolerance<double> {
  static constexpr double value = 1e-12, route = 1e-12;
  static constexpr const char* name = "fp64";
};
template <>
struct Tolerance<bf16> {
  static constexpr double value = 1.6e-2, route = 1e-5;
  static constexpr const char* name = "bf16";
};
template <>
struct Tolerance<f16> {
  static constexpr double value = 2e-3, route = 1e-5;
  static constexpr const char* name = "fp16";
};

double gelu64(double z) { return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0))); }
double gelu_derivative64(double z) { return 0.5 * (1.0 + std::erf(z / std::sqrt(2.0))) + z * std::exp(-0.5 * z * z) / std::sqrt(2.0 * M_PI); }

// Norm-wise relative error of `got` against `want`, checked against `tol`.
template <typename S>
void check_close(const char* name, const std::vector<S>& got, const std::vector<double>& want, double tol) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = widen(got[i]);
    if (!std::isfinite(g)) {
      fail(std::string(name) + " has a non-finite value");
      return;
    }
    err += (g - want[i]) * (g - want[i]);
    ref += want[i] * want[i];
  }
  err = std::sqrt(err);
  ref = std::sqrt(ref);
  if (err > tol * ref + 1e-300) {
    char text[160];
    std::snprintf(text, sizeof(text), "%s relative error %.3g > %.3g", name, err / std::max(ref, 1e-300), tol);
    fail(text);
  }
}

template <typename S>
bool bit_equal(const std::vector<S>& a, const std::vector<S>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0);
}

template <typename S>
void run_case(int64_t M, int64_t H, int64_t T, int64_t D, uint64_t seed) {
  using A = Acc<S>;
  const int64_t N = (int64_t{2} << D) - 1, R = T * N, Lv = D + 1, K = T * Lv;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  auto draw = [&](int64_t n, double scale) {
    std::vector<S> v(n);
    for (auto& e : v) e = from_double<S>(normal(rng) * scale);
    return v;
  };
  const auto x = draw(M * H, 1.0), w_in = draw(R * H, 1.0 / std::sqrt(double(H))), b_in = draw(R, 0.1),
             w_out = draw(R * H, 1.0 / std::sqrt(double(K))), grad_y = draw(M * H, 1.0);
  const Layer<S> layer{w_in.data(), b_in.data(), w_out.data(), H, T, D};

  // Forward, whole range and in pieces of 7 tokens (must be bit-equal).
  std::vector<S> y(M * H), y_pieces(M * H);
  std::vector<int64_t> leaves(M * T, -1), leaves_pieces(M * T, -1);
  forward_tokens(layer, x.data(), 0, M, y.data(), leaves.data());
  for (int64_t b = 0; b < M; b += 7) forward_tokens(layer, x.data(), b, std::min(M, b + 7), y_pieces.data(), leaves_pieces.data());
  if (!bit_equal(y, y_pieces) || leaves != leaves_pieces) fail("forward in pieces differs from forward in one range");

  // Double reference along the kernel's leaves.
  std::vector<double> y64(M * H, 0.0), gx64(M * H, 0.0), gwi64(R * H, 0.0), gb64(R, 0.0), gwo64(R * H, 0.0);
  std::vector<char> visited(R, 0);
  int64_t wrong_turns = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t leaf = leaves[m * T + t];
      if (leaf < 0 || leaf >= (int64_t{1} << D)) {
        fail("leaf out of range");
        return;
      }
      for (int64_t l = 0; l < Lv; ++l) {
        const int64_t row = path_row(leaf, t, l, D);
        visited[row] = 1;
        double z = widen(b_in[row]), magnitude = std::abs(widen(b_in[row])), dg = 0;
        for (int64_t h = 0; h < H; ++h) {
          const double xv = widen(x[m * H + h]), wv = widen(w_in[row * H + h]);
          z += xv * wv;
          magnitude += std::abs(xv * wv);
          dg += double(widen(grad_y[m * H + h])) * widen(w_out[row * H + h]);
        }
        if (l < D) {
          const bool went_right = (leaf >> (D - 1 - l)) & 1;
          if (went_right != (z > 0) && std::abs(z) > Tolerance<S>::route * magnitude) ++wrong_turns;
        }
        const double g = gelu64(z), gl = dg * gelu_derivative64(z);
        gb64[row] += gl;
        for (int64_t h = 0; h < H; ++h) {
          y64[m * H + h] += g * widen(w_out[row * H + h]);
          gx64[m * H + h] += gl * widen(w_in[row * H + h]);
          gwi64[row * H + h] += gl * widen(x[m * H + h]);
          gwo64[row * H + h] += g * widen(grad_y[m * H + h]);
        }
      }
    }
  }
  if (wrong_turns) fail(std::to_string(wrong_turns) + " branches against a clear logit sign");
  check_close("y", y, y64, Tolerance<S>::value);

  // Backward: per token in two ranges, weights in one column range and in three.
  std::vector<A> grad_logit(M * K), act(M * K);
  std::vector<S> gx(M * H), gwi(R * H), gb(R), gwo(R * H), gwi3(R * H), gwo3(R * H);
  backward_tokens(layer, grad_y.data(), x.data(), leaves.data(), 0, M / 2, grad_logit.data(), act.data(), gx.data());
  backward_tokens(layer, grad_y.data(), x.data(), leaves.data(), M / 2, M, grad_logit.data(), act.data(), gx.data());
  const auto plan = plan_weights(layer, grad_y.data(), x.data(), leaves.data(), M, grad_logit.data(), act.data());
  backward_weights(layer, plan, 0, H, gwi.data(), gwo.data());
  for (int64_t part = 0; part < 3; ++part) {
    const auto [begin, end] = column_share<S>(H, 3, part);
    backward_weights(layer, plan, begin, end, gwi3.data(), gwo3.data());
  }
  backward_bias(layer, plan, gb.data());
  if (!bit_equal(gwi, gwi3) || !bit_equal(gwo, gwo3)) fail("weight gradients depend on the column split");
  check_close("grad_x", gx, gx64, Tolerance<S>::value);
  check_close("grad_weight_in", gwi, gwi64, Tolerance<S>::value);
  check_close("grad_bias_in", gb, gb64, Tolerance<S>::value);
  check_close("grad_weight_out", gwo, gwo64, Tolerance<S>::value);
  for (int64_t row = 0; row < R; ++row) {
    if (visited[row]) continue;
    bool zero = widen(gb[row]) == 0;
    for (int64_t h = 0; h < H; ++h) zero = zero && widen(gwi[row * H + h]) == 0 && widen(gwo[row * H + h]) == 0;
    if (!zero) {
      fail("nonzero gradient on a row no token visited");
      break;
    }
  }
}

struct Shape {
  int64_t tokens, hidden, trees, depth;
};

template <typename S>
void run_all(const std::vector<Shape>& shapes, uint64_t seed) {
  for (const Shape& s : shapes) {
    const int before = failures;
    run_case<S>(s.tokens, s.hidden, s.trees, s.depth, seed ^ (uint64_t(s.tokens) * 1000003u + uint64_t(s.hidden) * 10007u + s.depth));
    std::printf("%s %-4s tokens=%-4" PRId64 " hidden=%-4" PRId64 " trees=%" PRId64 " depth=%-2" PRId64 "\n", failures == before ? "ok  " : "FAIL",
                Tolerance<S>::name, s.tokens, s.hidden, s.trees, s.depth);
  }
}

// Exact conversions: every fp16 value round-trips, and float -> half/bfloat rounds to nearest even.
void check_conversions() {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const bool nan = (bits & 0x7C00) == 0x7C00 && (bits & 0x3FF);
    if (!nan && float_to_half(half_to_float(uint16_t(bits))) != bits) {
      fail("fp16 round trip of " + std::to_string(bits));
      return;
    }
  }
  const float tie_up = half_to_float(0x3C01) / 2 + half_to_float(0x3C02) / 2;  // between odd and even: to even
  if (float_to_half(tie_up) != 0x3C02 || float_to_half(65520.0f) != 0x7C00 || float_to_half(65519.0f) != 0x7BFF)
    fail("fp16 rounding");
  if (float_to_bfloat(bits_to_float(0x3F808000u)) != 0x3F80 || float_to_bfloat(bits_to_float(0x3F818000u)) != 0x3F82)
    fail("bf16 rounding");
  std::printf("%s conversions\n", failures ? "FAIL" : "ok  ");
}

}  // namespace

// The hashed dropout (dropout_cpu_kernel.h): the vector path keeps and scales exactly the elements the scalar
// hash keeps, from any start offset (thread shares start anywhere), and keeps about 1 - p of them.
template <typename S>
void check_dropout(uint64_t seed) {
  using A = Acc<S>;
  const int before = failures;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  const int64_t n = 4099;
  std::vector<S> in(n), out(n, from_double<S>(7.0));
  for (auto& v : in) v = from_double<S>(normal(rng));
  const DropoutKey key{seed * 0x9E3779B97F4A7C15ull + 1, static_cast<uint32_t>(0.3 * 4294967296.0)};
  const A scale = A(1) / A(0.7);
  for (const int64_t begin : {int64_t{0}, int64_t{3}, int64_t{17}}) {
    dropout_range(in.data(), out.data(), begin, n, key, scale);
    int64_t kept = 0, wrong = 0;
    for (int64_t i = begin; i < n; ++i) {
      const bool keep = dropout_hash(static_cast<uint64_t>(i), key.seed) >= key.threshold;
      S expected;
      narrow(keep ? widen(in[i]) * scale : A(0), &expected);
      kept += keep;
      wrong += std::memcmp(&expected, &out[i], sizeof(S)) != 0;
    }
    const double rate = double(kept) / double(n - begin);
    if (wrong) fail("dropout: " + std::to_string(wrong) + " elements differ from the scalar hash (start " + std::to_string(begin) + ")");
    if (rate < 0.66 || rate > 0.74) fail("dropout: keep rate " + std::to_string(rate) + " for p = 0.3");
  }
  std::printf("%s %-4s dropout (vector path against the scalar hash, keep rate)\n", failures == before ? "ok  " : "FAIL", Tolerance<S>::name);
}

int main(int argc, char** argv) {
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 20261207u;
  std::printf("fff_cpu_kernel_test: isa %s, %d-byte vectors, seed %llu\n", isa_name(), int(kVectorBytes), (unsigned long long)seed);
  check_conversions();
  const std::vector<Shape> shapes = {
      {0, 13, 2, 3},  {1, 1, 1, 0},   {1, 768, 1, 11}, {5, 7, 8, 0},     {3, 15, 7, 1},   {200, 24, 4, 2},
      {64, 100, 3, 5}, {9, 129, 5, 8}, {50, 63, 6, 10}, {17, 37, 8, 11}, {33, 770, 1, 11}, {130, 768, 2, 7},
      {300, 31, 1, 13},
  };
  run_all<float>(shapes, seed);
  run_all<double>(shapes, seed);
  run_all<bf16>(shapes, seed);
  run_all<f16>(shapes, seed);
  check_dropout<float>(seed);
  check_dropout<double>(seed);
  check_dropout<bf16>(seed);
  check_dropout<f16>(seed);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}

// Dropout for CPU training, torch-free: keep each element with probability 1 - p and scale it by 1 / (1 - p).
//
// torch's CPU dropout draws a Bernoulli per element from a sequential generator (about 12 ns an element here,
// 9 ms per (8, 128, 768) activation), which made dropout a fifth of an UltraFastBERT fine-tuning step. Here the
// keep decision of element i is a hash of (seed, i): vectorised, free to split across threads, and the same
// decisions again from the same seed, so the backward (the same mask applied to the gradient) needs only the
// seed, not a saved mask.
//
// The hash: two keyed rounds of Chris Wellons' "lowbias32" 32-bit mixer, the element index's low word keyed
// by the seed's low word in the first, the index's high word plus the seed's high word in the second. Element
// i is kept when its hash is >= threshold = round(p * 2^32).
#pragma once

#include <cstdint>

#include "fff_cpu_kernel.h"

namespace hf_fff_cpu {

template <typename U>
inline U lowbias32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct DropoutKey {
  uint64_t seed;
  uint32_t threshold;  // keep when the element's hash >= threshold
};

// The element's 32-bit hash (scalar form; the vector form below computes the same values lane by lane).
inline uint32_t dropout_hash(uint64_t index, uint64_t seed) {
  const uint32_t first = lowbias32(static_cast<uint32_t>(index) ^ static_cast<uint32_t>(seed));
  return lowbias32(first ^ (static_cast<uint32_t>(index >> 32) + static_cast<uint32_t>(seed >> 32)));
}

// out[i] = in[i] * scale if element i is kept, else 0, for i in [begin, end) (in and out indexed from 0).
template <typename S>
void dropout_range(const S* in, S* out, int64_t begin, int64_t end, DropoutKey key, Acc<S> scale) {
  using A = Acc<S>;
  auto scalar = [&](int64_t at) {
    narrow(dropout_hash(static_cast<uint64_t>(at), key.seed) >= key.threshold ? widen(in[at]) * scale : A(0), out + at);
  };
  int64_t i = begin;
  if constexpr (sizeof(A) == sizeof(uint32_t)) {
    using U = Vec<uint32_t>;
    constexpr int64_t L = kLanes<A>;
    U lane_index;
    for (int64_t k = 0; k < L; ++k) lane_index[k] = static_cast<uint32_t>(k);
    const uint32_t seed_low = static_cast<uint32_t>(key.seed), seed_high = static_cast<uint32_t>(key.seed >> 32);
    // Vectors start at multiples of L, so none straddles a multiple of 2^32 (one high word per vector).
    for (; i < end && i % L != 0; ++i) scalar(i);
    for (; i + L <= end; i += L) {
      const U first = lowbias32((lane_index + static_cast<uint32_t>(i)) ^ seed_low);
      const U hash = lowbias32(first ^ (static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32) + seed_high));
      const U keep = (U)(hash >= key.threshold);  // all ones where kept (vector casts are bit casts)
      const Vec<A> scaled = load(in + i) * scale;
      store<S>((Vec<A>)((U)scaled & keep), out + i);
    }
  }
  for (; i < end; ++i) scalar(i);
}

}  // namespace hf_fff_cpu

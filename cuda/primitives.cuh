// Device primitives that the forward kernels (common.cuh and the strategy families) and the fused backward
// (backward.cuh) both compute with: element types (16-byte vectors <-> fp32, scalar loads and stores with round to
// nearest even on the way out, as torch's .to()), the warp's butterfly sum, exact GELU and the tree's size.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hf_fff_cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Element types: 16-byte vector <-> fp32 values, scalar loads and stores.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[kVec]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[kVec]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
  static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
  // Elements 2 * pair and 2 * pair + 1 of an 8-byte aligned row.
  static __device__ __forceinline__ float2 load2(const float* row, int64_t pair) {
    return __ldg(reinterpret_cast<const float2*>(row) + pair);
  }
  static __device__ __forceinline__ void store2(float* row, int64_t pair, float lo, float hi) {
    reinterpret_cast<float2*>(row)[pair] = make_float2(lo, hi);
  }
};

// 16-bit types: a 32-bit word holds two elements, widened and narrowed by the type's unpack2 / pack2.
template <typename Derived>
struct PairedElem {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[kVec]) {
    Derived::unpack2(v.x, f[0], f[1]);
    Derived::unpack2(v.y, f[2], f[3]);
    Derived::unpack2(v.z, f[4], f[5]);
    Derived::unpack2(v.w, f[6], f[7]);
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[kVec]) {
    return make_uint4(Derived::pack2(f[0], f[1]), Derived::pack2(f[2], f[3]), Derived::pack2(f[4], f[5]),
                      Derived::pack2(f[6], f[7]));
  }
  // Elements 2 * pair and 2 * pair + 1 of a 4-byte aligned row.
  template <typename T>
  static __device__ __forceinline__ float2 load2(const T* row, int64_t pair) {
    float2 f;
    Derived::unpack2(__ldg(reinterpret_cast<const unsigned*>(row) + pair), f.x, f.y);
    return f;
  }
  template <typename T>
  static __device__ __forceinline__ void store2(T* row, int64_t pair, float lo, float hi) {
    reinterpret_cast<unsigned*>(row)[pair] = Derived::pack2(lo, hi);
  }
};

template <>
struct Elem<__nv_bfloat16> : PairedElem<Elem<__nv_bfloat16>> {
  // bf16 is the top half of an fp32: widening is a shift or a mask, exact.
  static __device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // round to nearest even, as torch's .to(bfloat16)
    return *reinterpret_cast<unsigned*>(&h);
  }
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return __uint_as_float(static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

template <>
struct Elem<__half> : PairedElem<Elem<__half>> {
  static __device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    lo = f.x;
    hi = f.y;
  }
  static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  static __device__ __forceinline__ float load(const __half* p) {
    return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
  }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

// Exact (erf) GELU, torch.nn.GELU's default, written with erfc: 1 + erf(z) = erfc(-z) without the
// cancellation that 1 + erff(z) suffers for z << 0 (relative error of a few ulp over the whole range).
__device__ __forceinline__ float gelu(float v) { return 0.5f * v * erfcf(-v * 0.70710678118654752f); }

// Butterfly reduction: every lane ends with the same bits (fp addition commutes), so a branch on the
// result is uniform across the warp.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__host__ __device__ __forceinline__ int64_t nodes_per_tree(int depth) { return (int64_t{2} << depth) - 1; }

// Asynchronous global -> shared copies (sm_80 and later). The "memory" clobbers keep the compiler from moving shared
// memory reads or writes across them.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// kBytes (4, 8 or 16) bytes, cached in L1 on the way (.ca), so that warps reading the same rows share them.
template <int kBytes>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(kBytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory"); }

}  // namespace
}  // namespace hf_fff_cuda

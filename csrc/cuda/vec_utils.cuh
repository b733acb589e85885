// Small device helpers shared by the memory-bound ringattn kernels: vector loads/stores of N
// elements moved as 16-byte (or narrower, when N * sizeof(T) < 16) transactions, and the fp32/fp64
// math overloads the kernels template over.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace ringattn::cuda_utils {

// Widest transaction for N elements of T: 16 bytes when possible; the caller guarantees the
// address is aligned to min(16, N * sizeof(T)) (host side: vec_aligned below).
template <typename T, int N>
struct VecIO {
  static constexpr int kBytes = N * static_cast<int>(sizeof(T));

  template <typename A>
  static __device__ __forceinline__ void load(const T* p, A (&out)[N]) {
    if constexpr (kBytes >= 16) {
      static_assert(kBytes % 16 == 0, "vector width must be a multiple of 16 bytes");
      uint4 raw[kBytes / 16];
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c) raw[c] = __ldg(reinterpret_cast<const uint4*>(p) + c);
      const T* v = reinterpret_cast<const T*>(raw);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<A>(v[i]);
    } else if constexpr (kBytes == 8) {
      uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<A>(v[i]);
    } else if constexpr (kBytes == 4) {
      unsigned int raw = __ldg(reinterpret_cast<const unsigned int*>(p));
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<A>(v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<A>(p[i]);
    }
  }

  // Plain (coherent) load: for buffers the same kernel also writes (the in-place accumulator).
  template <typename A>
  static __device__ __forceinline__ void load_rw(const T* p, A (&out)[N]) {
    if constexpr (kBytes >= 16) {
      uint4 raw[kBytes / 16];
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c) raw[c] = reinterpret_cast<const uint4*>(p)[c];
      const T* v = reinterpret_cast<const T*>(raw);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<A>(v[i]);
    } else if constexpr (kBytes == 8) {
      uint2 raw = *reinterpret_cast<const uint2*>(p);
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<A>(v[i]);
    } else if constexpr (kBytes == 4) {
      unsigned int raw = *reinterpret_cast<const unsigned int*>(p);
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<A>(v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<A>(p[i]);
    }
  }

  template <typename A>
  static __device__ __forceinline__ void store(T* p, const A (&in)[N]) {
    if constexpr (kBytes >= 4 && kBytes % 4 == 0) {
      constexpr int kWords = kBytes >= 16 ? kBytes / 16 : 1;
      using Word = std::conditional_t<kBytes >= 16, uint4, std::conditional_t<kBytes == 8, uint2, unsigned int>>;
      Word raw[kWords];
      T* v = reinterpret_cast<T*>(raw);
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = static_cast<T>(in[i]);
#pragma unroll
      for (int c = 0; c < kWords; ++c) reinterpret_cast<Word*>(p)[c] = raw[c];
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) p[i] = static_cast<T>(in[i]);
    }
  }
};

__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }  // exp(-inf) = 0
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double acc_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float acc_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double acc_rsqrt(double x) { return rsqrt(x); }

}  // namespace ringattn::cuda_utils

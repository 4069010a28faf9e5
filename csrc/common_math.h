// Portable helpers shared by every op family's math header: compiled by g++ for the CPU kernels and by
// nvcc (host and device) for the CUDA kernels, so the CPU tests exercise the exact device arithmetic.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PF_HD __host__ __device__ __forceinline__
#else
#define PF_HD inline
#endif

namespace prefrank {

// Precision-preserving math: float stays float on the host (a bare `exp(float)` from <cmath> may pick the
// double overload there while the device picks expf, and the CPU tests must see the device arithmetic).
PF_HD float exp_(float x) { return ::expf(x); }
PF_HD double exp_(double x) { return ::exp(x); }
PF_HD float log_(float x) { return ::logf(x); }
PF_HD double log_(double x) { return ::log(x); }
PF_HD float log1p_(float x) { return ::log1pf(x); }
PF_HD double log1p_(double x) { return ::log1p(x); }

template <typename acc_t>
PF_HD acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// log(exp(a) + exp(b)) without overflow; -inf is the identity (log 0).
template <typename acc_t>
PF_HD acc_t log_add_exp(acc_t a, acc_t b) {
  const acc_t hi = a > b ? a : b;
  const acc_t lo = a > b ? b : a;
  if (lo == neg_inf<acc_t>()) return hi;
  return hi + log1p_(exp_(lo - hi));
}

// Conversions between a storage type and the accumulator. c10::Half/BFloat16 (CPU) convert implicitly;
// CUDA's __half/__nv_bfloat16 go through intrinsics (torch builds .cu files with the implicit
// conversions disabled).
template <typename acc_t, typename scalar_t>
PF_HD acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}
template <typename scalar_t, typename acc_t>
PF_HD scalar_t from_acc(acc_t x) {
  return static_cast<scalar_t>(x);
}
#if defined(__CUDACC__)
template <>
PF_HD float to_acc<float, __half>(__half x) {
  return __half2float(x);
}
template <>
PF_HD float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
PF_HD __half from_acc<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
PF_HD __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

template <typename acc_t, typename scalar_t>
PF_HD acc_t load_as(const scalar_t* ptr, int64_t offset) {
  return to_acc<acc_t>(ptr[offset]);
}

}  // namespace prefrank

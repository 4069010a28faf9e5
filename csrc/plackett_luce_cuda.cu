// Plackett-Luce NLL CUDA kernels: one thread per list running the shared per-list math
// (plackett_luce_math.h, the same code the CPU kernels run and the CPU tests check).
//
// One thread per list suits the common shape (many short lists: B in the thousands, K ≤ 64): loads of
// neighbouring threads hit neighbouring rows and nothing waits on shared memory or barriers. Lists of any
// length K work (no shared-memory cap); very long lists with few rows would want a warp-cooperative scan.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "plackett_luce_cuda.h"
#include "plackett_luce_math.h"

namespace prefrank {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) nll_fwd_kernel(const scalar_t* __restrict__ scores, int64_t stride_b,
                                                           int64_t stride_k, const int64_t* __restrict__ order,
                                                           const int64_t* __restrict__ level, int64_t B, int64_t K,
                                                           int64_t top_k, int64_t ties, acc_t* __restrict__ nll) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  nll[b] = pl::list_nll<acc_t>(scores + b * stride_b, stride_k, order + b * K, level + b * K, K, top_k, ties);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) nll_bwd_kernel(const acc_t* __restrict__ grad_nll,
                                                           const scalar_t* __restrict__ scores, int64_t stride_b,
                                                           int64_t stride_k, const int64_t* __restrict__ order,
                                                           const int64_t* __restrict__ level, int64_t B, int64_t K,
                                                           int64_t top_k, int64_t ties, scalar_t* __restrict__ grad,
                                                           acc_t* __restrict__ workspace) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  pl::list_nll_backward<acc_t>(grad_nll[b], scores + b * stride_b, stride_k, order + b * K, level + b * K, K, top_k,
                               ties, grad + b * K, 1, workspace + b * 2 * K);
}

unsigned blocks_for(int64_t B) { return static_cast<unsigned>((B + kThreads - 1) / kThreads); }

template <typename scalar_t, typename acc_t>
cudaError_t launch_fwd(const void* scores, int64_t sb, int64_t sk, const int64_t* order, const int64_t* level,
                       int64_t B, int64_t K, int64_t top_k, int64_t ties, void* nll, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  nll_fwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(scores), sb, sk, order, level, B, K, top_k, ties, static_cast<acc_t*>(nll));
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_bwd(const void* grad_nll, const void* scores, int64_t sb, int64_t sk, const int64_t* order,
                       const int64_t* level, int64_t B, int64_t K, int64_t top_k, int64_t ties, void* grad,
                       void* workspace, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  nll_bwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, stream>>>(
      static_cast<const acc_t*>(grad_nll), static_cast<const scalar_t*>(scores), sb, sk, order, level, B, K, top_k,
      ties, static_cast<scalar_t*>(grad), static_cast<acc_t*>(workspace));
  return cudaGetLastError();
}

}  // namespace

cudaError_t plackett_luce_nll_fwd(Dtype dtype, const void* scores, int64_t sb, int64_t sk, const int64_t* order,
                                  const int64_t* level, int64_t B, int64_t K, int64_t top_k, int64_t ties, void* nll,
                                  cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat: return launch_fwd<float, float>(scores, sb, sk, order, level, B, K, top_k, ties, nll, stream);
    case Dtype::kDouble:
      return launch_fwd<double, double>(scores, sb, sk, order, level, B, K, top_k, ties, nll, stream);
    case Dtype::kHalf: return launch_fwd<__half, float>(scores, sb, sk, order, level, B, K, top_k, ties, nll, stream);
    case Dtype::kBFloat16:
      return launch_fwd<__nv_bfloat16, float>(scores, sb, sk, order, level, B, K, top_k, ties, nll, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t plackett_luce_nll_bwd(Dtype dtype, const void* grad_nll, const void* scores, int64_t sb, int64_t sk,
                                  const int64_t* order, const int64_t* level, int64_t B, int64_t K, int64_t top_k,
                                  int64_t ties, void* grad, void* workspace, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat:
      return launch_bwd<float, float>(grad_nll, scores, sb, sk, order, level, B, K, top_k, ties, grad, workspace,
                                      stream);
    case Dtype::kDouble:
      return launch_bwd<double, double>(grad_nll, scores, sb, sk, order, level, B, K, top_k, ties, grad, workspace,
                                        stream);
    case Dtype::kHalf:
      return launch_bwd<__half, float>(grad_nll, scores, sb, sk, order, level, B, K, top_k, ties, grad, workspace,
                                       stream);
    case Dtype::kBFloat16:
      return launch_bwd<__nv_bfloat16, float>(grad_nll, scores, sb, sk, order, level, B, K, top_k, ties, grad,
                                              workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace prefrank

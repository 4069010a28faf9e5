// Launchers of the Plackett-Luce CUDA kernels. Plain C++ types only, so the torch glue (.cpp) and the
// kernels (.cu, compiled without torch headers) share this declaration.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace prefrank {
namespace cuda {

// Storage type of a scores tensor, as the glue maps it from the torch dtype.
enum class Dtype : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// nll[b] (float, or double when dtype is kDouble) for every list b < B.
cudaError_t plackett_luce_nll_fwd(Dtype dtype, const void* scores, int64_t stride_b, int64_t stride_k,
                                  const int64_t* order, const int64_t* level, int64_t B, int64_t K,
                                  int64_t top_k, int64_t ties, void* nll, cudaStream_t stream);

// grad (B, K) contiguous, in the scores' dtype; grad_nll (B,) and workspace (B, 2K) in the accumulator type.
cudaError_t plackett_luce_nll_bwd(Dtype dtype, const void* grad_nll, const void* scores, int64_t stride_b,
                                  int64_t stride_k, const int64_t* order, const int64_t* level, int64_t B,
                                  int64_t K, int64_t top_k, int64_t ties, void* grad, void* workspace,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace prefrank

// Launchers of the Plackett-Luce CUDA kernels. Plain C++ types only, so the torch glue (.cpp) and the
// kernels (.cu, compiled without torch headers) share this declaration.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace prefrank {
namespace cuda {

// Storage type of a scores tensor, as the glue maps it from the torch dtype.
enum class Dtype : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// The tensors of one call: (B, K) scores with strides; `order` = ranking or groups (int64) per `mode`
// (pl::OrderMode), nullptr for kByPlace; `mask` (bool) or nullptr. Values are checked by the kernels (a bad
// list gives NaN), so nothing here reads device memory.
struct Lists {
  Dtype dtype;
  const void* scores;
  int64_t score_sb, score_sk;
  const int64_t* order;
  int64_t order_sb, order_sk;
  const bool* mask;
  int64_t mask_sb, mask_sk;
  int64_t B, K, mode, top_k, ties;
};

// Bytes of scratch memory the kernels need for B lists of K items (the canonical order of every list).
int64_t plackett_luce_workspace_bytes(const Lists& lists, bool backward);

// nll[b] (float, or double when dtype is kDouble) for every list b < B.
cudaError_t plackett_luce_nll_fwd(const Lists& lists, void* nll, void* workspace, cudaStream_t stream);

// grad (B, K) contiguous, in the scores' dtype; grad_nll (B,) in the accumulator type with stride
// grad_nll_stride (0 = broadcast).
cudaError_t plackett_luce_nll_bwd(const Lists& lists, const void* grad_nll, int64_t grad_nll_stride, void* grad,
                                  void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace prefrank

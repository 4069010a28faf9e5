// Plackett-Luce NLL: CUDA dispatch-key implementations of the prefrank_C kernels (torch glue around
// plackett_luce_cuda.cu). Layout checks only: values are checked by the kernels (NaN for a bad list), so
// nothing here synchronises with the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "output_alloc.h"
#include "plackett_luce_args.h"
#include "plackett_luce_cuda.h"

namespace prefrank {
namespace {

cuda::Dtype storage_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::Dtype::kFloat;
    case at::kDouble: return cuda::Dtype::kDouble;
    case at::kHalf: return cuda::Dtype::kHalf;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    default: TORCH_CHECK(false, "plackett_luce: unsupported scores dtype ", t.scalar_type());
  }
}

cuda::Lists lists_of(const at::Tensor& scores, const std::optional<at::Tensor>& ranking,
                     const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& mask, int64_t top_k,
                     int64_t ties) {
  TORCH_CHECK(scores.is_cuda(), "plackett_luce: scores must be a CUDA tensor");
  const pl::ItemArgs a = pl::item_args(scores, ranking, groups, mask, ties);
  return {storage_dtype(scores), scores.const_data_ptr(), scores.stride(0), scores.stride(1), a.order, a.order_sb,
          a.order_sk, a.mask, a.mask_sb, a.mask_sk, scores.size(0), scores.size(1), a.mode, top_k, ties};
}

at::Tensor workspace_for(const cuda::Lists& l, const at::Tensor& scores, bool backward) {
  return at::empty({cuda::plackett_luce_workspace_bytes(l, backward)}, scores.options().dtype(at::kByte));
}

at::Tensor plackett_luce_nll_fwd_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& ranking,
                                      const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& mask,
                                      int64_t top_k, int64_t ties) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const cuda::Lists l = lists_of(scores, ranking, groups, mask, top_k, ties);
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor nll = new_output({scores.size(0)}, scores.options().dtype(acc));
  at::Tensor workspace = workspace_for(l, scores, false);
  const cudaError_t err =
      cuda::plackett_luce_nll_fwd(l, nll.mutable_data_ptr(), workspace.mutable_data_ptr(),
                                  c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "plackett_luce_nll_fwd launch failed: ", cudaGetErrorString(err));
  return nll;
}

at::Tensor plackett_luce_nll_bwd_cuda(const at::Tensor& grad_nll, const at::Tensor& scores,
                                      const std::optional<at::Tensor>& ranking, const std::optional<at::Tensor>& groups,
                                      const std::optional<at::Tensor>& mask, int64_t top_k, int64_t ties) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const cuda::Lists l = lists_of(scores, ranking, groups, mask, top_k, ties);
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_nll.dim() == 1 && grad_nll.size(0) == l.B, "plackett_luce: grad_nll must be (lists,)");
  const at::Tensor g = grad_nll.to(acc);
  at::Tensor grad = new_output({l.B, l.K}, scores.options());
  at::Tensor workspace = workspace_for(l, scores, true);
  const cudaError_t err =
      cuda::plackett_luce_nll_bwd(l, g.const_data_ptr(), g.stride(0), grad.mutable_data_ptr(),
                                  workspace.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "plackett_luce_nll_bwd launch failed: ", cudaGetErrorString(err));
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(prefrank_C, CUDA, m) {
  m.impl("plackett_luce_nll_fwd", &plackett_luce_nll_fwd_cuda);
  m.impl("plackett_luce_nll_bwd", &plackett_luce_nll_bwd_cuda);
}

}  // namespace prefrank

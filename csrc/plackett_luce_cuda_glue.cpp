// Plackett-Luce NLL: CUDA dispatch-key implementations (torch glue around plackett_luce_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "output_alloc.h"

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

void check_inputs(const at::Tensor& scores, const at::Tensor& order, const at::Tensor& level) {
  TORCH_CHECK(scores.is_cuda() && order.is_cuda() && level.is_cuda(), "plackett_luce: expected CUDA tensors");
  TORCH_CHECK(scores.dim() == 2 && order.sizes() == scores.sizes() && level.sizes() == scores.sizes(),
              "plackett_luce: scores, order and level must all be (lists, items)");
  TORCH_CHECK(order.scalar_type() == at::kLong && level.scalar_type() == at::kLong && order.is_contiguous() &&
                  level.is_contiguous(),
              "plackett_luce: order/level must be contiguous int64");
}

at::Tensor plackett_luce_nll_fwd_cuda(const at::Tensor& scores, const at::Tensor& order, const at::Tensor& level,
                                      int64_t top_k, int64_t ties) {
  check_inputs(scores, order, level);
  const c10::cuda::CUDAGuard guard(scores.device());
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor nll = new_output({scores.size(0)}, scores.options().dtype(acc));
  const cudaError_t err = cuda::plackett_luce_nll_fwd(
      storage_dtype(scores), scores.const_data_ptr(), scores.stride(0), scores.stride(1), order.const_data_ptr<int64_t>(),
      level.const_data_ptr<int64_t>(), scores.size(0), scores.size(1), top_k, ties, nll.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "plackett_luce_nll_fwd launch failed: ", cudaGetErrorString(err));
  return nll;
}

at::Tensor plackett_luce_nll_bwd_cuda(const at::Tensor& grad_nll, const at::Tensor& scores, const at::Tensor& order,
                                      const at::Tensor& level, int64_t top_k, int64_t ties) {
  check_inputs(scores, order, level);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), K = scores.size(1);
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_nll.to(acc).contiguous();
  TORCH_CHECK(g.numel() == B, "plackett_luce: grad_nll must have one element per list");
  at::Tensor grad = new_output({B, K}, scores.options());
  at::Tensor workspace = at::empty({B, 2 * K}, scores.options().dtype(acc));
  const cudaError_t err = cuda::plackett_luce_nll_bwd(
      storage_dtype(scores), g.const_data_ptr(), scores.const_data_ptr(), scores.stride(0), scores.stride(1),
      order.const_data_ptr<int64_t>(), level.const_data_ptr<int64_t>(), B, K, top_k, ties, grad.mutable_data_ptr(),
      workspace.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "plackett_luce_nll_bwd launch failed: ", cudaGetErrorString(err));
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(prefrank, CUDA, m) {
  m.impl("plackett_luce_nll_fwd", &plackett_luce_nll_fwd_cuda);
  m.impl("plackett_luce_nll_bwd", &plackett_luce_nll_bwd_cuda);
}

}  // namespace prefrank

// Plackett-Luce NLL: operator schemas and CPU kernels (one list per at::parallel_for task).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "output_alloc.h"
#include "plackett_luce_math.h"

namespace prefrank {
namespace {

void check_layout(const at::Tensor& scores, const at::Tensor& order, const at::Tensor& level) {
  TORCH_CHECK(scores.dim() == 2, "plackett_luce: scores must be (lists, items)");
  TORCH_CHECK(order.scalar_type() == at::kLong && level.scalar_type() == at::kLong,
              "plackett_luce: order and level must be int64");
  TORCH_CHECK(order.sizes() == scores.sizes() && level.sizes() == scores.sizes(),
              "plackett_luce: order and level must match scores' shape");
  TORCH_CHECK(order.is_contiguous() && level.is_contiguous(), "plackett_luce: order/level must be contiguous");
}

at::Tensor plackett_luce_nll_fwd_cpu(const at::Tensor& scores, const at::Tensor& order, const at::Tensor& level,
                                     int64_t top_k, int64_t ties) {
  check_layout(scores, order, level);
  const int64_t B = scores.size(0), K = scores.size(1);
  const auto out_dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor nll = new_output({B}, scores.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "plackett_luce_nll_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const int64_t sb = scores.stride(0), sk = scores.stride(1);
    const int64_t* o = order.const_data_ptr<int64_t>();
    const int64_t* l = level.const_data_ptr<int64_t>();
    acc_t* out = nll.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        out[b] = pl::list_nll<acc_t>(s + b * sb, sk, o + b * K, l + b * K, K, top_k, ties);
    });
  });
  return nll;
}

at::Tensor plackett_luce_nll_bwd_cpu(const at::Tensor& grad_nll, const at::Tensor& scores, const at::Tensor& order,
                                     const at::Tensor& level, int64_t top_k, int64_t ties) {
  check_layout(scores, order, level);
  const int64_t B = scores.size(0), K = scores.size(1);
  at::Tensor grad = new_output({B, K}, scores.options());
  const auto acc_dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_nll.to(acc_dtype).contiguous();
  TORCH_CHECK(g.numel() == B, "plackett_luce: grad_nll must have one element per list");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "plackett_luce_nll_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const int64_t sb = scores.stride(0), sk = scores.stride(1);
    const int64_t* o = order.const_data_ptr<int64_t>();
    const int64_t* l = level.const_data_ptr<int64_t>();
    const acc_t* gn = g.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> workspace(2 * K);
      for (int64_t b = begin; b < end; ++b)
        pl::list_nll_backward<acc_t>(gn[b], s + b * sb, sk, o + b * K, l + b * K, K, top_k, ties, out + b * K, 1,
                                     workspace.data());
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefrank, m) {
  m.def("plackett_luce_nll_fwd(Tensor scores, Tensor order, Tensor level, int top_k, int ties) -> Tensor");
  m.def("plackett_luce_nll_bwd(Tensor grad_nll, Tensor scores, Tensor order, Tensor level, int top_k, "
        "int ties) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefrank, CPU, m) {
  m.impl("plackett_luce_nll_fwd", &plackett_luce_nll_fwd_cpu);
  m.impl("plackett_luce_nll_bwd", &plackett_luce_nll_bwd_cpu);
}

}  // namespace prefrank

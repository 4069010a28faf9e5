// Sequence log-probs: CPU kernels of the private `prefrank_C` library (one token = one vocabulary row per task
// item). Users never call these: the public ops are the torch.library.custom_ops of prefrank/logprobs.py,
// whose cpu kernels call torch.ops.prefrank_C.sequence_logprobs_{fwd,bwd,bwd_}.
//
// Forward, per token t with label y != ignore_index, z = logits[t, :] / temperature:
//     lse_t = log Σ_v exp(z_v),   logp_t = z_y − lse_t          (0 and 0 for ignored tokens)
// Backward, from the per-token gradient g_t (the caller maps per-sequence/segment gradients to tokens):
//     ∂logp_t/∂logits[t, v] = (δ_vy − exp(z_v − lse_t)) / temperature
// so grad_logits[t, v] = g_t · (δ_vy − softmax(z)_v) / temperature, 0 on ignored rows. The backward reads
// each row once and writes it once; the in-place variant writes the gradient over the logits it reads
// (used by linear_sequence_logprobs on its own chunk buffer, never on user tensors).
//
// fp16/bf16/fp32 rows accumulate in float with a vectorisable exp (Cody-Waite + degree-7 polynomial,
// ≤ 1e-7 relative error); float64 rows use double and std::exp (gradcheck precision). The row loops live in
// logprobs_rows.h, compiled for AVX-512, AVX2 and the baseline target and picked at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "output_alloc.h"

// GCC vectorises vec_exp's selects (the clamp at -87, the underflow to 0) only when it may evaluate
// floating-point comparisons speculatively: aarch64's GCC 12 otherwise leaves every row loop scalar ("control
// flow in loop"). Nothing here reads the FP exception flags, and no value changes (this is not -ffast-math).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace prefrank {
namespace {

#if defined(__x86_64__) || defined(__i386__)
#define PREFRANK_LOGPROBS_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace rows_avx512 {
#include "logprobs_rows.h"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace rows_avx2 {
#include "logprobs_rows.h"
}
#pragma GCC pop_options
#endif
namespace rows_baseline {
#include "logprobs_rows.h"
}

enum class Isa { avx512, avx2, baseline };
Isa detect_isa() {
#ifdef PREFRANK_LOGPROBS_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::baseline;
}
const Isa kIsa = detect_isa();

template <typename scalar_t>
using Elem = rows_baseline::Elem<scalar_t>;  // raw/acc types (identical in every variant)

template <typename scalar_t>
typename Elem<scalar_t>::acc row_lse(const typename Elem<scalar_t>::raw* x, int64_t V,
                                     typename Elem<scalar_t>::acc inv_temp) {
#ifdef PREFRANK_LOGPROBS_X86
  if (kIsa == Isa::avx512) return rows_avx512::row_lse<rows_avx512::Elem<scalar_t>>(x, V, inv_temp);
  if (kIsa == Isa::avx2) return rows_avx2::row_lse<rows_avx2::Elem<scalar_t>>(x, V, inv_temp);
#endif
  return rows_baseline::row_lse<rows_baseline::Elem<scalar_t>>(x, V, inv_temp);
}

template <typename scalar_t, typename acc_t = typename Elem<scalar_t>::acc>
void row_grad(const typename Elem<scalar_t>::raw* x, typename Elem<scalar_t>::raw* out, int64_t V,
              int64_t label, acc_t inv_temp, acc_t lse, acc_t scale) {
#ifdef PREFRANK_LOGPROBS_X86
  if (kIsa == Isa::avx512)
    return rows_avx512::row_grad<rows_avx512::Elem<scalar_t>>(x, out, V, label, inv_temp, lse, scale);
  if (kIsa == Isa::avx2)
    return rows_avx2::row_grad<rows_avx2::Elem<scalar_t>>(x, out, V, label, inv_temp, lse, scale);
#endif
  return rows_baseline::row_grad<rows_baseline::Elem<scalar_t>>(x, out, V, label, inv_temp, lse, scale);
}

struct Layout {
  int64_t n_tokens, T, V, stride_b, stride_t;
};

Layout check_layout(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3, "sequence_logprobs: logits must be (rows, T, V)");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "sequence_logprobs: logits must be floating point");
  TORCH_CHECK(logits.size(2) == 1 || logits.stride(2) == 1, "sequence_logprobs: logits need unit stride on V");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "sequence_logprobs: labels must be int64");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "sequence_logprobs: labels must be (rows, T) matching logits");
  TORCH_CHECK(labels.is_contiguous(), "sequence_logprobs: labels must be contiguous");
  return {logits.size(0) * logits.size(1), logits.size(1), logits.size(2), logits.stride(0), logits.stride(1)};
}

// tokens per parallel task: about 64k logits each, so short vocabularies still amortise the task cost
int64_t grain(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

std::tuple<at::Tensor, at::Tensor> sequence_logprobs_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                             int64_t ignore_index, double temperature) {
  const Layout L = check_layout(logits, labels);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor logp = new_output(labels.sizes(), logits.options().dtype(acc_dtype));
  at::Tensor lse = new_output(labels.sizes(), logits.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sequence_logprobs_fwd", [&] {
    using E = Elem<scalar_t>;
    using acc_t = typename E::acc;
    using raw_t = typename E::raw;
    const raw_t* x = reinterpret_cast<const raw_t*>(logits.const_data_ptr<scalar_t>());
    const int64_t* y = labels.const_data_ptr<int64_t>();
    acc_t* out_logp = logp.mutable_data_ptr<acc_t>();
    acc_t* out_lse = lse.mutable_data_ptr<acc_t>();
    const acc_t inv_temp = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, L.n_tokens, grain(L.V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t label = y[n];
        if (label == ignore_index) {  // the row is never read
          out_logp[n] = 0;
          out_lse[n] = 0;
          continue;
        }
        if (label < 0 || label >= L.V) {  // never read out of bounds (the Python layer raises on CPU data)
          out_logp[n] = std::numeric_limits<acc_t>::quiet_NaN();
          out_lse[n] = std::numeric_limits<acc_t>::quiet_NaN();
          continue;
        }
        const raw_t* row = x + (n / L.T) * L.stride_b + (n % L.T) * L.stride_t;
        const acc_t row_lse_value = row_lse<scalar_t>(row, L.V, inv_temp);
        out_lse[n] = row_lse_value;
        out_logp[n] = E::load(row[label]) * inv_temp - row_lse_value;
      }
    });
  });
  return {logp, lse};
}

// Shared by the out-of-place and in-place backward: out has the (rows, T, V) shape of logits.
void backward_into(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                   const at::Tensor& lse, int64_t ignore_index, double temperature, at::Tensor& out) {
  const Layout L = check_layout(logits, labels);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == acc_dtype && lse.sizes() == labels.sizes(),
              "sequence_logprobs: lse must be the forward's (rows, T) accumulator-dtype result");
  TORCH_CHECK(grad_logp.sizes() == labels.sizes(), "sequence_logprobs: grad must be (rows, T)");
  TORCH_CHECK(out.stride(2) == 1 || out.size(2) == 1, "sequence_logprobs: gradient needs unit stride on V");
  const at::Tensor g = grad_logp.to(acc_dtype).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const int64_t ob = out.stride(0), ot = out.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sequence_logprobs_bwd", [&] {
    using E = Elem<scalar_t>;
    using acc_t = typename E::acc;
    using raw_t = typename E::raw;
    const raw_t* x = reinterpret_cast<const raw_t*>(logits.const_data_ptr<scalar_t>());
    raw_t* o = reinterpret_cast<raw_t*>(out.mutable_data_ptr<scalar_t>());
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* lp = lse_c.const_data_ptr<acc_t>();
    const acc_t inv_temp = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, L.n_tokens, grain(L.V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / L.T, t = n % L.T;
        raw_t* out_row = o + b * ob + t * ot;
        const int64_t label = y[n];
        if (label == ignore_index) {  // zero gradient, the row is never read
          std::fill(out_row, out_row + L.V, raw_t(0));  // +0.0 in every format
          continue;
        }
        if (label < 0 || label >= L.V) {  // NaN gradient row, no out-of-bounds access
          std::fill(out_row, out_row + L.V, E::store(std::numeric_limits<acc_t>::quiet_NaN()));
          continue;
        }
        row_grad<scalar_t>(x + b * L.stride_b + t * L.stride_t, out_row, L.V, label, inv_temp, lp[n],
                        gp[n] * inv_temp);
      }
    });
  });
}

at::Tensor sequence_logprobs_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& logits,
                                     const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
                                     double temperature) {
  at::Tensor out = new_output(logits.sizes(), logits.options());
  backward_into(grad_logp, logits, labels, lse, ignore_index, temperature, out);
  return out;
}

void sequence_logprobs_bwd_inplace_cpu(const at::Tensor& grad_logp, at::Tensor& logits, const at::Tensor& labels,
                                       const at::Tensor& lse, int64_t ignore_index, double temperature) {
  backward_into(grad_logp, logits, labels, lse, ignore_index, temperature, logits);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefrank_C, m) {
  m.def("sequence_logprobs_fwd(Tensor logits, Tensor labels, int ignore_index, float temperature) -> "
        "(Tensor, Tensor)");
  m.def("sequence_logprobs_bwd(Tensor grad_logp, Tensor logits, Tensor labels, Tensor lse, int ignore_index, "
        "float temperature) -> Tensor");
  m.def("sequence_logprobs_bwd_(Tensor grad_logp, Tensor(a!) logits, Tensor labels, Tensor lse, "
        "int ignore_index, float temperature) -> ()");
}

TORCH_LIBRARY_IMPL(prefrank_C, CPU, m) {
  m.impl("sequence_logprobs_fwd", &sequence_logprobs_fwd_cpu);
  m.impl("sequence_logprobs_bwd", &sequence_logprobs_bwd_cpu);
  m.impl("sequence_logprobs_bwd_", &sequence_logprobs_bwd_inplace_cpu);
}

}  // namespace prefrank

// Plackett-Luce negative log-likelihood of one list: forward and analytic backward.
//
// Shared by plackett_luce_cpu.cpp (one OpenMP task per list) and plackett_luce_cuda.cu (one thread per list).
//
// Input of one list (prepared by prefrank/plackett_luce.py): `order[p]` = item index at place p, valid
// places first; `level[p]` = compact group index (0 = best, non-decreasing along p), -1 for padding (only at
// the tail). A full ranking is the case where every place is its own group.
//
// With risk sets R_m = G_m ∪ … ∪ G_M, S_m = Σ_{j∈R_m} e^{s_j}, A_m = Σ_{i∈G_m} e^{s_i}, d_m = |G_m| and the
// tie coefficients c_ℓ = 0 (Breslow) or ℓ/d_m (Efron), ℓ = 0..d_m-1, each scored group (m < top_k) adds
//
//   NLL_m = Σ_{i∈G_m} -s_i + Σ_ℓ log(S_m − c_ℓ A_m)
//         = Σ_{i∈G_m} -s_i + d_m·L_m + Σ_ℓ log1p(−c_ℓ ρ_m),      L_m = log S_m, ρ_m = A_m / S_m ∈ (0, 1].
//
// (the negative Cox partial log-likelihood; for singleton groups both tie rules give the plain PL term).
// Gradient, with u_m = Σ_ℓ 1/(1 − c_ℓ ρ_m) and v_m = Σ_ℓ c_ℓ/(1 − c_ℓ ρ_m):
//
//   ∂NLL/∂s_j = −[g(j) scored] + Σ_{m ≤ g(j), m scored} e^{s_j − L_m} u_m − [g(j) scored] e^{s_j − L_g(j)} v_g(j)
//
// The middle sum is exp(s_j + C_g(j)) with C_g = logsumexp_{m ≤ g, scored}(−L_m + log u_m), a running
// log-sum-exp, so nothing overflows for scores of ±1e4: every exponent is ≤ log(Σ u_m).
//
// -inf scores (strength 0) of valid items: a scored item of strength 0 while a finite item is still in its
// risk set gives NLL = +inf (a probability-0 order). A group whose whole risk set has strength 0 is scored as
// the limit of equal scores, Σ_ℓ log(n_risk − c_ℓ d_m), a constant with zero gradient.
#pragma once

#include "common_math.h"

namespace prefrank {
namespace pl {

enum Ties : int64_t { kBreslow = 0, kEfron = 1 };

template <typename acc_t>
struct GroupTerms {
  acc_t log_terms;  // Σ_ℓ log(1 − c_ℓ ρ)   (0 for Breslow)
  acc_t u;          // Σ_ℓ 1/(1 − c_ℓ ρ)    (d for Breslow)
  acc_t v;          // Σ_ℓ c_ℓ/(1 − c_ℓ ρ)  (0 for Breslow)
};

template <typename acc_t>
PF_HD GroupTerms<acc_t> group_terms(int64_t d, acc_t rho, int64_t ties) {
  GroupTerms<acc_t> t{acc_t(0), static_cast<acc_t>(d), acc_t(0)};
  if (ties != kEfron || d == 1) return t;
  t.u = acc_t(0);
  for (int64_t l = 0; l < d; ++l) {
    const acc_t c = static_cast<acc_t>(l) / static_cast<acc_t>(d);
    const acc_t keep = acc_t(1) - c * rho;  // ≥ 1/d since c ≤ (d−1)/d and ρ ≤ 1
    t.log_terms += log_(keep);
    t.u += acc_t(1) / keep;
    t.v += c / keep;
  }
  return t;
}

// NLL of a risk set made only of strength-0 items: the limit of equal scores.
template <typename acc_t>
PF_HD acc_t zero_strength_group_nll(int64_t d, int64_t n_risk, int64_t ties) {
  acc_t total = acc_t(0);
  for (int64_t l = 0; l < d; ++l) {
    const acc_t removed = ties == kEfron ? static_cast<acc_t>(l) : acc_t(0);
    total += log_(static_cast<acc_t>(n_risk) - removed);
  }
  return total;
}

PF_HD int64_t valid_length(const int64_t* level, int64_t K) {
  int64_t n = 0;
  while (n < K && level[n] >= 0) ++n;
  return n;
}

PF_HD bool is_scored(int64_t group, int64_t top_k) { return top_k < 0 || group < top_k; }

// Forward NLL of one list. `scores` is the list's row (item i at scores[i * stride]).
template <typename acc_t, typename scalar_t>
PF_HD acc_t list_nll(const scalar_t* scores, int64_t stride, const int64_t* order, const int64_t* level,
                     int64_t K, int64_t top_k, int64_t ties) {
  const int64_t n = valid_length(level, K);
  acc_t log_risk = neg_inf<acc_t>();  // L of the current suffix
  int64_t n_risk = 0;
  acc_t nll = acc_t(0);
  int64_t p = n - 1;
  while (p >= 0) {  // walk groups from the worst to the best, growing the risk set
    const int64_t group = level[p];
    acc_t log_group = neg_inf<acc_t>();
    acc_t sum_scores = acc_t(0);
    int64_t d = 0;
    for (; p >= 0 && level[p] == group; --p, ++d) {
      const acc_t s = load_as<acc_t>(scores, order[p] * stride);
      log_group = log_add_exp(log_group, s);
      sum_scores += s;
    }
    log_risk = log_add_exp(log_risk, log_group);
    n_risk += d;
    if (!is_scored(group, top_k)) continue;
    if (log_risk == neg_inf<acc_t>()) {
      nll += zero_strength_group_nll<acc_t>(d, n_risk, ties);
    } else {
      const GroupTerms<acc_t> t = group_terms(d, exp_(log_group - log_risk), ties);
      nll += -sum_scores + static_cast<acc_t>(d) * log_risk + t.log_terms;
    }
  }
  return nll;
}

// Gradient of one list's NLL times `grad_nll`, written to grad[item * grad_stride] for every item (0 for
// padding). `workspace` holds 2·K accumulators: the risk set's log-sum-exp and ρ of each place's group.
template <typename acc_t, typename scalar_t>
PF_HD void list_nll_backward(acc_t grad_nll, const scalar_t* scores, int64_t stride, const int64_t* order,
                             const int64_t* level, int64_t K, int64_t top_k, int64_t ties, scalar_t* grad,
                             int64_t grad_stride, acc_t* workspace) {
  acc_t* log_risk_at = workspace;
  acc_t* rho_at = workspace + K;
  const int64_t n = valid_length(level, K);
  for (int64_t p = n; p < K; ++p) grad[order[p] * grad_stride] = from_acc<scalar_t>(acc_t(0));

  // Backward sweep: L_m and ρ_m for every group, stored at each of its places.
  acc_t log_risk = neg_inf<acc_t>();
  int64_t p = n - 1;
  while (p >= 0) {
    const int64_t group = level[p];
    const int64_t end = p;
    acc_t log_group = neg_inf<acc_t>();
    for (; p >= 0 && level[p] == group; --p) log_group = log_add_exp(log_group, load_as<acc_t>(scores, order[p] * stride));
    log_risk = log_add_exp(log_risk, log_group);
    const acc_t rho = log_risk == neg_inf<acc_t>() ? acc_t(1) : exp_(log_group - log_risk);
    for (int64_t q = p + 1; q <= end; ++q) {
      log_risk_at[q] = log_risk;
      rho_at[q] = rho;
    }
  }

  // Forward sweep over groups, accumulating C_g = logsumexp_{m ≤ g, scored}(−L_m + log u_m).
  acc_t running_c = neg_inf<acc_t>();
  p = 0;
  while (p < n) {
    const int64_t group = level[p];
    int64_t end = p;
    while (end < n && level[end] == group) ++end;
    const int64_t d = end - p;
    const acc_t log_risk_g = log_risk_at[p];
    const bool scored = is_scored(group, top_k);
    if (log_risk_g == neg_inf<acc_t>()) {  // strength-0 risk set: a constant term
      for (; p < end; ++p) grad[order[p] * grad_stride] = from_acc<scalar_t>(acc_t(0));
      continue;
    }
    const GroupTerms<acc_t> t = group_terms(d, rho_at[p], ties);
    if (scored) running_c = log_add_exp(running_c, -log_risk_g + log_(t.u));
    for (; p < end; ++p) {
      const acc_t s = load_as<acc_t>(scores, order[p] * stride);
      acc_t g = exp_(s + running_c);
      if (scored) g += acc_t(-1) - exp_(s - log_risk_g) * t.v;
      grad[order[p] * grad_stride] = from_acc<scalar_t>(grad_nll * g);
    }
  }
}

}  // namespace pl
}  // namespace prefrank

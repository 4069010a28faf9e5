// Plackett-Luce negative log-likelihood of one list: canonical order, forward and analytic backward.
//
// Shared by plackett_luce_cpu.cpp (a chunk of lists per at::parallel_for task) and plackett_luce_cuda.cu (one
// thread per list), so the CPU tests exercise the device arithmetic.
//
// 1. canonical_list() turns the user's description of the order (place along the item axis, `ranking` or
//    `groups`, plus `mask`) into `item[p]` = item at place p (valid items only, best first) and `key[p]`, a
//    non-decreasing level (equal keys = one tie group). It validates on the way (ranking entries in
//    [-1, K), -1 only as tail padding, no duplicates; groups >= -1) and reports a bad list, for which the
//    kernels write NaN (never an out-of-bounds read). Items outside the list (mask False, -1 padding) are
//    never loaded, so NaN there is ignored. Groups given unsorted whose levels span at most K values are
//    not sorted: the level path (list_nll_levels, below) accumulates per level instead, with the same
//    arithmetic per group; only sparse levels (a span above K) are sorted (O(n log n)).
// 2. Groups are walked from the worst to the best. With risk sets R_m = G_m ∪ … ∪ G_M, S_m = Σ_{j∈R_m} e^{s_j},
//    A_m = Σ_{i∈G_m} e^{s_i}, d_m = |G_m| and the tie coefficients c_ℓ = 0 (Breslow) or ℓ/d_m (Efron),
//    each scored group (index from the best m < top_k) adds
//
//      NLL_m = Σ_{i∈G_m} (L_m − s_i) + Σ_ℓ log(1 − c_ℓ ρ_m),      L_m = log S_m, ρ_m = A_m / S_m ∈ (0, 1]
//
//    (the negative Cox partial log-likelihood; a full ranking is the case of singleton groups). S is kept
//    as (mx, sum) with S = e^mx·sum, mx the running maximum: one exp per item, one log per group, no
//    overflow for scores of ±1e4.
// 3. Gradient, with π_j = e^{s_j}/S_{g(j)}, u_m = Σ_ℓ 1/(1 − c_ℓ ρ_m), v_m = Σ_ℓ c_ℓ/(1 − c_ℓ ρ_m):
//
//      ∂NLL/∂s_j = −[g scored] + Σ_{m ≤ g, m scored} e^{s_j}·u_m/S_m − [g scored]·π_j·v_g
//                = −[g scored] + π_j·(R_g − [g scored]·v_g),    R_g = Σ_{m ≤ g, scored} u_m·S_g/S_m
//
//    with R_g = R_{g−1}·(S_g/S_{g−1}) + [g scored]·u_g, a recurrence of ratios ≤ 1 (no exp at all). The
//    backward repeats the forward walk storing π per place and S_{m+1}/S_m per group (taken from the two
//    addends of S_m, not as 1 − ρ_m, so no cancellation), then runs the recurrence best-first.
//
// -inf scores (strength 0) of valid items: a scored item of strength 0 while a finite item is in its risk set
// gives NLL = +inf (a probability-0 order). A group whose whole risk set has strength 0 is scored as the limit
// of equal scores, Σ_ℓ log(n_risk − c_ℓ d_m), a constant with zero gradient. NaN or +inf in a valid item's
// score makes the list bad (NaN result).
#pragma once

#include "common_math.h"
#include "options.h"

namespace prefrank {
namespace pl {

using options::kBreslow;
using options::kEfron;

// How one list's order is given; the kernels read `ranking` / `groups` only in their mode.
enum OrderMode : int64_t { kByPlace = 0, kByRanking = 1, kByGroups = 2 };

// One list's inputs: base pointers at the list's row and the item-axis strides (any layout, no copies).
template <typename scalar_t>
struct ListInputs {
  const scalar_t* scores;
  int64_t score_stride;
  const int64_t* order;  // ranking or groups row, per `mode`; unused for kByPlace
  int64_t order_stride;
  const bool* mask;  // nullptr = every item kept
  int64_t mask_stride;
  int64_t K;
  int64_t mode;

  PF_HD bool kept(int64_t i) const { return mask == nullptr || mask[i * mask_stride]; }
};

// Per-list scratch buffers are indexed through Buf: a plain pointer (CPU: one list's buffer per task) or a
// Strided view (CUDA: element p of thread b's buffer at p·B + b, so a warp's accesses coalesce).
template <typename T>
struct Strided {
  T* base;
  int64_t stride;
  PF_HD T& operator[](int64_t i) const { return base[i * stride]; }
};

template <typename ItemBuf, typename KeyBuf>
PF_HD void swap_entries(ItemBuf item, KeyBuf key, int64_t a, int64_t b) {
  const int32_t ti = item[a];
  item[a] = item[b];
  item[b] = ti;
  const int64_t tk = key[a];
  key[a] = key[b];
  key[b] = tk;
}

template <typename ItemBuf, typename KeyBuf>
PF_HD void sift_down(ItemBuf item, KeyBuf key, int64_t root, int64_t end) {
  while (2 * root + 1 < end) {
    int64_t child = 2 * root + 1;
    if (child + 1 < end && key[child] < key[child + 1]) ++child;
    if (key[root] >= key[child]) return;
    swap_entries(item, key, root, child);
    root = child;
  }
}

// Sorts (key, item) pairs by key. Order inside a tie group is irrelevant (the tie formulas and every item's
// gradient do not depend on it), so no stability is needed: insertion sort for short lists (linear when the
// groups already come sorted, the common case), heap sort beyond (O(n log n), in place, no recursion).
template <typename ItemBuf, typename KeyBuf>
PF_HD void sort_by_key(ItemBuf item, KeyBuf key, int64_t n) {
  if (n <= 48) {
    for (int64_t i = 1; i < n; ++i)
      for (int64_t j = i; j > 0 && key[j - 1] > key[j]; --j) swap_entries(item, key, j - 1, j);
    return;
  }
  for (int64_t start = n / 2 - 1; start >= 0; --start) sift_down(item, key, start, n);
  for (int64_t end = n - 1; end > 0; --end) {
    swap_entries(item, key, 0, end);
    sift_down(item, key, 0, end);
  }
}

// What canonical_list() made of a list.
struct Canonical {
  int64_t n;       // valid items in item[0..n) / key[0..n); -1 for a bad list
  int64_t lo;      // levels > 0: the lowest level
  int64_t levels;  // 0: key[] is sorted (the group walk); > 0: key[] unsorted with key − lo in [0, levels) (the
                   // level path; levels ≤ K, so every per-level buffer has K entries)
};

// Fills item[0..n) / key[0..n) (see the file comment). `seen` holds K zero bytes (ranking mode only) and is
// zero again on return.
template <typename scalar_t, typename ItemBuf, typename KeyBuf, typename SeenBuf>
PF_HD Canonical canonical_list(const ListInputs<scalar_t>& in, ItemBuf item, KeyBuf key, SeenBuf seen) {
  const int64_t K = in.K;
  int64_t n = 0;
  if (in.mode == kByPlace) {
    for (int64_t i = 0; i < K; ++i)
      if (in.kept(i)) {
        item[n] = static_cast<int32_t>(i);
        key[n] = n;
        ++n;
      }
    return {n, 0, 0};
  }
  if (in.mode == kByRanking) {
    bool bad = false, padding = false;
    for (int64_t p = 0; p < K; ++p) {
      const int64_t r = in.order[p * in.order_stride];
      if (r < 0) {
        bad |= r != -1;
        padding = true;
        continue;
      }
      if (padding || r >= K || seen[r]) {
        bad = true;
        continue;
      }
      seen[r] = 1;
      if (in.kept(r)) {
        item[n] = static_cast<int32_t>(r);
        key[n] = n;
        ++n;
      }
    }
    for (int64_t p = 0; p < K; ++p) {  // reset the marks this list set
      const int64_t r = in.order[p * in.order_stride];
      if (r >= 0 && r < K) seen[r] = 0;
    }
    return {bad ? -1 : n, 0, 0};
  }
  bool bad = false;
  bool sorted = true;
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t g = in.order[i * in.order_stride];
    bad |= g < -1;
    if (g >= 0 && in.kept(i)) {
      sorted &= n == 0 || key[n - 1] <= g;
      lo = n == 0 || g < lo ? g : lo;
      hi = n == 0 || g > hi ? g : hi;
      item[n] = static_cast<int32_t>(i);
      key[n] = g;
      ++n;
    }
  }
  if (bad) return {-1, 0, 0};
  if (sorted) return {n, 0, 0};
  if (hi - lo < K) return {n, lo, hi - lo + 1};  // no sort: per-level accumulators (list_nll_levels)
  sort_by_key(item, key, n);                     // sparse levels: sort
  return {n, 0, 0};
}

template <typename acc_t>
struct GroupTerms {
  acc_t log_terms;  // Σ_ℓ log(1 − c_ℓ ρ)   (0 for Breslow)
  acc_t u;          // Σ_ℓ 1/(1 − c_ℓ ρ)    (d for Breslow)
  acc_t v;          // Σ_ℓ c_ℓ/(1 − c_ℓ ρ)  (0 for Breslow)
};

// Efron: Σ_ℓ log(keep_ℓ) is taken as the log of running products, one log per run instead of one per factor.
// Every factor keep_ℓ ≥ 1/d > 2^-31, so a product flushed into the sum once it drops below 2^-64 stays above
// 2^-95, a normal float.
template <typename acc_t>
PF_HD GroupTerms<acc_t> group_terms(int64_t d, acc_t rho, int64_t ties) {
  GroupTerms<acc_t> t{acc_t(0), static_cast<acc_t>(d), acc_t(0)};
  if (ties != kEfron || d == 1) return t;
  const acc_t flush_below = acc_t(5.42101086242752217e-20);  // 2^-64
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  acc_t product = acc_t(1);
  t.u = acc_t(0);
  for (int64_t l = 0; l < d; ++l) {
    const acc_t c = static_cast<acc_t>(l) * inv_d;
    const acc_t keep = acc_t(1) - c * rho;  // ≥ 1/d since c ≤ (d−1)/d and ρ ≤ 1
    const acc_t inv_keep = acc_t(1) / keep;
    product *= keep;
    if (product < flush_below) {
      t.log_terms += log_(product);
      product = acc_t(1);
    }
    t.u += inv_keep;
    t.v += c * inv_keep;
  }
  t.log_terms += log_(product);
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

template <typename KeyBuf>
PF_HD int64_t count_groups(KeyBuf key, int64_t n) {
  int64_t groups = n > 0 ? 1 : 0;
  for (int64_t p = 1; p < n; ++p) groups += key[p] != key[p - 1];
  return groups;
}

template <typename acc_t>
PF_HD bool bad_score(acc_t s) {
  return s != s || s == -neg_inf<acc_t>();
}

// The risk set's running sum S = e^mx·sum, grown by one group at a time (worst first).
template <typename acc_t>
struct RiskSet {
  acc_t mx = neg_inf<acc_t>();
  acc_t sum = acc_t(0);
  int64_t n = 0;

  // Rescales to the group's maximum if it is larger; returns the old sum in the new scale (S_{m+1}).
  PF_HD acc_t raise_to(acc_t group_max) {
    if (group_max > mx) {
      sum = mx == neg_inf<acc_t>() ? acc_t(0) : sum * exp_(mx - group_max);
      mx = group_max;
    }
    return sum;
  }
};

// Forward NLL of a list in sorted canonical order (NaN when the list is bad: n < 0 or a NaN/+inf score).
template <typename acc_t, typename scalar_t, typename ItemBuf, typename KeyBuf>
PF_HD acc_t list_nll_sorted(const ListInputs<scalar_t>& in, ItemBuf item, KeyBuf key, int64_t n,
                            int64_t top_k, int64_t ties) {
  const acc_t nan = neg_inf<acc_t>() - neg_inf<acc_t>();
  if (n < 0) return nan;
  const int64_t scored_groups = top_k < 0 ? count_groups(key, n) : top_k;
  int64_t group = count_groups(key, n) - 1;  // index from the best
  RiskSet<acc_t> risk;
  acc_t nll = acc_t(0);
  for (int64_t end = n; end > 0; --group) {
    int64_t begin = end - 1;
    while (begin > 0 && key[begin - 1] == key[end - 1]) --begin;
    acc_t group_max = neg_inf<acc_t>();
    for (int64_t p = begin; p < end; ++p) {
      const acc_t s = load_as<acc_t>(in.scores, item[p] * in.score_stride);
      if (bad_score(s)) return nan;
      group_max = s > group_max ? s : group_max;
    }
    risk.raise_to(group_max);
    const int64_t d = end - begin;
    risk.n += d;
    const bool scored = group < scored_groups;
    if (risk.mx == neg_inf<acc_t>()) {  // the whole risk set has strength 0
      if (scored) nll += zero_strength_group_nll<acc_t>(d, risk.n, ties);
      end = begin;
      continue;
    }
    acc_t group_sum = acc_t(0), gaps = acc_t(0);  // gaps = Σ (mx − s_i)
    for (int64_t p = begin; p < end; ++p) {
      const acc_t gap = risk.mx - load_as<acc_t>(in.scores, item[p] * in.score_stride);
      gaps += gap;
      group_sum += exp_(-gap);
    }
    risk.sum += group_sum;
    if (scored) {
      const GroupTerms<acc_t> t = group_terms(d, group_sum / risk.sum, ties);
      nll += gaps + static_cast<acc_t>(d) * log_(risk.sum) + t.log_terms;
    }
    end = begin;
  }
  return nll;
}

// list_nll_backward() of a list in sorted canonical order. `share` holds n accumulators (π per place); `ratio`
// and `rho` K each (per group, at its first place).
template <typename acc_t, typename scalar_t, typename ItemBuf, typename KeyBuf, typename AccBuf>
PF_HD void list_nll_backward_sorted(acc_t grad_nll, const ListInputs<scalar_t>& in, ItemBuf item, KeyBuf key,
                                    int64_t n, int64_t top_k, int64_t ties, scalar_t* grad, int64_t grad_stride,
                                    AccBuf share, AccBuf ratio, AccBuf rho) {
  const acc_t nan = neg_inf<acc_t>() - neg_inf<acc_t>();
  const bool bad = n < 0;
  for (int64_t i = 0; i < in.K; ++i) grad[i * grad_stride] = from_acc<scalar_t>(bad ? nan : acc_t(0));
  if (bad) return;

  // Worst → best: π per place, S_{m+1}/S_m and ρ_m per group. Strength-0 risk sets (a constant term,
  // gradient 0) are nested, so they form the tail [finite_end, n).
  RiskSet<acc_t> risk;
  int64_t finite_end = n;
  bool bad_scores = false;
  for (int64_t end = n; end > 0 && !bad_scores;) {
    int64_t begin = end - 1;
    while (begin > 0 && key[begin - 1] == key[end - 1]) --begin;
    acc_t group_max = neg_inf<acc_t>();
    for (int64_t p = begin; p < end; ++p) {
      const acc_t s = load_as<acc_t>(in.scores, item[p] * in.score_stride);
      bad_scores |= bad_score(s);
      group_max = s > group_max ? s : group_max;
    }
    const acc_t rest = risk.raise_to(group_max);
    if (risk.mx == neg_inf<acc_t>()) {
      finite_end = begin;
      end = begin;
      continue;
    }
    acc_t group_sum = acc_t(0);
    for (int64_t p = begin; p < end; ++p) {
      share[p] = exp_(load_as<acc_t>(in.scores, item[p] * in.score_stride) - risk.mx);
      group_sum += share[p];
    }
    risk.sum += group_sum;
    const acc_t inv = acc_t(1) / risk.sum;
    for (int64_t p = begin; p < end; ++p) share[p] *= inv;
    ratio[begin] = rest * inv;
    rho[begin] = group_sum * inv;
    end = begin;
  }

  if (bad_scores) {
    for (int64_t i = 0; i < in.K; ++i) grad[i * grad_stride] = from_acc<scalar_t>(nan);
    return;
  }

  // Best → worst: R_g = R_{g−1}·S_g/S_{g−1} + [g scored]·u_g.
  const int64_t scored_groups = top_k < 0 ? n : top_k;
  acc_t running = acc_t(0);
  acc_t ratio_to_next = acc_t(0);
  int64_t group = 0;
  for (int64_t begin = 0; begin < finite_end; ++group) {
    int64_t end = begin + 1;
    while (end < finite_end && key[end] == key[begin]) ++end;
    const bool scored = group < scored_groups;
    const int64_t d = end - begin;
    const GroupTerms<acc_t> t = group_terms(d, rho[begin], ties);
    running = running * ratio_to_next + (scored ? t.u : acc_t(0));
    ratio_to_next = ratio[begin];
    const acc_t own = scored ? t.v : acc_t(0);
    const acc_t minus = scored ? acc_t(1) : acc_t(0);
    for (int64_t p = begin; p < end; ++p) {
      const acc_t g = share[p] * (running - own) - minus;  // a scored -inf item (share 0) gets −1
      grad[item[p] * grad_stride] = from_acc<scalar_t>(grad_nll * g);
    }
    begin = end;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The level path (groups given unsorted, levels within a range of at most K): no sort. Per level ℓ = key − lo
// (K-entry buffers): pass 1 counts the items and takes each level's maximum; a walk worst → best turns the
// maxima into the risk sets' running maxima mx_ℓ; pass 2 adds e^{s_i − mx_ℓ} (one exp per item) into the
// level's sum; a second walk worst → best grows S exactly as the group walk does (the same rescaling, one log
// per group). Empty levels are skipped (they are not groups: top_k counts groups). The backward stores
// e^{s_i − mx_ℓ} per place, walks worst → best for 1/S_ℓ, S_{ℓ+1}/S_ℓ and ρ_ℓ, then best → worst for R_ℓ,
// leaving one factor per level, and writes every item's gradient in place order (no permutation).
// ---------------------------------------------------------------------------------------------------------

// Pass 1 and the first walk: count[ℓ] and risk_max[ℓ] = max score of the levels ≥ ℓ (-inf: the risk set has
// strength 0); returns the number of groups, or -1 when a valid score is NaN/+inf.
template <typename acc_t, typename scalar_t, typename ItemBuf, typename KeyBuf, typename CountBuf, typename AccBuf>
PF_HD int64_t level_risk_max(const ListInputs<scalar_t>& in, ItemBuf item, KeyBuf key, const Canonical& c,
                             CountBuf count, AccBuf risk_max) {
  for (int64_t l = 0; l < c.levels; ++l) {
    count[l] = 0;
    risk_max[l] = neg_inf<acc_t>();
  }
  for (int64_t p = 0; p < c.n; ++p) {
    const acc_t s = load_as<acc_t>(in.scores, item[p] * in.score_stride);
    if (bad_score(s)) return -1;
    const int64_t l = key[p] - c.lo;
    count[l] += 1;
    risk_max[l] = s > risk_max[l] ? s : risk_max[l];
  }
  int64_t groups = 0;
  acc_t mx = neg_inf<acc_t>();
  for (int64_t l = c.levels - 1; l >= 0; --l) {
    if (count[l] == 0) continue;
    ++groups;
    mx = risk_max[l] > mx ? risk_max[l] : mx;
    risk_max[l] = mx;
  }
  return groups;
}

template <typename acc_t, typename scalar_t, typename ItemBuf, typename KeyBuf, typename CountBuf, typename AccBuf>
PF_HD acc_t list_nll_levels(const ListInputs<scalar_t>& in, ItemBuf item, KeyBuf key, const Canonical& c,
                            int64_t top_k, int64_t ties, CountBuf count, AccBuf risk_max, AccBuf exp_sum,
                            AccBuf gap_sum) {
  const int64_t groups = level_risk_max<acc_t>(in, item, key, c, count, risk_max);
  if (groups < 0) return neg_inf<acc_t>() - neg_inf<acc_t>();
  for (int64_t l = 0; l < c.levels; ++l) {
    exp_sum[l] = acc_t(0);
    gap_sum[l] = acc_t(0);  // Σ (mx_ℓ − s_i): the group's Σ (L − s_i) without cancellation at ±1e4
  }
  for (int64_t p = 0; p < c.n; ++p) {
    const int64_t l = key[p] - c.lo;
    const acc_t mx = risk_max[l];
    if (mx == neg_inf<acc_t>()) continue;  // strength-0 risk set: a constant term
    const acc_t gap = mx - load_as<acc_t>(in.scores, item[p] * in.score_stride);
    gap_sum[l] += gap;
    exp_sum[l] += exp_(-gap);
  }
  const int64_t scored_groups = top_k < 0 ? groups : top_k;
  int64_t group = groups - 1;  // index from the best
  RiskSet<acc_t> risk;
  acc_t nll = acc_t(0);
  for (int64_t l = c.levels - 1; l >= 0; --l) {
    const int64_t d = count[l];
    if (d == 0) continue;
    const bool scored = group-- < scored_groups;
    risk.raise_to(risk_max[l]);
    risk.n += d;
    if (risk.mx == neg_inf<acc_t>()) {
      if (scored) nll += zero_strength_group_nll<acc_t>(d, risk.n, ties);
      continue;
    }
    risk.sum += exp_sum[l];
    if (scored) {
      const GroupTerms<acc_t> t = group_terms(d, exp_sum[l] / risk.sum, ties);
      nll += gap_sum[l] + static_cast<acc_t>(d) * log_(risk.sum) + t.log_terms;
    }
  }
  return nll;
}

// Per-level buffers, reused as the walks go (each entry is read before it is overwritten): `level_a` holds
// mx_ℓ, then 1/S_ℓ; `level_b` Σe^{s−mx_ℓ}, then ρ_ℓ, then the level's factor f_ℓ = (R_ℓ − [ℓ scored]·v_ℓ)/S_ℓ;
// `level_c` S_{ℓ+1}/S_ℓ, then [ℓ scored]. ∂NLL/∂s_j = e^{s_j − mx}·f_ℓ − [ℓ scored]; `share` holds
// e^{s_j − mx} per place.
template <typename acc_t, typename scalar_t, typename ItemBuf, typename KeyBuf, typename CountBuf, typename AccBuf>
PF_HD void list_nll_backward_levels(acc_t grad_nll, const ListInputs<scalar_t>& in, ItemBuf item, KeyBuf key,
                                    const Canonical& c, int64_t top_k, int64_t ties, scalar_t* grad,
                                    int64_t grad_stride, CountBuf count, AccBuf level_a, AccBuf level_b,
                                    AccBuf level_c, AccBuf share) {
  const int64_t groups = level_risk_max<acc_t>(in, item, key, c, count, level_a);
  if (groups < 0) {
    const acc_t nan = neg_inf<acc_t>() - neg_inf<acc_t>();
    for (int64_t i = 0; i < in.K; ++i) grad[i * grad_stride] = from_acc<scalar_t>(nan);
    return;
  }
  for (int64_t l = 0; l < c.levels; ++l) level_b[l] = acc_t(0);
  for (int64_t p = 0; p < c.n; ++p) {
    const int64_t l = key[p] - c.lo;
    const acc_t mx = level_a[l];
    share[p] = mx == neg_inf<acc_t>() ? acc_t(0)
                                      : exp_(load_as<acc_t>(in.scores, item[p] * in.score_stride) - mx);
    level_b[l] += share[p];
  }
  // Worst → best: 1/S_ℓ, S_{ℓ+1}/S_ℓ (from the two addends of S_ℓ) and ρ_ℓ. Strength-0 levels keep mx = -inf.
  RiskSet<acc_t> risk;
  for (int64_t l = c.levels - 1; l >= 0; --l) {
    if (count[l] == 0) continue;
    const acc_t rest = risk.raise_to(level_a[l]);
    if (risk.mx == neg_inf<acc_t>()) continue;
    risk.sum += level_b[l];
    const acc_t inv = acc_t(1) / risk.sum;
    level_a[l] = inv;
    level_c[l] = rest * inv;
    level_b[l] *= inv;
  }
  // Best → worst: R_ℓ = R_{ℓ−1}·S_ℓ/S_{ℓ−1} + [ℓ scored]·u_ℓ. Strength-0 risk sets are nested: a tail of
  // levels from zero_from on, whose items keep the gradient 0.
  const int64_t scored_groups = top_k < 0 ? groups : top_k;
  acc_t running = acc_t(0);
  acc_t ratio_to_next = acc_t(0);
  int64_t group = 0;
  int64_t zero_from = c.levels;
  for (int64_t l = 0; l < c.levels; ++l) {
    const int64_t d = count[l];
    if (d == 0) continue;
    if (level_a[l] == neg_inf<acc_t>()) {
      zero_from = l;
      break;
    }
    const bool scored = group++ < scored_groups;
    const GroupTerms<acc_t> t = group_terms(d, level_b[l], ties);
    running = running * ratio_to_next + (scored ? t.u : acc_t(0));
    ratio_to_next = level_c[l];
    level_b[l] = level_a[l] * (running - (scored ? t.v : acc_t(0)));
    level_c[l] = scored ? acc_t(1) : acc_t(0);
  }
  for (int64_t i = 0; i < in.K; ++i) grad[i * grad_stride] = from_acc<scalar_t>(acc_t(0));
  for (int64_t p = 0; p < c.n; ++p) {
    const int64_t l = key[p] - c.lo;
    if (l >= zero_from) continue;
    const acc_t g = share[p] * level_b[l] - level_c[l];  // a scored -inf item (share 0) gets −1
    grad[item[p] * grad_stride] = from_acc<scalar_t>(grad_nll * g);
  }
}

// Forward NLL of one list from canonical_list(): NaN for a bad list (n < 0, or a NaN/+inf score). The level
// path uses `count` and three K-entry accumulator buffers; the sorted walk none.
template <typename acc_t, typename scalar_t, typename ItemBuf, typename KeyBuf, typename CountBuf, typename AccBuf>
PF_HD acc_t list_nll(const ListInputs<scalar_t>& in, ItemBuf item, KeyBuf key, const Canonical& c, int64_t top_k,
                     int64_t ties, CountBuf count, AccBuf acc0, AccBuf acc1, AccBuf acc2) {
  if (c.n >= 0 && c.levels > 0) return list_nll_levels<acc_t>(in, item, key, c, top_k, ties, count, acc0, acc1, acc2);
  return list_nll_sorted<acc_t>(in, item, key, c.n, top_k, ties);
}

// grad[item * grad_stride] = grad_nll · ∂NLL/∂s_item for every item of the list (0 outside it, NaN for a bad
// list). Scratch: `count` and four K-entry accumulator buffers.
template <typename acc_t, typename scalar_t, typename ItemBuf, typename KeyBuf, typename CountBuf, typename AccBuf>
PF_HD void list_nll_backward(acc_t grad_nll, const ListInputs<scalar_t>& in, ItemBuf item, KeyBuf key,
                             const Canonical& c, int64_t top_k, int64_t ties, scalar_t* grad, int64_t grad_stride,
                             CountBuf count, AccBuf acc0, AccBuf acc1, AccBuf acc2, AccBuf acc3) {
  if (c.n >= 0 && c.levels > 0)
    list_nll_backward_levels<acc_t>(grad_nll, in, item, key, c, top_k, ties, grad, grad_stride, count, acc0, acc1,
                                    acc2, acc3);
  else
    list_nll_backward_sorted<acc_t>(grad_nll, in, item, key, c.n, top_k, ties, grad, grad_stride, acc0, acc1, acc2);
}

}  // namespace pl
}  // namespace prefrank

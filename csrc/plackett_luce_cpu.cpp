// Plackett-Luce NLL: kernel schemas (private library prefrank_C) and CPU kernels.
//
// One pass per list straight from the user's tensors (any strides, no canonicalisation copies): the list's
// order is built, validated and scored in cache-resident per-thread buffers (plackett_luce_math.h); a chunk of
// lists per at::parallel_for task. Called only through the custom ops of prefrank/plackett_luce.py.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "output_alloc.h"
#include "plackett_luce_args.h"
#include "plackett_luce_math.h"

namespace prefrank {
namespace {

// The tensors of one call, checked for layout (values are checked per list by the kernels).
struct Batch {
  int64_t B, K, mode;
  const int64_t* order = nullptr;
  int64_t order_sb = 0, order_sk = 0;
  const bool* mask = nullptr;
  int64_t mask_sb = 0, mask_sk = 0;

  template <typename scalar_t>
  pl::ListInputs<scalar_t> list(const scalar_t* scores, int64_t sb, int64_t sk, int64_t b) const {
    return {scores + b * sb, sk, order ? order + b * order_sb : nullptr, order_sk,
            mask ? mask + b * mask_sb : nullptr, mask_sk, K, mode};
  }
};

Batch batch_of(const at::Tensor& scores, const std::optional<at::Tensor>& ranking,
               const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& mask, int64_t ties) {
  const pl::ItemArgs a = pl::item_args(scores, ranking, groups, mask, ties);
  return {scores.size(0), scores.size(1), a.mode, a.order, a.order_sb, a.order_sk, a.mask, a.mask_sb, a.mask_sk};
}

at::ScalarType acc_dtype(const at::Tensor& scores) {
  return scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-task buffers of the canonical order and the per-level/per-place accumulators (reused across the task's
// lists: they stay in L1/L2).
template <typename acc_t>
struct Workspace {
  std::vector<int32_t> item, count;
  std::vector<int64_t> key;
  std::vector<uint8_t> seen;
  std::vector<acc_t> acc;
  Workspace(int64_t K, int64_t acc_buffers) : item(K), count(K), key(K), seen(K, 0), acc(acc_buffers * K) {}
  acc_t* buffer(int64_t i) { return acc.data() + i * static_cast<int64_t>(item.size()); }
};

constexpr int64_t kGrainItems = 16384;  // items per parallel task: amortises the task start

// ---------------------------------------------------------------------------------------------------------
// Fast path: full rankings / best-first order without ties or mask, fp32 accumulation, kLanes lists at once.
//
// The lists of a block are transposed into a (place, lane) tile, so every step of the scan is one
// operation across kLanes lists: plain float loops the compiler vectorises (an AVX2 clone is selected at run
// time), with exp/log as branch-free polynomials (Cephes expf/logf, ≤ 2 ulp) instead of libm calls. Forward
// per place: m' = max(m, x), sum = sum·e^{m−m'} + e^{x−m'}, NLL += (m' − x) + log sum. One of the two
// exponents is 0 (m' is m or x), so one exp per place: e = e^{−|x−m|}, and sum·e + 1 when x is the new
// maximum, sum + e otherwise. The logs are taken of products of kLogRun sums (each sum is in [1, K], so a
// product stays finite for K < 2^31): one log per kLogRun places. Backward: the same
// scan stores π_p = e^{x_p − m'}/sum and S_{p+1}/S_p, then R_p = R_{p−1}·S_p/S_{p−1} + [p scored] and
// ∂/∂x_p = π_p·R_p − [p scored] (plackett_luce_math.h). Padding places hold x = -inf (weight 0, never
// scored). Lists with a -inf, NaN or +inf score or a bad ranking take the scalar path (their lane is
// recomputed by the per-list code, which implements those cases).
// ---------------------------------------------------------------------------------------------------------
namespace fast {
// Without trapping math GCC if-converts the selects below and vectorises the lane loops (nothing here
// relies on floating-point exceptions).
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

constexpr int64_t kLanes = 16;
constexpr int64_t kLogRun = 4;
constexpr float kExpFloor = -87.0f;  // e^x below it is taken as 0 (< 2e-38, invisible next to sum ≥ 1)

// e^x for x ≤ 0 (Cephes expf: x = n·ln2 + r, e^r by a degree-6 polynomial, 2^n through the exponent bits).
inline float exp_nonpositive(float x) {
  const float xc = x < kExpFloor ? kExpFloor : x;
  const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return x < kExpFloor ? 0.0f : y * scale;
}

// log(x) for x ≥ 1 (the scan's sums; Cephes logf: x = 2^e·m, m in [√½, √2), log m by a polynomial).
inline float log_at_least_one(float x) {
  int32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>((bits >> 23) - 126);
  const int32_t mant_bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  __builtin_memcpy(&m, &mant_bits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1.0f : 0.0f;
  const float f = (small ? m + m : m) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += e * -2.12194440e-4f;
  y -= 0.5f * z;
  return f + y + e * 0.693359375f;
}

// NLL of the tile's lanes: x and scored are (K, kLanes); scored is 1 where the place is scored, else 0 (a float,
// not a byte: with every lane array 32-bit the compiler vectorises the scan 8 lanes wide, not 4).
__attribute__((target_clones("avx2", "default"))) void scan_forward(const float* x, const float* scored,
                                                                     int64_t K, float* nll) {
  float mx[kLanes], sum[kLanes], total[kLanes], product[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    mx[l] = -3.4e38f;
    sum[l] = 0.0f;
    total[l] = 0.0f;
    product[l] = 1.0f;
  }
  for (int64_t p = K - 1; p >= 0; --p) {
    const float* xp = x + p * kLanes;
    const float* sp = scored + p * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      const float d = xp[l] - mx[l];
      const float e = exp_nonpositive(-__builtin_fabsf(d));
      const bool raised = d > 0.0f;
      sum[l] = raised ? sum[l] * e + 1.0f : sum[l] + e;
      mx[l] = raised ? xp[l] : mx[l];
      const bool is_scored = sp[l] != 0.0f;
      total[l] += is_scored ? mx[l] - xp[l] : 0.0f;
      product[l] *= is_scored && sum[l] > 1.0f ? sum[l] : 1.0f;
    }
    if (p % kLogRun == 0)
      for (int64_t l = 0; l < kLanes; ++l) {
        total[l] += log_at_least_one(product[l]);
        product[l] = 1.0f;
      }
  }
  for (int64_t l = 0; l < kLanes; ++l) nll[l] = total[l];
}

// grad (K, kLanes) = grad_nll · ∂NLL/∂x; share and ratio are (K, kLanes) scratch.
__attribute__((target_clones("avx2", "default"))) void scan_backward(const float* x, const float* scored,
                                                                      int64_t K, const float* grad_nll,
                                                                      float* share, float* ratio, float* grad) {
  float mx[kLanes], sum[kLanes], running[kLanes], ratio_prev[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    mx[l] = -3.4e38f;
    sum[l] = 0.0f;
  }
  for (int64_t p = K - 1; p >= 0; --p) {
    const float* xp = x + p * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      const float d = xp[l] - mx[l];
      const float e = exp_nonpositive(-__builtin_fabsf(d));
      const bool raised = d > 0.0f;
      const float rest = raised ? sum[l] * e : sum[l];
      const float own = raised ? 1.0f : e;
      sum[l] = rest + own;
      mx[l] = raised ? xp[l] : mx[l];
      const float inv = sum[l] > 0.0f ? 1.0f / sum[l] : 0.0f;
      share[p * kLanes + l] = own * inv;
      ratio[p * kLanes + l] = rest * inv;
    }
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    running[l] = 0.0f;
    ratio_prev[l] = 0.0f;
  }
  for (int64_t p = 0; p < K; ++p) {
    const float* sp = scored + p * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      const float sc = sp[l];
      running[l] = running[l] * ratio_prev[l] + sc;
      ratio_prev[l] = ratio[p * kLanes + l];
      grad[p * kLanes + l] = grad_nll[l] * (share[p * kLanes + l] * running[l] - sc);
    }
  }
}

// The tile of one block: x, scored, the item of every place, and which lanes need the scalar path.
struct Tile {
  std::vector<float> x, scored, share, ratio, grad;
  std::vector<int64_t> item;
  std::vector<int64_t> listed_by;  // listed_by[i] = the last list whose ranking listed item i (no reset per list)
  explicit Tile(int64_t K, bool backward)
      : x(K * kLanes), scored(K * kLanes), share(backward ? K * kLanes : 0), ratio(backward ? K * kLanes : 0),
        grad(backward ? K * kLanes : 0), item(K * kLanes), listed_by(K, -1) {}
};

// Lane l contributes nothing to the scan (an unused lane, or one the scalar path scores instead).
inline void clear_lane(Tile& t, int64_t K, int64_t l) {
  for (int64_t p = 0; p < K; ++p) {
    t.x[p * kLanes + l] = 0.0f;
    t.scored[p * kLanes + l] = 0.0f;
  }
}

// Fills lane l of the tile from list b; false when the list needs the scalar path.
template <typename scalar_t>
bool load_lane(const Batch& batch, const scalar_t* s, int64_t sb, int64_t sk, int64_t b, int64_t l, int64_t top_k,
               Tile& t) {
  const int64_t K = batch.K;
  const int64_t places = top_k < 0 ? K : top_k;
  bool fine = true, padding = false;
  for (int64_t p = 0; p < K; ++p) {
    int64_t i = p;
    if (batch.mode == pl::kByRanking) {
      i = batch.order[b * batch.order_sb + p * batch.order_sk];
      if (i < 0) {
        fine &= i == -1;
        padding = true;
      } else if (padding || i >= K || t.listed_by[i] == b) {
        fine = false;
        i = -1;
      } else {
        t.listed_by[i] = b;
      }
    }
    float v = -std::numeric_limits<float>::infinity();
    if (i >= 0) {
      v = static_cast<float>(s[b * sb + i * sk]);
      fine &= std::isfinite(v);
    }
    t.x[p * kLanes + l] = v;
    t.scored[p * kLanes + l] = i >= 0 && p < places ? 1.0f : 0.0f;
    t.item[p * kLanes + l] = i;
  }
  if (!fine) clear_lane(t, K, l);  // keep the lane harmless; the scalar path overwrites its result
  return fine;
}

// Fills the tile with lists b0 .. b0+lanes-1 (fine[l]: lane l scanned, else the scalar path scores it) and
// clears the unused lanes of a last, partial block.
template <typename scalar_t>
void load_block(const Batch& batch, const scalar_t* s, int64_t sb, int64_t sk, int64_t b0, int64_t lanes,
                int64_t top_k, Tile& t, bool* fine) {
  for (int64_t l = 0; l < kLanes; ++l) {
    fine[l] = l < lanes && load_lane(batch, s, sb, sk, b0 + l, l, top_k, t);
    if (l >= lanes) clear_lane(t, batch.K, l);
  }
}

bool applies(const Batch& batch, at::ScalarType dtype) {
  return dtype != at::kDouble && batch.mask == nullptr && batch.mode != pl::kByGroups && batch.K > 0;
}

#pragma GCC pop_options

}  // namespace fast

int64_t grain(int64_t K) { return std::max<int64_t>(1, kGrainItems / std::max<int64_t>(K, 1)); }

at::Tensor plackett_luce_nll_fwd_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& ranking,
                                     const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& mask,
                                     int64_t top_k, int64_t ties) {
  const Batch batch = batch_of(scores, ranking, groups, mask, ties);
  at::Tensor nll = new_output({batch.B}, scores.options().dtype(acc_dtype(scores)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "plackett_luce_nll_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const int64_t sb = scores.stride(0), sk = scores.stride(1);
    acc_t* out = nll.mutable_data_ptr<acc_t>();
    const bool vectorised = fast::applies(batch, scores.scalar_type());
    at::parallel_for(0, batch.B, grain(batch.K), [&](int64_t begin, int64_t end) {
      Workspace<acc_t> ws(batch.K, 3);
      auto scalar_list = [&](int64_t b) {
        const auto list = batch.list(s, sb, sk, b);
        const pl::Canonical c = pl::canonical_list(list, ws.item.data(), ws.key.data(), ws.seen.data());
        out[b] = pl::list_nll<acc_t>(list, ws.item.data(), ws.key.data(), c, top_k, ties, ws.count.data(),
                                     ws.buffer(0), ws.buffer(1), ws.buffer(2));
      };
      if constexpr (std::is_same_v<acc_t, float>) {
        if (vectorised) {
          fast::Tile tile(batch.K, false);
          float block_nll[fast::kLanes];
          for (int64_t b0 = begin; b0 < end; b0 += fast::kLanes) {
            const int64_t lanes = std::min(fast::kLanes, end - b0);
            bool fine[fast::kLanes];
            fast::load_block(batch, s, sb, sk, b0, lanes, top_k, tile, fine);
            fast::scan_forward(tile.x.data(), tile.scored.data(), batch.K, block_nll);
            for (int64_t l = 0; l < lanes; ++l) {
              if (fine[l]) out[b0 + l] = block_nll[l];
              else scalar_list(b0 + l);
            }
          }
          return;
        }
      }
      for (int64_t b = begin; b < end; ++b) scalar_list(b);
    });
  });
  return nll;
}

at::Tensor plackett_luce_nll_bwd_cpu(const at::Tensor& grad_nll, const at::Tensor& scores,
                                     const std::optional<at::Tensor>& ranking, const std::optional<at::Tensor>& groups,
                                     const std::optional<at::Tensor>& mask, int64_t top_k, int64_t ties) {
  const Batch batch = batch_of(scores, ranking, groups, mask, ties);
  TORCH_CHECK(grad_nll.dim() == 1 && grad_nll.size(0) == batch.B, "plackett_luce: grad_nll must be (lists,)");
  const at::Tensor g = grad_nll.to(acc_dtype(scores));  // no copy in the usual case (already the nll's dtype)
  at::Tensor grad = new_output({batch.B, batch.K}, scores.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "plackett_luce_nll_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const int64_t sb = scores.stride(0), sk = scores.stride(1);
    const acc_t* gn = g.const_data_ptr<acc_t>();
    const int64_t gs = g.stride(0);  // 0 when broadcast from a scalar (reduction="sum"/"mean")
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const bool vectorised = fast::applies(batch, scores.scalar_type());
    at::parallel_for(0, batch.B, grain(batch.K), [&](int64_t begin, int64_t end) {
      Workspace<acc_t> ws(batch.K, 4);
      auto scalar_list = [&](int64_t b) {
        const auto list = batch.list(s, sb, sk, b);
        const pl::Canonical c = pl::canonical_list(list, ws.item.data(), ws.key.data(), ws.seen.data());
        pl::list_nll_backward<acc_t>(gn[b * gs], list, ws.item.data(), ws.key.data(), c, top_k, ties,
                                     out + b * batch.K, 1, ws.count.data(), ws.buffer(0), ws.buffer(1), ws.buffer(2),
                                     ws.buffer(3));
      };
      if constexpr (std::is_same_v<acc_t, float>) {
        if (vectorised) {
          fast::Tile tile(batch.K, true);
          float block_grad_nll[fast::kLanes];
          for (int64_t b0 = begin; b0 < end; b0 += fast::kLanes) {
            const int64_t lanes = std::min(fast::kLanes, end - b0);
            bool fine[fast::kLanes];
            fast::load_block(batch, s, sb, sk, b0, lanes, top_k, tile, fine);
            for (int64_t l = 0; l < fast::kLanes; ++l) block_grad_nll[l] = l < lanes ? gn[(b0 + l) * gs] : 0.0f;
            fast::scan_backward(tile.x.data(), tile.scored.data(), batch.K, block_grad_nll, tile.share.data(),
                                tile.ratio.data(), tile.grad.data());
            for (int64_t l = 0; l < lanes; ++l) {
              const int64_t b = b0 + l;
              if (!fine[l]) {
                scalar_list(b);
                continue;
              }
              scalar_t* row = out + b * batch.K;
              if (batch.mode == pl::kByRanking)  // items the ranking does not list (padding) get 0
                for (int64_t i = 0; i < batch.K; ++i) row[i] = scalar_t(0);
              for (int64_t p = 0; p < batch.K; ++p) {
                const int64_t i = tile.item[p * fast::kLanes + l];
                if (i >= 0) row[i] = static_cast<scalar_t>(tile.grad[p * fast::kLanes + l]);
              }
            }
          }
          return;
        }
      }
      for (int64_t b = begin; b < end; ++b) scalar_list(b);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefrank_C, m) {
  m.def("plackett_luce_nll_fwd(Tensor scores, Tensor? ranking, Tensor? groups, Tensor? mask, int top_k, "
        "int ties) -> Tensor");
  m.def("plackett_luce_nll_bwd(Tensor grad_nll, Tensor scores, Tensor? ranking, Tensor? groups, Tensor? mask, "
        "int top_k, int ties) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefrank_C, CPU, m) {
  m.impl("plackett_luce_nll_fwd", &plackett_luce_nll_fwd_cpu);
  m.impl("plackett_luce_nll_bwd", &plackett_luce_nll_bwd_cpu);
}

}  // namespace prefrank

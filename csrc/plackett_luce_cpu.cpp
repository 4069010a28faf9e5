// Plackett-Luce NLL: kernel schemas (private library prefrank_C) and CPU kernels.
//
// One pass per list straight from the user's tensors (any strides, no canonicalisation copies): the list's
// order is built, validated and scored in cache-resident per-thread buffers (plackett_luce_math.h); a chunk of
// lists per at::parallel_for task. With fp32/fp16/bf16 scores two SIMD tiles take 16 lists at a time: full
// rankings (namespace fast, first section) and groups of at most 16 levels (its second section); the lists
// they cannot take keep the per-list code. Called only through the custom ops of prefrank/plackett_luce.py.
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

#include "cpu_dispatch.h"  // PF_HOT
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

// The Cephes expf/logf constants and polynomials, written once for a float and for a GCC vector of floats (F:
// both take float operands in + − ×), so the scalar lanes and the vector tiles compute the same values.
// Always inlined: no vector crosses a call, so GCC's -Wpsabi ABI note (emitted at the end of the file, hence
// off from here on) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
constexpr float kLog2E = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kSqrtHalf = 0.707106781186547524f;

// e^r for a reduced argument r in [−ln2/2, ln2/2] (degree-6 polynomial).
template <typename F>
inline __attribute__((always_inline)) F exp_reduced(const F& r) {
  F y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * (r * r) + r + 1.0f;
}

// log(1 + f) − f + f²/2 for f in [√½ − 1, √2 − 1), z = f² (the caller adds −z/2, f and the exponent's part).
template <typename F>
inline __attribute__((always_inline)) F log_reduced_tail(const F& f, const F& z) {
  F y = f * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  return y * f * z;
}

// e^x for x ≤ 0 (Cephes expf: x = n·ln2 + r, e^r by exp_reduced, 2^n through the exponent bits).
inline float exp_nonpositive(float x) {
  const float xc = x < kExpFloor ? kExpFloor : x;
  const float n = __builtin_floorf(xc * kLog2E + 0.5f);
  const float r = xc - n * kLn2Hi - n * kLn2Lo;
  const float y = exp_reduced(r);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return x < kExpFloor ? 0.0f : y * scale;
}

// log(x) for a positive normal float x (Cephes logf: x = 2^e·m, m in [√½, √2), log m by a polynomial).
inline float log_positive(float x) {
  int32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>((bits >> 23) - 126);
  const int32_t mant_bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  __builtin_memcpy(&m, &mant_bits, sizeof(m));
  const bool small = m < kSqrtHalf;
  e -= small ? 1.0f : 0.0f;
  const float f = (small ? m + m : m) - 1.0f;
  const float z = f * f;
  float y = log_reduced_tail(f, z);
  y += e * kLn2Lo;
  y -= 0.5f * z;
  return f + y + e * kLn2Hi;
}

// NLL of the tile's lanes: x and scored are (K, kLanes); scored is 1 where the place is scored, else 0 (a float,
// not a byte: with every lane array 32-bit the compiler vectorises the scan 8 lanes wide, not 4).
PF_HOT void scan_forward(const float* x, const float* scored, int64_t K, float* nll) {
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
        total[l] += log_positive(product[l]);
        product[l] = 1.0f;
      }
  }
  for (int64_t l = 0; l < kLanes; ++l) nll[l] = total[l];
}

// grad (K, kLanes) = grad_nll · ∂NLL/∂x; share and ratio are (K, kLanes) scratch.
PF_HOT void scan_backward(const float* x, const float* scored, int64_t K, const float* grad_nll, float* share,
                          float* ratio, float* grad) {
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
      fine &= __builtin_isfinite(v);
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

// ---------------------------------------------------------------------------------------------------------
// Fast path for ties: `groups` whose valid levels span at most kTileLevels values (the dense levels of the
// level path, plackett_luce_math.h; sorted or not), fp32 accumulation, kLanes lists at once.
//
// The tile keeps the item order: x and level = g − lo (-1 outside the list) are (K, kLanes). The per-level
// accumulations of the scalar level path become one-hot passes (for each level ℓ, a select on level == ℓ
// across the lanes): O(levels·K), but without scatters, so they vectorise; the walks over the levels run
// across the lanes with empty levels masked out. The arithmetic is the scalar level path's (the same
// risk-set maxima, one exp per item, the same rescaling, the same Efron flushes), so ±1e4 scores keep their
// precision. A lane takes the scalar path when its list is bad (a group below -1, a NaN/±inf valid score:
// the scalar path implements strength 0 and NaN), has no valid item, or its levels span more values (or
// reach 2^31 − 1). Full blocks of contiguous fp32 rows with contiguous groups and no mask are loaded (and
// their gradients stored) by 8×8 in-register transposes; other layouts and dtypes lane by lane.
//
// The lane loops are written with GCC vector types (kWidth floats; 32 bytes: one AVX2 register in the
// avx2 clone, two SSE registers in the default one): the one-hot selects on a stack of per-level vectors
// are beyond the auto-vectoriser.
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kTileLevels = 16;  // beyond, the O(levels·K) one-hot passes cost more than the scalar path
constexpr float kLowest = -3.40282347e38f;  // at most every finite score: the maximum of an empty level
constexpr float kFlushBelow = 5.42101086242752217e-20f;  // 2^-64: Efron's running products (group_terms)

// The helpers are always inlined into the PF_HOT functions, so no vector crosses a call (the -Wpsabi
// note, switched off above the shared exp/log polynomials, does not apply).
typedef float vfloat __attribute__((vector_size(32)));
typedef int32_t vint __attribute__((vector_size(32)));
constexpr int64_t kWidth = sizeof(vfloat) / sizeof(float);
constexpr int64_t kVecs = kLanes / kWidth;  // vectors per tile row
static_assert(kVecs * kWidth == kLanes);
#define PF_VECTOR_INLINE inline __attribute__((always_inline))

PF_VECTOR_INLINE vfloat splat(float v) { return vfloat{} + v; }
PF_VECTOR_INLINE vfloat load_v(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
PF_VECTOR_INLINE vint load_v(const int32_t* p) {
  vint v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
PF_VECTOR_INLINE void store_v(float* p, const vfloat& v) { __builtin_memcpy(p, &v, sizeof(v)); }
PF_VECTOR_INLINE vfloat max_v(const vfloat& a, const vfloat& b) { return a > b ? a : b; }
PF_VECTOR_INLINE bool any_v(const vint& m) {
  int32_t any = 0;
  for (int64_t k = 0; k < kWidth; ++k) any |= m[k];
  return any != 0;
}
PF_VECTOR_INLINE float hmax_v(const vfloat& v) {
  float m = v[0];
  for (int64_t k = 1; k < kWidth; ++k) m = v[k] > m ? v[k] : m;
  return m;
}

// exp_nonpositive() and log_positive() lane by lane (the same operations in the same order).
PF_VECTOR_INLINE vfloat exp_nonpositive_v(const vfloat& x) {
  const vint under = x < kExpFloor;
  const vfloat xc = under ? splat(kExpFloor) : x;
  const vfloat t = xc * kLog2E + 0.5f;
  vfloat n = __builtin_convertvector(__builtin_convertvector(t, vint), vfloat);  // floor(t): t > -126
  n = n > t ? n - 1.0f : n;
  const vfloat r = xc - n * kLn2Hi - n * kLn2Lo;
  const vfloat y = exp_reduced(r);
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return under ? vfloat{} : y * (vfloat)bits;
}

PF_VECTOR_INLINE vfloat log_positive_v(const vfloat& x) {
  const vint bits = (vint)x;
  vfloat e = __builtin_convertvector((bits >> 23) - 126, vfloat);
  const vint mant_bits = (bits & 0x007fffff) | 0x3f000000;
  const vfloat m = (vfloat)mant_bits;
  const vint small = m < kSqrtHalf;
  e = small ? e - 1.0f : e;
  const vfloat f = (small ? m + m : m) - 1.0f;
  const vfloat z = f * f;
  vfloat y = log_reduced_tail(f, z);
  y += e * kLn2Lo;
  y -= 0.5f * z;
  return f + y + e * kLn2Hi;
}

struct LevelTile {
  std::vector<float> x, share;  // (K, kLanes): scores (0 outside the list); e^{x − mx_ℓ}, then the gradient
  std::vector<int32_t> level;   // (K, kLanes)
  explicit LevelTile(int64_t K) : x(K * kLanes), share(K * kLanes), level(K * kLanes) {}
};

// One vector column h of the tile (kWidth lanes) at a time, with the level count rounded up to a compile-time
// kLevels (4, 8 or 16: the per-level selects unroll and their accumulators stay in registers; the levels past
// the lanes' own are empty). Per level ℓ: count, the risk set's maximum mx_ℓ (over levels ≥ ℓ; an empty level
// holds the maximum of the levels above it), Σ e^{x − mx_ℓ}, Σ (mx_ℓ − x) (forward only: the group's
// Σ (L − s_i) without cancellation at ±1e4) and [ℓ scored]; d_max[ℓ]: the level's most items in a lane.
template <int kLevels>
struct LevelSums {
  vfloat count[kLevels], risk_max[kLevels], exp_sum[kLevels], gap_sum[kLevels], scored[kLevels];
  float d_max[kLevels];
};

// Fills `a` for column h and share[i] = e^{x_i − mx_ℓ(i)} (0 outside the list). A cleared lane (level -1
// everywhere) has only empty levels. `x`, `level` and `share` point at the column (row stride kLanes).
template <int kLevels, bool kGaps>
PF_VECTOR_INLINE void level_sums(const float* x, const int32_t* level, int64_t K, int64_t top_k, float* share,
                                 LevelSums<kLevels>& a) {
  vint count[kLevels];
  for (int v = 0; v < kLevels; ++v) {
    count[v] = vint{};
    a.risk_max[v] = splat(kLowest);
  }
  for (int64_t i = 0; i < K; ++i) {  // count and maximum per level
    const vint lv = load_v(level + i * kLanes);
    const vfloat xi = load_v(x + i * kLanes);
    for (int v = 0; v < kLevels; ++v) {
      const vint in = lv == v;
      count[v] -= in;  // in = -1 where true
      a.risk_max[v] = max_v(a.risk_max[v], in ? xi : splat(kLowest));
    }
  }
  const float cut = top_k < 0 ? 3.0e38f : static_cast<float>(top_k);
  vfloat run = splat(kLowest), rank = vfloat{};
  for (int v = kLevels - 1; v >= 0; --v) {  // worst → best: the risk sets' maxima
    run = max_v(a.risk_max[v], run);
    a.risk_max[v] = run;
  }
  for (int v = 0; v < kLevels; ++v) {  // best → worst: the groups before ℓ (top_k counts groups, not levels)
    a.count[v] = __builtin_convertvector(count[v], vfloat);
    a.d_max[v] = hmax_v(a.count[v]);
    a.scored[v] = rank < cut ? splat(1.0f) : vfloat{};
    rank += a.count[v] > 0.0f ? splat(1.0f) : vfloat{};
    a.exp_sum[v] = vfloat{};
    a.gap_sum[v] = vfloat{};
  }
  for (int64_t i = 0; i < K; ++i) {
    const vint lv = load_v(level + i * kLanes);
    vfloat mx = vfloat{};  // mx_ℓ(i), one-hot
    for (int v = 0; v < kLevels; ++v) mx = lv == v ? a.risk_max[v] : mx;
    const vfloat gap = mx - load_v(x + i * kLanes);
    const vfloat e = lv >= 0 ? exp_nonpositive_v(-gap) : vfloat{};
    store_v(share + i * kLanes, e);
    for (int v = 0; v < kLevels; ++v) {
      const vint in = lv == v;
      a.exp_sum[v] += in ? e : vfloat{};
      if constexpr (kGaps) a.gap_sum[v] += in ? gap : vfloat{};
    }
  }
}

template <int kLevels>
PF_VECTOR_INLINE void level_column_forward(const float* x, const int32_t* level, int64_t K, int64_t top_k,
                                           int64_t ties, float* share, float* nll) {
  LevelSums<kLevels> a;
  level_sums<kLevels, true>(x, level, K, top_k, share, a);
  vfloat mx = splat(kLowest), sum = vfloat{}, total = vfloat{};
  for (int v = kLevels - 1; v >= 0; --v) {
    // an empty level (risk_max = mx, exp_sum = 0) leaves (mx, sum) as they are
    const vfloat d = a.count[v], group_sum = a.exp_sum[v];
    const vfloat m_new = max_v(a.risk_max[v], mx);
    sum = sum * exp_nonpositive_v(mx - m_new) + group_sum;
    mx = m_new;
    if (a.d_max[v] == 0.0f) continue;
    vfloat terms = a.gap_sum[v] + d * log_positive_v(max_v(sum, splat(1.0f)));
    if (ties == pl::kEfron && a.d_max[v] > 1.0f) {  // Σ_j log(1 − (j/d)·ρ) as logs of running products
      const vfloat rho = group_sum / (sum > 0.0f ? sum : splat(1.0f));
      const vfloat inv_d = 1.0f / (d > 0.0f ? d : splat(1.0f));
      vfloat product = splat(1.0f), logs = vfloat{};
      // Every factor is ≥ 1/d > 2^-e (e: d_max's binary exponent + 1), so no product of j factors drops below
      // 2^-64 while j·e ≤ 64: the flush test starts after that.
      int32_t d_bits;
      __builtin_memcpy(&d_bits, &a.d_max[v], sizeof(d_bits));
      const float first_flush = 64.0f / static_cast<float>(((d_bits >> 23) & 0xff) - 126);
      for (float j = 1.0f; j < a.d_max[v]; j += 1.0f) {
        product = j < d ? product * (1.0f - (j * inv_d) * rho) : product;
        const vint flush = product < kFlushBelow;
        if (j > first_flush && any_v(flush)) {
          logs += flush ? log_positive_v(product) : vfloat{};
          product = flush ? splat(1.0f) : product;
        }
      }
      terms += logs + log_positive_v(product);
    }
    total += (d > 0.0f) & (a.scored[v] > 0.0f) ? terms : vfloat{};
  }
  store_v(nll, total);
}

template <int kLevels>
PF_VECTOR_INLINE void level_column_backward(const float* x, const int32_t* level, int64_t K, int64_t top_k,
                                            int64_t ties, const float* grad_nll, float* share) {
  LevelSums<kLevels> a;
  level_sums<kLevels, false>(x, level, K, top_k, share, a);
  // Worst → best: 1/S_ℓ (into gap_sum), S_{ℓ+1}/S_ℓ (into risk_max; 1 for an empty level, which passes the
  // ratio of the level above it on) and ρ_ℓ (into exp_sum).
  vfloat mx = splat(kLowest), sum = vfloat{};
  for (int v = kLevels - 1; v >= 0; --v) {
    const vfloat m_new = max_v(a.risk_max[v], mx);
    const vfloat rest = sum * exp_nonpositive_v(mx - m_new);
    sum = rest + a.exp_sum[v];
    mx = m_new;
    const vfloat inv = sum > 0.0f ? 1.0f / sum : vfloat{};
    a.gap_sum[v] = inv;
    a.risk_max[v] = a.count[v] == 0.0f ? splat(1.0f) : rest * inv;
    a.exp_sum[v] *= inv;
  }
  // Best → worst: R_ℓ = R_{ℓ−1}·S_ℓ/S_{ℓ−1} + [ℓ scored]·u_ℓ and the level's factor f_ℓ = (R_ℓ − [ℓ scored]·v_ℓ)/S_ℓ
  // (into gap_sum); ∂NLL/∂x_i = e^{x_i − mx_ℓ}·f_ℓ − [ℓ scored].
  vfloat running = vfloat{}, ratio_prev = vfloat{};
  for (int v = 0; v < kLevels; ++v) {
    const vfloat d = a.count[v], sc = a.scored[v];
    vfloat u = d, w = vfloat{};
    if (ties == pl::kEfron && a.d_max[v] > 1.0f) {  // u = Σ_j 1/(1 − c_j ρ), w = Σ_j c_j/(1 − c_j ρ), c_j = j/d
      const vfloat inv_d = 1.0f / (d > 0.0f ? d : splat(1.0f));
      u = d > 0.0f ? splat(1.0f) : vfloat{};  // j = 0: c = 0
      for (float j = 1.0f; j < a.d_max[v]; j += 1.0f) {
        const vfloat c = j * inv_d;
        const vfloat inv_keep = 1.0f / (1.0f - c * a.exp_sum[v]);
        const vint active = j < d;
        u += active ? inv_keep : vfloat{};
        w += active ? c * inv_keep : vfloat{};
      }
    }
    const vint empty = d == 0.0f;
    running = empty ? running : running * ratio_prev + sc * u;
    ratio_prev = empty ? ratio_prev : a.risk_max[v];
    a.gap_sum[v] *= running - sc * w;
  }
  const vfloat gn = load_v(grad_nll);
  for (int64_t i = 0; i < K; ++i) {
    const vint lv = load_v(level + i * kLanes);
    vfloat f = vfloat{}, sc = vfloat{};  // f_ℓ(i) and [ℓ(i) scored], one-hot
    for (int v = 0; v < kLevels; ++v) {
      const vint in = lv == v;
      f = in ? a.gap_sum[v] : f;
      sc = in ? a.scored[v] : sc;
    }
    const vfloat e = load_v(share + i * kLanes);
    store_v(share + i * kLanes, lv >= 0 ? gn * (e * f - sc) : vfloat{});  // 0 outside the list
  }
}

// NLL of the tile's lanes (list_nll_levels across the lanes); `levels` ≤ kTileLevels.
PF_HOT void level_scan_forward(const float* x, const int32_t* level, int64_t K, int64_t levels, int64_t top_k,
                               int64_t ties, float* share, float* nll) {
  for (int64_t h = 0; h < kVecs; ++h) {
    const int64_t o = h * kWidth;
    if (levels <= 4) level_column_forward<4>(x + o, level + o, K, top_k, ties, share + o, nll + o);
    else if (levels <= 8) level_column_forward<8>(x + o, level + o, K, top_k, ties, share + o, nll + o);
    else level_column_forward<kTileLevels>(x + o, level + o, K, top_k, ties, share + o, nll + o);
  }
}

// grad (K, kLanes, in place of `share`) = grad_nll · ∂NLL/∂x (list_nll_backward_levels across the lanes).
PF_HOT void level_scan_backward(const float* x, const int32_t* level, int64_t K, int64_t levels, int64_t top_k,
                                int64_t ties, const float* grad_nll, float* share) {
  for (int64_t h = 0; h < kVecs; ++h) {
    const int64_t o = h * kWidth;
    if (levels <= 4) level_column_backward<4>(x + o, level + o, K, top_k, ties, grad_nll + o, share + o);
    else if (levels <= 8) level_column_backward<8>(x + o, level + o, K, top_k, ties, grad_nll + o, share + o);
    else level_column_backward<kTileLevels>(x + o, level + o, K, top_k, ties, grad_nll + o, share + o);
  }
}

// In-register 8×8 transpose (kWidth == 8): r[k] = row k in, column k out.
PF_VECTOR_INLINE void transpose8(vfloat* r) {
  static_assert(kWidth == 8);
  vfloat t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shuffle(r[k], r[k + 1], vint{0, 8, 1, 9, 4, 12, 5, 13});
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], vint{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int k = 0; k < 8; k += 4)
    for (int j = 0; j < 2; ++j) {
      u[k + 2 * j] = __builtin_shuffle(t[k + j], t[k + j + 2], vint{0, 1, 8, 9, 4, 5, 12, 13});
      u[k + 2 * j + 1] = __builtin_shuffle(t[k + j], t[k + j + 2], vint{2, 3, 10, 11, 6, 7, 14, 15});
    }
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shuffle(u[k], u[k + 4], vint{0, 1, 2, 3, 8, 9, 10, 11});
    r[k + 4] = __builtin_shuffle(u[k], u[k + 4], vint{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

typedef int64_t vlong8 __attribute__((vector_size(8 * sizeof(int64_t))));
typedef uint32_t vuint __attribute__((vector_size(32)));

// A full block from contiguous fp32 rows and contiguous int64 groups without a mask (the common layout):
// 8×8 transposes into the tile, then every lane's checks and its rebase across the lanes. levels[l]: lane
// l's level count, 0 when it takes the scalar path (its lane is cleared).
PF_HOT void load_dense_block(const float* s, int64_t sb, const int64_t* g, int64_t gb, int64_t K, float* x,
                             int32_t* level, int32_t* levels) {
  const int64_t full = K - K % kWidth;
  const vlong8 below = vlong8{} - 2, above = vlong8{} + std::numeric_limits<int32_t>::max();
  for (int64_t h = 0; h < kVecs; ++h) {
    const float* sh = s + h * kWidth * sb;
    const int64_t* gh = g + h * kWidth * gb;
    for (int64_t c0 = 0; c0 < full; c0 += kWidth) {
      vfloat r[kWidth], q[kWidth];
      for (int64_t k = 0; k < kWidth; ++k) {
        r[k] = load_v(sh + k * sb + c0);
        vlong8 g8;
        __builtin_memcpy(&g8, gh + k * gb + c0, sizeof(g8));
        g8 = g8 < below ? below : g8;  // -2: a bad group (the lane takes the scalar path, which reports it)
        g8 = g8 > above ? above : g8;  // 2^31 − 1: too high for the tile's levels (the scalar path)
        q[k] = (vfloat)__builtin_convertvector(g8, vint);
      }
      transpose8(r);
      transpose8(q);
      for (int64_t k = 0; k < kWidth; ++k) {
        store_v(x + (c0 + k) * kLanes + h * kWidth, r[k]);
        __builtin_memcpy(level + (c0 + k) * kLanes + h * kWidth, &q[k], sizeof(q[k]));
      }
    }
    for (int64_t c = full; c < K; ++c)
      for (int64_t k = 0; k < kWidth; ++k) {
        const int64_t gi = gh[k * gb + c];
        x[c * kLanes + h * kWidth + k] = sh[k * sb + c];
        level[c * kLanes + h * kWidth + k] =
            static_cast<int32_t>(gi < -2 ? -2 : gi > std::numeric_limits<int32_t>::max() ? 0x7fffffff : gi);
      }
    vint lo = vint{} + std::numeric_limits<int32_t>::max(), hi = vint{} - 1, bad = vint{};
    for (int64_t i = 0; i < K; ++i) {
      const vint lv = load_v(level + i * kLanes + h * kWidth);
      const vfloat xi = load_v(x + i * kLanes + h * kWidth);
      const vint valid = lv >= 0;
      bad |= (lv < -1) | (valid & (((vint)xi & 0x7f800000) == 0x7f800000));  // NaN/±inf in the list
      lo = valid & (lv < lo) ? lv : lo;
      hi = valid & (lv > hi) ? lv : hi;
    }
    const vint span = (vint)((vuint)hi - (vuint)lo);  // hi − lo (wraps harmlessly for an empty lane)
    const vint fine = ~bad & (hi >= 0) & (hi < std::numeric_limits<int32_t>::max()) & (span < kTileLevels);
    const vint n = fine ? span + 1 : vint{};
    __builtin_memcpy(levels + h * kWidth, &n, sizeof(n));
    for (int64_t i = 0; i < K; ++i) {  // rebase; clear the lanes of the scalar path and what is outside lists
      const vint lv = load_v(level + i * kLanes + h * kWidth);
      const vint keep = fine & (lv >= 0);
      const vint rebased = keep ? lv - lo : vint{} - 1;
      const vfloat xi = load_v(x + i * kLanes + h * kWidth);
      __builtin_memcpy(level + i * kLanes + h * kWidth, &rebased, sizeof(rebased));
      store_v(x + i * kLanes + h * kWidth, keep ? xi : vfloat{});
    }
  }
}

// The gradient tile (K, kLanes) of a full block into contiguous fp32 rows: 8×8 transposes.
PF_HOT void store_dense_block(const float* tile, int64_t K, float* out, int64_t ob) {
  const int64_t full = K - K % kWidth;
  for (int64_t h = 0; h < kVecs; ++h) {
    float* oh = out + h * kWidth * ob;
    for (int64_t c0 = 0; c0 < full; c0 += kWidth) {
      vfloat r[kWidth];
      for (int64_t k = 0; k < kWidth; ++k) r[k] = load_v(tile + (c0 + k) * kLanes + h * kWidth);
      transpose8(r);
      for (int64_t k = 0; k < kWidth; ++k) store_v(oh + k * ob + c0, r[k]);
    }
    for (int64_t c = full; c < K; ++c)
      for (int64_t k = 0; k < kWidth; ++k) oh[k * ob + c] = tile[c * kLanes + h * kWidth + k];
  }
}

// level −= lo of its lane, outside the list (-1) kept.
PF_HOT void rebase_levels(int32_t* level, int64_t K, const int32_t* lo) {
  for (int64_t i = 0; i < K; ++i)
    for (int64_t h = 0; h < kVecs; ++h) {
      const vint lv = load_v(level + i * kLanes + h * kWidth);
      const vint rebased = lv >= 0 ? lv - load_v(lo + h * kWidth) : lv;
      __builtin_memcpy(level + i * kLanes + h * kWidth, &rebased, sizeof(rebased));
    }
}

// Fills lane l of the level tile from list b: x, and level = g (< 2^31; -1 outside the list) until
// rebase_levels() subtracts the lane's lowest level `lo`. Returns the number of levels, 0 when the list takes
// the scalar path (the lane is then cleared: only empty levels, no NaN in the tile).
template <typename scalar_t>
int64_t load_level_lane(const Batch& batch, const scalar_t* s, int64_t sb, int64_t sk, int64_t b, int64_t l,
                        LevelTile& t, int32_t* lo_out) {
  const int64_t K = batch.K;
  const int64_t* g = batch.order + b * batch.order_sb;
  const int64_t gk = batch.order_sk;
  const scalar_t* row = s + b * sb;
  const bool* mask = batch.mask ? batch.mask + b * batch.mask_sb : nullptr;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
  bool fine = true;
  for (int64_t i = 0; i < K; ++i) {  // branch-free: scores outside the list are read (in bounds) and dropped
    const int64_t gi = g[i * gk];
    const bool valid = gi >= 0 && (mask == nullptr || mask[i * batch.mask_sk]);
    const float v = static_cast<float>(row[i * sk]);
    fine &= gi >= -1 && (!valid || __builtin_isfinite(v));
    lo = valid && gi < lo ? gi : lo;
    hi = valid && gi > hi ? gi : hi;
    t.x[i * kLanes + l] = valid ? v : 0.0f;
    t.level[i * kLanes + l] = valid ? static_cast<int32_t>(gi) : -1;  // truncation undone below if hi ≥ 2^31
  }
  const int64_t levels = hi < 0 ? 0 : hi - lo + 1;
  if (!fine || levels == 0 || levels > kTileLevels || hi > std::numeric_limits<int32_t>::max()) {
    for (int64_t i = 0; i < K; ++i) {
      t.x[i * kLanes + l] = 0.0f;
      t.level[i * kLanes + l] = -1;
    }
    *lo_out = 0;
    return 0;
  }
  *lo_out = static_cast<int32_t>(lo);
  return levels;
}

// Fills the level tile with lists b0 .. b0+lanes-1 (fine[l]: lane l scanned, else the scalar path scores it;
// unused lanes of a last, partial block are cleared); returns the most levels of a lane (0: none scanned).
template <typename scalar_t>
int64_t load_level_block(const Batch& batch, const scalar_t* s, int64_t sb, int64_t sk, int64_t b0, int64_t lanes,
                         LevelTile& t, bool* fine) {
  int64_t levels = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (lanes == kLanes && sk == 1 && batch.order_sk == 1 && batch.mask == nullptr) {
      alignas(32) int32_t lane_levels[kLanes];
      load_dense_block(s + b0 * sb, sb, batch.order + b0 * batch.order_sb, batch.order_sb, batch.K, t.x.data(),
                       t.level.data(), lane_levels);
      for (int64_t l = 0; l < kLanes; ++l) {
        fine[l] = lane_levels[l] > 0;
        levels = std::max<int64_t>(levels, lane_levels[l]);
      }
      return levels;
    }
  }
  alignas(32) int32_t lo[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const int64_t n = l < lanes ? load_level_lane(batch, s, sb, sk, b0 + l, l, t, lo + l) : 0;
    if (l >= lanes) {
      lo[l] = 0;
      for (int64_t i = 0; i < batch.K; ++i) {
        t.x[i * kLanes + l] = 0.0f;
        t.level[i * kLanes + l] = -1;
      }
    }
    fine[l] = n > 0;
    levels = std::max(levels, n);
  }
  if (levels > 0) rebase_levels(t.level.data(), batch.K, lo);
  return levels;
}

// The tile counts items in floats (exact up to 2^24).
bool applies_to_levels(const Batch& batch, at::ScalarType dtype) {
  return dtype != at::kDouble && batch.mode == pl::kByGroups && batch.K > 0 && batch.K <= (int64_t(1) << 24);
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
    const bool level_tiles = fast::applies_to_levels(batch, scores.scalar_type());
    at::parallel_for(0, batch.B, grain(batch.K), [&](int64_t begin, int64_t end) {
      Workspace<acc_t> ws(batch.K, 3);
      auto scalar_list = [&](int64_t b) {
        const auto list = batch.list(s, sb, sk, b);
        const pl::Canonical c = pl::canonical_list(list, ws.item.data(), ws.key.data(), ws.seen.data());
        out[b] = pl::list_nll<acc_t>(list, ws.item.data(), ws.key.data(), c, top_k, ties, ws.count.data(),
                                     ws.buffer(0), ws.buffer(1), ws.buffer(2));
      };
      if constexpr (std::is_same_v<acc_t, float>) {
        // blocks of kLanes lists: `tile_nll` loads and scans one block; a list it cannot take goes scalar
        auto by_blocks = [&](auto&& tile_nll) {
          float block_nll[fast::kLanes];
          for (int64_t b0 = begin; b0 < end; b0 += fast::kLanes) {
            const int64_t lanes = std::min(fast::kLanes, end - b0);
            bool fine[fast::kLanes];
            tile_nll(b0, lanes, fine, block_nll);
            for (int64_t l = 0; l < lanes; ++l) {
              if (fine[l]) out[b0 + l] = block_nll[l];
              else scalar_list(b0 + l);
            }
          }
        };
        if (vectorised) {
          fast::Tile tile(batch.K, false);
          by_blocks([&](int64_t b0, int64_t lanes, bool* fine, float* block_nll) {
            fast::load_block(batch, s, sb, sk, b0, lanes, top_k, tile, fine);
            fast::scan_forward(tile.x.data(), tile.scored.data(), batch.K, block_nll);
          });
          return;
        }
        if (level_tiles) {
          fast::LevelTile tile(batch.K);
          by_blocks([&](int64_t b0, int64_t lanes, bool* fine, float* block_nll) {
            const int64_t levels = fast::load_level_block(batch, s, sb, sk, b0, lanes, tile, fine);
            if (levels > 0)
              fast::level_scan_forward(tile.x.data(), tile.level.data(), batch.K, levels, top_k, ties,
                                       tile.share.data(), block_nll);
          });
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
    const bool level_tiles = fast::applies_to_levels(batch, scores.scalar_type());
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
        // blocks of kLanes lists: `tile_grad` loads and scans one block (true: it already wrote the whole
        // block's rows), `store_row` writes one lane's row; a list the tile cannot take goes scalar
        auto by_blocks = [&](auto&& tile_grad, auto&& store_row) {
          float block_grad_nll[fast::kLanes];
          for (int64_t b0 = begin; b0 < end; b0 += fast::kLanes) {
            const int64_t lanes = std::min(fast::kLanes, end - b0);
            bool fine[fast::kLanes];
            for (int64_t l = 0; l < fast::kLanes; ++l) block_grad_nll[l] = l < lanes ? gn[(b0 + l) * gs] : 0.0f;
            const bool stored = tile_grad(b0, lanes, fine, block_grad_nll);
            for (int64_t l = 0; l < lanes; ++l) {
              const int64_t b = b0 + l;
              if (!fine[l]) scalar_list(b);  // (over a stored block's row too)
              else if (!stored) store_row(l, out + b * batch.K);
            }
          }
        };
        if (vectorised) {
          fast::Tile tile(batch.K, true);
          by_blocks(
              [&](int64_t b0, int64_t lanes, bool* fine, const float* block_grad_nll) {
                fast::load_block(batch, s, sb, sk, b0, lanes, top_k, tile, fine);
                fast::scan_backward(tile.x.data(), tile.scored.data(), batch.K, block_grad_nll, tile.share.data(),
                                    tile.ratio.data(), tile.grad.data());
                return false;
              },
              [&](int64_t l, scalar_t* row) {
                if (batch.mode == pl::kByRanking)  // items the ranking does not list (padding) get 0
                  for (int64_t i = 0; i < batch.K; ++i) row[i] = scalar_t(0);
                for (int64_t p = 0; p < batch.K; ++p) {
                  const int64_t i = tile.item[p * fast::kLanes + l];
                  if (i >= 0) row[i] = static_cast<scalar_t>(tile.grad[p * fast::kLanes + l]);
                }
              });
          return;
        }
        if (level_tiles) {
          fast::LevelTile tile(batch.K);
          by_blocks(
              [&](int64_t b0, int64_t lanes, bool* fine, const float* block_grad_nll) {
                const int64_t levels = fast::load_level_block(batch, s, sb, sk, b0, lanes, tile, fine);
                if (levels > 0)
                  fast::level_scan_backward(tile.x.data(), tile.level.data(), batch.K, levels, top_k, ties,
                                            block_grad_nll, tile.share.data());
                if constexpr (std::is_same_v<scalar_t, float>) {  // a full fp32 block: written by transposes
                  if (levels > 0 && lanes == fast::kLanes) {
                    fast::store_dense_block(tile.share.data(), batch.K, reinterpret_cast<float*>(out + b0 * batch.K),
                                            batch.K);
                    return true;
                  }
                }
                return false;
              },
              [&](int64_t l, scalar_t* row) {
                for (int64_t i = 0; i < batch.K; ++i) row[i] = static_cast<scalar_t>(tile.share[i * fast::kLanes + l]);
              });
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

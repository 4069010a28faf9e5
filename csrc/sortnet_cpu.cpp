// Differentiable sorting networks: operator schemas and CPU kernels (one list per at::parallel_for task).
//
// Per list of m items and L layers (schedule and relaxations in sortnet_math.h):
//  * values: each comparator touches its two wires: O(L·m) work. The forward saves α per wire (both wires
//    of a comparator hold the comparator's α): `alpha` is (lists, L, n), 4·L·n bytes per fp32 list.
//  * P: row i of P is the one-hot e_i pushed through the network, each comparator mixing two entries, so P
//    costs O(L·m²) and is built in blocks of R rows kept WIRE-major (Q[w][r] = P[row0 + r, w]): a
//    comparator mixes two contiguous R-vectors, over the rows that can be nonzero on its wires only (its
//    hull, see Schedule: bitonic on 128 wires does 2.3x, odd-even on 32 1.45x less than all rows). P is never
//    needed by the loss ops, which reduce each final row on the fly.
//  * backward: the values are re-run from x and the saved α (O(L·m)); for the P part each row block is re-run
//    forward recording Q[lo] − Q[hi] over each comparator's hull (≤ one R-vector per comparator of per-thread
//    scratch, R chosen so this stays ≤ 2^20 elements), then the adjoint rows are pulled back layer by layer
//    while accumulating ∂L/∂α_c = ±Σ_r (Ḡ[lo][r] − Ḡ[hi][r])·(Q[lo][r] − Q[hi][r]). Nothing of size L·n² is
//    ever stored.
//
// Gradient of one comparator (lo < hi, own/other = α/(1−α), swapped when flipped), with a, b the values
// entering it and g_lo, g_hi the adjoints leaving it:
//   ∂L/∂α = ±(g_lo − g_hi)(a − b)  (+ the P part),  ∂L/∂d = ∂L/∂α · f'(d),  d = b − a
//   ḡ_lo = own·g_lo + other·g_hi − ∂L/∂d,   ḡ_hi = other·g_lo + own·g_hi + ∂L/∂d.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

// GCC vectorises the relaxations' selects (cauchy's branch-free arctan) over a layer's comparators only when it
// may evaluate floating-point operations speculatively: nothing here reads the FP exception flags, and no value
// changes (this is not -ffast-math).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "cpu_dispatch.h"  // PF_HOT: the row loops, the hot spot, also compiled for AVX2
#include "sortnet_math.h"

namespace prefrank {
namespace {

using namespace sortnet;

// Per-thread trajectory scratch of the backward (elements, 4 MiB in fp32); the row block shrinks to fit.
constexpr int64_t kScratchElements = int64_t(1) << 20;

// The comparators of a network on m wires, layer by layer (pass-through wires omitted), and the rows of P each
// comparator can touch. Row i of P starts as e_i, so Q[w][i] is structurally zero until row i has reached wire w
// through the comparators so far. Per wire the rows that may be nonzero lie in an interval [first, last) (its
// hull), {w} at the start; a comparator gives both its wires the smallest interval holding their two hulls (a
// superset would only cost work), a pass-through keeps its own. [row_lo[c], row_hi[c]) is the hull of
// comparator c's wires after it: its row loops run there only, both wires hold exact zeros outside it before and
// after (hulls only grow), so the results do not depend on the restriction. Data independent: per network and m.
struct Schedule {
  struct Comparator {
    int32_t lo, hi;          // its wires, lo < hi
    int32_t row_lo, row_hi;  // the hull of both wires after it
    bool flipped;
  };
  int64_t m = 0, layers = 0;
  std::vector<int64_t> start;  // comparators of layer l: [start[l], start[l+1])
  std::vector<Comparator> comparator;

  Schedule(int64_t network, int64_t wires) : m(wires), layers(num_layers(network, wires)) {
    start.reserve(layers + 1);
    std::vector<int32_t> first(m), last(m);
    for (int64_t w = 0; w < m; ++w) first[w] = static_cast<int32_t>(w), last[w] = static_cast<int32_t>(w + 1);
    for (int64_t l = 0; l < layers; ++l) {
      start.push_back(static_cast<int64_t>(comparator.size()));
      for (int64_t w = 0; w < m; ++w) {
        bool flip = false;
        const int64_t p = partner(network, m, l, w, &flip);
        if (p <= w) continue;
        first[w] = first[p] = std::min(first[w], first[p]);
        last[w] = last[p] = std::max(last[w], last[p]);
        comparator.push_back({static_cast<int32_t>(w), static_cast<int32_t>(p), first[w], last[w], flip});
      }
    }
    start.push_back(static_cast<int64_t>(comparator.size()));
  }
};

template <typename acc_t>
struct Options {
  int64_t network, relaxation;
  acc_t s, lam;
};

// α = f(d) (kSlope: f'(d)) of `count` comparators, vectorised: the relaxation is a compile-time constant of each
// loop, so the inlined formula (cauchy's Cephes arctan included) has no calls and no branches left.
template <int64_t kRelaxation, bool kSlope, typename acc_t>
inline void relaxation_of(const acc_t* d, acc_t* out, int64_t count, acc_t s, acc_t lam) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j)
    out[j] = kSlope ? alpha_slope(d[j], kRelaxation, s, lam) : sortnet::alpha(d[j], kRelaxation, s, lam);
}

template <bool kSlope, typename acc_t>
PF_HOT void relaxation(const acc_t* d, acc_t* out, int64_t count, const Options<acc_t>& o) {
  switch (o.relaxation) {
    case kLogistic: return relaxation_of<kLogistic, kSlope>(d, out, count, o.s, o.lam);
    case kLogisticPhi: return relaxation_of<kLogisticPhi, kSlope>(d, out, count, o.s, o.lam);
    case kGaussian: return relaxation_of<kGaussian, kSlope>(d, out, count, o.s, o.lam);
    case kReciprocal: return relaxation_of<kReciprocal, kSlope>(d, out, count, o.s, o.lam);
    case kCauchy: return relaxation_of<kCauchy, kSlope>(d, out, count, o.s, o.lam);
    default: return relaxation_of<kOptimal, kSlope>(d, out, count, o.s, o.lam);
  }
}

// The vector loops above run over whole vectors of comparators (no scalar tail); their scratch is padded.
constexpr int64_t kPad = 8;
inline int64_t padded(int64_t count) { return (count + kPad - 1) / kPad * kPad; }

// Values forward of one list: x (m values, sorted in place), α per wire written to alpha (layers × n).
// scratch: a layer's differences and α.
template <typename acc_t>
void values_forward(const Schedule& net, const Options<acc_t>& o, acc_t* x, acc_t* alpha, int64_t n,
                    std::vector<acc_t>& scratch) {
  const int64_t width = padded(net.m / 2);
  scratch.assign(std::max<int64_t>(1, 2 * width), acc_t(0));
  acc_t* d = scratch.data();
  acc_t* al = d + width;
  for (int64_t l = 0; l < net.layers; ++l) {
    const int64_t c0 = net.start[l], count = net.start[l + 1] - c0;
    const Schedule::Comparator* k = net.comparator.data() + c0;
    for (int64_t j = 0; j < count; ++j) d[j] = x[k[j].hi] - x[k[j].lo];
    relaxation<false>(d, al, padded(count), o);
    for (int64_t j = 0; j < count; ++j) {
      const int32_t lo = k[j].lo, hi = k[j].hi;
      const acc_t a = x[lo], b = x[hi];
      acc_t own, other;
      mix_weights(al[j], k[j].flipped, own, other);
      x[lo] = own * a + other * b;
      x[hi] = own * b + other * a;
      alpha[l * n + lo] = al[j];
      alpha[l * n + hi] = al[j];
    }
  }
}

// The row loops work on whole 32-byte vectors (GCC vector extension; the default clone splits them in two): a
// block's R entries per wire are a multiple of the lane count, and a comparator's hull, rounded out to whole
// vectors, stays inside the block. The extra rows are structural zeros of Q (or rows past the list, zero too).
template <typename acc_t>
struct Lanes {
  static constexpr int64_t kCount = 32 / sizeof(acc_t);
  typedef acc_t Vec __attribute__((vector_size(32)));
  // (by reference: a vector passed by value changes the ABI between the target clones)
  static void load(Vec& v, const acc_t* p) { std::memcpy(&v, p, sizeof(Vec)); }
  static void store(acc_t* p, const Vec& v) { std::memcpy(p, &v, sizeof(Vec)); }
  static acc_t sum(const Vec& v) {  // pairwise: the order is fixed, whatever the target
    Vec t = v;
    for (int64_t h = kCount / 2; h >= 1; h /= 2)
      for (int64_t i = 0; i < h; ++i) t[i] += t[i + h];
    return t[0];
  }
};

template <typename acc_t>
inline int64_t whole_vectors(int64_t rows) {
  constexpr int64_t k = Lanes<acc_t>::kCount;
  return (rows + k - 1) / k * k;
}

// Rows [r0, r1) of comparator c in the block of rows [row0, row0 + rr), relative to row0 and rounded out to
// whole vectors; false when the comparator does not touch the block.
template <typename acc_t>
inline bool vector_rows(const Schedule& net, int64_t c, int64_t row0, int64_t rr, int64_t& r0, int64_t& r1) {
  constexpr int64_t k = Lanes<acc_t>::kCount;
  r0 = std::max<int64_t>(net.comparator[c].row_lo, row0) - row0;
  r1 = std::min<int64_t>(net.comparator[c].row_hi, row0 + rr) - row0;
  if (r0 >= r1) return false;
  r0 &= ~(k - 1);  // both >= 0 here
  r1 = (r1 + k - 1) & ~(k - 1);
  return true;
}

// One layer of the P-row block Q (wire-major, R entries per wire, rows [row0, row0 + rr) of P), in place,
// each comparator over its hull only. With kRecord, Q[lo] − Q[hi] entering each comparator is appended at D
// (what the backward needs of the trajectory); returns the end of what was appended.
template <bool kRecord, typename acc_t>
PF_HOT acc_t* rows_layer(const Schedule& net, int64_t l, const acc_t* alpha_l, acc_t* Q, int64_t R, int64_t row0,
                         int64_t rr, acc_t* D) {
  using V = Lanes<acc_t>;
  for (int64_t c = net.start[l]; c < net.start[l + 1]; ++c) {
    int64_t r0, r1;
    if (!vector_rows<acc_t>(net, c, row0, rr, r0, r1)) continue;
    const int32_t lo = net.comparator[c].lo, hi = net.comparator[c].hi;
    acc_t own, other;
    mix_weights(alpha_l[lo], net.comparator[c].flipped, own, other);
    const typename V::Vec vown = typename V::Vec{} + own, vother = typename V::Vec{} + other;
    acc_t* a = Q + lo * R;
    acc_t* b = Q + hi * R;
    for (int64_t r = r0; r < r1; r += V::kCount) {
      typename V::Vec av, bv;
      V::load(av, a + r);
      V::load(bv, b + r);
      if constexpr (kRecord) V::store(D + (r - r0), av - bv);
      V::store(a + r, vown * av + vother * bv);
      V::store(b + r, vown * bv + vother * av);
    }
    if constexpr (kRecord) D += r1 - r0;
  }
  return D;
}

// Identity rows [row0, row0 + R) of P, wire-major: the zeros outside the hulls stay exact from here on.
template <typename acc_t>
inline void identity_rows(acc_t* Q, int64_t m, int64_t R, int64_t row0) {
  std::fill(Q, Q + m * R, acc_t(0));
  for (int64_t r = 0; r < R && row0 + r < m; ++r) Q[(row0 + r) * R + r] = acc_t(1);
}

// Rows per block of the backward (whole vectors): the recorded differences of a block (≤ one R-vector per
// comparator) stay within the scratch budget.
template <typename acc_t>
inline int64_t rows_per_block(const Schedule& net) {
  const int64_t fit = kScratchElements / std::max<int64_t>(1, net.start.back()) / Lanes<acc_t>::kCount;
  return whole_vectors<acc_t>(std::max<int64_t>(1, std::min<int64_t>(net.m, fit * Lanes<acc_t>::kCount)));
}

// Pull the adjoint rows G back through layer l, adding ∂L/∂α to dalpha_l: D_end is the end of the layer's
// recorded differences (rows_layer<true>); returns their start. Only rows inside a comparator's hull (in whole
// vectors) are read or written: G[w] is consumed at the rows of w's hull only (the ∂L/∂α sum vanishes where
// Q[lo] − Q[hi] does, and the hull of w before a layer lies inside the one after it), so the entries outside
// keep stale values that nothing reads but those zero differences.
template <typename acc_t>
PF_HOT const acc_t* rows_layer_backward(const Schedule& net, int64_t l, const acc_t* alpha_l, const acc_t* D_end,
                                        acc_t* G, acc_t* dalpha_l, int64_t R, int64_t row0, int64_t rr) {
  using V = Lanes<acc_t>;
  const acc_t* D = D_end;
  for (int64_t c = net.start[l + 1] - 1; c >= net.start[l]; --c) {
    int64_t r0, r1;
    if (!vector_rows<acc_t>(net, c, row0, rr, r0, r1)) continue;
    D -= r1 - r0;
    const int32_t lo = net.comparator[c].lo, hi = net.comparator[c].hi;
    const bool flip = net.comparator[c].flipped;
    acc_t own, other;
    mix_weights(alpha_l[lo], flip, own, other);
    const typename V::Vec vown = typename V::Vec{} + own, vother = typename V::Vec{} + other;
    acc_t* ga = G + lo * R;
    acc_t* gb = G + hi * R;
    typename V::Vec acc{};
    for (int64_t r = r0; r < r1; r += V::kCount) {
      typename V::Vec gl, gh, d;
      V::load(gl, ga + r);
      V::load(gh, gb + r);
      V::load(d, D + (r - r0));
      acc += (gl - gh) * d;
      V::store(ga + r, vown * gl + vother * gh);
      V::store(gb + r, vother * gl + vown * gh);
    }
    const acc_t total = V::sum(acc);
    dalpha_l[lo] += flip ? -total : total;
  }
  return D;
}

// Adjoint of the values, given ∂L/∂α from the P part (dalpha, layers × n, indexed at lo): g (m) holds ∂L/∂values
// on entry and ∂L/∂x on exit. The values are re-run from x0 and the saved α, keeping each comparator's
// difference d = b − a and slope f'(d) (scratch; a − b = −d exactly).
template <typename acc_t>
void values_backward(const Schedule& net, const Options<acc_t>& o, const acc_t* x0, const acc_t* alpha,
                     const acc_t* dalpha, int64_t n, acc_t* g, std::vector<acc_t>& scratch) {
  const int64_t m = net.m, comparators = net.start.back();
  scratch.resize(m + 2 * (comparators + kPad));
  acc_t* x = scratch.data();
  acc_t* diff = x + m;
  acc_t* slope = diff + comparators + kPad;
  std::copy(x0, x0 + m, x);
  std::fill(diff + comparators, diff + comparators + kPad, acc_t(0));  // read by the last layer's vectors
  for (int64_t l = 0; l < net.layers; ++l) {
    const int64_t c0 = net.start[l], count = net.start[l + 1] - c0;
    for (int64_t c = c0; c < c0 + count; ++c) diff[c] = x[net.comparator[c].hi] - x[net.comparator[c].lo];
    // past the layer's end this reads the next layers' (or the zeroed) differences: their slopes get rewritten
    relaxation<true>(diff + c0, slope + c0, padded(count), o);
    if (l + 1 == net.layers) break;  // the last layer's output is not needed
    for (int64_t c = c0; c < c0 + count; ++c) {
      const int32_t lo = net.comparator[c].lo, hi = net.comparator[c].hi;
      acc_t own, other;
      mix_weights(alpha[l * n + lo], net.comparator[c].flipped, own, other);
      const acc_t a = x[lo], b = x[hi];
      x[lo] = own * a + other * b;
      x[hi] = own * b + other * a;
    }
  }
  for (int64_t l = net.layers - 1; l >= 0; --l) {
    for (int64_t c = net.start[l]; c < net.start[l + 1]; ++c) {
      const int32_t lo = net.comparator[c].lo, hi = net.comparator[c].hi;
      const bool flip = net.comparator[c].flipped;
      acc_t own, other;
      mix_weights(alpha[l * n + lo], flip, own, other);
      const acc_t gl = g[lo], gh = g[hi];
      acc_t d_alpha = (gl - gh) * -diff[c];
      if (flip) d_alpha = -d_alpha;
      if (dalpha != nullptr) d_alpha += dalpha[l * n + lo];
      const acc_t d_d = d_alpha * slope[c];
      g[lo] = own * gl + other * gh - d_d;
      g[hi] = other * gl + own * gh + d_d;
    }
  }
}

// P part of the backward for one list: accumulates ∂L/∂α (dalpha, layers × n at lo) for the adjoint rows that
// `seed(row0, rr, R, Q_final, G)` writes into G (wire-major, like Q; zero elsewhere) given the block's final
// rows Q_final. Each row block is re-run forward in place, recording what the backward reads (rows_layer).
template <typename acc_t, typename Seed>
void rows_backward(const Schedule& net, const acc_t* alpha, int64_t n, acc_t* dalpha, std::vector<acc_t>& Q,
                   std::vector<acc_t>& traj, std::vector<acc_t>& G, const Seed& seed) {
  const int64_t L = net.layers, m = net.m;
  const int64_t R = rows_per_block<acc_t>(net);
  Q.resize(m * R);
  G.resize(m * R);
  traj.resize(std::max<int64_t>(1, net.start.back() * R));
  std::fill(dalpha, dalpha + L * n, acc_t(0));
  for (int64_t row0 = 0; row0 < m; row0 += R) {
    const int64_t rr = std::min(R, m - row0);
    identity_rows(Q.data(), m, R, row0);
    acc_t* D = traj.data();
    for (int64_t l = 0; l < L; ++l) D = rows_layer<true>(net, l, alpha + l * n, Q.data(), R, row0, rr, D);
    std::fill(G.begin(), G.end(), acc_t(0));
    seed(row0, rr, R, Q.data(), G.data());
    const acc_t* D_end = D;
    for (int64_t l = L - 1; l >= 0; --l)
      D_end = rows_layer_backward(net, l, alpha + l * n, D_end, G.data(), dalpha + l * n, R, row0, rr);
  }
}

// One 8 × 8 tile of floats: dst[c · dst_stride + r] = src[r · src_stride + c], through registers (three rounds of
// two-vector shuffles; AVX2 has each as one instruction, the default clone gets them in halves).
inline void transpose_tile(const float* __restrict src, int64_t src_stride, float* __restrict dst, int64_t dst_stride) {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t M __attribute__((vector_size(32)));
  V r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * src_stride, sizeof(V));
  const M pairs_lo = {0, 8, 1, 9, 4, 12, 5, 13}, pairs_hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const M quads_lo = {0, 1, 8, 9, 4, 5, 12, 13}, quads_hi = {2, 3, 10, 11, 6, 7, 14, 15};
  const M halves_lo = {0, 1, 2, 3, 8, 9, 10, 11}, halves_hi = {4, 5, 6, 7, 12, 13, 14, 15};
  for (int i = 0; i < 8; i += 2) {  // t[i] = r[i][0] r[i+1][0] r[i][1] r[i+1][1] | the same for columns 4, 5
    t[i] = __builtin_shuffle(r[i], r[i + 1], pairs_lo);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], pairs_hi);
  }
  for (int i = 0; i < 8; i += 4)  // u[i + k]: rows i..i+3 of columns k and k + 4
    for (int k = 0; k < 2; ++k) {
      u[i + 2 * k] = __builtin_shuffle(t[i + k], t[i + k + 2], quads_lo);
      u[i + 2 * k + 1] = __builtin_shuffle(t[i + k], t[i + k + 2], quads_hi);
    }
  for (int k = 0; k < 4; ++k) {
    const V column = __builtin_shuffle(u[k], u[k + 4], halves_lo), column4 = __builtin_shuffle(u[k], u[k + 4], halves_hi);
    std::memcpy(dst + k * dst_stride, &column, sizeof(V));
    std::memcpy(dst + (k + 4) * dst_stride, &column4, sizeof(V));
  }
}

// dst[c · dst_stride + r] = src[r · src_stride + c] for r < rows, c < cols: whole 8 × 8 tiles through registers
// (float) or a small array the compiler unrolls, the ragged edges element by element.
template <typename acc_t>
PF_HOT void transpose(const acc_t* __restrict src, int64_t src_stride, int64_t rows, int64_t cols,
                      acc_t* __restrict dst, int64_t dst_stride) {
  constexpr int64_t T = 8;
  const int64_t full_rows = rows / T * T, full_cols = cols / T * T;
  for (int64_t r0 = 0; r0 < full_rows; r0 += T)
    for (int64_t c0 = 0; c0 < full_cols; c0 += T) {
      if constexpr (std::is_same_v<acc_t, float>) {
        transpose_tile(src + r0 * src_stride + c0, src_stride, dst + c0 * dst_stride + r0, dst_stride);
      } else {
        acc_t tile[T][T];
        for (int64_t r = 0; r < T; ++r)
          for (int64_t c = 0; c < T; ++c) tile[c][r] = src[(r0 + r) * src_stride + c0 + c];
        for (int64_t c = 0; c < T; ++c)
          for (int64_t r = 0; r < T; ++r) dst[(c0 + c) * dst_stride + r0 + r] = tile[c][r];
      }
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < full_rows ? full_cols : 0; c < cols; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
}

void check_common(const at::Tensor& x, int64_t network, int64_t relaxation, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": expected (lists, n) scores");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": scores must be float32 or float64 (prefrank.ops upcasts)");
  TORCH_CHECK(network >= 0 && network < kNetworkCount, op, ": unknown network code ", network);
  TORCH_CHECK(relaxation >= 0 && relaxation < kRelaxationCount, op, ": unknown relaxation code ", relaxation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sortnet_forward_cpu(const at::Tensor& x_in, int64_t network,
                                                                   int64_t relaxation, double steepness,
                                                                   double art_lambda, bool with_perm) {
  check_common(x_in, network, relaxation, "sortnet_forward");
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), n = x.size(1), L = num_layers(network, n);
  at::Tensor values = at::empty({B, n}, x.options());
  at::Tensor perm = with_perm ? at::empty({B, n, n}, x.options()) : at::empty({0}, x.options());
  at::Tensor alpha = at::zeros({B, L, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sortnet_forward", [&] {
    using acc_t = scalar_t;
    const Schedule net(network, n);
    const Options<acc_t> o{network, relaxation, static_cast<acc_t>(steepness), static_cast<acc_t>(art_lambda)};
    const acc_t* xp = x.const_data_ptr<acc_t>();
    acc_t* vp = values.mutable_data_ptr<acc_t>();
    acc_t* pp = with_perm ? perm.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* ap = alpha.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      const int64_t R = whole_vectors<acc_t>(n);  // all rows at once: one wire-major block
      std::vector<acc_t> Q(with_perm ? n * R : 0), scratch;
      for (int64_t b = begin; b < end; ++b) {
        acc_t* v = vp + b * n;
        std::copy(xp + b * n, xp + (b + 1) * n, v);
        acc_t* al = ap + b * L * n;
        values_forward(net, o, v, al, n, scratch);
        if (!with_perm) continue;
        identity_rows(Q.data(), n, R, 0);
        for (int64_t l = 0; l < L; ++l) rows_layer<false>(net, l, al + l * n, Q.data(), R, 0, n, Q.data());
        transpose(Q.data(), R, n, n, pp + b * n * n, n);  // P[i, w] = Q[w][i]
      }
    });
  });
  return {values, perm, alpha};
}

at::Tensor sortnet_backward_cpu(const at::Tensor& grad_values, const std::optional<at::Tensor>& grad_perm,
                                const at::Tensor& x_in, const at::Tensor& alpha_in, int64_t network,
                                int64_t relaxation, double steepness, double art_lambda) {
  check_common(x_in, network, relaxation, "sortnet_backward");
  const at::Tensor x = x_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t B = x.size(0), n = x.size(1), L = num_layers(network, n);
  TORCH_CHECK(alpha.sizes() == at::IntArrayRef({B, L, n}), "sortnet_backward: alpha has the wrong shape");
  at::Tensor grad = grad_values.to(x.scalar_type()).expand({B, n}).contiguous().clone();
  const bool with_perm = grad_perm.has_value() && grad_perm->defined() && grad_perm->numel() > 0;
  at::Tensor gp;
  if (with_perm) gp = grad_perm->to(x.scalar_type()).expand({B, n, n}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sortnet_backward", [&] {
    using acc_t = scalar_t;
    const Schedule net(network, n);
    const Options<acc_t> o{network, relaxation, static_cast<acc_t>(steepness), static_cast<acc_t>(art_lambda)};
    const acc_t* xp = x.const_data_ptr<acc_t>();
    const acc_t* ap = alpha.const_data_ptr<acc_t>();
    const acc_t* gpp = with_perm ? gp.const_data_ptr<acc_t>() : nullptr;
    acc_t* gx = grad.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch, Q, traj, G, dalpha(with_perm ? std::max<int64_t>(1, L * n) : 0);
      for (int64_t b = begin; b < end; ++b) {
        const acc_t* al = ap + b * L * n;
        if (with_perm) {
          const acc_t* Gb = gpp + b * n * n;
          rows_backward(net, al, n, dalpha.data(), Q, traj, G,
                        [&](int64_t row0, int64_t rr, int64_t R, const acc_t*, acc_t* Gw) {
                          transpose(Gb + row0 * n, n, rr, n, Gw, R);  // G[w][r] = ∂L/∂P[row0 + r, w]
                        });
        }
        values_backward(net, o, xp + b * n, al, with_perm ? dalpha.data() : nullptr, n, gx + b * n, scratch);
      }
    });
  });
  return grad;
}

// ---- fused rank losses: y = the list's valid scores (negated: best first), m = sizes[b] of them ----

void check_loss_inputs(const at::Tensor& y, const at::Tensor& sizes, const at::Tensor& lo, const at::Tensor& hi,
                       int64_t target) {
  TORCH_CHECK(target >= 0 && target < kTargetCount, "sortnet_loss: unknown target code ", target);
  TORCH_CHECK(sizes.scalar_type() == at::kLong && lo.scalar_type() == at::kLong && hi.scalar_type() == at::kLong,
              "sortnet_loss: sizes/lo/hi must be int64");
  TORCH_CHECK(sizes.dim() == 1 && sizes.size(0) == y.size(0), "sortnet_loss: sizes must be (lists,)");
  TORCH_CHECK(lo.sizes() == y.sizes() && hi.sizes() == y.sizes(), "sortnet_loss: lo/hi must match y");
}

// Loss of one final row block (wire-major rows Q) and, when G != nullptr, ∂loss/∂Q for those rows.
// block: Σ_rows −log(Σ_{w∈[lo,hi)} Q[w][r]) / m;  permutation: Σ_rows Σ_w BCE(Q[w][r], [w == lo]) / m².
template <typename acc_t>
acc_t rows_loss(int64_t target, const acc_t* Q, int64_t R, int64_t rr, int64_t m, const int64_t* lo,
                const int64_t* hi, acc_t scale, acc_t* G) {
  acc_t total = acc_t(0);
  for (int64_t r = 0; r < rr; ++r) {
    if (target == kBlock) {
      acc_t mass = acc_t(0);
      for (int64_t w = lo[r]; w < hi[r]; ++w) mass += Q[w * R + r];
      const acc_t tiny = std::numeric_limits<acc_t>::min();
      total -= log_(mass < tiny ? tiny : mass) / acc_t(m);
      if (G != nullptr && mass >= tiny)
        for (int64_t w = lo[r]; w < hi[r]; ++w) G[w * R + r] = -scale / (acc_t(m) * mass);
      continue;
    }
    const acc_t mm = acc_t(m) * acc_t(m);
    for (int64_t w = 0; w < m; ++w) {
      const acc_t raw = Q[w * R + r];
      const acc_t p = raw < acc_t(0) ? acc_t(0) : (raw > acc_t(1) ? acc_t(1) : raw);
      const bool one = w == lo[r];
      // torch's binary_cross_entropy: logs clamped at -100, gradient (p − q)/max(p(1−p), 1e-12)
      const acc_t lg = one ? log_(p) : log1p_(-p);
      total -= (lg < acc_t(-100) ? acc_t(-100) : lg) / mm;
      if (G != nullptr && raw >= acc_t(0) && raw <= acc_t(1)) {
        const acc_t denom = std::max(p * (acc_t(1) - p), acc_t(1e-12));
        G[w * R + r] = scale * (p - acc_t(one)) / denom / mm;
      }
    }
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor> sortnet_loss_forward_cpu(const at::Tensor& y_in, const at::Tensor& sizes_in,
                                                            const at::Tensor& lo_in, const at::Tensor& hi_in,
                                                            int64_t target, int64_t network, int64_t relaxation,
                                                            double steepness, double art_lambda) {
  check_common(y_in, network, relaxation, "sortnet_loss_forward");
  check_loss_inputs(y_in, sizes_in, lo_in, hi_in, target);
  const at::Tensor y = y_in.contiguous(), sizes = sizes_in.contiguous(), lo = lo_in.contiguous(),
                   hi = hi_in.contiguous();
  const int64_t B = y.size(0), n = y.size(1), L = num_layers(network, n);
  at::Tensor loss = at::empty({B}, y.options());
  at::Tensor alpha = at::zeros({B, L, n}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "sortnet_loss_forward", [&] {
    using acc_t = scalar_t;
    const acc_t* yp = y.const_data_ptr<acc_t>();
    const int64_t* mp = sizes.const_data_ptr<int64_t>();
    const int64_t* lop = lo.const_data_ptr<int64_t>();
    const int64_t* hip = hi.const_data_ptr<int64_t>();
    acc_t* lp = loss.mutable_data_ptr<acc_t>();
    acc_t* ap = alpha.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x(n), Q, scratch;
      std::optional<Schedule> schedule;  // rebuilt only when the list size changes
      for (int64_t b = begin; b < end; ++b) {
        const int64_t m = mp[b];
        if (!schedule || schedule->m != m) schedule.emplace(network, m);
        const Schedule& net = *schedule;
        const Options<acc_t> o{network, relaxation, static_cast<acc_t>(steepness),
                               static_cast<acc_t>(art_lambda)};
        std::copy(yp + b * n, yp + b * n + m, x.data());
        acc_t* al = ap + b * L * n;
        values_forward(net, o, x.data(), al, n, scratch);
        const int64_t R = whole_vectors<acc_t>(std::max<int64_t>(1, std::min<int64_t>(m, 64)));
        Q.resize(std::max<int64_t>(1, m * R));
        acc_t total = acc_t(0);
        for (int64_t row0 = 0; row0 < m; row0 += R) {
          const int64_t rr = std::min(R, m - row0);
          identity_rows(Q.data(), m, R, row0);
          for (int64_t l = 0; l < net.layers; ++l)
            rows_layer<false>(net, l, al + l * n, Q.data(), R, row0, rr, Q.data());
          total += rows_loss<acc_t>(target, Q.data(), R, rr, m, lop + b * n + row0, hip + b * n + row0,
                                    acc_t(0), nullptr);
        }
        lp[b] = total;
      }
    });
  });
  return {loss, alpha};
}

at::Tensor sortnet_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& y_in,
                                     const at::Tensor& sizes_in, const at::Tensor& lo_in, const at::Tensor& hi_in,
                                     const at::Tensor& alpha_in, int64_t target, int64_t network,
                                     int64_t relaxation, double steepness, double art_lambda) {
  check_common(y_in, network, relaxation, "sortnet_loss_backward");
  check_loss_inputs(y_in, sizes_in, lo_in, hi_in, target);
  const at::Tensor y = y_in.contiguous(), sizes = sizes_in.contiguous(), lo = lo_in.contiguous(),
                   hi = hi_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t B = y.size(0), n = y.size(1), L = num_layers(network, n);
  TORCH_CHECK(alpha.sizes() == at::IntArrayRef({B, L, n}), "sortnet_loss_backward: alpha has the wrong shape");
  const at::Tensor gl = grad_loss.to(y.scalar_type()).expand({B}).contiguous();
  at::Tensor grad = at::zeros({B, n}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "sortnet_loss_backward", [&] {
    using acc_t = scalar_t;
    const acc_t* yp = y.const_data_ptr<acc_t>();
    const int64_t* mp = sizes.const_data_ptr<int64_t>();
    const int64_t* lop = lo.const_data_ptr<int64_t>();
    const int64_t* hip = hi.const_data_ptr<int64_t>();
    const acc_t* ap = alpha.const_data_ptr<acc_t>();
    const acc_t* glp = gl.const_data_ptr<acc_t>();
    acc_t* gy = grad.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch, Q, traj, G, dalpha(std::max<int64_t>(1, L * n));
      std::optional<Schedule> schedule;  // rebuilt only when the list size changes
      for (int64_t b = begin; b < end; ++b) {
        const int64_t m = mp[b];
        if (m == 0) continue;
        if (!schedule || schedule->m != m) schedule.emplace(network, m);
        const Schedule& net = *schedule;
        const Options<acc_t> o{network, relaxation, static_cast<acc_t>(steepness),
                               static_cast<acc_t>(art_lambda)};
        const acc_t* al = ap + b * L * n;
        rows_backward(net, al, n, dalpha.data(), Q, traj, G,
                      [&](int64_t row0, int64_t rr, int64_t R, const acc_t* Qf, acc_t* Gw) {
                        rows_loss<acc_t>(target, Qf, R, rr, m, lop + b * n + row0, hip + b * n + row0, glp[b],
                                         Gw);
                      });
        values_backward(net, o, yp + b * n, al, dalpha.data(), n, gy + b * n, scratch);
      }
    });
  });
  return grad;
}

}  // namespace

// Private kernels of the prefrank::sortnet_* custom ops (prefrank/sortnet.py); users never call these.
TORCH_LIBRARY_FRAGMENT(prefrank_C, m) {
  m.def("sortnet_forward(Tensor x, int network, int relaxation, float steepness, float art_lambda, "
        "bool with_perm) -> (Tensor, Tensor, Tensor)");
  m.def("sortnet_backward(Tensor grad_values, Tensor? grad_perm, Tensor x, Tensor alpha, int network, "
        "int relaxation, float steepness, float art_lambda) -> Tensor");
  m.def("sortnet_loss_forward(Tensor y, Tensor sizes, Tensor lo, Tensor hi, int target, int network, "
        "int relaxation, float steepness, float art_lambda) -> (Tensor, Tensor)");
  m.def("sortnet_loss_backward(Tensor grad_loss, Tensor y, Tensor sizes, Tensor lo, Tensor hi, Tensor alpha, "
        "int target, int network, int relaxation, float steepness, float art_lambda) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefrank_C, CPU, m) {
  m.impl("sortnet_forward", &sortnet_forward_cpu);
  m.impl("sortnet_backward", &sortnet_backward_cpu);
  m.impl("sortnet_loss_forward", &sortnet_loss_forward_cpu);
  m.impl("sortnet_loss_backward", &sortnet_loss_backward_cpu);
}

}  // namespace prefrank

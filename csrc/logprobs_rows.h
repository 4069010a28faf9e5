// Per-row kernels of the sequence log-probs CPU op (see logprobs_cpu.cpp for the maths).
//
// Deliberately without an include guard: logprobs_cpu.cpp includes this file once per instruction set
// (AVX-512 and AVX2 on x86, plus the baseline target) inside a namespace under `#pragma GCC target`, so every helper is compiled
// for the same target as the loop that inlines it (gcc does not inline across target mismatches, and an
// exp or conversion left as a call keeps the loop scalar), then picks the variant at run time.
// Needs <algorithm>, <cmath>, <cstdint>, <cstring>, <limits> and c10's Half/BFloat16 included before.

// exp for float that gcc vectorises under `omp simd` (libm's expf is a scalar call). Inputs here are
// ≤ ~0 (logit − max or logit − lse); below -87 the result underflows to 0. NaN propagates.
__attribute__((always_inline)) inline float vec_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  // round-to-nearest of xc·log2(e) with the 1.5·2^23 trick (vectorises, unlike roundf)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;  // ln2 split hi/lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}
__attribute__((always_inline)) inline double vec_exp(double x) { return std::exp(x); }

// Bit casts and selects for the branch-free Half/BFloat16 conversions below.
__attribute__((always_inline)) inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
__attribute__((always_inline)) inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}
// cond ? a : b with bit masks: a `?:` on integers becomes control flow that stops the vectoriser
__attribute__((always_inline)) inline uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

// How a storage type is read and written in the row loops: raw element type, accumulator, load, store.
// Half/BFloat16 rows are handled as raw uint16_t bits with branch-free conversions, always inlined, so gcc
// vectorises the loops (c10's own conversions branch on NaN, which keeps a loop scalar).
template <typename scalar_t>
struct Elem {  // float, double
  using raw = scalar_t;
  using acc = scalar_t;
  __attribute__((always_inline)) static acc load(raw x) { return x; }
  __attribute__((always_inline)) static raw store(acc x) { return x; }
};

template <>
struct Elem<c10::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  __attribute__((always_inline)) static float load(uint16_t x) { return bits_to_float(uint32_t(x) << 16); }
  // round to nearest even; NaN stays NaN
  __attribute__((always_inline)) static uint16_t store(float x) {
    const uint32_t bits = float_to_bits(x);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(select_bits((bits & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded));
  }
};

template <>
struct Elem<c10::Half> {
  using raw = uint16_t;
  using acc = float;
  // IEEE half → float (the algorithm of c10::detail::fp16_ieee_to_fp32_value)
  __attribute__((always_inline)) static float load(uint16_t x) {
    const uint32_t w = uint32_t(x) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_to_float(
        sign | select_bits(two_w < (1u << 27), float_to_bits(denormalized), float_to_bits(normalized)));
  }
  // float → IEEE half, round to nearest even (the algorithm of c10::detail::fp16_ieee_from_fp32_value)
  __attribute__((always_inline)) static uint16_t store(float x) {
    float base = (__builtin_fabsf(x) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_to_bits(x);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<uint16_t>((sign >> 16) | select_bits(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
  }
};

// Partial sums of row_lse: lane l adds the terms v ≡ l (mod kSumLanes), then the lanes are added pairwise.
// The order of the additions, and so the rounding, is written here rather than left to the vectoriser: it is
// the same for every instruction set (AVX-512, AVX2, NEON, a build that vectorises nothing), and no build
// adds a whole vocabulary into one fp32 accumulator (aarch64's GCC 12 left the `omp simd` reduction scalar:
// 4.6e-4 off at V = 262147, against 1.3e-5 on x86).
constexpr int64_t kSumLanes = 16;

// log Σ_v exp(x_v · inv_temp) of one row (two passes: max, then the sum; the row stays in cache).
template <typename E>
typename E::acc row_lse(const typename E::raw* x, int64_t V, typename E::acc inv_temp) {
  using acc_t = typename E::acc;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) {
    const acc_t xv = E::load(x[v]);
    m = xv > m ? xv : m;
  }
  const acc_t shift = m * inv_temp;  // temperature > 0 keeps the argmax
  // a row of -inf only: log 0 (the reference's log_softmax gives NaN logps there too)
  if (shift == -std::numeric_limits<acc_t>::infinity()) return shift;
  acc_t lane[kSumLanes] = {};
  const int64_t full = V - V % kSumLanes;
  for (int64_t v = 0; v < full; v += kSumLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kSumLanes; ++l) lane[l] += vec_exp(E::load(x[v + l]) * inv_temp - shift);
  }
  for (int64_t v = full; v < V; ++v) lane[v - full] += vec_exp(E::load(x[v]) * inv_temp - shift);
  for (int64_t width = kSumLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lane[l] += lane[l + width];
  }
  return shift + std::log(lane[0]);
}

// out_v = −scale · exp(x_v · inv_temp − lse), then out_y += scale (δ term). out may alias x.
template <typename E>
void row_grad(const typename E::raw* x, typename E::raw* out, int64_t V, int64_t label, typename E::acc inv_temp,
              typename E::acc lse, typename E::acc scale) {
  using acc_t = typename E::acc;
  const acc_t p_label = vec_exp(E::load(x[label]) * inv_temp - lse);  // read before an in-place write
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] = E::store(-scale * vec_exp(E::load(x[v]) * inv_temp - lse));
  out[label] = E::store(scale * (acc_t(1) - p_label));
}

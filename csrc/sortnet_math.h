// Differentiable sorting networks: comparator schedules and the six relaxations, shared by the CPU kernels
// (sortnet_cpu.cpp) and any CUDA code; the Triton kernels (triton_kernels/sortnet.py) mirror these formulas.
//
// Schedule (identical to the diffsort package, see prefrank/networks.py): in layer `layer` of a network on m
// wires, wire w is paired with partner(w) (== w: passes through). For a comparator on wires lo < hi,
// α = f(x_hi − x_lo) and, unless the comparator is "flipped" (sends the minimum to hi, bitonic's descending
// sub-blocks):  x_lo ← α·x_lo + (1−α)·x_hi,  x_hi ← (1−α)·x_lo + α·x_hi.  Flipped: α and 1−α trade places.
//
// Relaxations f(d) of the difference d = x_hi − x_lo with steepness s (diffsort's formulas, z = s·d):
//   logistic      σ(z)                                   f' = s·σ(z)(1−σ(z))
//   logistic_phi  σ(s·d/(|d|+ε)^λ), ε = 1e-10 (ART)      f' = σ'·s/(|d|+ε)^λ·(1 − λ|d|/(|d|+ε))
//   gaussian      Φ(z) = ½ + ½·erf(z/√2)                  f' = s/√(2π)·exp(−z²/2)
//   reciprocal    ½(z/(2+|z|) + 1)                        f' = s/(2+|z|)²
//   cauchy        atan(z)/π + ½                           f' = s/(π(1+z²))
//   optimal       z+½ on |z|≤¼, 1−1/(16z) above, −1/(16z) below (ε = 1e-10 in the denominator)
//                                                         f' = s on |z|≤¼, s/(16(|z|+ε)²) outside
#pragma once

#include "common_math.h"
#include "options.h"

namespace prefrank {
namespace sortnet {

// Network, Relaxation and Target codes: the generated options.h (one source: prefrank/_options.py).
using namespace ::prefrank::options;

// arctan by Cephes' rational approximation (accurate to double rounding): inline arithmetic instead of a libm
// call, ~5x cheaper on the CPU, and the exact formula the Triton kernels use.
template <typename acc_t>
PF_HD acc_t atan_(acc_t x) {
  // Branch-free (every operation unconditional, then selects; ax / 1 is exact) so that a loop over comparators
  // vectorises without assuming that floating-point operations cannot trap.
  const acc_t ax = x < acc_t(0) ? -x : x;
  const bool big = ax > acc_t(2.414213562373095);
  const bool mid = ax > acc_t(0.66);  // only where !big
  const acc_t below = ax - acc_t(1), above = ax + acc_t(1);
  const acc_t t = (big ? acc_t(-1) : (mid ? below : ax)) / (big ? ax : (mid ? above : acc_t(1)));
  const acc_t z = t * t;
  const acc_t p = (((acc_t(-8.750608600031904122785e-1) * z - acc_t(1.615753718733365076637e1)) * z -
                    acc_t(7.500855792314704667340e1)) * z - acc_t(1.228866684490136173410e2)) * z -
                  acc_t(6.485021904942025371773e1);
  const acc_t q = ((((z + acc_t(2.485846490142306297962e1)) * z + acc_t(1.650270098316988542046e2)) * z +
                    acc_t(4.328810604912902668951e2)) * z + acc_t(4.853903996359136964868e2)) * z +
                  acc_t(1.945506571482613964425e2);
  const acc_t r = t * (z * p / q) + t;
  const acc_t r_big = acc_t(1.5707963267948966) + r, r_mid = acc_t(0.7853981633974483) + r;
  const acc_t y = big ? r_big : (mid ? r_mid : r);
  return x < acc_t(0) ? -y : y;
}
// fp32: evaluated in double and rounded once, which is what torch's fp32 atan (hence diffsort) returns nearly
// always; α differences of an ulp get amplified through the layers at high steepness.
PF_HD float atan_(float x) { return static_cast<float>(atan_<double>(static_cast<double>(x))); }
PF_HD float erf_(float x) { return ::erff(x); }
PF_HD double erf_(double x) { return ::erf(x); }
PF_HD float pow_(float x, float y) { return ::powf(x, y); }
PF_HD double pow_(double x, double y) { return ::pow(x, y); }
PF_HD float abs_(float x) { return ::fabsf(x); }
PF_HD double abs_(double x) { return ::fabs(x); }

// Number of bitonic blocks K = ceil(log2 m): the bitonic network runs on 2^K wires.
PF_HD int64_t bitonic_blocks(int64_t m) {
  int64_t k = 0;
  while ((int64_t(1) << k) < m) ++k;
  return k;
}

PF_HD int64_t num_layers(int64_t network, int64_t m) {
  if (network == kOddEven) return m;
  const int64_t k = bitonic_blocks(m);
  return k * (k + 1) / 2;
}

// Partner of wire w in `layer` of the network on m wires (w itself for a pass-through); *flipped is set when
// the comparator sends the minimum to the higher wire.
PF_HD int64_t partner(int64_t network, int64_t m, int64_t layer, int64_t w, bool* flipped) {
  *flipped = false;
  if (network == kOddEven) {
    const int64_t shifted = layer & 1;  // even layers pair (0,1),(2,3)…; odd layers (1,2),(3,4)…
    if (w < shifted) return w;
    const int64_t p = ((w - shifted) ^ 1) + shifted;
    return p < m ? p : w;
  }
  const int64_t k = bitonic_blocks(m);
  const int64_t offset = (int64_t(1) << k) - m;  // the dropped wires are the top ones: padded index < offset
  int64_t block = 0;
  while ((block + 1) * (block + 2) / 2 <= layer) ++block;
  const int64_t step = layer - block * (block + 1) / 2;
  const int64_t q = w + offset;
  const int64_t pq = q ^ (int64_t(1) << (block - step));
  if (pq < offset) return w;
  *flipped = ((q >> (block + 1)) & 1) != 0;
  return pq - offset;
}

// The comparator's mixing weights seen from one wire: x_w ← own·x_w + other·x_partner, (own, other) =
// (α, 1−α), swapped when the comparator is flipped. The only place this rule is written in C++.
template <typename acc_t>
PF_HD void mix_weights(acc_t alpha, bool flipped, acc_t& own, acc_t& other) {
  own = flipped ? acc_t(1) - alpha : alpha;
  other = flipped ? alpha : acc_t(1) - alpha;
}

template <typename acc_t>
PF_HD acc_t sigmoid_(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp_(-z));
}

// α = f(d) for d = x_hi − x_lo, written as diffsort writes it (so results agree to the last bits).
template <typename acc_t>
PF_HD acc_t alpha(acc_t d, int64_t relaxation, acc_t s, acc_t lam) {
  switch (relaxation) {
    case kLogistic:
      return sigmoid_(d * s);
    case kLogisticPhi:
      return sigmoid_(d * s / pow_(abs_(d) + acc_t(1e-10), lam));
    case kGaussian:
      return acc_t(0.5) + acc_t(0.5) * erf_(d / (acc_t(1) / s) / acc_t(1.4142135623730951));
    case kReciprocal: {
      const acc_t z = s * d;
      return acc_t(0.5) * (z / (acc_t(2) + abs_(z)) + acc_t(1));
    }
    case kCauchy:
      return acc_t(0.3183098861837907) * atan_(s * d) + acc_t(0.5);  // (1/π rounded once, as torch does)
    default: {  // kOptimal
      const acc_t z = s * d;
      const acc_t inner = z < acc_t(-0.25) ? acc_t(-0.25) : (z > acc_t(0.25) ? acc_t(0.25) : z);
      const acc_t outside = acc_t(z > acc_t(0.25)) - acc_t(z < acc_t(-0.25));
      return inner + acc_t(0.5) + outside * (acc_t(0.25) - acc_t(1) / acc_t(16) / (abs_(z) + acc_t(1e-10)));
    }
  }
}

// dα/dd (the relaxation's slope), matching autograd of the formulas above (diffsort's NormalCDF backward
// for gaussian).
template <typename acc_t>
PF_HD acc_t alpha_slope(acc_t d, int64_t relaxation, acc_t s, acc_t lam) {
  switch (relaxation) {
    case kLogistic: {
      const acc_t a = sigmoid_(d * s);
      return s * a * (acc_t(1) - a);
    }
    case kLogisticPhi: {
      const acc_t r = abs_(d) + acc_t(1e-10);
      const acc_t scale = s / pow_(r, lam);
      const acc_t a = sigmoid_(d * scale);
      return a * (acc_t(1) - a) * scale * (acc_t(1) - lam * abs_(d) / r);
    }
    case kGaussian: {
      const acc_t z = d * s;
      return s / acc_t(2.5066282746310002) * exp_(acc_t(-0.5) * z * z);
    }
    case kReciprocal: {
      const acc_t t = acc_t(2) + abs_(s * d);
      return s / (t * t);
    }
    case kCauchy: {
      const acc_t z = s * d;
      return s / (acc_t(3.141592653589793) * (acc_t(1) + z * z));
    }
    default: {  // kOptimal
      const acc_t z = abs_(s * d);
      if (z <= acc_t(0.25)) return s;
      const acc_t t = z + acc_t(1e-10);
      return s / (acc_t(16) * t * t);
    }
  }
}

}  // namespace sortnet
}  // namespace prefrank

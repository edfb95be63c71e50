// The numerics every backend shares (README "Method" §1), for the C++ sources: the CPU ops (csrc/cpu) and the
// CUDA kernels and binding (csrc/cuda) include this one header. vqkernels/numerics.py holds the same values for
// Python (the reference and the Triton launchers); vqkernels._C exposes the constants below so that a test can
// check that the two agree. Plain C++17 with no torch or CUDA headers, so `nvcc -c` and the host compiler both
// take it; every function that device code calls is VQK_HD.
#pragma once

#include <math.h>
#include <stdint.h>

#include <string_view>

#ifdef __CUDACC__
#define VQK_HD __host__ __device__
#else
#define VQK_HD
#endif

namespace vqkernels::numerics {

// ---- constants --------------------------------------------------------------------------------------------------

// The cosine distance clamps both norms at this: 1 - x.c / (max(|x|, eps) max(|c|, eps)).
constexpr double kCosEps = 1e-12;

// Multiplies (D + 4) u in the bound on a fast key's rounding error. The classic bound of a D-term dot product is
// gamma_D = D u / (1 - D u) for any summation order; + 4 covers the product by w, the addition of o and the
// roundings of w and o themselves. One factor 2: tensor cores may truncate instead of round when they align
// addends (an error of up to 2u per addition). The other: margin, so that a bound that is tight in theory is never
// the reason an answer differs from fp64.
constexpr double kExactSafety = 4.0;

// Candidates per row that exact mode keeps and re-scores in fp64; a row with more codes inside the bound is
// re-scanned whole.
constexpr int kExactCandidates = 4;

// The `metric` ints of every kernel (vqkernels.numerics.metric_code).
constexpr int kMetricL2 = 0;
constexpr int kMetricCosine = 1;
constexpr int kMetricDot = 2;

// A metric name as its code, or -1 for an unknown name (callers raise, with kMetricNames in the message).
inline int metric_code(std::string_view name) {
  if (name == "l2") return kMetricL2;
  if (name == "cosine") return kMetricCosine;
  if (name == "dot") return kMetricDot;
  return -1;
}
constexpr const char* kMetricNames = "'l2', 'cosine', 'dot'";

// ---- exact mode -------------------------------------------------------------------------------------------------

// Unit roundoff of the accumulation type: fp64 inputs accumulate in fp64, everything else in fp32.
template <typename acc_t>
VQK_HD constexpr double unit_roundoff() {
  return sizeof(acc_t) == 8 ? 0x1p-53 : 0x1p-24;
}
VQK_HD constexpr double unit_roundoff(bool fp64) { return fp64 ? 0x1p-53 : 0x1p-24; }

// gamma = kExactSafety (D + 4) u for inputs accumulated in fp64 (fp64) or fp32.
VQK_HD inline double exact_gamma(int64_t d, bool fp64) {
  return kExactSafety * static_cast<double>(d + 4) * unit_roundoff(fp64);
}

// Bound E on the rounding error of a fast key w (x . c) + o of a row with fp64 norm xnorm, against codes of
// largest fp64 norm cmax, whose fast minimum is key0: the dot product's error scaled by what multiplies it (l2:
// 2 |x| cmax, plus cmax^2 for o; cosine: |x|, its keys carry 1 / |c|; dot: |x| cmax), plus that of key0 itself.
// Every code whose fast key lies within 2E of key0 may be the true minimum (exact_threshold).
VQK_HD inline double key_error_bound(int metric, double xnorm, double cmax, double key0, double gamma) {
  double e;
  if (metric == kMetricL2) {
    e = gamma * (2.0 * xnorm * cmax + cmax * cmax);
  } else if (metric == kMetricCosine) {
    e = gamma * xnorm;
  } else {
    e = gamma * xnorm * cmax;
  }
  return e + gamma * fabs(key0);
}

VQK_HD inline double exact_threshold(int metric, double xnorm, double cmax, double key0, double gamma) {
  return key0 + 2.0 * key_error_bound(metric, xnorm, cmax, key0, gamma);
}

// ---- counter-based Gumbel noise of sample_code ---------------------------------------------------------------
// g(seed, k, i) = -log(-log(u)), u from the top 23 bits of mix32(q_k ^ r_i), q_k = mix32(k ^ s_code),
// r_i = mix32(i ^ s_row): a function of the seed and the two indices only, so every backend, tile and split draws
// the same noise (vqkernels.numerics.gumbel_noise).

// A 3-round xorshift-multiply bijection on 32-bit words (unsigned arithmetic: products wrap modulo 2^32).
VQK_HD inline uint32_t mix32(uint32_t v) {
  v ^= v >> 17;
  v *= 0xED5AD4BBu;
  v ^= v >> 11;
  v *= 0xAC4C1B51u;
  v ^= v >> 15;
  v *= 0x31848BABu;
  return v ^ (v >> 14);
}

// Per-index key: mix32(idx ^ salt), the index taken as its low 32 bits (indices are < 2^31).
VQK_HD inline uint32_t index_key(int64_t idx, uint32_t salt) { return mix32(static_cast<uint32_t>(idx) ^ salt); }

// The schema's int64 seed is a 64-bit pattern: s_code its low 32 bits, s_row its high 32 bits.
VQK_HD inline uint32_t seed_code(int64_t seed) { return static_cast<uint32_t>(static_cast<uint64_t>(seed)); }
VQK_HD inline uint32_t seed_row(int64_t seed) { return static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32); }

VQK_HD inline float log_of(float v) { return logf(v); }
VQK_HD inline double log_of(double v) { return log(v); }

// Gumbel(0, 1) from a hash: u = ((h >> 9) + 1/2) 2^-23, exact in fp32 and in (0, 1), so -log(u) > 0.
template <typename acc_t>
VQK_HD inline acc_t gumbel_from_hash(uint32_t h) {
  const acc_t u = (static_cast<acc_t>(h >> 9) + acc_t(0.5)) * static_cast<acc_t>(0x1p-23);
  return -log_of(-log_of(u));
}

// The noise of the pair (code key q_k, row key r_i).
template <typename acc_t>
VQK_HD inline acc_t gumbel(uint32_t code_key, uint32_t row_key) {
  return gumbel_from_hash<acc_t>(mix32(code_key ^ row_key));
}

// An upper bound of every value g takes in either accumulation type: its maximum, at h >> 9 = 2^23 - 1
// (u = 1 - 2^-24), is 16.6355323..., and the margin covers the roundings of the two logs. A key minus this that
// does not beat the running best cannot win whatever its noise, so the kernels skip computing that noise.
constexpr double kGumbelMax = 16.6356;

}  // namespace vqkernels::numerics

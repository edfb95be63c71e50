// Epilogues of the CPU tile drivers: what a tile of dot products becomes while it is hot in cache. Each has a
// portable scalar form and ISA variants in their own files; the drivers pass the EpilogueKind of cpu_features.h.
//
// Search: tiles are codes major (tile[j * ld + r] = c_{kb+j} . x_r, epilogue_kernels.h); the argmin and the top-4
// of exact mode fold every code of the tile into per-row state, ties to the lowest index (README "Method" §1.1).
// Sampling: tiles are also codes major, and each tile row reduces to that code's running minimum over the input
// rows (the columns).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"
#include "cpu_features.h"

namespace vqkernels::cpu {

// (epilogue_kernels.h, whose templates the ISA files compile for their ISA, is not included here: a template
// defined before an ISA file's target pragma would compile for the baseline.)
constexpr int kTopT = num::kExactCandidates;
// The drivers pad the rows of a block (and the tile's row stride) to this: the widest vector epilogue's lanes.
constexpr int64_t kRowLanes = 16;

// ---- the search epilogues: argmin (the fast path) and top-4 (exact mode), per ISA ------------------------------
void argmin_codes_scalar(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                         int32_t kb, float* best, int32_t* bidx);
void argmin_codes_scalar(const double* tile, int64_t nb, int64_t ld, int64_t m, const double* w, const double* o,
                         int32_t kb, double* best, int32_t* bidx);
void top4_codes_scalar(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                       int32_t kb, float* topv, int32_t* topi, int64_t stride);
void top4_codes_scalar(const double* tile, int64_t nb, int64_t ld, int64_t m, const double* w, const double* o,
                       int32_t kb, double* topv, int32_t* topi, int64_t stride);
#ifdef VQK_X86
void argmin_codes_avx512(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                         int32_t kb, float* best, int32_t* bidx);
void top4_codes_avx512(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                       int32_t kb, float* topv, int32_t* topi, int64_t stride);
void argmin_codes_avx2(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                       int32_t kb, float* best, int32_t* bidx);
void top4_codes_avx2(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                     int32_t kb, float* topv, int32_t* topi, int64_t stride);
#endif
#ifdef VQK_ARM64
void argmin_codes_neon(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                       int32_t kb, float* best, int32_t* bidx);
void top4_codes_neon(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                     int32_t kb, float* topv, int32_t* topi, int64_t stride);
#endif

template <typename acc_t>
void argmin_codes(EpilogueKind kind, const acc_t* tile, int64_t nb, int64_t ld, int64_t m, const acc_t* w,
                  const acc_t* o, int32_t kb, acc_t* best, int32_t* bidx) {
  if constexpr (std::is_same_v<acc_t, float>) {
    switch (kind) {
#ifdef VQK_X86
      case EpilogueKind::Avx512: return argmin_codes_avx512(tile, nb, ld, m, w, o, kb, best, bidx);
      case EpilogueKind::Avx2: return argmin_codes_avx2(tile, nb, ld, m, w, o, kb, best, bidx);
#endif
#ifdef VQK_ARM64
      case EpilogueKind::Neon: return argmin_codes_neon(tile, nb, ld, m, w, o, kb, best, bidx);
#endif
      default: break;
    }
  }
  argmin_codes_scalar(tile, nb, ld, m, w, o, kb, best, bidx);
}

template <typename acc_t>
void top4_codes(EpilogueKind kind, const acc_t* tile, int64_t nb, int64_t ld, int64_t m, const acc_t* w,
                const acc_t* o, int32_t kb, acc_t* topv, int32_t* topi, int64_t stride) {
  if constexpr (std::is_same_v<acc_t, float>) {
    switch (kind) {
#ifdef VQK_X86
      case EpilogueKind::Avx512: return top4_codes_avx512(tile, nb, ld, m, w, o, kb, topv, topi, stride);
      case EpilogueKind::Avx2: return top4_codes_avx2(tile, nb, ld, m, w, o, kb, topv, topi, stride);
#endif
#ifdef VQK_ARM64
      case EpilogueKind::Neon: return top4_codes_neon(tile, nb, ld, m, w, o, kb, topv, topi, stride);
#endif
      default: break;
    }
  }
  top4_codes_scalar(tile, nb, ld, m, w, o, kb, topv, topi, stride);
}

// fp64 distance of exact mode's candidates, from the values as stored: l2 as sum (x - c)^2 (no cancellation).
template <typename scalar_t>
double rescore(const scalar_t* xr, const scalar_t* cr, int64_t D, Metric metric, double xnorm, double cnorm) {
  double s = 0.0;
  if (metric == Metric::L2) {
    for (int64_t j = 0; j < D; ++j) {
      const double d = static_cast<double>(xr[j]) - static_cast<double>(cr[j]);
      s += d * d;
    }
    return s;
  }
  for (int64_t j = 0; j < D; ++j) s += static_cast<double>(xr[j]) * static_cast<double>(cr[j]);
  if (metric == Metric::Dot) return -s;
  return 1.0 - s / (std::max(xnorm, num::kCosEps) * std::max(cnorm, num::kCosEps));
}

// ---- sampling (tile rows = codes, columns = input rows) ----------------------------------------------------------
// Per code k (tile row r) the running minimum of key - g(seed, k, i) over the input rows i (columns), with
// key = fma(fma(dot, w_i, o_i), rs_k, rt_k): (w_i, o_i) the key terms of input row i, rs_k = 1 / max(|c_k|, eps)
// for cosine (else 1), rt_k = |c_k|^2 for l2 (else 0), clamped at 0 for l2: the distance up to a constant per code
// (cosine's 1), which is all Gumbel-max needs. Ties go to the lowest row (columns in increasing order, strict <).
//
// Most noise is never computed, without changing a result: an element can only win if g > key - best, and
//  1. g <= kGumbelMax: a key with fl(key - kGumbelMax) >= best cannot win (rounding is monotone), which prunes
//     most of l2 and dot, whose keys spread far more than the noise;
//  2. g grows with h >> 9, and its largest value in each bucket of v = 2^23 - 1 - (h >> 9) by floor(log2 v)
//     (SampleBounds) bounds it from the hash alone: that prunes the rest but the elements whose noise lies within
//     about log 2 of what they need (cosine: a few in 10^5 once the best has settled).
// Only the survivors take the two logs.
template <typename acc_t>
struct SampleBounds {
  static constexpr int kBuckets = 23;  // floor(log2 v) for v < 2^23
  acc_t gmax;
  acc_t bucket_max[32];  // upper bound of g over the bucket (32 entries: two zmm for vpermt2ps)

  SampleBounds() {
    gmax = static_cast<acc_t>(num::kGumbelMax);
    for (int j = 0; j < 32; ++j) bucket_max[j] = gmax;
    for (int j = 1; j < kBuckets; ++j) {
      // the smallest v of bucket j has the largest u: u = (2^23 - 1 - 2^j + 1/2) 2^-23, computed in fp64; the
      // margin covers the roundings of the two logs in acc_t
      const double u = (double((1u << 23) - 1u - (1u << j)) + 0.5) * 0x1p-23;
      bucket_max[j] = static_cast<acc_t>(-std::log(-std::log(u)) + 1e-4);
    }
  }

  static int bucket(uint32_t h) {
    const uint32_t v = (0x7FFFFFu - (h >> 9)) | 1u;
    return 31 - __builtin_clz(v);
  }

  static const SampleBounds& get() {
    static const SampleBounds b;
    return b;
  }
};

template <typename acc_t>
void sample_tile_scalar(const acc_t* tile, int64_t m, int64_t nb, int64_t ld, const acc_t* w, const acc_t* o,
                        const uint32_t* rkey, int64_t c0, const acc_t* rs, const acc_t* rt, const uint32_t* qkey,
                        bool clamp, acc_t* best, int64_t* bidx) {
  const SampleBounds<acc_t>& bounds = SampleBounds<acc_t>::get();
  for (int64_t r = 0; r < m; ++r) {
    const acc_t* t = tile + r * ld;
    const acc_t s = rs[r], a = rt[r];
    const uint32_t q = qkey[r];
    acc_t b = best[r];
    int64_t bi = bidx[r];
    for (int64_t j = 0; j < nb; ++j) {
      acc_t key = std::fma(std::fma(t[j], w[j], o[j]), s, a);
      if (clamp && key < acc_t(0)) key = acc_t(0);
      if (!(key - bounds.gmax < b)) continue;
      const uint32_t h = num::mix32(q ^ rkey[j]);
      if (!(key - bounds.bucket_max[SampleBounds<acc_t>::bucket(h)] < b)) continue;
      const acc_t v = key - num::gumbel_from_hash<acc_t>(h);
      if (v < b) {
        b = v;
        bi = c0 + j;
      }
    }
    best[r] = b;
    bidx[r] = bi;
  }
}

#ifdef VQK_X86
void sample_tile_avx512(const float* tile, int64_t m, int64_t nb, int64_t ld, const float* w, const float* o,
                        const uint32_t* rkey, int64_t c0, const float* rs, const float* rt, const uint32_t* qkey,
                        bool clamp, float* best, int64_t* bidx);
#endif

template <typename acc_t>
void sample_tile(EpilogueKind kind, const acc_t* tile, int64_t m, int64_t nb, int64_t ld, const acc_t* w,
                 const acc_t* o, const uint32_t* rkey, int64_t c0, const acc_t* rs, const acc_t* rt,
                 const uint32_t* qkey, bool clamp, acc_t* best, int64_t* bidx) {
#ifdef VQK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (kind == EpilogueKind::Avx512)
      return sample_tile_avx512(tile, m, nb, ld, w, o, rkey, c0, rs, rt, qkey, clamp, best, bidx);
  }
#endif
  sample_tile_scalar(tile, m, nb, ld, w, o, rkey, c0, rs, rt, qkey, clamp, best, bidx);
}

}  // namespace vqkernels::cpu

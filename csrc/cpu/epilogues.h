// Epilogues of the CPU tile drivers: what a tile of dot products becomes while it is hot in cache. Each has a
// portable scalar form here and, where it pays, ISA variants in their own files (epilogues_avx512.cpp), chosen at
// run time by the dispatching function below; a variant for another ISA is one more file and one more branch.
//
// Search (rows = inputs, columns = codes): the argmin key of code k is w_k (x . c_k) + o_k (README "Method" §1).
// Columns are visited in increasing order and only a strictly smaller key replaces the best, so ties go to the
// lowest index. w/o/c0 are offset to the tile's first column.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"
#include "isa.h"

namespace vqkernels::cpu {

// ---- argmin (the fast path) -----------------------------------------------------------------------------------
template <typename acc_t>
void argmin_tile_scalar(const acc_t* tile, int64_t m, int64_t nb, int64_t ld, const acc_t* w, const acc_t* o,
                        int64_t kb, acc_t* best, int64_t* bidx) {
  for (int64_t r = 0; r < m; ++r) {
    const acc_t* t = tile + r * ld;
    acc_t b = best[r];
    int64_t bi = bidx[r];
    for (int64_t j = 0; j < nb; ++j) {
      const acc_t key = t[j] * w[j] + o[j];
      if (key < b) {
        b = key;
        bi = kb + j;
      }
    }
    best[r] = b;
    bidx[r] = bi;
  }
}

#ifdef VQK_X86
void argmin_tile_avx512(const float* tile, int64_t m, int64_t nb, int64_t ld, const float* w, const float* o,
                        int64_t kb, float* best, int64_t* bidx);
#endif

template <typename acc_t>
void argmin_tile(const acc_t* tile, int64_t m, int64_t nb, int64_t ld, const acc_t* w, const acc_t* o, int64_t kb,
                 acc_t* best, int64_t* bidx) {
#ifdef VQK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return argmin_tile_avx512(tile, m, nb, ld, w, o, kb, best, bidx);
  }
#endif
  argmin_tile_scalar(tile, m, nb, ld, w, o, kb, best, bidx);
}

// ---- exact mode: the kExactCandidates smallest keys per row, sorted by (key, index) ------------------------------
constexpr int kTopT = num::kExactCandidates;

template <typename acc_t>
void topk_tile(const acc_t* tile, int64_t m, int64_t nb, int64_t ld, const acc_t* w, const acc_t* o, int64_t kb,
               acc_t* topv, int64_t* topi) {
  for (int64_t r = 0; r < m; ++r) {
    const acc_t* t = tile + r * ld;
    acc_t* tv = topv + r * kTopT;
    int64_t* ti = topi + r * kTopT;
    acc_t thr = tv[kTopT - 1];
    for (int64_t j = 0; j < nb; ++j) {
      const acc_t key = t[j] * w[j] + o[j];
      if (key < thr) {
        int p = kTopT - 1;
        while (p > 0 && tv[p - 1] > key) {
          tv[p] = tv[p - 1];
          ti[p] = ti[p - 1];
          --p;
        }
        tv[p] = key;
        ti[p] = kb + j;
        thr = tv[kTopT - 1];
      }
    }
  }
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

// ---- sampling (rows = codes, columns = input rows) ------------------------------------------------------------
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
void sample_tile(const acc_t* tile, int64_t m, int64_t nb, int64_t ld, const acc_t* w, const acc_t* o,
                 const uint32_t* rkey, int64_t c0, const acc_t* rs, const acc_t* rt, const uint32_t* qkey, bool clamp,
                 acc_t* best, int64_t* bidx) {
#ifdef VQK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512cd()) return sample_tile_avx512(tile, m, nb, ld, w, o, rkey, c0, rs, rt, qkey, clamp, best, bidx);
  }
#endif
  sample_tile_scalar(tile, m, nb, ld, w, o, rkey, c0, rs, rt, qkey, clamp, best, bidx);
}

}  // namespace vqkernels::cpu

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

}  // namespace vqkernels::cpu

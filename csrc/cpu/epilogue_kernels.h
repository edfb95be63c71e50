// The search epilogues, written once over a small vector type V and compiled per ISA (epilogues_avx512.cpp,
// epilogues_avx2.cpp, epilogues_neon.cpp, and the scalar V in epilogues.cpp). No ATen and no torch headers: the
// NEON file is compile-checked with an aarch64 cross compiler on x86 machines (make neon-check).
//
// A tile holds the dot products of a block of codes with a block of input rows, codes major: tile[j * ld + r] =
// c_{kb+j} . x_r. The epilogue folds it into per-row running state while it is hot: the argmin key of code k is
// w_k (x . c_k) + o_k (README "Method" §1.1), computed as one fma. The codes of a tile are visited in increasing
// order and only a strictly smaller key replaces, so ties go to the lowest index. Rows are vector lanes: each step
// is one broadcast code against V::L rows, with no reduction across lanes.
//
// Padding contract: the tile's columns, `best`/`bidx`, and each row of the top-4 state are readable and writable
// up to round_up(m, V::L) (the drivers pad to 16, the widest V); the lanes past m compute on whatever is there and
// are never read back.
//
// V provides: T (the element type), L (lanes), F (a vector of T), I (int32), M (a comparison mask), and
// load/store/loadi/storei, set1/set1i, iota() (0, 1, ..., L - 1), addi, fma(a, b, c) = a b + c, lt(a, b),
// sel(m, a, b) = m ? a : b, seli, any(m).
//
// The ISA files include this header after `#pragma GCC target(...)`, so the templates compile for that ISA; their
// V types live in anonymous namespaces, so no instantiation can leak into code that runs on other CPUs. Anything
// else with external linkage (numerics.h, the standard headers) must be included before the pragma.
#pragma once

#include <cstdint>
#include <limits>

#include "../numerics.h"

namespace vqkernels::cpu::epilogue {

// Exact mode keeps this many candidates per row; the insertion network below is written for 4.
constexpr int kTopT = ::vqkernels::numerics::kExactCandidates;
static_assert(kTopT == 4, "the top-T insertion network is written for 4 candidates");

// Rows [r, r + G L) of the argmin state against every code of the tile: G independent chunks interleaved, so the
// compare-select chain of one chunk overlaps the others'.
template <class V, int G>
inline void argmin_group(const typename V::T* tile, int64_t nb, int64_t ld, int64_t r, const typename V::T* w,
                         const typename V::T* o, int32_t kb, typename V::T* best, int32_t* bidx) {
  typename V::F b[G];
  typename V::I bi[G];
  for (int g = 0; g < G; ++g) {
    b[g] = V::load(best + r + g * V::L);
    bi[g] = V::loadi(bidx + r + g * V::L);
  }
  // Two codes a step: their own minimum first (the lower code on a tie), then one compare with the running best,
  // so the chain through b has one compare-select per two codes.
  int64_t j = 0;
  for (; j + 2 <= nb; j += 2) {
    const typename V::F w0 = V::set1(w[j]), o0 = V::set1(o[j]), w1 = V::set1(w[j + 1]), o1 = V::set1(o[j + 1]);
    const typename V::I j0 = V::set1i(kb + static_cast<int32_t>(j)), j1 = V::set1i(kb + static_cast<int32_t>(j + 1));
    const typename V::T* t0 = tile + j * ld + r;
    const typename V::T* t1 = t0 + ld;
    for (int g = 0; g < G; ++g) {
      const typename V::F k0 = V::fma(V::load(t0 + g * V::L), w0, o0);
      const typename V::F k1 = V::fma(V::load(t1 + g * V::L), w1, o1);
      const typename V::M second = V::lt(k1, k0);
      const typename V::F key = V::sel(second, k1, k0);
      const typename V::I idx = V::seli(second, j1, j0);
      const typename V::M lt = V::lt(key, b[g]);
      b[g] = V::sel(lt, key, b[g]);
      bi[g] = V::seli(lt, idx, bi[g]);
    }
  }
  if (j < nb) {
    const typename V::F wj = V::set1(w[j]), oj = V::set1(o[j]);
    const typename V::I jv = V::set1i(kb + static_cast<int32_t>(j));
    const typename V::T* t = tile + j * ld + r;
    for (int g = 0; g < G; ++g) {
      const typename V::F key = V::fma(V::load(t + g * V::L), wj, oj);
      const typename V::M lt = V::lt(key, b[g]);
      b[g] = V::sel(lt, key, b[g]);
      bi[g] = V::seli(lt, jv, bi[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    V::store(best + r + g * V::L, b[g]);
    V::storei(bidx + r + g * V::L, bi[g]);
  }
}

// One row (m = 1) whose tile row is contiguous (ld = 1): codes are the lanes, so a step folds V::L codes at once,
// each lane keeping the first minimum of its own codes; the lanes are then merged, lowest index first among equal
// keys, into the running (best, bidx) of earlier tiles (lower codes: a strict < keeps them on ties).
template <class V>
inline void argmin_row(const typename V::T* t, int64_t nb, const typename V::T* w, const typename V::T* o,
                       int32_t kb, typename V::T* best, int32_t* bidx) {
  using T = typename V::T;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  typename V::F bv = V::set1(kInf);
  typename V::I iv = V::set1i(0);
  typename V::I jv = V::addi(V::iota(), V::set1i(kb));
  const typename V::I step = V::set1i(V::L);
  int64_t j = 0;
  for (; j + V::L <= nb; j += V::L) {
    const typename V::F key = V::fma(V::load(t + j), V::load(w + j), V::load(o + j));
    const typename V::M lt = V::lt(key, bv);
    bv = V::sel(lt, key, bv);
    iv = V::seli(lt, jv, iv);
    jv = V::addi(jv, step);
  }
  T lv[V::L];
  int32_t li[V::L];
  V::store(lv, bv);
  V::storei(li, iv);
  T tile_best = kInf;
  int32_t tile_idx = 0;
  for (int l = 0; l < V::L; ++l) {
    if (lv[l] < tile_best || (lv[l] == tile_best && li[l] < tile_idx)) {
      tile_best = lv[l];
      tile_idx = li[l];
    }
  }
  for (; j < nb; ++j) {  // the tail, after every vector lane (higher codes)
    const T key = t[j] * w[j] + o[j];
    if (key < tile_best) {
      tile_best = key;
      tile_idx = kb + static_cast<int32_t>(j);
    }
  }
  if (tile_best < *best) {
    *best = tile_best;
    *bidx = tile_idx;
  }
}

// The running (min key, code) of m rows over the nb codes of a tile (codes kb .. kb + nb - 1).
template <class V>
inline void argmin_codes(const typename V::T* tile, int64_t nb, int64_t ld, int64_t m, const typename V::T* w,
                         const typename V::T* o, int32_t kb, typename V::T* best, int32_t* bidx) {
  if (m == 1 && ld == 1) return argmin_row<V>(tile, nb, w, o, kb, best, bidx);
  // vectors of rows, at most 4 interleaved per pass over the tile (the last vector may run into the padding)
  for (int64_t r = 0; r < m;) {
    const int64_t left = (m - r + V::L - 1) / V::L;
    if (left >= 4) {
      argmin_group<V, 4>(tile, nb, ld, r, w, o, kb, best, bidx);
      r += 4 * V::L;
    } else if (left == 3) {
      argmin_group<V, 3>(tile, nb, ld, r, w, o, kb, best, bidx);
      r += 3 * V::L;
    } else if (left == 2) {
      argmin_group<V, 2>(tile, nb, ld, r, w, o, kb, best, bidx);
      r += 2 * V::L;
    } else {
      argmin_group<V, 1>(tile, nb, ld, r, w, o, kb, best, bidx);
      r += V::L;
    }
  }
}

// The kTopT smallest (key, code) of m rows, sorted by (key, code), over the codes of a tile. State: topv / topi
// rows t = 0..3 at topv + t * stride (stride >= round_up(m, 16)); an empty slot is (+inf, -1).
template <class V>
inline void top4_codes(const typename V::T* tile, int64_t nb, int64_t ld, int64_t m, const typename V::T* w,
                       const typename V::T* o, int32_t kb, typename V::T* topv, int32_t* topi, int64_t stride) {
  using F = typename V::F;
  using I = typename V::I;
  using M = typename V::M;
  for (int64_t r = 0; r < m; r += V::L) {
    F v0 = V::load(topv + r), v1 = V::load(topv + stride + r), v2 = V::load(topv + 2 * stride + r),
      v3 = V::load(topv + 3 * stride + r);
    I i0 = V::loadi(topi + r), i1 = V::loadi(topi + stride + r), i2 = V::loadi(topi + 2 * stride + r),
      i3 = V::loadi(topi + 3 * stride + r);
    for (int64_t j = 0; j < nb; ++j) {
      const F key = V::fma(V::load(tile + j * ld + r), V::set1(w[j]), V::set1(o[j]));
      const M c3 = V::lt(key, v3);
      if (!V::any(c3)) continue;  // the common case once the lists have filled: nothing enters
      const I jv = V::set1i(kb + static_cast<int32_t>(j));
      // the lists are sorted, so c0 => c1 => c2 => c3; an equal key goes after the earlier (lower) codes
      const M c0 = V::lt(key, v0), c1 = V::lt(key, v1), c2 = V::lt(key, v2);
      v3 = V::sel(c2, v2, V::sel(c3, key, v3));
      i3 = V::seli(c2, i2, V::seli(c3, jv, i3));
      v2 = V::sel(c1, v1, V::sel(c2, key, v2));
      i2 = V::seli(c1, i1, V::seli(c2, jv, i2));
      v1 = V::sel(c0, v0, V::sel(c1, key, v1));
      i1 = V::seli(c0, i0, V::seli(c1, jv, i1));
      v0 = V::sel(c0, key, v0);
      i0 = V::seli(c0, jv, i0);
    }
    V::store(topv + r, v0);
    V::store(topv + stride + r, v1);
    V::store(topv + 2 * stride + r, v2);
    V::store(topv + 3 * stride + r, v3);
    V::storei(topi + r, i0);
    V::storei(topi + stride + r, i1);
    V::storei(topi + 2 * stride + r, i2);
    V::storei(topi + 3 * stride + r, i3);
  }
}

// One lane: the portable form, for any CPU, fp32 and fp64. key = t w + o as a multiply and an add (a call to fma
// would be a library call on baseline x86-64).
template <typename T_>
struct Scalar {
  using T = T_;
  using F = T_;
  using I = int32_t;
  using M = bool;
  static constexpr int L = 1;
  static F load(const T* p) { return *p; }
  static void store(T* p, F v) { *p = v; }
  static I loadi(const int32_t* p) { return *p; }
  static void storei(int32_t* p, I v) { *p = v; }
  static F set1(T v) { return v; }
  static I set1i(int32_t v) { return v; }
  static I iota() { return 0; }
  static I addi(I a, I b) { return a + b; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static M lt(F a, F b) { return a < b; }
  static F sel(M m, F a, F b) { return m ? a : b; }
  static I seli(M m, I a, I b) { return m ? a : b; }
  static bool any(M m) { return m; }
};

}  // namespace vqkernels::cpu::epilogue

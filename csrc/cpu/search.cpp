// Fused nearest-code search on the CPU: tiled GEMM + argmin (or top-4) epilogue + gather + usage histogram
// (README "Method" §1, "Backends").
//
// Work is a grid of tasks: (group, block of BM input rows, split of the codebook). BM defaults to 256 (env
// VQK_CPU_BM), fewer when the rows of all groups together are few, so every thread gets rows. With enough row
// blocks for the threads the codebook is one split and a task owns its rows outright; with few rows (retrieval,
// N = 1 against a million codes) the codes are split between threads and the per-row results merged in split order
// with a strict <, which keeps ties on the lowest index. A task packs its block of rows once (tile_gemm.h) and
// streams its group's codes through in tiles of BN codes, read where they lie: the tile of dot products, codes
// major, stays in L2 while the epilogue folds it into per-row state (epilogues.h). Nothing of size N x K is
// allocated, and the codebook is never copied.
//
// The batched form (x [G, N, D], codebook [G, K, D], README "Method" §1.6) is one grid over every group's blocks:
// it balances like one search of G * N rows, and a group's tasks are adjacent, so a thread works through one
// codebook at a time. A 2-D call is the grid of one group. Rows and codes are read through their strides (unit
// stride along D is all the kernels need), so the head split x.view(N, G, D).transpose(0, 1) is not copied.
//
// Argmin key per code k: key = w_k (x . c_k) + o_k
//   l2:     w = -2,                 o = |c_k|^2 (|x|^2 is constant per row and added back for the distance)
//   cosine: w = -1/max(|c_k|, eps), o = 0
//   dot:    w = -1,                 o = 0
// The key terms come from one pass over the codebook, or, when each code tile meets one row block only, from the
// task that meets it, while the tile is in cache (one pass over a huge codebook instead of two).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "bf16_microkernel.h"
#include "common.h"
#include "cpu_features.h"
#include "epilogues.h"
#include "gemv_kernel.h"
#include "row_norms.h"
#include "tile_gemm.h"

namespace vqkernels::cpu {
namespace {

struct Outputs {
  int64_t* codes;   // [G * N]
  void* dist;       // acc_t [G * N]
  void* zq;         // scalar_t [G * N, D] (contiguous) or nullptr
  int64_t* counts;  // [G * K] or nullptr
};

int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Per-code key terms (README "Method" §1.1) and fp64 norms, from the codes as stored, for the G * K codes of every
// group (code k of group g at index g * K + k). Computed up front for all codes when several row blocks read them,
// else by each task for its tile only, into the task's buffers (a huge codebook then costs no K-sized arrays). The
// norms (a square root per code) only where something reads them: the cosine keys and exact mode.
template <typename scalar_t>
struct CodeTerms {
  using acc_t = typename AccOf<scalar_t>::type;
  Metric metric;
  bool want_norms;
  std::vector<acc_t> w, o;     // [G * K] when computed up front
  std::vector<double> cnorm;   // [G * K] when wanted

  CodeTerms(int64_t codes, Metric metric_, bool exact, bool up_front)
      : metric(metric_),
        want_norms(exact || metric_ == Metric::Cosine),
        w(up_front ? codes : 0),
        o(up_front ? codes : 0),
        cnorm(want_norms ? codes : 0) {}

  // codes at indices idx0 .. idx0 + n - 1 from their sums of squares sq[0 .. n) into w_out / o_out [0 .. n); false
  // when one is not finite, i.e. the code holds a NaN or an Inf (no finite fp32 / bf16 / fp16 square overflows
  // fp64; fp64 codes are checked element by element instead, by sum_squares_rows)
  bool finish(const double* sq, int64_t idx0, int64_t n, acc_t* w_out, acc_t* o_out) {
    bool ok = true;
    for (int64_t j = 0; j < n; ++j) {
      const double s = sq[j];
      if constexpr (!std::is_same_v<scalar_t, double>) ok &= std::isfinite(s);
      const double norm = want_norms ? std::sqrt(s) : 0.0;
      if (want_norms) cnorm[idx0 + j] = norm;
      switch (metric) {
        case Metric::L2: w_out[j] = acc_t(-2); o_out[j] = static_cast<acc_t>(s); break;
        case Metric::Cosine: w_out[j] = static_cast<acc_t>(-1.0 / std::max(norm, num::kCosEps)); o_out[j] = acc_t(0); break;
        case Metric::Dot: w_out[j] = acc_t(-1); o_out[j] = acc_t(0); break;
      }
    }
    return ok;
  }

  // codes k0 .. k0 + n - 1 of one group's codebook cb, stored at indices idx0 .. (sq: n doubles of scratch); false
  // when one holds a NaN or Inf
  bool compute(const RowMatrix<scalar_t>& cb, int64_t k0, int64_t n, int64_t idx0, double* sq, acc_t* w_out,
               acc_t* o_out) {
    const bool ok = sum_squares_rows(cb, k0, k0 + n, sq);
    return finish(sq, idx0, n, w_out, o_out) && ok;
  }

  // the largest norm of each group's K codes (exact mode's bound is per codebook)
  std::vector<double> cmax(int64_t G, int64_t K) const {
    std::vector<double> out(G, 0.0);
    if (cnorm.empty()) return out;
    for (int64_t g = 0; g < G; ++g)
      out[g] = *std::max_element(cnorm.begin() + g * K, cnorm.begin() + (g + 1) * K);
    return out;
  }
};

// Whether a tile kernel computes the codes' sums of squares in its own pass (GemvTile::tile_norms).
template <typename Gemm, typename = void>
struct FusesNorms : std::false_type {};
template <typename Gemm>
struct FusesNorms<Gemm, std::void_t<decltype(Gemm::kFusesNorms)>> : std::bool_constant<Gemm::kFusesNorms> {};

// What a search on a prefilter (search_fp32_via_bf16) changes in exact mode: a bound on every key's error per row
// (row_bound, in place of key_error_bound's), and the rows that their top-4 list cannot settle are flagged in redo
// (and left unwritten) instead of re-scanned against every code.
struct GridOptions {
  const double* row_bound = nullptr;  // [G * N] a bound on the error of every key of the row (then redo is needed)
  uint8_t* redo = nullptr;            // [G * N]
  bool fixed_blocks = false;          // row blocks of a shape that does not follow the thread count (block_rows)
};

// The search over a grid of (group, row block, code split) tasks, with one tile kernel: make_gemm(codes, rows)
// builds it for one group's codebook and rows. Rows of all groups are numbered together, row i of group g being
// row g * N + i of the outputs (codes, dist, zq) and of the per-row buffers.
template <typename scalar_t, typename MakeGemm>
void search_grid(MakeGemm&& make_gemm, const GroupedRows<scalar_t>& x, const GroupedRows<scalar_t>& cb,
                 Metric metric, bool exact, EpilogueKind epi, const Outputs& out, const GridOptions& opt = {}) {
  using Gemm = decltype(make_gemm(cb.group(0), x.group(0)));
  using acc_t = typename AccOf<scalar_t>::type;
  static_assert(std::is_same_v<acc_t, typename Gemm::acc_t>);
  const int64_t G = x.G, N = x.rows, D = x.D, K = cb.rows;
  const int64_t NT = G * N;  // rows of all groups
  acc_t* dist = static_cast<acc_t*>(out.dist);
  scalar_t* zq = static_cast<scalar_t*>(out.zq);
  const int nthreads = at::get_num_threads();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  std::vector<Gemm> gemms;
  gemms.reserve(G);
  for (int64_t g = 0; g < G; ++g) gemms.push_back(make_gemm(cb.group(g), x.group(g)));

  // ---- the grid ------------------------------------------------------------------------------------------------
  // a GEMV kernel reads each code once per row block: its few rows stay in one block (the threads split the codes
  // instead), else every block would stream the whole codebook from memory again
  const int64_t BM =
      FusesNorms<Gemm>::value && N < kGemvRows ? std::max<int64_t>(N, 1) : block_rows(N, G, opt.fixed_blocks);
  const int64_t nblk = (N + BM - 1) / BM;  // row blocks per group
  const int64_t blocks = G * nblk;
  // the tile's row stride: a padded block of rows; for blocks of one row, 1 (the row is then contiguous and the
  // epilogue folds codes, not rows, into its lanes)
  const int64_t ldt = BM == 1 && Gemm::kColAlign == 1
                          ? 1
                          : round_up(std::max(BM, Gemm::kColAlign), std::max<int64_t>(kRowLanes, Gemm::kColAlign));
  // each code tile meets one row block only: its key terms are computed by that task, while it is in cache
  const bool fused_terms = nblk == 1;
  // codes per tile: a tile of about 256 KiB (it stays in L2 while the epilogue reads it), and, when the key terms
  // are computed on the way, codes of at most 256 KiB too (they stay in L2 from that pass to the GEMM)
  int64_t bn_auto = std::clamp<int64_t>((int64_t(256) << 10) / (ldt * int64_t(sizeof(acc_t))), 64, 8192);
  if (fused_terms) bn_auto = std::clamp<int64_t>((int64_t(256) << 10) / (D * int64_t(sizeof(scalar_t))), 64, bn_auto);
  const int64_t BN = round_up(std::min(env_int("VQK_CPU_BN", bn_auto), K), Gemm::kRowAlign);
  // splits of the codebook when the row blocks cannot keep every thread busy: about 4 tasks a thread, each at least
  // 4 tiles of codes. Several groups of a few blocks each may leave the threads unevenly loaded (3 blocks on 2
  // threads take 2 blocks' time): they split too, unless the blocks are many or fall evenly on the threads.
  const bool busy = blocks >= nthreads && (G == 1 || blocks % nthreads == 0 || blocks >= 4 * nthreads);
  int64_t S = 1;
  if (!busy) S = std::max<int64_t>(1, std::min((4 * nthreads + blocks - 1) / blocks, K / (4 * BN)));
  const int64_t per_split = round_up((K + S - 1) / S, BN);
  S = (K + per_split - 1) / per_split;
  // results are finished inside the task when it saw every code and the key terms were ready before it started
  const bool finish_in_task = S == 1 && !fused_terms;

  // ---- per-row terms of the distance (and the non-finite check of x) -------------------------------------------
  std::vector<double> xsq(NT), xnorm(NT);
  std::atomic<bool> x_finite{true};
  at::parallel_for(0, NT, 256, [&](int64_t r0, int64_t r1) {
    for_group_ranges(r0, r1, N, [&](int64_t g, int64_t i0, int64_t i1) {
      // l2's row term: a sum of squares, as o
      if (!sum_squares_rows(x.group(g), i0, i1, xsq.data() + g * N + i0)) x_finite = false;
    });
    for (int64_t r = r0; r < r1; ++r) xnorm[r] = std::sqrt(xsq[r]);
  });

  CodeTerms<scalar_t> terms(G * K, metric, exact, /*up_front=*/!fused_terms);
  std::atomic<bool> cb_finite{true};
  if (!fused_terms) {
    at::parallel_for(0, G * K, 1024, [&](int64_t c0, int64_t c1) {
      std::vector<double> sq(c1 - c0);
      for_group_ranges(c0, c1, K, [&](int64_t g, int64_t k0, int64_t k1) {
        const int64_t idx = g * K + k0;
        if (!terms.compute(cb.group(g), k0, k1 - k0, idx, sq.data(), terms.w.data() + idx, terms.o.data() + idx))
          cb_finite = false;
      });
    });
    TORCH_CHECK_VALUE(cb_finite.load(), "codebook contains non-finite values (NaN or Inf)");
  }
  TORCH_CHECK_VALUE(x_finite.load(), "x contains non-finite values (NaN or Inf)");
  const double gamma = num::exact_gamma(D, std::is_same_v<acc_t, double>);
  std::vector<double> cmax = exact && !fused_terms ? terms.cmax(G, K) : std::vector<double>();

  // ---- what a row ends with -----------------------------------------------------------------------------------
  // Per-thread usage histograms merged after the loop (no atomics) when rows are many; with fewer rows than codes
  // the histogram is counted afterwards (zeroing per-thread histograms of a huge codebook would cost more).
  const bool want_hist = out.counts != nullptr;
  const bool private_hist = want_hist && N >= K && int64_t(nthreads) * G * K * 8 <= (int64_t(64) << 20);
  std::vector<int64_t> hist(private_hist ? size_t(nthreads) * G * K : 0, 0);

  // row i of group g (r = g * N + i): its outputs from its code and distance
  auto emit = [&](int64_t g, int64_t r, int64_t code, acc_t d, int64_t* my_hist) {
    out.codes[r] = code;
    dist[r] = d;
    if (zq != nullptr) std::memcpy(zq + r * D, cb.row(g, code), sizeof(scalar_t) * D);
    if (my_hist != nullptr) ++my_hist[g * K + code];
  };
  // fast path: the row from its best key
  auto finish_fast = [&](int64_t g, int64_t r, acc_t key, int64_t code, int64_t* my_hist) {
    acc_t d;
    switch (metric) {
      case Metric::L2: d = std::max(static_cast<acc_t>(xsq[r]) + key, acc_t(0)); break;
      case Metric::Cosine: d = acc_t(1) + key / static_cast<acc_t>(std::max(xnorm[r], num::kCosEps)); break;
      default: d = key; break;
    }
    emit(g, r, code, d, my_hist);
  };
  // exact mode: the row from its kTopT candidates tv / ti (stride ts; key +inf and code -1 are empty slots). Every
  // code whose fast key may round below the true minimum lies within 2E of the fast minimum; when the last kept
  // candidate is inside too, more may hide behind it: re-scan the row.
  auto finish_exact = [&](int64_t g, int64_t r, const acc_t* tv, const int32_t* ti, int64_t ts, int64_t* my_hist) {
    const scalar_t* xr = x.row(g, r - g * N);
    const double* cn = terms.cnorm.data() + g * K;
    const double xn = xnorm[r];
    double bd = std::numeric_limits<double>::infinity();
    int64_t bc = -1;
    // the candidates whose fast keys are at most limit, re-scored in fp64 (ties to the lowest index)
    auto rescore_candidates = [&](double limit) {
      for (int p = 0; p < kTopT; ++p) {
        const int64_t c = ti[p * ts];
        if (c < 0 || double(tv[p * ts]) > limit) break;
        const double dk = rescore(xr, cb.row(g, c), D, metric, xn, cn[c]);
        if (bc < 0 || dk < bd || (dk == bd && c < bc)) { bd = dk; bc = c; }
      }
    };
    if (opt.row_bound != nullptr) {
      // a prefilter's keys, each within E of its true key: every candidate re-scored, and the row settled when no
      // code behind the list (keys >= the last one's) can have a true key at or below the best candidate's
      rescore_candidates(std::numeric_limits<double>::infinity());
      const double best_key = metric == Metric::L2       ? bd - xsq[r]
                              : metric == Metric::Cosine ? (bd - 1.0) * std::max(xn, num::kCosEps)
                                                         : bd;
      const int32_t last = ti[(kTopT - 1) * ts];
      if (bc < 0 || (last >= 0 && !(double(tv[(kTopT - 1) * ts]) - opt.row_bound[r] > best_key))) {
        opt.redo[r] = 1;
        return;
      }
      emit(g, r, bc, static_cast<acc_t>(bd), my_hist);
      return;
    }
    const double thresh = num::exact_threshold(static_cast<int>(metric), xn, cmax[g], double(tv[0]), gamma);
    const bool overflow = ti[(kTopT - 1) * ts] >= 0 && double(tv[(kTopT - 1) * ts]) <= thresh;
    if (overflow) {
      for (int64_t k = 0; k < K; ++k) {
        const double dk = rescore(xr, cb.row(g, k), D, metric, xn, cn[k]);
        if (dk < bd || bc < 0) { bd = dk; bc = k; }
      }
    } else {
      rescore_candidates(thresh);
    }
    emit(g, r, bc, static_cast<acc_t>(bd), my_hist);
  };

  // ---- the tasks ----------------------------------------------------------------------------------------------
  // partial results of the splits (S > 1 or fused terms): per split, per row, the best key / code or top lists
  const bool partials = !finish_in_task;
  const int64_t T = exact ? kTopT : 1;
  std::vector<acc_t> part_v(partials ? size_t(S) * T * NT : 0);
  std::vector<int32_t> part_i(partials ? size_t(S) * T * NT : 0);
  const int64_t mp = round_up(BM, kRowLanes);

  at::parallel_for(0, blocks * S, 1, [&](int64_t t0, int64_t t1) {
    // (+ kRowLanes: an epilogue may read a vector's lanes past the last row of a tile)
    std::vector<acc_t> tile(size_t(BN + Gemm::kRowPad) * ldt + kRowLanes, acc_t(0));
    typename Gemm::Scratch scratch;
    std::vector<acc_t> sv(size_t(T) * mp);
    std::vector<int32_t> si(size_t(T) * mp);
    // the tile's key terms, when the task computes them
    std::vector<double> tsq(fused_terms ? BN : 0);
    std::vector<acc_t> tw(fused_terms ? BN : 0), to(fused_terms ? BN : 0);
    bool terms_ok = true;
    int64_t* my_hist = private_hist ? hist.data() + size_t(at::get_thread_num()) * G * K : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / (nblk * S), b = (t / S) % nblk, s = t % S;
      const Gemm& gemm = gemms[g];
      const int64_t i0 = b * BM, m = std::min(BM, N - i0);
      const int64_t r0 = g * N + i0;  // the block's first row among all groups'
      const int64_t k_lo = s * per_split, k_hi = std::min(K, k_lo + per_split);
      std::fill(sv.begin(), sv.end(), kInf);
      std::fill(si.begin(), si.end(), exact ? int32_t(-1) : static_cast<int32_t>(k_lo));
      gemm.load_cols(scratch, i0, m);
      for (int64_t kb = k_lo; kb < k_hi; kb += BN) {
        const int64_t nb = std::min(BN, k_hi - kb);
        if constexpr (FusesNorms<Gemm>::value) {
          if (fused_terms) {  // the squares in the GEMV's own pass over the codes, then the terms from them
            gemm.tile_norms(scratch, kb, nb, m, tile.data(), ldt, tsq.data());
            terms_ok &= terms.finish(tsq.data(), g * K + kb, nb, tw.data(), to.data());
          } else {
            gemm.tile(scratch, kb, nb, m, tile.data(), ldt);
          }
        } else {
          if (fused_terms) terms_ok &= terms.compute(cb.group(g), kb, nb, g * K + kb, tsq.data(), tw.data(), to.data());
          gemm.tile(scratch, kb, nb, m, tile.data(), ldt);
        }
        const acc_t* w = fused_terms ? tw.data() : terms.w.data() + g * K + kb;
        const acc_t* o = fused_terms ? to.data() : terms.o.data() + g * K + kb;
        if (exact) {
          top4_codes(epi, tile.data(), nb, ldt, m, w, o, static_cast<int32_t>(kb), sv.data(), si.data(), mp);
        } else {
          argmin_codes(epi, tile.data(), nb, ldt, m, w, o, static_cast<int32_t>(kb), sv.data(), si.data());
        }
      }
      if (finish_in_task) {
        for (int64_t j = 0; j < m; ++j) {
          if (exact) {
            finish_exact(g, r0 + j, sv.data() + j, si.data() + j, mp, my_hist);
          } else {
            finish_fast(g, r0 + j, sv[j], si[j], my_hist);
          }
        }
      } else {
        for (int64_t p = 0; p < T; ++p) {
          std::copy(sv.begin() + p * mp, sv.begin() + p * mp + m, part_v.begin() + (s * T + p) * NT + r0);
          std::copy(si.begin() + p * mp, si.begin() + p * mp + m, part_i.begin() + (s * T + p) * NT + r0);
        }
      }
    }
    if (!terms_ok) cb_finite = false;
    if (!gemms.empty()) gemms.front().release();
  });

  if (partials) {
    TORCH_CHECK_VALUE(cb_finite.load(), "codebook contains non-finite values (NaN or Inf)");
    if (exact && fused_terms) cmax = terms.cmax(G, K);
    // merge the splits, in split order: split s holds lower codes than split s + 1, so a strict < (and, for the
    // top lists, inserting after equal keys) keeps ties on the lowest index
    at::parallel_for(0, NT, 64, [&](int64_t r0, int64_t r1) {
      int64_t* my_hist = private_hist ? hist.data() + size_t(at::get_thread_num()) * G * K : nullptr;
      acc_t tv[kTopT];
      int32_t ti[kTopT];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t g = r / N;
        if (!exact) {
          acc_t bv = part_v[r];
          int32_t bi = part_i[r];
          for (int64_t s = 1; s < S; ++s) {
            if (part_v[s * NT + r] < bv) {
              bv = part_v[s * NT + r];
              bi = part_i[s * NT + r];
            }
          }
          finish_fast(g, r, bv, bi, my_hist);
          continue;
        }
        std::fill(tv, tv + kTopT, kInf);
        std::fill(ti, ti + kTopT, int32_t(-1));
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t p = 0; p < kTopT; ++p) {
            const acc_t v = part_v[(s * T + p) * NT + r];
            const int32_t c = part_i[(s * T + p) * NT + r];
            if (c < 0 || !(v < tv[kTopT - 1])) continue;
            int q = kTopT - 1;
            while (q > 0 && tv[q - 1] > v) {
              tv[q] = tv[q - 1];
              ti[q] = ti[q - 1];
              --q;
            }
            tv[q] = v;
            ti[q] = c;
          }
        }
        finish_exact(g, r, tv, ti, 1, my_hist);
      }
    });
  }

  if (want_hist) {
    int64_t* counts = out.counts;
    if (private_hist) {
      at::parallel_for(0, G * K, 4096, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t s = 0;
          for (int th = 0; th < nthreads; ++th) s += hist[size_t(th) * G * K + c];
          counts[c] = s;
        }
      });
    } else {
      std::memset(counts, 0, sizeof(int64_t) * G * K);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < N; ++i) ++counts[g * K + out.codes[g * N + i]];
    }
  }
}

#ifdef VQK_X86
// Per row of all groups: |v|, |v - bf16(v)| and |bf16(v)| (bf16_rounding_norms); false when a row's sum of
// squares is neither 0 nor within [2^-60, 2^60] (a NaN or Inf included, which the plain search then reports).
bool rounding_norms(const GroupedRows<float>& m, std::vector<double>& n, std::vector<double>& dn,
                    std::vector<double>& rn) {
  const int64_t R = m.G * m.rows;
  n.resize(R);
  dn.resize(R);
  rn.resize(R);
  std::atomic<bool> ok{true};
  at::parallel_for(0, R, 1024, [&](int64_t r0, int64_t r1) {
    for_group_ranges(r0, r1, m.rows, [&](int64_t g, int64_t i0, int64_t i1) {
      const int64_t r = g * m.rows + i0;
      bf16_rounding_norms(m.group(g), i0, i1, n.data() + r, dn.data() + r, rn.data() + r);
    });
    for (int64_t r = r0; r < r1; ++r) {
      if (!(n[r] == 0.0 || (n[r] >= 0x1p-60 && n[r] <= 0x1p60))) ok = false;
      n[r] = std::sqrt(n[r]);
      dn[r] = std::sqrt(dn[r]);
      rn[r] = std::sqrt(rn[r]);
    }
  });
  return ok.load();
}

// fp32 through a bf16 prefilter (TileKind::Bf16Rescore / BrgemmRescore, README "Method" §1.3a): a bf16 tile kernel
// on operands rounded to bf16 (RoundedToBf16: vdpbf16ps at twice the fp32 FMA rate, or AMX tiles through brgemm),
// exact mode's top-4 per row, and every candidate that the rounding may have put behind the true minimum re-scored
// in fp64.
//
// The bound, per row x against codes c (x~, c~ rounded to bf16; products of bf16 are exact in fp32):
//   |x . c - fl(x~ . c~)| <= |x . (c - c~)| + |(x - x~) . c~| + gamma_D |x~| |c~|
//                         <= |x| dc + |x - x~| ct + gamma_D |x~| ct          (Cauchy-Schwarz)
// with dc, ct the largest |c - c~|, |c~| of the codebook and gamma_D = (D + 2) 2^-24 / (1 - (D + 2) 2^-24) for
// the fp32 sum. The residual norms are measured, not assumed (they run at about 0.42 2^-8 |v| on random data, a
// third of the worst case), which is what lets the top-4 settle 97 % of the rows of Gaussian data at D = 256,
// K = 16384 (measured). A key adds its fp32 terms' rounding (l2: o = |c|^2 and the sum o - 2 x.c; cosine:
// 1 / |c|), and the whole carries a safety factor of 1.5. vdpbf16ps flushes denormals, an absolute error below
// D 2^-96 once every norm is 0 or within 2^+-30, which is checked first (else brgemm) and far below the bound.
// A row is settled when its 4th key minus the bound lies above the best candidate's fp64 key: no code behind the
// list can reach the minimum. It gets the fp64 argmin among the candidates with its fp64 distance: exact mode's
// answer. The other rows (near-ties, data whose norms dwarf its distances) are searched again by the fp32 search
// (brgemm), exact mode if asked, so the worst case costs the prefilter plus the fp32 search.
// on_brgemm: the rounded tiles go to ATen's brgemm (AMX tiles where the CPU has them), else to Bf16Avx512Gemm.
void search_fp32_via_bf16(const GroupedRows<float>& xm, const GroupedRows<float>& cm, Metric metric, bool exact,
                          EpilogueKind epi, const Outputs& out, bool on_brgemm) {
  using RM = RowMatrix<float>;
  auto fp32_grid = [&](const GroupedRows<float>& x, const GroupedRows<float>& c, const Outputs& o) {
    search_grid<float>([](const RM& cc, const RM& r) { return AtenTileGemm<float>(cc, r); }, x, c, metric, exact,
                       epi, o);
  };
  std::vector<double> xn, dx, xt, cn, dc, ct;
  if (!rounding_norms(xm, xn, dx, xt) || !rounding_norms(cm, cn, dc, ct)) return fp32_grid(xm, cm, out);
  const int64_t G = xm.G, N = xm.rows, D = xm.D, K = cm.rows, NT = G * N;
  constexpr double u = 0x1p-24;
  const double gD = double(D + 2) * u / (1.0 - double(D + 2) * u);
  std::vector<double> bound(NT);
  for (int64_t g = 0; g < G; ++g) {
    double cmax = 0.0, dcmax = 0.0, ctmax = 0.0, rdc = 0.0, rct = 0.0;  // rdc, rct: per 1 / max(|c|, eps)
    for (int64_t k = g * K; k < (g + 1) * K; ++k) {
      cmax = std::max(cmax, cn[k]);
      dcmax = std::max(dcmax, dc[k]);
      ctmax = std::max(ctmax, ct[k]);
      const double inv = 1.0 / std::max(cn[k], num::kCosEps);
      rdc = std::max(rdc, dc[k] * inv);
      rct = std::max(rct, ct[k] * inv);
    }
    for (int64_t i = g * N; i < (g + 1) * N; ++i) {
      double e;
      switch (metric) {
        case Metric::L2:
          e = 2.0 * (xn[i] * dcmax + (dx[i] + gD * xt[i]) * ctmax) + 3.0 * u * (cmax * cmax + 2.0 * xt[i] * ctmax);
          break;
        case Metric::Cosine: e = xn[i] * rdc + (dx[i] + gD * xt[i]) * rct + 3.0 * u * xt[i] * rct; break;
        default: e = xn[i] * dcmax + (dx[i] + gD * xt[i]) * ctmax + 2.0 * u * xt[i] * ctmax; break;
      }
      bound[i] = 1.5 * e + double(D) * 0x1p-90;
    }
  }
  std::vector<uint8_t> redo(NT, 0);
  GridOptions opt;
  opt.row_bound = bound.data();
  opt.redo = redo.data();
  // which rows settle depends on the keys' last bits: tiles of the same shape on any thread count keep them the
  // same (oneDNN may pick its brgemm kernel by the tile's shape), so the answer does not follow the thread count
  opt.fixed_blocks = true;
  const Outputs pre{out.codes, out.dist, nullptr, nullptr};
  if (on_brgemm) {
    search_grid<float>([](const RM& c, const RM& r) { return RoundedToBf16<AtenTileGemm<at::BFloat16>>(c, r); }, xm,
                       cm, metric, /*exact=*/true, epi, pre, opt);
  } else {
    search_grid<float>([](const RM& c, const RM& r) { return RoundedToBf16<Bf16Avx512Gemm>(c, r); }, xm, cm, metric,
                       /*exact=*/true, epi, pre, opt);
  }
  float* dist = static_cast<float*>(out.dist);
  for (int64_t g = 0; g < G; ++g) {
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < N; ++i)
      if (redo[g * N + i]) rows.push_back(i);
    if (rows.empty()) continue;
    const int64_t n = static_cast<int64_t>(rows.size());
    std::vector<float> xs(size_t(n) * D);
    for (int64_t j = 0; j < n; ++j) std::memcpy(xs.data() + j * D, xm.row(g, rows[j]), sizeof(float) * D);
    std::vector<int64_t> codes(n);
    std::vector<float> d(n);
    fp32_grid(GroupedRows<float>{xs.data(), 0, D, 1, n, D}, GroupedRows<float>{cm.data + g * cm.gs, 0, cm.ld, 1, K, D},
              Outputs{codes.data(), d.data(), nullptr, nullptr});
    for (int64_t j = 0; j < n; ++j) {
      out.codes[g * N + rows[j]] = codes[j];
      dist[g * N + rows[j]] = d[j];
    }
  }
  if (out.zq != nullptr) {
    float* zq = static_cast<float*>(out.zq);
    at::parallel_for(0, NT, 1024, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::memcpy(zq + r * D, cm.row(r / N, out.codes[r]), sizeof(float) * D);
    });
  }
  if (out.counts != nullptr) {
    std::memset(out.counts, 0, sizeof(int64_t) * G * K);
    for (int64_t r = 0; r < NT; ++r) ++out.counts[(r / N) * K + out.codes[r]];
  }
}
#endif

template <typename scalar_t>
GroupedRows<scalar_t> grouped(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), group_stride(t), t.stride(-2), groups_of(t), t.size(-2), t.size(-1)};
}

template <typename scalar_t>
void search_kernel(const at::Tensor& x, const at::Tensor& cb, Metric metric, bool exact, const Outputs& out) {
  const GroupedRows<scalar_t> xm = grouped<scalar_t>(x), cm = grouped<scalar_t>(cb);
  const std::string dtype = dtype_name(x.scalar_type());
  const EpilogueKind epi = epilogue_kind(dtype);
  // per group: a group's blocks hold its rows only, so its row count is what a GEMM's lanes see
  const TileKind tile = tile_kind(dtype, xm.rows);
  if (xm.G == 0) return;
  if (xm.rows == 0) {  // nothing to search; the codebooks are still checked (README "Method" §1.5)
    const int64_t K = cm.rows;
    std::vector<double> sq(K);
    for (int64_t g = 0; g < cm.G; ++g) {
      TORCH_CHECK_VALUE(sum_squares_rows(cm.group(g), 0, K, sq.data()),
                        "codebook contains non-finite values (NaN or Inf)");
    }
    return;
  }
  using RM = RowMatrix<scalar_t>;
#ifdef VQK_X86
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (tile == TileKind::Avx512Bf16)
      return search_grid<scalar_t>([](const RM& c, const RM& r) { return Bf16Avx512Gemm(c, r); }, xm, cm, metric,
                                   exact, epi, out);
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (tile == TileKind::Bf16Rescore || tile == TileKind::BrgemmRescore)
      return search_fp32_via_bf16(xm, cm, metric, exact, epi, out, tile == TileKind::BrgemmRescore);
  }
#endif
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (tile == TileKind::Gemv || tile == TileKind::GemvBf16) {
      // the GEMV kernel's vector width: the widest this CPU has (its own choice, apart from the epilogue's)
      const CpuFeatures& f = cpu_features();
      const EpilogueKind isa = f.avx512 ? EpilogueKind::Avx512 : (f.avx2_fma ? EpilogueKind::Avx2 : EpilogueKind::Scalar);
      const bool bf16dot = tile == TileKind::GemvBf16;
      return search_grid<scalar_t>(
          [isa, bf16dot, exact](const RM& c, const RM& r) { return GemvTile<scalar_t>(c, r, isa, bf16dot, exact); },
          xm, cm, metric, exact, epi, out);
    }
  }
  search_grid<scalar_t>([](const RM& c, const RM& r) { return AtenTileGemm<scalar_t>(c, r); }, xm, cm, metric, exact,
                        epi, out);
}

// x [N, D] / codebook [K, D], or batched x [G, N, D] / codebook [G, K, D] -> codes [(G,) N], z_q [(G,) N, D] (gather
// only; else empty), dist [(G,) N], counts [(G,) K] (gather only; else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> search(const at::Tensor& x_in, const at::Tensor& cb_in,
                                                                  c10::string_view metric_name, bool exact,
                                                                  bool gather) {
  check_search_args(x_in, cb_in);
  const Metric metric = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  // unit stride along D is all the kernels need: row-strided views (and the head split) are read in place
  const at::Tensor x = rows_unit_stride(x_in);
  const at::Tensor cb = rows_unit_stride(cb_in);
  const bool batched = x.dim() == 3;
  const int64_t G = groups_of(x), N = x.size(-2), D = x.size(-1), K = cb.size(-2);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto rows_shape = batched ? std::vector<int64_t>{G, N} : std::vector<int64_t>{N};
  const auto zq_shape = batched ? std::vector<int64_t>{G, N, D} : std::vector<int64_t>{N, D};
  const auto counts_shape = batched ? std::vector<int64_t>{G, K} : std::vector<int64_t>{K};
  auto codes = at::empty(rows_shape, x.options().dtype(at::kLong));
  auto dist = at::empty(rows_shape, x.options().dtype(acc_dtype));
  at::Tensor zq, counts;
  if (gather) {
    zq = at::empty(zq_shape, cb.options());
    counts = at::empty(counts_shape, x.options().dtype(at::kLong));
  } else {
    zq = at::empty({0}, cb.options());
    counts = at::empty({0}, x.options().dtype(at::kLong));
  }
  Outputs out{codes.data_ptr<int64_t>(), dist.data_ptr(), gather ? zq.data_ptr() : nullptr,
              gather ? counts.data_ptr<int64_t>() : nullptr};
  if (gather && N == 0) counts.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vqkernels_search_cpu",
                                  [&] { search_kernel<scalar_t>(x, cb, metric, exact, out); });
  return {codes, zq, dist, counts};
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                                    c10::string_view metric, bool exact) {
  auto [codes, zq, dist, counts] = search(x, codebook, metric, exact, /*gather=*/false);
  return {codes, dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x,
                                                                        const at::Tensor& codebook,
                                                                        c10::string_view metric, bool exact) {
  return search(x, codebook, metric, exact, /*gather=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) {
  m.impl("nearest_code", &nearest_code_cpu);
  m.impl("quantize", &quantize_cpu);
}

}  // namespace vqkernels::cpu

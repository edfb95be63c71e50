// sample_code on the CPU: per code k the row argmin_i (d(x_i, c_k) - g(seed, k, i)), a draw of
// P(i) ~ exp(-d(x_i, c_k)) by Gumbel-max (README "Method" §1; CVQ-VAE's "probrandom" anchors, Zheng & Vedaldi,
// ICCV 2023, §3.2).
//
// The tiles of search.cpp (codes major: rows are codes read in place, columns a packed block of input rows) reduced
// the other way: each tile row to one code's running (min key - noise, row) while the tile is hot (sample_tile,
// epilogues.h). Nothing of size N x K (or K x N) is allocated: a thread holds one tile and one packed block of
// input rows, and the other buffers are O(N + K) (key terms, per-index noise keys) plus O(K) partial results per
// range of input rows, merged in range order with a strict <, which keeps the lowest row on ties. bf16 / fp16
// inputs are upcast to fp32 first: their products are exact in fp32, so this is what an fp32-accumulating kernel
// computes anyway, and the fp32 tile GEMM is the fastest.
//
// The batched form (x [G, N, D], codebook [G, K, D], README "Method" §1.6): one grid of (group, row range, code
// split) tasks over all groups; group g's code k takes the noise of code g * K + k and its rows the noise of their
// index within the group, so group g draws what the 2-D op draws for code indices offset by g * K.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "epilogues.h"
#include "row_norms.h"
#include "tile_gemm.h"

namespace vqkernels::cpu {
namespace {

// x: G groups of N rows, cb: G groups of K codes (a 2-D call is one group); out [G * K]: per code of every group the
// row (within its group) drawn for it. Code k of group g is keyed in the noise as code g * K + k.
template <typename acc_t>
void sample_kernel(const GroupedRows<acc_t>& xm, const GroupedRows<acc_t>& cm, Metric metric, int64_t seed,
                   int64_t* out) {
  const int64_t G = xm.G, N = xm.rows, K = cm.rows;
  const int64_t KT = G * K, NT = G * N;  // codes and rows of all groups (code k of group g at g * K + k)
  const uint32_t s_code = num::seed_code(seed), s_row = num::seed_row(seed);
  const EpilogueKind epi = epilogue_kind(std::is_same_v<acc_t, double> ? "fp64" : "fp32");

  // Per code: the factor and term of its part of the distance (rs = 1 / max(|c|, eps) for cosine, i.e. minus the
  // code's own w; rt = |c|^2 for l2, its o) and its noise key q_k.
  std::vector<acc_t> rs(KT), rt(KT);
  std::vector<uint32_t> qkey(KT);
  std::vector<double> csq(KT);
  std::atomic<bool> cb_finite{true};
  at::parallel_for(0, KT, 1024, [&](int64_t c0, int64_t c1) {
    for_group_ranges(c0, c1, K, [&](int64_t g, int64_t k0, int64_t k1) {
      if (!sum_squares_rows(cm.group(g), k0, k1, csq.data() + g * K + k0)) cb_finite = false;
    });
    for (int64_t c = c0; c < c1; ++c) {
      const double sq = csq[c];
      rs[c] = metric == Metric::Cosine ? static_cast<acc_t>(1.0 / std::max(std::sqrt(sq), num::kCosEps)) : acc_t(1);
      rt[c] = metric == Metric::L2 ? static_cast<acc_t>(sq) : acc_t(0);
      qkey[c] = num::index_key(c, s_code);
    }
  });
  TORCH_CHECK_VALUE(cb_finite.load(), "codebook contains non-finite values (NaN or Inf)");

  // Per input row: its key terms (w, o) as if it were a code of the search ([G * N]), and its noise key r_i ([N]:
  // rows are keyed by their index within the group, so every group shares them).
  std::vector<acc_t> w(NT), o(NT);
  std::vector<uint32_t> rkey(N);
  std::vector<double> xsq(NT);
  std::atomic<bool> x_finite{true};
  at::parallel_for(0, NT, 1024, [&](int64_t r0, int64_t r1) {
    for_group_ranges(r0, r1, N, [&](int64_t g, int64_t i0, int64_t i1) {
      if (!sum_squares_rows(xm.group(g), i0, i1, xsq.data() + g * N + i0)) x_finite = false;
      if (g == 0)
        for (int64_t i = i0; i < i1; ++i) rkey[i] = num::index_key(i, s_row);
    });
    for (int64_t r = r0; r < r1; ++r) {
      const double sq = xsq[r];
      switch (metric) {
        case Metric::L2: w[r] = acc_t(-2); o[r] = static_cast<acc_t>(sq); break;
        case Metric::Cosine:
          w[r] = static_cast<acc_t>(-1.0 / std::max(std::sqrt(sq), num::kCosEps));
          o[r] = acc_t(0);
          break;
        case Metric::Dot: w[r] = acc_t(-1); o[r] = acc_t(0); break;
      }
    }
  });
  TORCH_CHECK_VALUE(x_finite.load(), "x contains non-finite values (NaN or Inf)");

  // Tasks: (group, range of input rows (whole column blocks of BN rows each), split of the codes). A task packs each
  // of its column blocks once and runs every code tile of its split against it, keeping per code the running
  // (min key - noise, row). Ranges balance the work (about 4 tasks a thread, over all groups) as long as their
  // per-code partial results stay under 64 MiB; the codes are split as well when the ranges of all groups are
  // fewer than the threads (a split packs its column blocks again, so splits are the second resort).
  const int nthreads = at::get_num_threads();
  const int64_t BN = std::min<int64_t>(N, env_int("VQK_CPU_BN", 256));  // input rows per column block
  const int64_t BM = std::min<int64_t>(K, env_int("VQK_CPU_BM", 256));  // codes per tile
  const int64_t col_blocks = (N + BN - 1) / BN;
  const int64_t max_ranges = std::max<int64_t>(1, (int64_t(64) << 20) / (KT * int64_t(sizeof(acc_t) + 8)));
  const int64_t ranges = std::min({col_blocks, (int64_t(4) * nthreads + G - 1) / G, max_ranges});
  const int64_t blocks_per_range = (col_blocks + ranges - 1) / ranges;
  const int64_t R = (col_blocks + blocks_per_range - 1) / blocks_per_range;  // ranges per group
  int64_t S = G * R >= nthreads
                  ? 1
                  : std::max<int64_t>(1, std::min((4 * nthreads + G * R - 1) / (G * R), (K + BM - 1) / BM));
  const int64_t per_split = (K + S - 1) / S;
  S = (K + per_split - 1) / per_split;
  // [G, R, K]: per group, range and code the best (key - noise) and its row
  std::vector<acc_t> part_best(size_t(G) * R * K);
  std::vector<int64_t> part_idx(size_t(G) * R * K);

  const int64_t ldt = (BN + kRowLanes - 1) / kRowLanes * kRowLanes;
  const bool clamp = metric == Metric::L2;  // d >= 0, as the reference clamps
  at::parallel_for(0, G * R * S, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> tile(size_t(BM) * ldt);
    typename AtenTileGemm<acc_t>::Scratch scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / (R * S), range = (t / S) % R, split = t % S;
      const AtenTileGemm<acc_t> gemm(cm.group(g), xm.group(g));  // rows: the codes; columns: the input rows
      const int64_t k_lo = split * per_split, k_hi = std::min(K, k_lo + per_split);
      const int64_t i_lo = range * blocks_per_range * BN;
      const int64_t i_hi = std::min(N, i_lo + blocks_per_range * BN);
      acc_t* best = part_best.data() + (g * R + range) * K;
      int64_t* bidx = part_idx.data() + (g * R + range) * K;
      const int64_t gk = g * K, gn = g * N;
      // all keys infinite (overflow) leaves the first row of the range, as the reference's first minimum
      std::fill(best + k_lo, best + k_hi, std::numeric_limits<acc_t>::infinity());
      std::fill(bidx + k_lo, bidx + k_hi, i_lo);
      for (int64_t c0 = i_lo; c0 < i_hi; c0 += BN) {
        const int64_t nc = std::min(BN, i_hi - c0);
        gemm.load_cols(scratch, c0, nc);
        for (int64_t r0 = k_lo; r0 < k_hi; r0 += BM) {
          const int64_t m = std::min(BM, k_hi - r0);
          gemm.tile(scratch, r0, m, nc, tile.data(), ldt);
          sample_tile(epi, tile.data(), m, nc, ldt, w.data() + gn + c0, o.data() + gn + c0, rkey.data() + c0, c0,
                      rs.data() + gk + r0, rt.data() + gk + r0, qkey.data() + gk + r0, clamp, best + r0, bidx + r0);
        }
      }
    }
    AtenTileGemm<acc_t>(cm.group(0), xm.group(0)).release();  // once per thread (brgemm's per-thread state)
  });
  for (int64_t g = 0; g < G; ++g) {
    const acc_t* pb = part_best.data() + g * R * K;
    const int64_t* pi = part_idx.data() + g * R * K;
    for (int64_t k = 0; k < K; ++k) {
      acc_t b = pb[k];
      int64_t bi = pi[k];
      for (int64_t r = 1; r < R; ++r) {
        if (pb[r * K + k] < b) {  // strict: earlier ranges hold lower rows
          b = pb[r * K + k];
          bi = pi[r * K + k];
        }
      }
      out[g * K + k] = bi;
    }
  }
}

// x [N, D] / codebook [K, D] -> [K]; batched x [G, N, D] / codebook [G, K, D] -> [G, K].
at::Tensor sample_code_cpu(const at::Tensor& x_in, const at::Tensor& cb_in, c10::string_view metric_name,
                           int64_t seed) {
  check_search_args(x_in, cb_in);
  const Metric metric = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  TORCH_CHECK_VALUE(x_in.size(-2) >= 1, "x must hold at least one row to sample from; got N = 0");
  TORCH_CHECK_VALUE(x_in.size(-2) < (int64_t(1) << 31), "x may hold at most 2^31 - 1 rows to sample from");
  const auto acc_dtype = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = rows_unit_stride(x_in.to(acc_dtype));
  const at::Tensor cb = rows_unit_stride(cb_in.to(acc_dtype));
  const int64_t G = groups_of(x), K = cb.size(-2);
  auto out = at::empty(x.dim() == 3 ? std::vector<int64_t>{G, K} : std::vector<int64_t>{K},
                       x_in.options().dtype(at::kLong));
  if (G == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "vqkernels_sample_cpu", [&] {
    const GroupedRows<scalar_t> xm{x.const_data_ptr<scalar_t>(), group_stride(x), x.stride(-2), G, x.size(-2),
                                   x.size(-1)};
    const GroupedRows<scalar_t> cm{cb.const_data_ptr<scalar_t>(), group_stride(cb), cb.stride(-2), G, K, cb.size(-1)};
    sample_kernel<scalar_t>(xm, cm, metric, seed, out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) { m.impl("sample_code", &sample_code_cpu); }

}  // namespace vqkernels::cpu

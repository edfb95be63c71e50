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

template <typename acc_t>
void sample_kernel(const at::Tensor& x, const at::Tensor& cb, Metric metric, int64_t seed, int64_t* out) {
  const int64_t N = x.size(0), D = x.size(1), K = cb.size(0);
  const RowMatrix<acc_t> xm{x.const_data_ptr<acc_t>(), x.stride(0), N, D};
  const RowMatrix<acc_t> cm{cb.const_data_ptr<acc_t>(), cb.stride(0), K, D};
  const uint32_t s_code = num::seed_code(seed), s_row = num::seed_row(seed);
  const EpilogueKind epi = epilogue_kind(std::is_same_v<acc_t, double> ? "fp64" : "fp32");

  // Per code: the factor and term of its part of the distance (rs = 1 / max(|c|, eps) for cosine, i.e. minus the
  // code's own w; rt = |c|^2 for l2, its o) and its noise key q_k.
  std::vector<acc_t> rs(K), rt(K);
  std::vector<uint32_t> qkey(K);
  std::vector<double> csq(K);
  std::atomic<bool> cb_finite{true};
  at::parallel_for(0, K, 1024, [&](int64_t k0, int64_t k1) {
    if (!sum_squares_rows(cm, k0, k1, csq.data() + k0)) cb_finite = false;
    for (int64_t k = k0; k < k1; ++k) {
      const double sq = csq[k];
      rs[k] = metric == Metric::Cosine ? static_cast<acc_t>(1.0 / std::max(std::sqrt(sq), num::kCosEps)) : acc_t(1);
      rt[k] = metric == Metric::L2 ? static_cast<acc_t>(sq) : acc_t(0);
      qkey[k] = num::index_key(k, s_code);
    }
  });
  TORCH_CHECK_VALUE(cb_finite.load(), "codebook contains non-finite values (NaN or Inf)");

  // Per input row: its key terms (w, o) as if it were a code of the search, and its noise key r_i.
  std::vector<acc_t> w(N), o(N);
  std::vector<uint32_t> rkey(N);
  std::vector<double> xsq(N);
  std::atomic<bool> x_finite{true};
  at::parallel_for(0, N, 1024, [&](int64_t i0, int64_t i1) {
    if (!sum_squares_rows(xm, i0, i1, xsq.data() + i0)) x_finite = false;
    for (int64_t i = i0; i < i1; ++i) {
      const double sq = xsq[i];
      switch (metric) {
        case Metric::L2: w[i] = acc_t(-2); o[i] = static_cast<acc_t>(sq); break;
        case Metric::Cosine:
          w[i] = static_cast<acc_t>(-1.0 / std::max(std::sqrt(sq), num::kCosEps));
          o[i] = acc_t(0);
          break;
        case Metric::Dot: w[i] = acc_t(-1); o[i] = acc_t(0); break;
      }
      rkey[i] = num::index_key(i, s_row);
    }
  });
  TORCH_CHECK_VALUE(x_finite.load(), "x contains non-finite values (NaN or Inf)");

  // Tasks: ranges of input rows (whole column blocks of BN rows each) times splits of the codes. A task packs each
  // of its column blocks once and runs every code tile of its split against it, keeping per code the running
  // (min key - noise, row). Ranges balance the work (about 4 tasks a thread) as long as their per-code partial
  // results stay under 64 MiB; the codes are split as well when the ranges are fewer than the threads (a split
  // packs its column blocks again, so splits are the second resort).
  const int nthreads = at::get_num_threads();
  const int64_t BN = std::min<int64_t>(N, env_int("VQK_CPU_BN", 256));  // input rows per column block
  const int64_t BM = std::min<int64_t>(K, env_int("VQK_CPU_BM", 256));  // codes per tile
  const int64_t col_blocks = (N + BN - 1) / BN;
  const int64_t max_ranges = std::max<int64_t>(1, (int64_t(64) << 20) / (K * int64_t(sizeof(acc_t) + 8)));
  const int64_t ranges = std::min({col_blocks, int64_t(4) * nthreads, max_ranges});
  const int64_t blocks_per_range = (col_blocks + ranges - 1) / ranges;
  const int64_t R = (col_blocks + blocks_per_range - 1) / blocks_per_range;
  int64_t S = R >= nthreads ? 1 : std::max<int64_t>(1, std::min((4 * nthreads + R - 1) / R, (K + BM - 1) / BM));
  const int64_t per_split = (K + S - 1) / S;
  S = (K + per_split - 1) / per_split;
  std::vector<acc_t> part_best(size_t(R) * K);
  std::vector<int64_t> part_idx(size_t(R) * K);

  const AtenTileGemm<acc_t> gemm(cm, xm);  // rows: the codes; columns: the input rows
  const int64_t ldt = (BN + kRowLanes - 1) / kRowLanes * kRowLanes;
  const bool clamp = metric == Metric::L2;  // d >= 0, as the reference clamps
  at::parallel_for(0, R * S, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> tile(size_t(BM) * ldt);
    typename AtenTileGemm<acc_t>::Scratch scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t range = t / S, split = t % S;
      const int64_t k_lo = split * per_split, k_hi = std::min(K, k_lo + per_split);
      const int64_t i_lo = range * blocks_per_range * BN;
      const int64_t i_hi = std::min(N, i_lo + blocks_per_range * BN);
      acc_t* best = part_best.data() + range * K;
      int64_t* bidx = part_idx.data() + range * K;
      // all keys infinite (overflow) leaves the first row of the range, as the reference's first minimum
      std::fill(best + k_lo, best + k_hi, std::numeric_limits<acc_t>::infinity());
      std::fill(bidx + k_lo, bidx + k_hi, i_lo);
      for (int64_t c0 = i_lo; c0 < i_hi; c0 += BN) {
        const int64_t nc = std::min(BN, i_hi - c0);
        gemm.load_cols(scratch, c0, nc);
        for (int64_t r0 = k_lo; r0 < k_hi; r0 += BM) {
          const int64_t m = std::min(BM, k_hi - r0);
          gemm.tile(scratch, r0, m, nc, tile.data(), ldt);
          sample_tile(epi, tile.data(), m, nc, ldt, w.data() + c0, o.data() + c0, rkey.data() + c0, c0,
                      rs.data() + r0, rt.data() + r0, qkey.data() + r0, clamp, best + r0, bidx + r0);
        }
      }
    }
    gemm.release();
  });
  for (int64_t k = 0; k < K; ++k) {
    acc_t b = part_best[k];
    int64_t bi = part_idx[k];
    for (int64_t r = 1; r < R; ++r) {
      if (part_best[r * K + k] < b) {  // strict: earlier ranges hold lower rows
        b = part_best[r * K + k];
        bi = part_idx[r * K + k];
      }
    }
    out[k] = bi;
  }
}

at::Tensor sample_code_cpu(const at::Tensor& x_in, const at::Tensor& cb_in, c10::string_view metric_name,
                           int64_t seed) {
  check_search_args(x_in, cb_in);
  const Metric metric = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  TORCH_CHECK_VALUE(x_in.size(0) >= 1, "x must hold at least one row to sample from; got N = 0");
  TORCH_CHECK_VALUE(x_in.size(0) < (int64_t(1) << 31), "x may hold at most 2^31 - 1 rows to sample from");
  const auto acc_dtype = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = rows_unit_stride(x_in.to(acc_dtype));
  const at::Tensor cb = rows_unit_stride(cb_in.to(acc_dtype));
  auto out = at::empty({cb.size(0)}, x_in.options().dtype(at::kLong));
  if (acc_dtype == at::kDouble) {
    sample_kernel<double>(x, cb, metric, seed, out.data_ptr<int64_t>());
  } else {
    sample_kernel<float>(x, cb, metric, seed, out.data_ptr<int64_t>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) { m.impl("sample_code", &sample_code_cpu); }

}  // namespace vqkernels::cpu

// sample_code on the CPU: per code k the row argmin_i (d(x_i, c_k) - g(seed, k, i)), a draw of
// P(i) ~ exp(-d(x_i, c_k)) by Gumbel-max (README "Method" §1; CVQ-VAE's "probrandom" anchors, Zheng & Vedaldi,
// ICCV 2023, §3.2).
//
// The search of search.cpp with the roles swapped: the codes are the rows of the tiles and the input rows stream
// through the tile GEMM as its columns, so each tile row reduces to one code's running (min key - noise, row) while
// the tile is hot (sample_tile, epilogues.h). Nothing of size N x K (or K x N) is allocated: a thread holds one
// tile, and the only other buffers are O(N + K) (key terms, per-index noise keys, the transposed copy of x the
// tile GEMM streams from) plus O(K) partial results per row range.
//
// Work is split into (code block, row range) tasks: code blocks alone when there are enough of them, and row ranges
// as well when the codes are few; the ranges' results are merged in range order with a strict <, which keeps the
// lowest row on ties. bf16 / fp16 inputs are upcast to fp32 first: their products are exact in fp32, so this is
// what an fp32-accumulating kernel computes anyway, and the fp32 tile GEMM is the fastest.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "epilogues.h"
#include "tile_gemm.h"

namespace vqkernels::cpu {
namespace {

template <typename acc_t>
void sample_kernel(const at::Tensor& x, const at::Tensor& cb, Metric metric, int64_t seed, int64_t* out) {
  const int64_t N = x.size(0), D = x.size(1), K = cb.size(0);
  const acc_t* xp = x.const_data_ptr<acc_t>();
  const acc_t* cp = cb.const_data_ptr<acc_t>();
  const uint32_t s_code = num::seed_code(seed), s_row = num::seed_row(seed);

  // Per code: the factor and term of its part of the distance (rs = 1 / max(|c|, eps) for cosine, i.e. minus the
  // code's own w; rt = |c|^2 for l2, its o) and its noise key q_k.
  std::vector<acc_t> rs(K), rt(K);
  std::vector<uint32_t> qkey(K);
  std::atomic<bool> cb_finite{true};
  at::parallel_for(0, K, 1024, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      bool fin;
      const double sq = sum_squares64(cp + k * D, D, &fin);
      if (!fin) cb_finite = false;
      rs[k] = metric == Metric::Cosine ? static_cast<acc_t>(1.0 / std::max(std::sqrt(sq), num::kCosEps)) : acc_t(1);
      rt[k] = metric == Metric::L2 ? static_cast<acc_t>(sq) : acc_t(0);
      qkey[k] = num::index_key(k, s_code);
    }
  });
  TORCH_CHECK_VALUE(cb_finite.load(), "codebook contains non-finite values (NaN or Inf)");

  // Per input row: its key terms (w, o) as if it were a code of the search, and its noise key r_i.
  std::vector<acc_t> w(N), o(N);
  std::vector<uint32_t> rkey(N);
  std::atomic<bool> x_finite{true};
  at::parallel_for(0, N, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      bool fin;
      const double sq = sum_squares64(xp + i * D, D, &fin);
      if (!fin) x_finite = false;
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

  const int nthreads = at::get_num_threads();
  const int64_t BN = std::min<int64_t>(N, env_int("VQK_CPU_BN", 256));  // input rows per tile
  // code blocks of at most VQK_CPU_BM codes, of equal size
  const int64_t ncb = (K + env_int("VQK_CPU_BM", 256) - 1) / env_int("VQK_CPU_BM", 256);
  const int64_t BM = (K + ncb - 1) / ncb;
  const int64_t col_blocks = (N + BN - 1) / BN;
  // Row ranges (whole tiles each) as well when the code blocks alone cannot share the threads evenly: then about
  // four tasks per thread.
  const int64_t ranges = ncb % nthreads == 0 ? 1 : std::min(col_blocks, (4 * nthreads + ncb - 1) / ncb);
  const int64_t blocks_per_range = (col_blocks + ranges - 1) / ranges;
  std::vector<acc_t> part_best(ranges > 1 ? size_t(ranges) * K : 0);
  std::vector<int64_t> part_idx(ranges > 1 ? size_t(ranges) * K : 0);

  const AtenTileGemm<acc_t> gemm(cb, x);  // rows: the codes; columns: the input rows
  const bool clamp = metric == Metric::L2;  // d >= 0, as the reference clamps
  at::parallel_for(0, ncb * ranges, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> tile(size_t(BM) * BN);
    typename AtenTileGemm<acc_t>::Scratch scratch;
    std::vector<acc_t> best(BM);
    std::vector<int64_t> bidx(BM);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t cblk = t / ranges, range = t % ranges;
      const int64_t r0 = cblk * BM, m = std::min(BM, K - r0);
      const int64_t i_lo = range * blocks_per_range * BN;
      const int64_t i_hi = std::min(N, i_lo + blocks_per_range * BN);
      // all keys infinite (overflow) leaves the first row of the range, as the reference's first minimum
      std::fill(best.begin(), best.end(), std::numeric_limits<acc_t>::infinity());
      std::fill(bidx.begin(), bidx.end(), i_lo);
      gemm.load_rows(scratch, r0, m);
      for (int64_t c0 = i_lo; c0 < i_hi; c0 += BN) {
        const int64_t nc = std::min(BN, i_hi - c0);
        const int64_t ld = gemm.tile(scratch, r0, m, c0, nc, tile.data(), BN);
        sample_tile(tile.data(), m, nc, ld, w.data() + c0, o.data() + c0, rkey.data() + c0, c0, rs.data() + r0,
                    rt.data() + r0, qkey.data() + r0, clamp, best.data(), bidx.data());
      }
      if (ranges == 1) {
        std::copy(bidx.begin(), bidx.begin() + m, out + r0);
      } else {
        std::copy(best.begin(), best.begin() + m, part_best.begin() + range * K + r0);
        std::copy(bidx.begin(), bidx.begin() + m, part_idx.begin() + range * K + r0);
      }
    }
    gemm.release();
  });
  if (ranges > 1) {
    for (int64_t k = 0; k < K; ++k) {
      acc_t b = part_best[k];
      int64_t bi = part_idx[k];
      for (int64_t r = 1; r < ranges; ++r) {
        if (part_best[r * K + k] < b) {  // strict: earlier ranges hold lower rows
          b = part_best[r * K + k];
          bi = part_idx[r * K + k];
        }
      }
      out[k] = bi;
    }
  }
}

at::Tensor sample_code_cpu(const at::Tensor& x_in, const at::Tensor& cb_in, c10::string_view metric_name,
                           int64_t seed) {
  check_search_args(x_in, cb_in);
  const Metric metric = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  TORCH_CHECK_VALUE(x_in.size(0) >= 1, "x must hold at least one row to sample from; got N = 0");
  TORCH_CHECK_VALUE(x_in.size(0) < (int64_t(1) << 31), "x may hold at most 2^31 - 1 rows to sample from");
  const auto acc_dtype = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.to(acc_dtype).contiguous();
  const at::Tensor cb = cb_in.to(acc_dtype).contiguous();
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

// Fused nearest-code search on the CPU: tiled GEMM + argmin epilogue + gather + usage histogram
// (README "Method" §1).
//
// Each thread owns a block of BM input rows (default 256; env VQK_CPU_BM). The tile is BM x BN (BN default 256,
// env VQK_CPU_BN): 256 KiB of fp32, measured best on a 2-core AVX-512 machine for D = 64 and 256. The codebook
// streams through in blocks of BN codes; the BM x BN tile of dot products is produced by a single-threaded tile
// GEMM (tile_gemm.h, bf16_microkernel.h) into a thread-local buffer that stays in L2, and is reduced to a running
// (min key, index) per row while it is hot (epilogues.h). Nothing of size N x K is ever allocated.
//
// Argmin key per code k: key = w_k * (x . c_k) + o_k
//   l2:     w = -2,         o = |c_k|^2   (|x|^2 is constant per row and added back for the distance)
//   cosine: w = -1/max(|c_k|, eps), o = 0
//   dot:    w = -1,         o = 0
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
#include "epilogues.h"
#include "tile_gemm.h"

namespace vqkernels::cpu {
namespace {

struct Outputs {
  int64_t* codes;
  void* dist;        // acc_t [N]
  void* zq;          // scalar_t [N, D] or nullptr
  int64_t* counts;   // [K] or nullptr
};

// Per-code key terms (README "Method" §1) and fp64 norms, from the codes as stored.
template <typename scalar_t>
struct CodeTerms {
  using acc_t = typename AccOf<scalar_t>::type;
  std::vector<acc_t> w, o;
  std::vector<double> cnorm;
  double cmax = 0.0;
};

template <typename scalar_t, typename Gemm>
void search_blocks(const Gemm& gemm, const at::Tensor& x, const at::Tensor& cb, Metric metric, bool exact,
                   const CodeTerms<scalar_t>& terms, const Outputs& out) {
  using acc_t = typename AccOf<scalar_t>::type;
  static_assert(std::is_same_v<acc_t, typename Gemm::acc_t>);
  const int64_t N = x.size(0), D = x.size(1), K = cb.size(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* cp = cb.const_data_ptr<scalar_t>();
  acc_t* dist = static_cast<acc_t*>(out.dist);
  scalar_t* zq = static_cast<scalar_t*>(out.zq);
  const acc_t* w = terms.w.data();
  const acc_t* o = terms.o.data();
  const double cmax = terms.cmax;

  const int nthreads = at::get_num_threads();
  const int64_t BN = std::min<int64_t>(K, env_int("VQK_CPU_BN", 256));
  const int64_t BM = std::min<int64_t>(env_int("VQK_CPU_BM", 256), (N + nthreads - 1) / nthreads);
  const int64_t nblk = (N + BM - 1) / BM;

  // Per-thread usage histograms merged after the loop (no atomics); above a memory budget, fall back to
  // a second pass over the codes.
  const bool want_hist = out.counts != nullptr;
  const bool private_hist = want_hist && int64_t(nthreads) * K * 8 <= (int64_t(64) << 20);
  std::vector<int64_t> hist(private_hist ? size_t(nthreads) * K : 0, 0);

  // Code blocks are whole multiples of what the tile kernel fills at once.
  const int64_t BNt = (BN + Gemm::kColAlign - 1) / Gemm::kColAlign * Gemm::kColAlign;
  const int64_t ldt = BNt;
  std::atomic<bool> x_finite{true};
  const double gamma = num::exact_gamma(D, std::is_same_v<acc_t, double>);

  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> tile(size_t(BM + Gemm::kRowPad) * ldt);
    typename Gemm::Scratch scratch;
    std::vector<acc_t> best(BM);
    std::vector<int64_t> bidx(BM);
    std::vector<acc_t> topv(exact ? size_t(BM) * kTopT : 0);
    std::vector<int64_t> topi(exact ? size_t(BM) * kTopT : 0);
    std::vector<double> xnorm(BM), xsq(BM);
    int64_t* my_hist = private_hist ? hist.data() + size_t(at::get_thread_num()) * K : nullptr;

    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * BM, m = std::min(BM, N - r0);
      bool fin_all = true;
      for (int64_t r = 0; r < m; ++r) {
        bool fin;
        xsq[r] = sum_squares64(xp + (r0 + r) * D, D, &fin);  // l2's row term: a sum of squares, as o
        xnorm[r] = std::sqrt(xsq[r]);
        fin_all &= fin;
      }
      if (!fin_all) {
        x_finite = false;
        continue;
      }
      std::fill(best.begin(), best.end(), std::numeric_limits<acc_t>::infinity());
      std::fill(bidx.begin(), bidx.end(), int64_t(0));
      if (exact) {
        std::fill(topv.begin(), topv.end(), std::numeric_limits<acc_t>::infinity());
        std::fill(topi.begin(), topi.end(), int64_t(-1));
      }
      gemm.load_rows(scratch, r0, m);
      for (int64_t kb = 0; kb < K; kb += BNt) {
        const int64_t nb = std::min(BNt, K - kb);
        const int64_t ld = gemm.tile(scratch, r0, m, kb, nb, tile.data(), ldt);
        if (exact) {
          topk_tile(tile.data(), m, nb, ld, w + kb, o + kb, kb, topv.data(), topi.data());
        } else {
          argmin_tile(tile.data(), m, nb, ld, w + kb, o + kb, kb, best.data(), bidx.data());
        }
      }
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = r0 + r;
        const scalar_t* xr = xp + i * D;
        int64_t code;
        acc_t d;
        if (exact) {
          acc_t* tv = topv.data() + r * kTopT;
          int64_t* ti = topi.data() + r * kTopT;
          // Every code whose fast key may round below the true minimum lies within 2E of the fast minimum; when
          // the last kept candidate is inside too, more may hide behind it: re-scan the row.
          const double xn = xnorm[r];
          const double thresh = num::exact_threshold(static_cast<int>(metric), xn, cmax, double(tv[0]), gamma);
          const bool overflow = ti[kTopT - 1] >= 0 && double(tv[kTopT - 1]) <= thresh;
          double bd = std::numeric_limits<double>::infinity();
          int64_t bc = -1;
          if (overflow) {
            for (int64_t k = 0; k < K; ++k) {
              const double dk = rescore(xr, cp + k * D, D, metric, xn, terms.cnorm[k]);
              if (dk < bd || bc < 0) { bd = dk; bc = k; }
            }
          } else {
            for (int p = 0; p < kTopT; ++p) {
              if (ti[p] < 0 || double(tv[p]) > thresh) break;
              const double dk = rescore(xr, cp + ti[p] * D, D, metric, xn, terms.cnorm[ti[p]]);
              if (bc < 0 || dk < bd || (dk == bd && ti[p] < bc)) { bd = dk; bc = ti[p]; }
            }
          }
          code = bc;
          d = static_cast<acc_t>(bd);
        } else {
          code = bidx[r];
          const acc_t key = best[r];
          switch (metric) {
            case Metric::L2: d = std::max(static_cast<acc_t>(xsq[r]) + key, acc_t(0)); break;
            case Metric::Cosine: d = acc_t(1) + key / static_cast<acc_t>(std::max(xnorm[r], num::kCosEps)); break;
            default: d = key; break;
          }
        }
        out.codes[i] = code;
        dist[i] = d;
        if (zq != nullptr) std::memcpy(zq + i * D, cp + code * D, sizeof(scalar_t) * D);
        if (my_hist != nullptr) ++my_hist[code];
      }
    }
    gemm.release();
  });
  TORCH_CHECK_VALUE(x_finite.load(), "x contains non-finite values (NaN or Inf)");

  if (want_hist) {
    int64_t* counts = out.counts;
    if (private_hist) {
      at::parallel_for(0, K, 4096, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          int64_t s = 0;
          for (int t = 0; t < nthreads; ++t) s += hist[size_t(t) * K + k];
          counts[k] = s;
        }
      });
    } else {
      std::fill(counts, counts + K, int64_t(0));
      for (int64_t i = 0; i < N; ++i) ++counts[out.codes[i]];
    }
  }
}

template <typename scalar_t>
void search_kernel(const at::Tensor& x, const at::Tensor& cb, Metric metric, bool exact, const Outputs& out) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t N = x.size(0), D = x.size(1), K = cb.size(0);
  const scalar_t* cp = cb.const_data_ptr<scalar_t>();

  CodeTerms<scalar_t> terms;
  terms.w.resize(K);
  terms.o.resize(K);
  terms.cnorm.resize(K);
  std::atomic<bool> cb_finite{true};
  at::parallel_for(0, K, 1024, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      bool fin;
      const double sq = sum_squares64(cp + k * D, D, &fin);
      const double n = std::sqrt(sq);
      if (!fin) cb_finite = false;
      terms.cnorm[k] = n;
      switch (metric) {
        case Metric::L2: terms.w[k] = acc_t(-2); terms.o[k] = static_cast<acc_t>(sq); break;
        case Metric::Cosine:
          terms.w[k] = static_cast<acc_t>(-1.0 / std::max(n, num::kCosEps));
          terms.o[k] = acc_t(0);
          break;
        case Metric::Dot: terms.w[k] = acc_t(-1); terms.o[k] = acc_t(0); break;
      }
    }
  });
  TORCH_CHECK_VALUE(cb_finite.load(), "codebook contains non-finite values (NaN or Inf)");
  if (N == 0) return;
  terms.cmax = *std::max_element(terms.cnorm.begin(), terms.cnorm.end());

#ifdef VQK_X86
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (cpu_has_avx512bf16() && env_int("VQK_CPU_BF16_BRGEMM", 0) != 1) {
      return search_blocks<scalar_t>(Bf16Avx512Gemm(x, cb), x, cb, metric, exact, terms, out);
    }
  }
#endif
  search_blocks<scalar_t>(AtenTileGemm<scalar_t>(x, cb), x, cb, metric, exact, terms, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> search(const at::Tensor& x_in, const at::Tensor& cb_in,
                                                                  c10::string_view metric_name, bool exact,
                                                                  bool gather) {
  check_search_args(x_in, cb_in);
  const Metric metric = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cb = cb_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1), K = cb.size(0);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto codes = at::empty({N}, x.options().dtype(at::kLong));
  auto dist = at::empty({N}, x.options().dtype(acc_dtype));
  at::Tensor zq, counts;
  if (gather) {
    zq = at::empty({N, D}, cb.options());
    counts = at::empty({K}, x.options().dtype(at::kLong));
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

// Fused nearest-code search on the CPU: tiled GEMM + argmin epilogue + gather + usage histogram.
//
// Each thread owns a block of BM input rows (default 256; env VQK_CPU_BM). The tile is BM x BN (BN default 256,
// env VQK_CPU_BN): 256 KiB of fp32, measured best on a 2-core AVX-512 machine for D = 64 and 256.
// The codebook streams through in blocks of BN codes; the BM x BN tile
// of dot products is produced by a single-threaded GEMM into a thread-local buffer that stays in L2, and is reduced
// to a running (min key, index) per row while it is hot. Nothing of size N x K is ever allocated.
//
// Argmin key per code k: key = w_k * (x . c_k) + o_k
//   l2:     w = -2,         o = |c_k|^2   (|x|^2 is constant per row and added back for the distance)
//   cosine: w = -1/max(|c_k|, eps), o = 0
//   dot:    w = -1,         o = 0
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VQK_X86 1
#endif

namespace vqkernels::cpu {
namespace {

constexpr double kCosEps = 1e-12;
constexpr int kTopT = 4;  // candidates kept per row by exact mode before it falls back to a full re-scan

int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  return std::max<int64_t>(1, std::atoll(v));
}

template <typename acc_t>
constexpr double unit_roundoff() {
  return std::is_same_v<acc_t, double> ? 0x1p-53 : 0x1p-24;
}

// ---------------------------------------------------------------------------------------------------------------
// Tile GEMM: tile[m, nb] = x_blk[m, D] . cb[kb : kb + nb, D]^T, accumulated and stored in acc_t (ld = nb).
// float / bf16 / fp16 use ATen's brgemm (oneDNN ukernel where the CPU has one, else its BLAS fallback) on a
// D x K transposed copy of the codebook; fp64 uses at::mm_out. Inside at::parallel_for both run single-threaded.
// ---------------------------------------------------------------------------------------------------------------
template <typename scalar_t>
struct TileGemm {
  using acc_t = typename AccOf<scalar_t>::type;
  const scalar_t* x;   // [N, D]
  const scalar_t* cb;  // [K, D]
  at::Tensor cbT;      // [D, K] when brgemm is used
  int64_t D, K;
  bool use_brgemm;

  TileGemm(const at::Tensor& x_, const at::Tensor& cb_) : D(x_.size(1)), K(cb_.size(0)) {
    x = x_.const_data_ptr<scalar_t>();
    cb = cb_.const_data_ptr<scalar_t>();
    use_brgemm = brgemm_available();
    if (use_brgemm) cbT = cb_.t().contiguous();
  }

  static constexpr bool brgemm_available() {
    if constexpr (std::is_same_v<scalar_t, float>) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
      return true;
#endif
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
      return true;
#endif
    } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
#ifdef CPUBLAS_BRGEMM_F16F16F32
      return true;
#endif
    }
    return false;
  }

  void operator()(int64_t r0, int64_t m, int64_t kb, int64_t nb, acc_t* tile) const {
    if constexpr (brgemm_available()) {
      at::native::cpublas::brgemm(m, nb, D, /*ld_a=*/D, /*ld_b=*/K, /*ld_c=*/nb, /*add_C=*/false, x + r0 * D,
                                  cbT.const_data_ptr<scalar_t>() + kb, tile, /*is_vnni=*/false);
    } else {
      static_assert(std::is_same_v<scalar_t, double> || std::is_same_v<scalar_t, float>,
                    "low-precision inputs need ATen's brgemm (torch >= 2.6)");
      auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
      auto a = at::from_blob(const_cast<scalar_t*>(x + r0 * D), {m, D}, opts);
      auto b = at::from_blob(const_cast<scalar_t*>(cb + kb * D), {nb, D}, opts);
      auto c = at::from_blob(tile, {m, nb}, opts);
      at::mm_out(c, a, b.t());
    }
  }

  void release() const {
    if constexpr (brgemm_available()) at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// bf16 tile GEMM on AVX512-BF16 (vdpbf16ps): ATen's brgemm has no fast bf16 path on CPUs with AVX512-BF16 but no
// AMX (it falls back to a generic GEMM at under half the dpbf16 peak), so bf16 gets its own register-blocked
// micro-kernel. The codebook is packed once per call into panels of 32 codes in VNNI pair order
// (panel p, pair j: [c_0(2j), c_0(2j+1), c_1(2j), ..., c_31(2j+1)], two zmm); an x block is packed per row block
// into D2 = ceil(D/2) 32-bit pairs per row (odd D and missing codes are zero-padded, which adds 0 to the dot).
// Each pair of products is exact in fp32 and accumulated in fp32 (vdpbf16ps: RNE, denormals flushed).
// ---------------------------------------------------------------------------------------------------------------
constexpr int kBfPanel = 32;  // codes per packed panel (two zmm of 16 fp32 lanes)
constexpr int kBfMR = 12;     // rows per micro-tile: 24 accumulators + 2 B panels + 1 broadcast of 32 zmm

#ifdef VQK_X86
bool cpu_has_avx512bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return has;
}

// c[r, 0:32] = sum_j dot2(a[r, j], b[j, :]) for r < kBfMR; a: kBfMR rows of D2 pairs (stride D2), b: D2 x 2 zmm.
__attribute__((target("avx512f,avx512bf16"))) void bf16_microkernel(const uint32_t* a, int64_t D2,
                                                                    const uint16_t* b, float* c, int64_t ldc) {
  __m512 acc0[kBfMR], acc1[kBfMR];
#pragma GCC unroll 12
  for (int r = 0; r < kBfMR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < D2; ++j) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + j * 2 * kBfPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + j * 2 * kBfPanel + kBfPanel);
#pragma GCC unroll 12
    for (int r = 0; r < kBfMR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * D2 + j]));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kBfMR; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc0[r]);
    _mm512_storeu_ps(c + r * ldc + 16, acc1[r]);
  }
}
#endif

// The packed codebook and the per-thread x packing of the bf16 path.
struct Bf16Packed {
  int64_t D, D2, K, panels;
  std::vector<uint16_t> b;  // panels x D2 x 64 bf16 bit patterns

  Bf16Packed(const at::BFloat16* cb, int64_t K_, int64_t D_)
      : D(D_), D2((D_ + 1) / 2), K(K_), panels((K_ + kBfPanel - 1) / kBfPanel) {
    b.assign(size_t(panels) * D2 * 2 * kBfPanel, 0);
    at::parallel_for(0, panels, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        uint16_t* dst = b.data() + size_t(p) * D2 * 2 * kBfPanel;
        for (int64_t c = 0; c < kBfPanel && p * kBfPanel + c < K; ++c) {
          const at::BFloat16* src = cb + (p * kBfPanel + c) * D;
          for (int64_t d = 0; d < D; ++d) dst[(d / 2) * 2 * kBfPanel + 2 * c + (d & 1)] = src[d].x;
        }
      }
    });
  }

  // rows r0..r0+m of x into `a` (round_up(m, kBfMR) rows of D2 pairs; padding rows and odd-D halves are 0).
  void pack_rows(const at::BFloat16* x, int64_t r0, int64_t m, std::vector<uint32_t>& a) const {
    const int64_t mp = (m + kBfMR - 1) / kBfMR * kBfMR;
    a.assign(size_t(mp) * D2, 0u);
    auto* a16 = reinterpret_cast<uint16_t*>(a.data());
    for (int64_t r = 0; r < m; ++r) {
      const at::BFloat16* src = x + (r0 + r) * D;
      for (int64_t d = 0; d < D; ++d) a16[r * 2 * D2 + d] = src[d].x;
    }
  }

#ifdef VQK_X86
  // tile[r, 0:round_up(nb, 32)] (ld = ldt) = x_block . cb[kb : kb + nb]^T; kb is a multiple of kBfPanel.
  void tile(const std::vector<uint32_t>& a, int64_t m, int64_t kb, int64_t nb, float* tile, int64_t ldt) const {
    const int64_t p0 = kb / kBfPanel, p1 = (kb + nb + kBfPanel - 1) / kBfPanel;
    for (int64_t r = 0; r < m; r += kBfMR) {
      for (int64_t p = p0; p < p1; ++p) {
        bf16_microkernel(a.data() + r * D2, D2, b.data() + size_t(p) * D2 * 2 * kBfPanel,
                         tile + r * ldt + (p - p0) * kBfPanel, ldt);
      }
    }
  }
#endif
};

// ---------------------------------------------------------------------------------------------------------------
// Epilogues. Codes are visited in increasing order and only a strictly smaller key replaces the best, so ties go
// to the lowest index. w/o/kb are already offset to the tile's first code.
// ---------------------------------------------------------------------------------------------------------------
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
__attribute__((target("avx512f"))) void argmin_tile_avx512(const float* tile, int64_t m, int64_t nb, int64_t ld,
                                                            const float* w, const float* o, int64_t kb,
                                                            float* best, int64_t* bidx) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const int64_t nfull = nb & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (nb - nfull)) - 1u);
  for (int64_t r = 0; r < m; ++r) {
    const float* t = tile + r * ld;
    __m512 mv = inf;
    __m512i iv = _mm512_setzero_si512();
    __m512i jv = lane;
    for (int64_t j = 0; j < nfull; j += 16) {
      const __m512 key = _mm512_fmadd_ps(_mm512_loadu_ps(t + j), _mm512_loadu_ps(w + j), _mm512_loadu_ps(o + j));
      const __mmask16 lt = _mm512_cmp_ps_mask(key, mv, _CMP_LT_OQ);
      mv = _mm512_mask_mov_ps(mv, lt, key);
      iv = _mm512_mask_mov_epi32(iv, lt, jv);
      jv = _mm512_add_epi32(jv, step);
    }
    if (tail) {
      const __m512 key = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, t + nfull), _mm512_maskz_loadu_ps(tail, w + nfull),
                                         _mm512_maskz_loadu_ps(tail, o + nfull));
      const __mmask16 lt = _mm512_mask_cmp_ps_mask(tail, key, mv, _CMP_LT_OQ);
      mv = _mm512_mask_mov_ps(mv, lt, key);
      iv = _mm512_mask_mov_epi32(iv, lt, jv);
    }
    const float mn = _mm512_reduce_min_ps(mv);
    if (mn < best[r]) {
      // Each lane holds the first index of its own minimum; the lowest index among the minimal lanes wins.
      const __mmask16 eq = _mm512_cmp_ps_mask(mv, _mm512_set1_ps(mn), _CMP_EQ_OQ);
      best[r] = mn;
      bidx[r] = kb + _mm512_mask_reduce_min_epi32(eq, iv);
    }
  }
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
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

// Exact mode keeps the kTopT smallest keys per row, sorted by (key, index).
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

// fp64 re-score from the original values (METHODS §1, exact mode).
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
  return 1.0 - s / (std::max(xnorm, kCosEps) * std::max(cnorm, kCosEps));
}

// sum_d v_d^2 in fp64 from the stored values (and whether every v_d is finite).
template <typename scalar_t>
double sum_squares64(const scalar_t* v, int64_t D, bool* finite) {
  double s = 0.0;
  bool ok = true;
  for (int64_t j = 0; j < D; ++j) {
    const double a = static_cast<double>(v[j]);
    ok &= std::isfinite(a);
    s += a * a;
  }
  *finite = ok;
  return s;
}

struct Outputs {
  int64_t* codes;
  void* dist;        // acc_t [N]
  void* zq;          // scalar_t [N, D] or nullptr
  int64_t* counts;   // [K] or nullptr
};

template <typename scalar_t>
void search_kernel(const at::Tensor& x, const at::Tensor& cb, Metric metric, bool exact, const Outputs& out) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t N = x.size(0), D = x.size(1), K = cb.size(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* cp = cb.const_data_ptr<scalar_t>();
  acc_t* dist = static_cast<acc_t*>(out.dist);
  scalar_t* zq = static_cast<scalar_t*>(out.zq);

  // Per-code key terms from fp64 norms of the codes as stored.
  std::vector<acc_t> w(K), o(K);
  std::vector<double> cnorm(K);
  std::atomic<bool> cb_finite{true};
  at::parallel_for(0, K, 1024, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      bool fin;
      // The key terms of vqkernels.reference.key_terms: o is the fp64 sum of squares rounded once (a rounded
      // norm squared would break exact ties between equidistant codes).
      const double sq = sum_squares64(cp + k * D, D, &fin);
      const double n = std::sqrt(sq);
      if (!fin) cb_finite = false;
      cnorm[k] = n;
      switch (metric) {
        case Metric::L2: w[k] = acc_t(-2); o[k] = static_cast<acc_t>(sq); break;
        case Metric::Cosine: w[k] = static_cast<acc_t>(-1.0 / std::max(n, kCosEps)); o[k] = acc_t(0); break;
        case Metric::Dot: w[k] = acc_t(-1); o[k] = acc_t(0); break;
      }
    }
  });
  TORCH_CHECK_VALUE(cb_finite.load(), "codebook contains non-finite values (NaN or Inf)");
  if (N == 0) return;
  const double cmax = *std::max_element(cnorm.begin(), cnorm.end());

  const int nthreads = at::get_num_threads();
  const int64_t BN = std::min<int64_t>(K, env_int("VQK_CPU_BN", 256));
  const int64_t BM = std::min<int64_t>(env_int("VQK_CPU_BM", 256), (N + nthreads - 1) / nthreads);
  const int64_t nblk = (N + BM - 1) / BM;

  // Per-thread usage histograms merged after the loop (no atomics); above a memory budget, fall back to
  // a second pass over the codes.
  const bool want_hist = out.counts != nullptr;
  const bool private_hist = want_hist && int64_t(nthreads) * K * 8 <= (int64_t(64) << 20);
  std::vector<int64_t> hist(private_hist ? size_t(nthreads) * K : 0, 0);

  // bf16 on AVX512-BF16: packed micro-kernel (see Bf16Packed); otherwise ATen's brgemm / mm (TileGemm).
  bool use_bf16_mk = false;
#ifdef VQK_X86
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    use_bf16_mk = cpu_has_avx512bf16() && env_int("VQK_CPU_BF16_BRGEMM", 0) != 1;
  }
#endif
  // The micro-kernel fills whole panels of codes, so its code blocks are multiples of the panel width.
  const int64_t BNt = use_bf16_mk ? (BN + kBfPanel - 1) / kBfPanel * kBfPanel : BN;
  const int64_t ldt = BNt;
  std::unique_ptr<Bf16Packed> packed;
  std::optional<TileGemm<scalar_t>> gemm;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (use_bf16_mk) packed = std::make_unique<Bf16Packed>(cp, K, D);
  }
  if (!use_bf16_mk) gemm.emplace(x, cb);
  std::atomic<bool> x_finite{true};
  const double u = unit_roundoff<acc_t>();
  const double gamma = 2.0 * double(D + 4) * u;  // 2x safety over the classic gamma_D dot-product bound

  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> tile(size_t(BM + kBfMR) * ldt);
    std::vector<uint32_t> apack;
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
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (use_bf16_mk) packed->pack_rows(xp, r0, m, apack);
      }
      for (int64_t kb = 0; kb < K; kb += BNt) {
        const int64_t nb = std::min(BNt, K - kb);
        int64_t ld = nb;
        bool done = false;
#ifdef VQK_X86
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (use_bf16_mk) {
            packed->tile(apack, m, kb, nb, tile.data(), ldt);
            ld = ldt;
            done = true;
          }
        }
#endif
        if (!done) (*gemm)(r0, m, kb, nb, tile.data());
        if (exact) {
          topk_tile(tile.data(), m, nb, ld, w.data() + kb, o.data() + kb, kb, topv.data(), topi.data());
        } else {
          argmin_tile(tile.data(), m, nb, ld, w.data() + kb, o.data() + kb, kb, best.data(), bidx.data());
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
          // Every code whose fast key may round below the true minimum lies within 2E of the fast minimum.
          const double xn = xnorm[r];
          double E;
          switch (metric) {
            case Metric::L2: E = gamma * (2.0 * xn * cmax + cmax * cmax); break;
            case Metric::Cosine: E = gamma * xn; break;
            default: E = gamma * xn * cmax; break;
          }
          E += gamma * std::abs(double(tv[0]));
          const double thresh = double(tv[0]) + 2.0 * E;
          const bool overflow = ti[kTopT - 1] >= 0 && double(tv[kTopT - 1]) <= thresh;
          double bd = std::numeric_limits<double>::infinity();
          int64_t bc = -1;
          if (overflow) {
            for (int64_t k = 0; k < K; ++k) {
              const double dk = rescore(xr, cp + k * D, D, metric, xn, cnorm[k]);
              if (dk < bd || bc < 0) { bd = dk; bc = k; }
            }
          } else {
            for (int p = 0; p < kTopT; ++p) {
              if (ti[p] < 0 || double(tv[p]) > thresh) break;
              const double dk = rescore(xr, cp + ti[p] * D, D, metric, xn, cnorm[ti[p]]);
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
            case Metric::Cosine: d = acc_t(1) + key / static_cast<acc_t>(std::max(xnorm[r], kCosEps)); break;
            default: d = key; break;
          }
        }
        out.codes[i] = code;
        dist[i] = d;
        if (zq != nullptr) std::memcpy(zq + i * D, cp + code * D, sizeof(scalar_t) * D);
        if (my_hist != nullptr) ++my_hist[code];
      }
    }
    if (gemm) gemm->release();
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> search(const at::Tensor& x_in, const at::Tensor& cb_in,
                                                                  const std::string& metric_name, bool exact,
                                                                  bool gather) {
  check_search_args(x_in, cb_in);
  const Metric metric = parse_metric(metric_name);
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
  auto [codes, zq, dist, counts] = search(x, codebook, std::string(metric), exact, /*gather=*/false);
  return {codes, dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x,
                                                                        const at::Tensor& codebook,
                                                                        c10::string_view metric, bool exact) {
  return search(x, codebook, std::string(metric), exact, /*gather=*/true);
}

}  // namespace

// Which tile GEMM bf16 inputs get on this CPU (reported by `python -m vqkernels.info`).
const char* bf16_tile_kernel() {
#ifdef VQK_X86
  if (cpu_has_avx512bf16()) return "avx512_bf16 micro-kernel (VQK_CPU_BF16_BRGEMM=1: ATen brgemm)";
#endif
  return "ATen brgemm";
}

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) {
  m.impl("nearest_code", &nearest_code_cpu);
  m.impl("quantize", &quantize_cpu);
}

}  // namespace vqkernels::cpu

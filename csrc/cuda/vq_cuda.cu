// CUDA kernels of the fused VQ ops, with plain C launchers (vq_cuda.h): no torch headers, so `nvcc -c` checks
// this file on any machine with the CUDA toolkit.
//
// search_kernel: a block owns BM rows; the codes of its split stream through in blocks of BN. The row and code
// tiles are double-buffered in shared memory: on sm_80+ with 16-byte aligned rows they arrive by cp.async while the
// previous tile is multiplied (and the next code block's first tile while the epilogue runs); otherwise by plain
// loads in the same two-buffer order. The BM x BN dot
// products come from tensor cores (WMMA 16x16x16, bf16/fp16 on sm_80+) or from a register-tiled FMA loop
// (fp32 as IEEE fp32, fp64; bank-conflict-free shared-memory layout, see search_kernel), into shared memory,
// where two threads per row reduce them to a running minimum (key, index), or for exact mode a running list of
// the kExactCandidates smallest (strictly smaller keys replace, codes are visited in increasing order: ties go to
// the lowest index). Only [splits, N, T] partials are written, never N x K. With its sampling epilogue
// (sample_code, README "Method" §1) the same kernel runs with the roles swapped: the codes are its rows, the input
// rows stream through as its "codes", and each key becomes the distance minus counter-based Gumbel noise, so the
// minimum per code is a Gumbel-max draw of an input row (CVQ-VAE's "probrandom" anchors, Zheng & Vedaldi, ICCV
// 2023, §3.2).
// finalize_kernel: a warp per group of 32 rows. Lane l merges the splits of row l (coalesced partials); then the
// warp takes the rows one by one with its lanes striding over D (coalesced): the norm, exact mode's fp64 re-score
// of the candidates inside the rounding bound from the stored values (and the re-scan of every code for the rare
// rows whose last kept candidate is inside it too), the z_q gather; finally one atomic per distinct code of the
// group (__match_any_sync) adds the histogram, so full collapse costs N / 32 atomics.
// code_stats_kernel: the same groups of 32 rows; per distinct code of a group, the lanes stride over D, sum the
// code's rows and issue one atomic per feature.
// key_terms_kernel: a warp per code, lanes over D.
// The batched form (x [G, N, D] against codebook [G, K, D], README "Method" §1.6) is one launch of each kernel for
// all groups (up to 65535 groups a launch: more take one launch per 65535): the group is the grid's last axis
// (search: z, its y being the splits; finalize, code_stats: y), and a block offsets its operands by its group's
// strides (x, codebook: any group stride; key terms, partials and outputs: [G, ...] contiguous). key_terms_kernel
// takes the G * K codes as one flat range. A 2-D launch is G = 1.
// No fast math anywhere (setup.py and the Makefile pass no --use_fast_math): float and double division and
// sqrt are IEEE correctly rounded, so distances and the values compared are reproducible.
#include "vq_cuda.h"

#include "../numerics.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <float.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

namespace num = vqkernels::numerics;

static_assert(VQK_L2 == num::kMetricL2 && VQK_COSINE == num::kMetricCosine && VQK_DOT == num::kMetricDot,
              "the C launchers' metric codes are numerics.h's");
static_assert(VQK_EXACT_CANDIDATES == num::kExactCandidates, "vq_cuda.h repeats numerics.h's candidate count");

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kTopExact = num::kExactCandidates;
constexpr int kBM = 64;        // rows per block
constexpr int kBK = 16;        // features per step (one WMMA k-step)
constexpr int kIntMax = 2147483647;

// ---- conversions -----------------------------------------------------------------------------------------------
__device__ __forceinline__ float f32(float v) { return v; }
__device__ __forceinline__ float f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double f64(double v) { return v; }
__device__ __forceinline__ double f64(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double f64(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double f64(__nv_bfloat16 v) { return static_cast<double>(__bfloat162float(v)); }

template <typename A>
struct Cvt;
template <>
struct Cvt<float> {
  template <typename T>
  static __device__ __forceinline__ float of(T v) { return f32(v); }
  static __device__ __forceinline__ float inf() { return INFINITY; }
};
template <>
struct Cvt<double> {
  template <typename T>
  static __device__ __forceinline__ double of(T v) { return f64(v); }
  static __device__ __forceinline__ double inf() { return static_cast<double>(INFINITY); }
};

// zero of each element type through the conversion intrinsics: torch's extension build defines
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove __half(float) and friends
template <typename T>
__device__ __forceinline__ T zero_of() { return T(0); }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half_rn(0.0f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16_rn(0.0f); }

// bf16 WMMA needs sm_80; older device passes (and the host pass) take the FMA path
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
constexpr bool kHasWmma = true;
#else
constexpr bool kHasWmma = false;
#endif

// ---- cp.async (sm_80+) ------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr bool kHasCpAsync = true;
#else
constexpr bool kHasCpAsync = false;
#endif

// 16 bytes global -> shared without staging in registers; src_bytes = 0 writes zeros (rows or features past the
// end), reading nothing.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
#else
  (void)smem; (void)gmem; (void)src_bytes;
#endif
}

// one element (Bytes = 4 or 8) global -> shared, for the transposed code tile of the FMA path; src_bytes = 0
// writes zeros
template <int Bytes>
__device__ __forceinline__ void cp_async_elem(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem), "n"(Bytes), "r"(src_bytes)
               : "memory");
#else
  (void)smem; (void)gmem; (void)src_bytes;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// wait until at most `Pending` of this thread's committed groups are still in flight
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

template <typename T>
struct IsHalf { static constexpr bool value = false; };
template <>
struct IsHalf<__half> { static constexpr bool value = true; };
template <>
struct IsHalf<__nv_bfloat16> { static constexpr bool value = true; };

// Insert (v, i) into a list of the TOP smallest (value, index) pairs, ordered by value then index: the pair walks
// down the list, swapping with every entry it precedes (fully unrolled: the list stays in registers).
template <int TOP, typename A>
__device__ __forceinline__ void push_top(A v, int i, A (&tv)[TOP], int (&ti)[TOP]) {
#pragma unroll
  for (int p = 0; p < TOP; ++p) {
    if (v < tv[p] || (v == tv[p] && i < ti[p])) {
      const A sv = tv[p];
      const int si = ti[p];
      tv[p] = v; ti[p] = i;
      v = sv; i = si;
    }
  }
}

// The sampling epilogue's per-launch inputs: per search row (code) the factor and term of its part of the
// distance, rs = 1 / max(|c|, eps) for cosine (else 1) and rt = |c|^2 for l2 (else 0); the two seed halves; and
// whether keys clamp at 0 (l2).
template <typename A>
struct SampleArgs {
  const A* rs;
  const A* rt;
  uint32_t s_code, s_row;
  int clamp;
  int64_t code0;  // the noise index of the launch's first code: code k of its group g is code code0 + g K + k
};

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = kWarps * 32;  // finalize / code_stats: a warp per group of 32 rows

// Sum over the 32 lanes by an xor butterfly: every lane ends with the same, bitwise identical value (each step
// adds the same two operands on both lanes of a pair, and fp addition is commutative), so branches on it stay
// warp-uniform. The whole warp must call it.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFull, v, m);
  return v;
}

// ---- key terms ---------------------------------------------------------------------------------------------------
// A warp per code, lanes over D (coalesced). key_k = w_k (x . c_k) + o_k with s = sum_d c_d^2 in fp64 from the
// stored values: l2: w = -2, o = (A)s (not sqrt(s)^2, which rounds and would break exact ties between equidistant
// codes); cosine: w = (A)(-1 / max(sqrt(s), eps)), o = 0; dot: w = -1, o = 0. cnorm64 = sqrt(s) (IEEE double
// sqrt, correctly rounded).
// Batched: the G * K codes of G groups (group stride sgc), w / o [G * K], cnorm64 group stride lnorm.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
key_terms_kernel(const T* __restrict__ cb, int64_t G, int64_t K, int64_t D, int64_t ldc, int64_t sgc, int metric,
                 A* __restrict__ w, A* __restrict__ o, double* __restrict__ cnorm64, int64_t lnorm) {
  const int lane = threadIdx.x & 31;
  const int64_t gk = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32;  // code k of group g: g K + k
  if (gk >= G * K) return;  // warp-uniform
  const int64_t g = gk / K, k = gk - g * K;
  const T* cr = cb + g * sgc + k * ldc;
  double s = 0.0;
  for (int64_t d = lane; d < D; d += 32) {
    const double c = f64(cr[d]);
    s += c * c;
  }
  s = warp_sum(s);
  if (lane != 0) return;
  const double n = sqrt(s);
  cnorm64[g * lnorm + k] = n;
  if (metric == VQK_L2) {
    w[gk] = A(-2); o[gk] = static_cast<A>(s);
  } else if (metric == VQK_COSINE) {
    w[gk] = static_cast<A>(-1.0 / fmax(n, num::kCosEps)); o[gk] = A(0);
  } else {
    w[gk] = A(-1); o[gk] = A(0);
  }
}

// ---- search ------------------------------------------------------------------------------------------------------
// Shared-memory layout of the FMA path (fp32, fp64; bf16/fp16 only below sm_80), chosen so that no read of the
// inner loop has a bank conflict. Thread t owns rows rg + 8 i (i < 8) and codes cg + 16 j (j < BN / 16) of the
// block, rg = t / 16, cg = t % 16: a warp is two half-warps with rg = 2w and 2w + 1 and cg = 0..15.
//  - code tile, stored transposed, cs[kk][code] (row stride BN + kCsPad): a B read cs[kk][cg + 16 j] has the 16
//    lanes of a half-warp on 16 consecutive elements and the other half-warp on the same 16 (a broadcast): 16
//    distinct consecutive words for fp32, 128 contiguous bytes for fp64 -- one wavefront, no conflict. (The
//    previous layout cs[code][kk] with codes cg * kCols + j put consecutive lanes kCols * kBK elements apart, all
//    on one bank: a 16-way conflict on every B read.) The tile is filled element-wise (cp.async of 4 or 8 bytes,
//    or plain stores) with a warp covering 2 codes x 16 features: coalesced global reads, and the pad makes the
//    shared writes conflict-free too (fp32: word kk (BN + 2) + c, bank 2 kk + c, 32 distinct for c in {2q, 2q+1};
//    fp64: double kk (BN + 1) + c, bank pair (kk + c) mod 16, 16 distinct per half-warp).
//  - row tile xs[r][kk] (row stride kBK + 16 bytes, a multiple of 16 so 16-byte cp.async stays aligned): an A read
//    xs[rg + 8 i][kk] is one address per half-warp (a broadcast), and the two half-warps' rows are adjacent, one
//    row stride (kBK + 16 / sizeof(T) elements: 80 bytes fp32, 144 bytes fp64) apart: different banks.
// The WMMA path (bf16/fp16 on sm_80+) keeps the layouts load_matrix_sync expects: xs[r][kk], cs[code][kk].
// TOP: 1 (the fast path's minimum, sampling) or kTopExact (exact mode's candidates). SAMPLE: the sampling
// epilogue (x are then the codes, cb the input rows, and w, o the input rows' key terms).
// Batched: grid.z = G; x, cb group strides sgx, sgc; w, o [G, K]; pv, pi [G, splits, N, TOP]; sampling: rs, rt
// [G, N], and row r of group g (code r of that group) keyed as code0 + g N + r.
template <typename T, typename A, int BN, int TOP, bool SAMPLE>
__global__ void __launch_bounds__(kThreads)
search_kernel(const T* __restrict__ x, const T* __restrict__ cb, const A* __restrict__ w, const A* __restrict__ o,
              int64_t N, int64_t K, int64_t D, int64_t ldx, int64_t ldc, int64_t sgx, int64_t sgc,
              int64_t codes_per_split, int vec16, SampleArgs<A> sa, A* __restrict__ pv, int32_t* __restrict__ pi) {
  constexpr bool kWmma = IsHalf<T>::value && kHasWmma;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte copy
  constexpr int kXStride = kWmma ? kBK : kBK + kVec;      // row tile: + 16 bytes per row on the FMA path
  constexpr int kCsPad = sizeof(T) == 8 ? 1 : 2;
  constexpr int kCsRows = kWmma ? BN : kBK;               // WMMA: cs[code][kk]; FMA: cs[kk][code] (transposed)
  constexpr int kCsCols = kWmma ? kBK : BN + kCsPad;
  static_assert(BN % 16 == 0 && kBM == 64 && kThreads == 128, "thread mapping assumes 64 rows, 128 threads");
  static_assert((kXStride * sizeof(T)) % 16 == 0, "16-byte cp.async needs 16-byte aligned rows");
  __shared__ __align__(32) T xs[2][kBM][kXStride];
  __shared__ __align__(32) T cs[2][kCsRows][kCsCols];
  __shared__ __align__(32) A acc_s[kBM][BN + 4];  // +4: fewer bank conflicts in the row-wise epilogue

  const int tid = threadIdx.x;
  const int64_t grp = blockIdx.z;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(kBM);
  const int split = blockIdx.y;
  x += grp * sgx;
  cb += grp * sgc;
  w += grp * K;
  o += grp * K;
  const int64_t k_lo = split * codes_per_split;
  const int64_t k_hi = k_lo + codes_per_split < K ? k_lo + codes_per_split : K;

  // epilogue ownership: two threads per row, each scanning half of a code block
  const int er = tid >> 1, eh = tid & 1;
  A tv[TOP];
  int ti[TOP];
#pragma unroll
  for (int p = 0; p < TOP; ++p) { tv[p] = Cvt<A>::inf(); ti[p] = kIntMax; }
  // sampling: this thread's row is code row0 + er, with its distance factor and term and its noise key
  A s_fac = A(1), s_term = A(0);
  uint32_t s_qkey = 0;
  if constexpr (SAMPLE) {
    if (row0 + er < N) {
      s_fac = sa.rs[grp * N + row0 + er];
      s_term = sa.rt[grp * N + row0 + er];
    }
    s_qkey = num::index_key(sa.code0 + grp * N + row0 + er, sa.s_code);
  }

  // vec16 (set by the launcher): x, cb, ldx, ldc and D are multiples of 16 bytes, so a 16-byte chunk lies wholly
  // inside or wholly past the valid features
  const bool async = kHasCpAsync && vec16 != 0;
  // the feature slice [d0, d0 + kBK) of this block's rows and of codes [kb, kb + BN) into buffer `buf`
  auto stage = [&](int64_t kb, int64_t d0, int buf) {
    if (async) {
      for (int e = tid; e < kBM * kBK / kVec; e += kThreads) {
        const int r = e / (kBK / kVec), kk = (e % (kBK / kVec)) * kVec;
        const int64_t row = row0 + r, d = d0 + kk;
        const bool in = row < N && d < D;
        cp_async16(&xs[buf][r][kk], in ? x + row * ldx + d : x, in ? 16 : 0);
      }
      if constexpr (kWmma) {
        for (int e = tid; e < BN * kBK / kVec; e += kThreads) {
          const int c = e / (kBK / kVec), kk = (e % (kBK / kVec)) * kVec;
          const int64_t code = kb + c, d = d0 + kk;
          const bool in = code < k_hi && d < D;
          cp_async16(&cs[buf][c][kk], in ? cb + code * ldc + d : cb, in ? 16 : 0);
        }
      } else {
        for (int e = tid; e < BN * kBK; e += kThreads) {
          const int c = e / kBK, kk = e % kBK;
          const int64_t code = kb + c, d = d0 + kk;
          const bool in = code < k_hi && d < D;
          cp_async_elem<static_cast<int>(sizeof(T))>(&cs[buf][kk][c], in ? cb + code * ldc + d : cb,
                                                     in ? static_cast<int>(sizeof(T)) : 0);
        }
      }
      return;
    }
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int r = e / kBK, kk = e % kBK;
      const int64_t row = row0 + r, d = d0 + kk;
      xs[buf][r][kk] = (row < N && d < D) ? x[row * ldx + d] : zero_of<T>();
    }
    for (int e = tid; e < BN * kBK; e += kThreads) {
      const int c = e / kBK, kk = e % kBK;
      const int64_t code = kb + c, d = d0 + kk;
      const T v = (code < k_hi && d < D) ? cb[code * ldc + d] : zero_of<T>();
      if constexpr (kWmma) {
        cs[buf][c][kk] = v;
      } else {
        cs[buf][kk][c] = v;
      }
    }
  };
  int buf = 0;
  if (k_lo < k_hi) stage(k_lo, 0, 0);
  cp_async_commit();

  for (int64_t kb = k_lo; kb < k_hi; kb += BN) {
    // FMA path: thread owns rows rg + 8 i and codes cg + 16 j (layout comment above)
    constexpr int kCols = BN / 16;
    A acc[8][kCols];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[i][j] = A(0);
    const int rg = tid / 16, cg = tid % 16;

    using namespace nvcuda;
    constexpr int kFrags = BN / 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> cfrag[kWmma ? kFrags : 1];
    if constexpr (kWmma) {
#pragma unroll
      for (int j = 0; j < kFrags; ++j) wmma::fill_fragment(cfrag[j], 0.0f);
    }

    for (int64_t d0 = 0; d0 < D; d0 += kBK) {
      // the next step's tiles (next feature slice, or the next code block's first) go into the other buffer,
      // which every thread finished reading at the end of the previous step
      int64_t next_d0 = d0 + kBK, next_kb = kb;
      if (next_d0 >= D) {
        next_d0 = 0;
        next_kb = kb + BN;
      }
      if (next_kb < k_hi) stage(next_kb, next_d0, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();  // this step's group has landed (the one just committed may still be in flight)
      __syncthreads();
      if constexpr (kWmma) {
        const int warp = tid / 32;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> afrag;
        wmma::load_matrix_sync(afrag, &xs[buf][warp * 16][0], kXStride);
#pragma unroll
        for (int j = 0; j < kFrags; ++j) {
          // B[k][n] = code n's feature k: the code tile read column-major
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bfrag;
          wmma::load_matrix_sync(bfrag, &cs[buf][j * 16][0], kCsCols);
          wmma::mma_sync(cfrag[j], afrag, bfrag, cfrag[j]);
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
          A a[8], b[kCols];
#pragma unroll
          for (int i = 0; i < 8; ++i) a[i] = Cvt<A>::of(xs[buf][rg + 8 * i][kk]);
#pragma unroll
          for (int j = 0; j < kCols; ++j) b[j] = Cvt<A>::of(cs[buf][kk][cg + 16 * j]);
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < kCols; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
      }
      __syncthreads();
      buf ^= 1;
    }
    if constexpr (kWmma) {
      const int warp = tid / 32;
#pragma unroll
      for (int j = 0; j < kFrags; ++j)
        wmma::store_matrix_sync(&acc_s[warp * 16][j * 16], cfrag[j], BN + 4, wmma::mem_row_major);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc_s[rg + 8 * i][cg + 16 * j] = acc[i][j];
    }
    __syncthreads();
    // epilogue: keys and the running minimum / top list of this thread's half-row
    const int j0 = eh * (BN / 2);
    for (int j = j0; j < j0 + BN / 2; ++j) {
      const int64_t code = kb + j;
      if (code >= k_hi) break;
      A key;
      if constexpr (SAMPLE) {
        // the distance up to a per-code constant (cosine's 1), as explicit fmas (vqkernels.reference.sample),
        // minus the noise; a key that cannot win even with the largest noise skips computing it
        key = fma(fma(acc_s[er][j], w[code], o[code]), s_fac, s_term);
        if (sa.clamp != 0 && key < A(0)) key = A(0);
        if (!(key - static_cast<A>(num::kGumbelMax) < tv[TOP - 1])) continue;
        key -= num::gumbel<A>(s_qkey, num::index_key(code, sa.s_row));
      } else {
        key = acc_s[er][j] * w[code] + o[code];
      }
      if (key < tv[TOP - 1]) push_top<TOP>(key, static_cast<int>(code), tv, ti);
    }
    __syncthreads();  // acc_s is rewritten by the next block
  }
  cp_async_wait<0>();  // nothing may be in flight when the block exits (D = 0 leaves the prologue's group)
  // merge the two halves of each row (threads t and t ^ 1 share a warp); both threads end with the same list
  A ov[TOP];
  int oi[TOP];
#pragma unroll
  for (int p = 0; p < TOP; ++p) {
    ov[p] = __shfl_xor_sync(kFull, tv[p], 1);
    oi[p] = __shfl_xor_sync(kFull, ti[p], 1);
  }
#pragma unroll
  for (int p = 0; p < TOP; ++p) push_top<TOP>(ov[p], oi[p], tv, ti);
  const int64_t row = row0 + er;
  if (eh == 0 && row < N) {
    const int64_t off = ((grp * gridDim.y + split) * N + row) * TOP;
#pragma unroll
    for (int p = 0; p < TOP; ++p) {
      pv[off + p] = tv[p];
      pi[off + p] = ti[p];
    }
  }
}

// ---- finalize ----------------------------------------------------------------------------------------------------
// The group of a finalize block (grid.y), read by an opaque instruction at every use: the compiler can neither hoist
// it nor keep a value derived from it in a register across a call.
__device__ __forceinline__ int64_t launch_group() {
  unsigned g;
  asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(g));
  return g;
}

// fp64 distance of row xr to code cr, the whole warp cooperating: lanes stride over D, then warp_sum (every lane
// returns the same value). The whole warp must call it. Not inlined: as a real call it keeps the finalize
// kernel's exact variants free of register spills (inlined, ptxas spilled a few loop invariants around it on
// sm_80), and a call per re-scored code is cheap next to its D-loop and reduction.
template <typename T>
__device__ __noinline__ double rescore64(const T* xr, const T* cr, int64_t D, int metric, double xn, double cn,
                                         int lane) {
  double s = 0.0;
  if (metric == VQK_L2) {
    for (int64_t d = lane; d < D; d += 32) {
      const double diff = f64(xr[d]) - f64(cr[d]);
      s += diff * diff;
    }
  } else {
    for (int64_t d = lane; d < D; d += 32) s += f64(xr[d]) * f64(cr[d]);
  }
  s = warp_sum(s);  // one reduction site for every metric
  if (metric == VQK_L2) return s;
  if (metric == VQK_DOT) return -s;
  return 1.0 - s / (fmax(xn, num::kCosEps) * fmax(cn, num::kCosEps));
}

// A warp per group of 32 consecutive rows (kernel comment at the top). Every value a branch depends on in the
// per-row phase is either broadcast from the row's lane or a warp_sum, so the branches are warp-uniform and the
// full-mask shuffles inside are safe. The partials hold TOP = 1 (fast path) or kTopExact (exact) pairs per row.
// Batched: grid.y = G; x, cb group strides sgx, sgc; cnorm64 [G, K + 1] (each group's max at [K]); pv, pi
// [G, splits, N, TOP]; codes, dist [G, N]; zq [G, N, D]; counts [G, K].
template <typename T, typename A, bool exact>
__global__ void __launch_bounds__(kThreads)
finalize_kernel(const T* __restrict__ x, const T* __restrict__ cb, const double* __restrict__ cnorm64, int64_t N,
                int64_t K, int64_t D, int64_t ldx, int64_t ldc, int64_t sgx, int64_t sgc, int splits, int metric,
                double gamma, const A* __restrict__ pv, const int32_t* __restrict__ pi, int64_t* __restrict__ codes,
                A* __restrict__ dist, T* __restrict__ zq, int64_t* __restrict__ counts) {
  constexpr int TOP = exact ? kTopExact : 1;
  const int lane = threadIdx.x & 31;
  const int64_t base = (blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32) * 32;
  if (base >= N) return;  // warp-uniform
  // the group's offsets are added where each operand is read or written, from the group index read afresh each
  // time (launch_group): no per-group pointer lives across the call of rescore64, whose callee-saved registers are
  // few (the exact variants would spill)
  const int64_t my_row = base + lane;
  const bool valid = my_row < N;
  const int rows = N - base < 32 ? static_cast<int>(N - base) : 32;

  // per-row candidates in, per-row results out: kept in shared memory rather than in registers across the row
  // loop below (fewer values live across it: no spills)
  __shared__ A s_v[kWarps][TOP][32], s_dist[kWarps][32];
  __shared__ int s_i[kWarps][TOP][32];
  __shared__ int64_t s_code[kWarps][32];
  const int wid = threadIdx.x / 32;

  // lane l: merge the splits of row base + l (partials of consecutive rows are adjacent: coalesced)
  {
    A tv[TOP];
    int ti[TOP];
#pragma unroll
    for (int p = 0; p < TOP; ++p) { tv[p] = Cvt<A>::inf(); ti[p] = kIntMax; }
    if (valid) {
#pragma unroll 1
      for (int s = 0; s < splits; ++s) {
        const int64_t off = ((launch_group() * splits + s) * N + my_row) * TOP;
#pragma unroll
        for (int p = 0; p < TOP; ++p) push_top<TOP>(pv[off + p], pi[off + p], tv, ti);
      }
    }
#pragma unroll
    for (int p = 0; p < TOP; ++p) { s_v[wid][p][lane] = tv[p]; s_i[wid][p][lane] = ti[p]; }
  }
  __syncwarp();

  // the rows one by one, lanes over D
  const bool need_x = exact || metric != VQK_DOT;
  for (int r = 0; r < rows; ++r) {
    const A rv1 = s_v[wid][0][r];  // broadcast reads
    const int ri1 = s_i[wid][0][r];
    const int64_t row = base + r;
    const T* xr = x + launch_group() * sgx + row * ldx;
    // |x|^2: in the accumulation type for the fast distance, in fp64 for exact mode (which needs only that)
    using X = typename std::conditional<exact, double, A>::type;
    X xsq = X(0);
    if (need_x) {
      for (int64_t d = lane; d < D; d += 32) {
        const X a = Cvt<X>::of(xr[d]);
        xsq += a * a;
      }
      xsq = warp_sum(xsq);
    }
    // no finite key in any split (only when every key overflowed): code 0, the lowest of the all-equal keys
    const bool none = ri1 >= K;
    int64_t code;
    A dd;
    if constexpr (!exact) {
      code = none ? 0 : ri1;
      if (metric == VQK_L2) {
        dd = xsq + rv1 > A(0) ? xsq + rv1 : A(0);
      } else if (metric == VQK_COSINE) {
        dd = A(1) + rv1 / static_cast<A>(fmax(sqrt(static_cast<double>(xsq)), num::kCosEps));
      } else {
        dd = rv1;
      }
    } else {
      const double xn = sqrt(xsq), cmax = cnorm64[launch_group() * (K + 1) + K];
      // every code whose fast key may round below the true minimum lies within 2E of the fast minimum
      // (README "Method" §1); when the last kept candidate is inside too, more may hide behind it: re-scan every
      // code in fp64 (increasing k with a strict <: ties to the lowest index), else re-score the candidates
      // inside the bound (ties to the lower index explicitly, the list being ordered by key)
      const double thresh = num::exact_threshold(metric, xn, cmax, static_cast<double>(rv1), gamma);
      const bool scan = none || (s_i[wid][TOP - 1][r] < K && static_cast<double>(s_v[wid][TOP - 1][r]) <= thresh);
      int64_t n = K;  // codes to re-score: all of them, or the candidates inside the bound (the first always)
      if (!scan) {
        n = 1;
        while (n < TOP && s_i[wid][n][r] < K && static_cast<double>(s_v[wid][n][r]) <= thresh) ++n;
      }
      // one loop and one call site for both cases (fewer live registers: no spills)
      double bd = static_cast<double>(INFINITY);
      int64_t bc = scan ? 0 : ri1;
      for (int64_t it = 0; it < n; ++it) {
        const int64_t k = scan ? it : s_i[wid][it][r];
        const double dk = rescore64(xr, cb + launch_group() * sgc + k * ldc, D, metric, xn,
                                    cnorm64[launch_group() * (K + 1) + k], lane);
        if (dk < bd || (dk == bd && k < bc)) { bd = dk; bc = k; }
      }
      code = bc;
      dd = static_cast<A>(bd);
    }
    if (lane == 0) { s_code[wid][r] = code; s_dist[wid][r] = dd; }
    if (zq != nullptr) {
      const T* cr = cb + launch_group() * sgc + code * ldc;
      T* zr = zq + (launch_group() * N + row) * D;
      for (int64_t d = lane; d < D; d += 32) zr[d] = cr[d];
    }
  }

  __syncwarp();
  const int64_t my_code = valid ? s_code[wid][lane] : 0;
  if (valid) {
    codes[launch_group() * N + my_row] = my_code;
    dist[launch_group() * N + my_row] = s_dist[wid][lane];
  }
  if (counts != nullptr) {
    const unsigned active = __ballot_sync(kFull, valid);
    if (valid) {
      const unsigned peers = __match_any_sync(active, static_cast<unsigned long long>(my_code));
      if (lane == __ffs(peers) - 1)
        atomicAdd(reinterpret_cast<unsigned long long*>(counts + launch_group() * K + my_code),
                  static_cast<unsigned long long>(__popc(peers)));
    }
  }
}

// ---- code_stats --------------------------------------------------------------------------------------------------
// A warp per group of 32 consecutive rows: lane l reads the code of row base + l, __match_any_sync groups equal
// codes; then for each distinct code (warp-uniform loop over the group leaders) the lanes stride over D, each
// summing the code's rows of its features in increasing row order and issuing one atomic per feature: one
// atomic per distinct code of the group and per feature, so full collapse costs N / 32 atomics per feature.
// Batched: grid.y = G; x group stride sgx; codes [G, N]; sums [G, K, D]; counts [G, K].
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
code_stats_kernel(const T* __restrict__ x, const int64_t* __restrict__ codes, int64_t N, int64_t D, int64_t ldx,
                  int64_t sgx, int64_t K, A* __restrict__ sums, int64_t* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int64_t grp = blockIdx.y;
  const int64_t base = (blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32) * 32;
  if (base >= N) return;  // warp-uniform
  x += grp * sgx;
  codes += grp * N;
  sums += grp * K * D;
  counts += grp * K;
  const bool valid = base + lane < N;
  const int64_t code = valid ? codes[base + lane] : -1;
  const unsigned active = __ballot_sync(kFull, valid);
  unsigned peers = 0;
  if (valid) peers = __match_any_sync(active, static_cast<unsigned long long>(code));
  unsigned leaders = __ballot_sync(kFull, valid && lane == __ffs(peers) - 1);
  while (leaders != 0) {
    const int ld = __ffs(leaders) - 1;
    leaders &= leaders - 1;
    const unsigned group = __shfl_sync(kFull, peers, ld);
    const int64_t c = __shfl_sync(kFull, code, ld);
    if (lane == 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + c), static_cast<unsigned long long>(__popc(group)));
    A* sr = sums + c * D;
    for (int64_t d = lane; d < D; d += 32) {
      A s = A(0);
      unsigned m = group;
      while (m != 0) {
        const int p = __ffs(m) - 1;
        m &= m - 1;
        s += Cvt<A>::of(x[(base + p) * ldx + d]);
      }
      atomicAdd(sr + d, s);
    }
  }
}

// ---- dispatch ----------------------------------------------------------------------------------------------------
constexpr int64_t kMaxGridYZ = 65535;  // the groups of one launch (grid.y / grid.z)

// f(g0, n) for each launch of groups g0 .. g0 + n - 1 (n <= kMaxGridYZ), stopping at the first error.
template <typename F>
int per_launch(int64_t G, F&& f) {
  for (int64_t g0 = 0; g0 < G; g0 += kMaxGridYZ) {
    const int err = f(g0, G - g0 < kMaxGridYZ ? G - g0 : kMaxGridYZ);
    if (err != 0) return err;
  }
  return 0;
}

template <typename T, typename A, int BN, int TOP, bool SAMPLE>
int launch_search(const void* x, const void* cb, const void* w, const void* o, int64_t G, int64_t N, int64_t K,
                  int64_t D, int64_t ldx, int64_t ldc, int64_t sgx, int64_t sgc, int splits, int64_t cps,
                  const SampleArgs<A>& sa, void* pv, int32_t* pi, cudaStream_t stream) {
  const int64_t row_blocks = (N + kBM - 1) / kBM;
  // grid.x the row blocks of a group (at most 2^31 - 1), grid.y the splits (at most 65535; binding.cpp clamps)
  if (splits < 1 || splits > 65535 || row_blocks > 2147483647 || cps < 1) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  constexpr int64_t es = static_cast<int64_t>(sizeof(T));
  const bool vec16 = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(cb) % 16 == 0 &&
                     (ldx * es) % 16 == 0 && (ldc * es) % 16 == 0 && (sgx * es) % 16 == 0 &&
                     (sgc * es) % 16 == 0 && (D * es) % 16 == 0;
  return per_launch(G, [&](int64_t g0, int64_t n) {
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits), static_cast<unsigned>(n));
    SampleArgs<A> sg = sa;
    if constexpr (SAMPLE) {
      sg.rs += g0 * N;
      sg.rt += g0 * N;
      sg.code0 = g0 * N;
    }
    const int64_t part = g0 * splits * N * TOP;
    search_kernel<T, A, BN, TOP, SAMPLE><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x) + g0 * sgx, static_cast<const T*>(cb) + g0 * sgc, static_cast<const A*>(w) + g0 * K,
        static_cast<const A*>(o) + g0 * K, N, K, D, ldx, ldc, sgx, sgc, cps, vec16 ? 1 : 0, sg,
        static_cast<A*>(pv) + part, pi + part);
    return static_cast<int>(cudaGetLastError());
  });
}

// the search variants of nearest_code / quantize: the fast path's minimum or exact mode's candidate list
template <typename T, typename A, int BN>
int launch_search_top(const void* x, const void* cb, const void* w, const void* o, int64_t G, int64_t N, int64_t K,
                      int64_t D, int64_t ldx, int64_t ldc, int64_t sgx, int64_t sgc, int splits, int64_t cps,
                      int top, void* pv, int32_t* pi, cudaStream_t stream) {
  const SampleArgs<A> none{nullptr, nullptr, 0u, 0u, 0, 0};
  if (top == 1) {
    return launch_search<T, A, BN, 1, false>(x, cb, w, o, G, N, K, D, ldx, ldc, sgx, sgc, splits, cps, none, pv, pi,
                                             stream);
  }
  if (top == kTopExact) {
    return launch_search<T, A, BN, kTopExact, false>(x, cb, w, o, G, N, K, D, ldx, ldc, sgx, sgc, splits, cps, none,
                                                     pv, pi, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename T, typename A>
int launch_finalize(const void* x, const void* cb, const double* cnorm64, int64_t G, int64_t N, int64_t K, int64_t D,
                    int64_t ldx, int64_t ldc, int64_t sgx, int64_t sgc, int splits, int metric, int exact,
                    double gamma, const void* pv, const int32_t* pi, int64_t* codes, void* dist, void* zq,
                    int64_t* counts, cudaStream_t stream) {
  const int64_t blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 2147483647) return static_cast<int>(cudaErrorInvalidConfiguration);
  auto kernel = exact ? finalize_kernel<T, A, true> : finalize_kernel<T, A, false>;
  const int64_t top = exact ? kTopExact : 1;
  return per_launch(G, [&](int64_t g0, int64_t n) {
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(n));
    const int64_t part = g0 * splits * N * top;
    kernel<<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x) + g0 * sgx, static_cast<const T*>(cb) + g0 * sgc, cnorm64 + g0 * (K + 1), N, K, D,
        ldx, ldc, sgx, sgc, splits, metric, gamma, static_cast<const A*>(pv) + part, pi + part, codes + g0 * N,
        static_cast<A*>(dist) + g0 * N, zq != nullptr ? static_cast<T*>(zq) + g0 * N * D : nullptr,
        counts != nullptr ? counts + g0 * K : nullptr);
    return static_cast<int>(cudaGetLastError());
  });
}

template <typename T, typename A>
int launch_key_terms(const void* cb, int64_t G, int64_t K, int64_t D, int64_t ldc, int64_t sgc, int metric, void* w,
                     void* o, double* cnorm64, int64_t lnorm, cudaStream_t stream) {
  const int64_t blocks = (G * K + kWarps - 1) / kWarps;  // a warp per code of any group
  if (blocks > 2147483647) return static_cast<int>(cudaErrorInvalidConfiguration);
  key_terms_kernel<T, A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(cb), G, K, D, ldc, sgc, metric, static_cast<A*>(w), static_cast<A*>(o), cnorm64, lnorm);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename A>
int launch_code_stats(const void* x, const int64_t* codes, int64_t G, int64_t N, int64_t D, int64_t ldx, int64_t sgx,
                      int64_t K, void* sums, int64_t* counts, cudaStream_t stream) {
  const int64_t blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 2147483647) return static_cast<int>(cudaErrorInvalidConfiguration);
  return per_launch(G, [&](int64_t g0, int64_t n) {
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(n));
    code_stats_kernel<T, A><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x) + g0 * sgx, codes + g0 * N, N, D,
                                                           ldx, sgx, K, static_cast<A*>(sums) + g0 * K * D,
                                                           counts + g0 * K);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace

extern "C" int vqk_key_terms(int dtype, const void* cb, int64_t G, int64_t K, int64_t D, int64_t ldc, int64_t sgc,
                             int metric, void* w, void* o, double* cnorm64, int64_t lnorm, cudaStream_t stream) {
  if (G == 0 || K == 0) return 0;
  switch (dtype) {
    case VQK_F32:
      return launch_key_terms<float, float>(cb, G, K, D, ldc, sgc, metric, w, o, cnorm64, lnorm, stream);
    case VQK_F64:
      return launch_key_terms<double, double>(cb, G, K, D, ldc, sgc, metric, w, o, cnorm64, lnorm, stream);
    case VQK_BF16:
      return launch_key_terms<__nv_bfloat16, float>(cb, G, K, D, ldc, sgc, metric, w, o, cnorm64, lnorm, stream);
    case VQK_F16:
      return launch_key_terms<__half, float>(cb, G, K, D, ldc, sgc, metric, w, o, cnorm64, lnorm, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int vqk_search(int dtype, const void* x, const void* cb, const void* w, const void* o, int64_t G,
                          int64_t N, int64_t K, int64_t D, int64_t ldx, int64_t ldc, int64_t sgx, int64_t sgc,
                          int splits, int64_t codes_per_split, int top, int allow_tf32, void* pv, int32_t* pi,
                          cudaStream_t stream) {
  (void)allow_tf32;  // fp32 runs as IEEE fp32 on the FMA path
  if (G == 0 || N == 0) return 0;
  switch (dtype) {
    case VQK_F32:
      return launch_search_top<float, float, 64>(x, cb, w, o, G, N, K, D, ldx, ldc, sgx, sgc, splits, codes_per_split,
                                                 top, pv, pi, stream);
    case VQK_F64:  // a 64 x 32 block keeps the fp64 shared tiles under the 48 KiB static limit
      return launch_search_top<double, double, 32>(x, cb, w, o, G, N, K, D, ldx, ldc, sgx, sgc, splits,
                                                   codes_per_split, top, pv, pi, stream);
    case VQK_BF16:
      return launch_search_top<__nv_bfloat16, float, 64>(x, cb, w, o, G, N, K, D, ldx, ldc, sgx, sgc, splits,
                                                         codes_per_split, top, pv, pi, stream);
    case VQK_F16:
      return launch_search_top<__half, float, 64>(x, cb, w, o, G, N, K, D, ldx, ldc, sgx, sgc, splits,
                                                  codes_per_split, top, pv, pi, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int vqk_sample_search(int dtype, const void* codes_in, const void* rows_in, const void* w, const void* o,
                                 const void* rs, const void* rt, int64_t G, int64_t K, int64_t N, int64_t D,
                                 int64_t ldk, int64_t ldn, int64_t sgk, int64_t sgn, int splits,
                                 int64_t rows_per_split, uint32_t s_code, uint32_t s_row, int clamp, void* pv,
                                 int32_t* pi, cudaStream_t stream) {
  if (G == 0 || K == 0) return 0;
  // the search's rows are the codes and its "codes" the input rows (vq_cuda.h)
  switch (dtype) {
    case VQK_F32: {
      const SampleArgs<float> sa{static_cast<const float*>(rs), static_cast<const float*>(rt), s_code, s_row, clamp,
                                 0};
      return launch_search<float, float, 64, 1, true>(codes_in, rows_in, w, o, G, K, N, D, ldk, ldn, sgk, sgn, splits,
                                                      rows_per_split, sa, pv, pi, stream);
    }
    case VQK_F64: {
      const SampleArgs<double> sa{static_cast<const double*>(rs), static_cast<const double*>(rt), s_code, s_row,
                                  clamp, 0};
      return launch_search<double, double, 32, 1, true>(codes_in, rows_in, w, o, G, K, N, D, ldk, ldn, sgk, sgn,
                                                        splits, rows_per_split, sa, pv, pi, stream);
    }
    default:  // bf16 / fp16 are upcast by the caller: their products are exact in fp32
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int vqk_finalize(int dtype, const void* x, const void* cb, const double* cnorm64, int64_t G, int64_t N,
                            int64_t K, int64_t D, int64_t ldx, int64_t ldc, int64_t sgx, int64_t sgc, int splits,
                            int metric, int exact, const void* pv, const int32_t* pi, int64_t* codes, void* dist,
                            void* zq, int64_t* counts, cudaStream_t stream) {
  if (G == 0 || N == 0) return 0;
  const double gamma = num::exact_gamma(D, dtype == VQK_F64);
  switch (dtype) {
    case VQK_F32:
      return launch_finalize<float, float>(x, cb, cnorm64, G, N, K, D, ldx, ldc, sgx, sgc, splits, metric, exact,
                                           gamma, pv, pi, codes, dist, zq, counts, stream);
    case VQK_F64:
      return launch_finalize<double, double>(x, cb, cnorm64, G, N, K, D, ldx, ldc, sgx, sgc, splits, metric, exact,
                                             gamma, pv, pi, codes, dist, zq, counts, stream);
    case VQK_BF16:
      return launch_finalize<__nv_bfloat16, float>(x, cb, cnorm64, G, N, K, D, ldx, ldc, sgx, sgc, splits, metric,
                                                   exact, gamma, pv, pi, codes, dist, zq, counts, stream);
    case VQK_F16:
      return launch_finalize<__half, float>(x, cb, cnorm64, G, N, K, D, ldx, ldc, sgx, sgc, splits, metric, exact,
                                            gamma, pv, pi, codes, dist, zq, counts, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int vqk_code_stats(int dtype, const void* x, const int64_t* codes, int64_t G, int64_t N, int64_t D,
                              int64_t ldx, int64_t sgx, int64_t K, void* sums, int64_t* counts, cudaStream_t stream) {
  if (G == 0 || N == 0) return 0;
  switch (dtype) {
    case VQK_F32:
      return launch_code_stats<float, float>(x, codes, G, N, D, ldx, sgx, K, sums, counts, stream);
    case VQK_F64:
      return launch_code_stats<double, double>(x, codes, G, N, D, ldx, sgx, K, sums, counts, stream);
    case VQK_BF16:
      return launch_code_stats<__nv_bfloat16, float>(x, codes, G, N, D, ldx, sgx, K, sums, counts, stream);
    case VQK_F16:
      return launch_code_stats<__half, float>(x, codes, G, N, D, ldx, sgx, K, sums, counts, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

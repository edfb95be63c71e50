// CUDA kernels of the fused VQ ops, with plain C launchers (vq_cuda.h): no torch headers, so `nvcc -c` checks
// this file on any machine with the CUDA toolkit.
//
// search_kernel: a block owns BM rows; the codes of its split stream through in blocks of BN. The row and code
// tiles are double-buffered in shared memory: on sm_80+ with 16-byte aligned rows they arrive by cp.async while the
// previous tile is multiplied (and the next code block's first tile while the epilogue runs); otherwise by plain
// loads in the same two-buffer order. The BM x BN dot
// products come from tensor cores (WMMA 16x16x16, bf16/fp16 on sm_80+) or from a register-tiled FMA loop
// (fp32 as IEEE fp32, fp64), into shared memory, where two threads per row reduce them to a running top-2
// (key, index) (strictly smaller keys replace, codes are visited in increasing order: ties go to the lowest
// index). Only [splits, N, 2] partials are written, never N x K.
// finalize_kernel: merges the splits, forms the distance, re-scores exact mode's candidates in fp64 from the
// stored values (and re-scans every code for the rare rows whose second candidate is inside the rounding bound),
// gathers z_q and adds the histogram with warp-aggregated atomics (__match_any_sync: one atomic per distinct
// code of a warp, so full collapse costs N / 32 atomics).
// code_stats_kernel: the same warp aggregation for per-code sums and counts.
#include "vq_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <float.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 128;  // 4 warps
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

template <typename T>
__device__ __forceinline__ T zero_of() { return T(0.0f); }

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

// Keep the two smallest (value, index) pairs, ordered by value then index.
template <typename A>
__device__ __forceinline__ void push2(A v, int i, A& v1, int& i1, A& v2, int& i2) {
  if (v < v1 || (v == v1 && i < i1)) {
    v2 = v1; i2 = i1; v1 = v; i1 = i;
  } else if (v < v2 || (v == v2 && i < i2)) {
    v2 = v; i2 = i;
  }
}

// ---- key terms ---------------------------------------------------------------------------------------------------
template <typename T, typename A>
__global__ void key_terms_kernel(const T* __restrict__ cb, int64_t K, int64_t D, int64_t ldc, int metric,
                                 A* __restrict__ w, A* __restrict__ o, double* __restrict__ cnorm64) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= K) return;
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double c = f64(cb[k * ldc + d]);
    s += c * c;
  }
  const double n = sqrt(s);
  cnorm64[k] = n;
  if (metric == VQK_L2) {
    w[k] = A(-2); o[k] = static_cast<A>(s);
  } else if (metric == VQK_COSINE) {
    w[k] = static_cast<A>(-1.0 / fmax(n, 1e-12)); o[k] = A(0);
  } else {
    w[k] = A(-1); o[k] = A(0);
  }
}

// ---- search ------------------------------------------------------------------------------------------------------
template <typename T, typename A, int BN>
__global__ void __launch_bounds__(kThreads)
search_kernel(const T* __restrict__ x, const T* __restrict__ cb, const A* __restrict__ w, const A* __restrict__ o,
              int64_t N, int64_t K, int64_t D, int64_t ldx, int64_t ldc, int64_t codes_per_split, int top,
              int vec16, A* __restrict__ pv, int32_t* __restrict__ pi) {
  constexpr bool kWmma = IsHalf<T>::value && kHasWmma;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte copy
  __shared__ __align__(32) T xs[2][kBM][kBK];
  __shared__ __align__(32) T cs[2][BN][kBK];
  __shared__ __align__(32) A acc_s[kBM][BN + 4];  // +4: fewer bank conflicts in the row-wise epilogue

  const int tid = threadIdx.x;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(kBM);
  const int split = blockIdx.y;
  const int64_t k_lo = split * codes_per_split;
  const int64_t k_hi = k_lo + codes_per_split < K ? k_lo + codes_per_split : K;

  // epilogue ownership: two threads per row, each scanning half of a code block
  const int er = tid >> 1, eh = tid & 1;
  A v1 = Cvt<A>::inf(), v2 = Cvt<A>::inf();
  int i1 = kIntMax, i2 = kIntMax;

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
      for (int e = tid; e < BN * kBK / kVec; e += kThreads) {
        const int c = e / (kBK / kVec), kk = (e % (kBK / kVec)) * kVec;
        const int64_t code = kb + c, d = d0 + kk;
        const bool in = code < k_hi && d < D;
        cp_async16(&cs[buf][c][kk], in ? cb + code * ldc + d : cb, in ? 16 : 0);
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
      cs[buf][c][kk] = (code < k_hi && d < D) ? cb[code * ldc + d] : zero_of<T>();
    }
  };
  int buf = 0;
  if (k_lo < k_hi) stage(k_lo, 0, 0);
  cp_async_commit();

  for (int64_t kb = k_lo; kb < k_hi; kb += BN) {
    // FMA path: thread owns an 8 x (BN / 16) register tile of the block
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
        wmma::load_matrix_sync(afrag, &xs[buf][warp * 16][0], kBK);
#pragma unroll
        for (int j = 0; j < kFrags; ++j) {
          // B[k][n] = code n's feature k: the code tile read column-major
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bfrag;
          wmma::load_matrix_sync(bfrag, &cs[buf][j * 16][0], kBK);
          wmma::mma_sync(cfrag[j], afrag, bfrag, cfrag[j]);
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
          A a[8], b[kCols];
#pragma unroll
          for (int i = 0; i < 8; ++i) a[i] = Cvt<A>::of(xs[buf][rg * 8 + i][kk]);
#pragma unroll
          for (int j = 0; j < kCols; ++j) b[j] = Cvt<A>::of(cs[buf][cg * kCols + j][kk]);
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
        for (int j = 0; j < kCols; ++j) acc_s[rg * 8 + i][cg * kCols + j] = acc[i][j];
    }
    __syncthreads();
    // epilogue: keys and the running top-2 of this thread's half-row
    const int j0 = eh * (BN / 2);
    for (int j = j0; j < j0 + BN / 2; ++j) {
      const int64_t code = kb + j;
      if (code >= k_hi) break;
      const A key = acc_s[er][j] * w[code] + o[code];
      if (key < v1) {
        v2 = v1; i2 = i1; v1 = key; i1 = static_cast<int>(code);
      } else if (top > 1 && key < v2) {
        v2 = key; i2 = static_cast<int>(code);
      }
    }
    __syncthreads();  // acc_s is rewritten by the next block
  }
  cp_async_wait<0>();  // nothing may be in flight when the block exits (D = 0 leaves the prologue's group)
  // merge the two halves of each row (threads t and t ^ 1 share a warp)
  const A ov1 = __shfl_xor_sync(0xffffffffu, v1, 1), ov2 = __shfl_xor_sync(0xffffffffu, v2, 1);
  const int oi1 = __shfl_xor_sync(0xffffffffu, i1, 1), oi2 = __shfl_xor_sync(0xffffffffu, i2, 1);
  push2(ov1, oi1, v1, i1, v2, i2);
  push2(ov2, oi2, v1, i1, v2, i2);
  const int64_t row = row0 + er;
  if (eh == 0 && row < N) {
    const int64_t off = (split * N + row) * 2;
    pv[off] = v1; pv[off + 1] = v2;
    pi[off] = i1; pi[off + 1] = i2;
  }
}

// ---- finalize ----------------------------------------------------------------------------------------------------
template <typename T>
__device__ double rescore64(const T* xr, const T* cr, int64_t D, int metric, double xn, double cn) {
  double s = 0.0;
  if (metric == VQK_L2) {
    for (int64_t d = 0; d < D; ++d) {
      const double diff = f64(xr[d]) - f64(cr[d]);
      s += diff * diff;
    }
    return s;
  }
  for (int64_t d = 0; d < D; ++d) s += f64(xr[d]) * f64(cr[d]);
  if (metric == VQK_DOT) return -s;
  return 1.0 - s / (fmax(xn, 1e-12) * fmax(cn, 1e-12));
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
finalize_kernel(const T* __restrict__ x, const T* __restrict__ cb, const double* __restrict__ cnorm64, int64_t N,
                int64_t K, int64_t D, int64_t ldx, int64_t ldc, int splits, int metric, int exact, double gamma,
                const A* __restrict__ pv, const int32_t* __restrict__ pi, int64_t* __restrict__ codes,
                A* __restrict__ dist, T* __restrict__ zq, int64_t* __restrict__ counts) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool valid = row < N;
  int64_t code = 0;
  if (valid) {
    A v1 = Cvt<A>::inf(), v2 = Cvt<A>::inf();
    int i1 = kIntMax, i2 = kIntMax;
    for (int s = 0; s < splits; ++s) {
      const int64_t off = (s * N + row) * 2;
      push2(pv[off], pi[off], v1, i1, v2, i2);
      push2(pv[off + 1], pi[off + 1], v1, i1, v2, i2);
    }
    const T* xr = x + row * ldx;
    A xsq = A(0);
    double xsq64 = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const A a = Cvt<A>::of(xr[d]);
      xsq += a * a;
      if (exact) xsq64 += f64(xr[d]) * f64(xr[d]);
    }
    A dd;
    if (!exact) {
      code = i1;
      if (metric == VQK_L2) {
        dd = xsq + v1 > A(0) ? xsq + v1 : A(0);
      } else if (metric == VQK_COSINE) {
        dd = A(1) + v1 / static_cast<A>(fmax(sqrt(static_cast<double>(xsq)), 1e-12));
      } else {
        dd = v1;
      }
    } else {
      const double xn = sqrt(xsq64), cmax = cnorm64[K];
      double e = metric == VQK_L2 ? gamma * (2.0 * xn * cmax + cmax * cmax)
                                  : (metric == VQK_COSINE ? gamma * xn : gamma * xn * cmax);
      e += gamma * fabs(static_cast<double>(v1));
      const double thresh = static_cast<double>(v1) + 2.0 * e;
      double bd = rescore64(xr, cb + static_cast<int64_t>(i1) * ldc, D, metric, xn, cnorm64[i1]);
      int64_t bc = i1;
      const bool second = i2 < K && static_cast<double>(v2) <= thresh;
      if (second) {  // the bound may hide more codes than the two kept: re-scan every code in fp64
        for (int64_t k = 0; k < K; ++k) {
          const double dk = rescore64(xr, cb + k * ldc, D, metric, xn, cnorm64[k]);
          if (dk < bd || (dk == bd && k < bc)) { bd = dk; bc = k; }
        }
      }
      code = bc;
      dd = static_cast<A>(bd);
    }
    codes[row] = code;
    dist[row] = dd;
    if (zq != nullptr) {
      const T* cr = cb + code * ldc;
      for (int64_t d = 0; d < D; ++d) zq[row * D + d] = cr[d];
    }
  }
  if (counts != nullptr) {
    const unsigned active = __ballot_sync(0xffffffffu, valid);
    if (valid) {
      const unsigned peers = __match_any_sync(active, static_cast<unsigned long long>(code));
      if (static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1)
        atomicAdd(reinterpret_cast<unsigned long long*>(counts + code), static_cast<unsigned long long>(__popc(peers)));
    }
  }
}

// ---- code_stats --------------------------------------------------------------------------------------------------
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
code_stats_kernel(const T* __restrict__ x, const int64_t* __restrict__ codes, int64_t N, int64_t D, int64_t ldx,
                  A* __restrict__ sums, int64_t* __restrict__ counts) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool valid = row < N;
  const int64_t code = valid ? codes[row] : -1;
  const unsigned active = __ballot_sync(0xffffffffu, valid);
  if (!valid) return;
  const unsigned peers = __match_any_sync(active, static_cast<unsigned long long>(code));
  const int lane = threadIdx.x & 31;
  if (lane != __ffs(peers) - 1) return;
  // the warp's leader for this code sums its peers' rows (rows of a warp are consecutive)
  atomicAdd(reinterpret_cast<unsigned long long*>(counts + code), static_cast<unsigned long long>(__popc(peers)));
  const int64_t base = row - lane;
  for (int64_t d = 0; d < D; ++d) {
    A s = A(0);
    unsigned m = peers;
    while (m) {
      const int p = __ffs(m) - 1;
      m &= m - 1;
      s += Cvt<A>::of(x[(base + p) * ldx + d]);
    }
    atomicAdd(sums + code * D + d, s);
  }
}

// ---- dispatch ----------------------------------------------------------------------------------------------------
template <typename T, typename A, int BN>
int launch_search(const void* x, const void* cb, const void* w, const void* o, int64_t N, int64_t K, int64_t D,
                  int64_t ldx, int64_t ldc, int splits, int64_t cps, int top, void* pv, int32_t* pi,
                  cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + kBM - 1) / kBM), static_cast<unsigned>(splits));
  constexpr int64_t es = static_cast<int64_t>(sizeof(T));
  const bool vec16 = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(cb) % 16 == 0 &&
                     (ldx * es) % 16 == 0 && (ldc * es) % 16 == 0 && (D * es) % 16 == 0;
  search_kernel<T, A, BN><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(cb), static_cast<const A*>(w), static_cast<const A*>(o), N,
      K, D, ldx, ldc, cps, top, vec16 ? 1 : 0, static_cast<A*>(pv), pi);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename A>
int launch_finalize(const void* x, const void* cb, const double* cnorm64, int64_t N, int64_t K, int64_t D,
                    int64_t ldx, int64_t ldc, int splits, int metric, int exact, double gamma, const void* pv,
                    const int32_t* pi, int64_t* codes, void* dist, void* zq, int64_t* counts, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((N + kThreads - 1) / kThreads);
  finalize_kernel<T, A><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(cb), cnorm64, N, K, D, ldx, ldc, splits, metric, exact, gamma,
      static_cast<const A*>(pv), pi, codes, static_cast<A*>(dist), static_cast<T*>(zq), counts);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int vqk_key_terms(int dtype, const void* cb, int64_t K, int64_t D, int64_t ldc, int metric, void* w,
                             void* o, double* cnorm64, cudaStream_t stream) {
  if (K == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((K + kThreads - 1) / kThreads);
  switch (dtype) {
    case VQK_F32:
      key_terms_kernel<float, float><<<blocks, kThreads, 0, stream>>>(
          static_cast<const float*>(cb), K, D, ldc, metric, static_cast<float*>(w), static_cast<float*>(o), cnorm64);
      break;
    case VQK_F64:
      key_terms_kernel<double, double><<<blocks, kThreads, 0, stream>>>(
          static_cast<const double*>(cb), K, D, ldc, metric, static_cast<double*>(w), static_cast<double*>(o),
          cnorm64);
      break;
    case VQK_BF16:
      key_terms_kernel<__nv_bfloat16, float><<<blocks, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(cb), K, D, ldc, metric, static_cast<float*>(w), static_cast<float*>(o),
          cnorm64);
      break;
    case VQK_F16:
      key_terms_kernel<__half, float><<<blocks, kThreads, 0, stream>>>(
          static_cast<const __half*>(cb), K, D, ldc, metric, static_cast<float*>(w), static_cast<float*>(o),
          cnorm64);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int vqk_search(int dtype, const void* x, const void* cb, const void* w, const void* o, int64_t N,
                          int64_t K, int64_t D, int64_t ldx, int64_t ldc, int splits, int64_t codes_per_split,
                          int top, int allow_tf32, void* pv, int32_t* pi, cudaStream_t stream) {
  (void)allow_tf32;  // fp32 runs as IEEE fp32 on the FMA path
  if (N == 0) return 0;
  switch (dtype) {
    case VQK_F32:
      return launch_search<float, float, 64>(x, cb, w, o, N, K, D, ldx, ldc, splits, codes_per_split, top, pv, pi,
                                             stream);
    case VQK_F64:  // a 64 x 32 block keeps the fp64 shared tiles under the 48 KiB static limit
      return launch_search<double, double, 32>(x, cb, w, o, N, K, D, ldx, ldc, splits, codes_per_split, top, pv,
                                               pi, stream);
    case VQK_BF16:
      return launch_search<__nv_bfloat16, float, 64>(x, cb, w, o, N, K, D, ldx, ldc, splits, codes_per_split, top,
                                                     pv, pi, stream);
    case VQK_F16:
      return launch_search<__half, float, 64>(x, cb, w, o, N, K, D, ldx, ldc, splits, codes_per_split, top, pv, pi,
                                              stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int vqk_finalize(int dtype, const void* x, const void* cb, const double* cnorm64, int64_t N, int64_t K,
                            int64_t D, int64_t ldx, int64_t ldc, int splits, int metric, int exact, const void* pv,
                            const int32_t* pi, int64_t* codes, void* dist, void* zq, int64_t* counts,
                            cudaStream_t stream) {
  if (N == 0) return 0;
  // rounding bound of the fast key: 2x the classic gamma_D, and 2x again for the MMA's accumulation order
  const double u = dtype == VQK_F64 ? 0x1p-53 : 0x1p-24;
  const double gamma = 4.0 * static_cast<double>(D + 4) * u;
  switch (dtype) {
    case VQK_F32:
      return launch_finalize<float, float>(x, cb, cnorm64, N, K, D, ldx, ldc, splits, metric, exact, gamma, pv, pi,
                                           codes, dist, zq, counts, stream);
    case VQK_F64:
      return launch_finalize<double, double>(x, cb, cnorm64, N, K, D, ldx, ldc, splits, metric, exact, gamma, pv,
                                             pi, codes, dist, zq, counts, stream);
    case VQK_BF16:
      return launch_finalize<__nv_bfloat16, float>(x, cb, cnorm64, N, K, D, ldx, ldc, splits, metric, exact, gamma,
                                                   pv, pi, codes, dist, zq, counts, stream);
    case VQK_F16:
      return launch_finalize<__half, float>(x, cb, cnorm64, N, K, D, ldx, ldc, splits, metric, exact, gamma, pv, pi,
                                            codes, dist, zq, counts, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int vqk_code_stats(int dtype, const void* x, const int64_t* codes, int64_t N, int64_t D, int64_t ldx,
                              int64_t K, void* sums, int64_t* counts, cudaStream_t stream) {
  (void)K;
  if (N == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((N + kThreads - 1) / kThreads);
  switch (dtype) {
    case VQK_F32:
      code_stats_kernel<float, float><<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(x), codes, N, D,
                                                                        ldx, static_cast<float*>(sums), counts);
      break;
    case VQK_F64:
      code_stats_kernel<double, double><<<blocks, kThreads, 0, stream>>>(static_cast<const double*>(x), codes, N,
                                                                          D, ldx, static_cast<double*>(sums), counts);
      break;
    case VQK_BF16:
      code_stats_kernel<__nv_bfloat16, float><<<blocks, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), codes, N, D, ldx, static_cast<float*>(sums), counts);
      break;
    case VQK_F16:
      code_stats_kernel<__half, float><<<blocks, kThreads, 0, stream>>>(static_cast<const __half*>(x), codes, N, D,
                                                                         ldx, static_cast<float*>(sums), counts);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

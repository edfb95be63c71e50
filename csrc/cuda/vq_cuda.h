// Plain C launchers of the CUDA kernels (no torch headers): pointers, sizes, a stream; 0 on success, else a
// cudaError_t. csrc/cuda/binding.cpp wraps them as the CUDA implementations of the vqkernels ops. The numerics
// (key terms, the exact-mode bound, the Gumbel noise) are those of csrc/numerics.h (README "Method" §1).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes shared with binding.cpp
enum VqkDtype { VQK_F32 = 0, VQK_F64 = 1, VQK_BF16 = 2, VQK_F16 = 3 };
// metric codes: numerics.h's kMetric* (vq_cuda.cu checks that they agree)
enum VqkMetric { VQK_L2 = 0, VQK_COSINE = 1, VQK_DOT = 2 };
// candidates per row that exact mode keeps: numerics.h's kExactCandidates (vq_cuda.cu checks)
enum { VQK_EXACT_CANDIDATES = 4 };

// Per-code key terms: key_k = w_k (x . c_k) + o_k, in the accumulation type (double for VQK_F64, else float), and
// the fp64 norms cnorm64[k]. sample_code also calls it on the input rows, whose key terms its search uses.
int vqk_key_terms(int dtype, const void* cb, int64_t K, int64_t D, int64_t ldc, int metric, void* w, void* o,
                  double* cnorm64, cudaStream_t stream);

// Search: for rows [N, D] (row stride ldx) against codes [K, D] (row stride ldc), `splits` ranges of
// `codes_per_split` codes each; writes the `top` smallest (key, index) per row and split, ordered by (key, index),
// to pv [splits, N, top] (acc type) and pi [splits, N, top] (int32; empty slots: (inf, INT32_MAX)). top: 1 (the
// fast path) or VQK_EXACT_CANDIDATES (exact mode); cudaErrorInvalidValue otherwise. The splits are the launch's
// grid.y: 1..65535 (cudaErrorInvalidConfiguration otherwise; binding.cpp clamps).
int vqk_search(int dtype, const void* x, const void* cb, const void* w, const void* o, int64_t N, int64_t K,
               int64_t D, int64_t ldx, int64_t ldc, int splits, int64_t codes_per_split, int top, int allow_tf32,
               void* pv, int32_t* pi, cudaStream_t stream);

// Finalize: merge the splits, distance, exact fp64 re-score of the candidates inside the rounding bound (with a
// full re-scan of rows whose last kept candidate is inside it too), gather z_q ([N, D] contiguous, may be null)
// and add the usage histogram (counts [K] int64, zeroed by the caller; may be null). The partials are vqk_search's
// with top = 1 (exact = 0) or VQK_EXACT_CANDIDATES (exact = 1).
int vqk_finalize(int dtype, const void* x, const void* cb, const double* cnorm64, int64_t N, int64_t K, int64_t D,
                 int64_t ldx, int64_t ldc, int splits, int metric, int exact, const void* pv, const int32_t* pi,
                 int64_t* codes, void* dist, void* zq, int64_t* counts, cudaStream_t stream);

// Sampling search (sample_code): the search with the roles swapped. Its rows are the codes [K, D] (row stride ldk)
// and its columns the input rows [N, D] (row stride ldn), `splits` ranges of `rows_per_split` input rows each. The
// key of (code k, row i) is fma(fma(c_k . x_i, w_i, o_i), rs_k, rt_k), clamped at 0 when `clamp` (l2), minus the
// Gumbel noise g(seed, k, i) of numerics.h: (w, o) [N] are the input rows' key terms (vqk_key_terms on x), rs, rt
// [K] the codes' factor and term of the distance (1 / max(|c_k|, eps) for cosine, else 1; |c_k|^2 for l2, else 0).
// Writes the smallest (key, row) per code and split to pv [splits, K, 1] / pi [splits, K, 1]; the caller merges the
// splits to the lowest (key, row). dtype: VQK_F32 or VQK_F64 only (bf16 / fp16 are upcast by the caller: their
// products are exact in fp32).
int vqk_sample_search(int dtype, const void* codes, const void* rows, const void* w, const void* o, const void* rs,
                      const void* rt, int64_t K, int64_t N, int64_t D, int64_t ldk, int64_t ldn, int splits,
                      int64_t rows_per_split, uint32_t s_code, uint32_t s_row, int clamp, void* pv, int32_t* pi,
                      cudaStream_t stream);

// code_stats: sums [K, D] (acc type, zeroed by the caller) and counts [K] (int64, zeroed) of rows x by codes.
int vqk_code_stats(int dtype, const void* x, const int64_t* codes, int64_t N, int64_t D, int64_t ldx,
                   int64_t K, void* sums, int64_t* counts, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

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

// Every launcher takes the batched form (README "Method" §1.6): G groups, group g's rows or codes starting a group
// stride (sg*, elements) after group g - 1's, each group searched against its own codes; a 2-D call is G = 1 (any
// group stride). Per-group buffers (key terms, partials, outputs) are [G, ...] contiguous.

// Per-code key terms: key_k = w_k (x . c_k) + o_k, in the accumulation type (double for VQK_F64, else float), and
// the fp64 norms. cb: G groups of K codes [K, D] (row stride ldc, group stride sgc); w, o [G, K]; cnorm64[g * lnorm
// + k] (lnorm >= K: the search keeps each group's max at [g * lnorm + K]). sample_code also calls it on the input
// rows, whose key terms its search uses.
int vqk_key_terms(int dtype, const void* cb, int64_t G, int64_t K, int64_t D, int64_t ldc, int64_t sgc, int metric,
                  void* w, void* o, double* cnorm64, int64_t lnorm, cudaStream_t stream);

// Search: per group, rows [N, D] (row stride ldx, group stride sgx) against codes [K, D] (row stride ldc, group
// stride sgc) with key terms w, o [G, K], `splits` ranges of `codes_per_split` codes each; writes the `top`
// smallest (key, index) per row and split, ordered by (key, index), to pv [G, splits, N, top] (acc type) and
// pi [G, splits, N, top] (int32, the index within the group; empty slots: (inf, INT32_MAX)). top: 1 (the fast
// path) or VQK_EXACT_CANDIDATES (exact mode); cudaErrorInvalidValue otherwise. The splits are the launch's grid.y:
// 1..65535, and every group's row blocks its grid.x: at most 2^31 - 1 (cudaErrorInvalidConfiguration otherwise;
// binding.cpp clamps the splits).
int vqk_search(int dtype, const void* x, const void* cb, const void* w, const void* o, int64_t G, int64_t N,
               int64_t K, int64_t D, int64_t ldx, int64_t ldc, int64_t sgx, int64_t sgc, int splits,
               int64_t codes_per_split, int top, int allow_tf32, void* pv, int32_t* pi, cudaStream_t stream);

// Finalize: merge the splits, distance, exact fp64 re-score of the candidates inside the rounding bound (with a
// full re-scan of rows whose last kept candidate is inside it too), gather z_q ([G, N, D] contiguous, may be null)
// and add the usage histogram (counts [G, K] int64, zeroed by the caller; may be null). cnorm64 [G, K + 1]: each
// group's norms, then their max. codes, dist [G, N]. The partials are vqk_search's with top = 1 (exact = 0) or
// VQK_EXACT_CANDIDATES (exact = 1).
int vqk_finalize(int dtype, const void* x, const void* cb, const double* cnorm64, int64_t G, int64_t N, int64_t K,
                 int64_t D, int64_t ldx, int64_t ldc, int64_t sgx, int64_t sgc, int splits, int metric, int exact,
                 const void* pv, const int32_t* pi, int64_t* codes, void* dist, void* zq, int64_t* counts,
                 cudaStream_t stream);

// Sampling search (sample_code): the search with the roles swapped. Its rows are the codes [K, D] (row stride ldk,
// group stride sgk) and its columns the input rows [N, D] (row stride ldn, group stride sgn), `splits` ranges of
// `rows_per_split` input rows each. The key of (code k, row i) of group g is fma(fma(c_k . x_i, w_i, o_i), rs_k,
// rt_k), clamped at 0 when `clamp` (l2), minus the Gumbel noise g(seed, g K + k, i) of numerics.h: (w, o) [G, N]
// are the input rows' key terms (vqk_key_terms on x), rs, rt [G, K] the codes' factor and term of the distance
// (1 / max(|c_k|, eps) for cosine, else 1; |c_k|^2 for l2, else 0). Writes the smallest (key, row) per code and
// split to pv [G, splits, K, 1] / pi [G, splits, K, 1]; the caller merges the splits to the lowest (key, row).
// dtype: VQK_F32 or VQK_F64 only (bf16 / fp16 are upcast by the caller: their products are exact in fp32).
int vqk_sample_search(int dtype, const void* codes, const void* rows, const void* w, const void* o, const void* rs,
                      const void* rt, int64_t G, int64_t K, int64_t N, int64_t D, int64_t ldk, int64_t ldn,
                      int64_t sgk, int64_t sgn, int splits, int64_t rows_per_split, uint32_t s_code, uint32_t s_row,
                      int clamp, void* pv, int32_t* pi, cudaStream_t stream);

// code_stats: sums [G, K, D] (acc type, zeroed by the caller) and counts [G, K] (int64, zeroed) of rows x (row
// stride ldx, group stride sgx) by codes [G, N] (group g's in [0, K)).
int vqk_code_stats(int dtype, const void* x, const int64_t* codes, int64_t G, int64_t N, int64_t D, int64_t ldx,
                   int64_t sgx, int64_t K, void* sums, int64_t* counts, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

// Plain C launchers of the CUDA kernels (no torch headers): pointers, sizes, a stream; 0 on success, else a
// cudaError_t. csrc/cuda/binding.cpp wraps them as the CUDA implementations of the vqkernels ops.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes shared with binding.cpp
enum VqkDtype { VQK_F32 = 0, VQK_F64 = 1, VQK_BF16 = 2, VQK_F16 = 3 };
enum VqkMetric { VQK_L2 = 0, VQK_COSINE = 1, VQK_DOT = 2 };

// Per-code key terms: key_k = w_k (x . c_k) + o_k, in the accumulation type (double for VQK_F64, else float).
int vqk_key_terms(int dtype, const void* cb, int64_t K, int64_t D, int64_t ldc, int metric, void* w, void* o,
                  double* cnorm64, cudaStream_t stream);

// Search: for rows [N, D] (row stride ldx) against codes [K, D] (row stride ldc), `splits` ranges of
// `codes_per_split` codes each; writes the best `top` (1 or 2) (key, index) per row and split to
// pv [splits, N, 2] (acc type) and pi [splits, N, 2] (int32). The splits are the launch's grid.y: 1..65535
// (cudaErrorInvalidConfiguration otherwise; binding.cpp clamps).
int vqk_search(int dtype, const void* x, const void* cb, const void* w, const void* o, int64_t N, int64_t K,
               int64_t D, int64_t ldx, int64_t ldc, int splits, int64_t codes_per_split, int top, int allow_tf32,
               void* pv, int32_t* pi, cudaStream_t stream);

// Finalize: merge the splits, distance, exact fp64 re-score (with a full re-scan of rows whose second
// candidate is inside the rounding bound), gather z_q ([N, D] contiguous, may be null) and add the usage
// histogram (counts [K] int64, zeroed by the caller; may be null).
int vqk_finalize(int dtype, const void* x, const void* cb, const double* cnorm64, int64_t N, int64_t K, int64_t D,
                 int64_t ldx, int64_t ldc, int splits, int metric, int exact, const void* pv, const int32_t* pi,
                 int64_t* codes, void* dist, void* zq, int64_t* counts, cudaStream_t stream);

// code_stats: sums [K, D] (acc type, zeroed by the caller) and counts [K] (int64, zeroed) of rows x by codes.
int vqk_code_stats(int dtype, const void* x, const int64_t* codes, int64_t N, int64_t D, int64_t ldx,
                   int64_t K, void* sums, int64_t* counts, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

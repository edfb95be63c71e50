// Sums of squares of rows in fp64: the key terms of every code and the row terms of every input (README "Method"
// §1.1: s = sum_d v_d^2 from the values as stored, summed in fp64 and rounded once by the caller). The pass reads
// every element anyway, so it also enforces the non-finite policy (§1.5). With few input rows against a huge
// codebook this pass is half of all memory traffic, so fp32 / bf16 / fp16 rows get AVX-512 and AVX2 forms.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "tile_gemm.h"

namespace vqkernels::cpu {

// out[i - i0] = sum_d row(i)_d^2 for i in [i0, i1); false when a row holds a NaN or an Inf. The order of the fp64
// additions depends on the ISA (an fp64 sum of D <= 2^20 squares is then rounded once to fp32 by the key terms,
// and it is exact whenever the squares are, as for small integers).
template <typename scalar_t>
bool sum_squares_rows(const RowMatrix<scalar_t>& m, int64_t i0, int64_t i1, double* out);

}  // namespace vqkernels::cpu

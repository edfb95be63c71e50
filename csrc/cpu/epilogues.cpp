// The portable (scalar) search epilogues, for every CPU and for fp64: epilogue_kernels.h with a one-lane V.
#include "epilogues.h"

#include "epilogue_kernels.h"

namespace vqkernels::cpu {

using epilogue::Scalar;

void argmin_codes_scalar(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                         int32_t kb, float* best, int32_t* bidx) {
  epilogue::argmin_codes<Scalar<float>>(tile, nb, ld, m, w, o, kb, best, bidx);
}

void argmin_codes_scalar(const double* tile, int64_t nb, int64_t ld, int64_t m, const double* w, const double* o,
                         int32_t kb, double* best, int32_t* bidx) {
  epilogue::argmin_codes<Scalar<double>>(tile, nb, ld, m, w, o, kb, best, bidx);
}

void top4_codes_scalar(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                       int32_t kb, float* topv, int32_t* topi, int64_t stride) {
  epilogue::top4_codes<Scalar<float>>(tile, nb, ld, m, w, o, kb, topv, topi, stride);
}

void top4_codes_scalar(const double* tile, int64_t nb, int64_t ld, int64_t m, const double* w, const double* o,
                       int32_t kb, double* topv, int32_t* topi, int64_t stride) {
  epilogue::top4_codes<Scalar<double>>(tile, nb, ld, m, w, o, kb, topv, topi, stride);
}

}  // namespace vqkernels::cpu

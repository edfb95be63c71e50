// Shared helpers of the CPU ops: argument checks that name the argument, metric parsing, accumulator types.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace vqkernels::cpu {

enum class Metric { L2, Cosine, Dot };

inline Metric parse_metric(const std::string& name) {
  if (name == "l2") return Metric::L2;
  if (name == "cosine") return Metric::Cosine;
  if (name == "dot") return Metric::Dot;
  TORCH_CHECK_VALUE(false, "metric must be one of 'l2', 'cosine', 'dot'; got '", name, "'");
}

// Distances and code norms accumulate in fp32, or fp64 for fp64 inputs.
template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

inline void check_float_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be a 2-D tensor [rows, D]; got ", t.dim(), " dims");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be float64/float32/bfloat16/float16; got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU for the cpu backend; got ", t.device());
}

inline void check_search_args(const at::Tensor& x, const at::Tensor& codebook) {
  check_float_matrix(x, "x");
  check_float_matrix(codebook, "codebook");
  TORCH_CHECK_TYPE(x.scalar_type() == codebook.scalar_type(), "x and codebook must have the same dtype; got ",
                   x.scalar_type(), " and ", codebook.scalar_type());
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, "codebook must hold at least one code; got K = 0");
  TORCH_CHECK_VALUE(x.size(1) == codebook.size(1), "x and codebook must have the same D; got x [", x.size(0),
                    ", ", x.size(1), "] and codebook [", codebook.size(0), ", ", codebook.size(1), "]");
  TORCH_CHECK_VALUE(codebook.size(0) < (int64_t(1) << 31), "codebook may hold at most 2^31 - 1 codes");
}

}  // namespace vqkernels::cpu

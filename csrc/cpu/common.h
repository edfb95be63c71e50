// Shared helpers of the CPU ops: argument checks that name the argument, metric parsing, accumulator types, the
// key-term pass over stored rows.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string_view>

#include "../numerics.h"

namespace vqkernels::cpu {

namespace num = ::vqkernels::numerics;

enum class Metric : int { L2 = num::kMetricL2, Cosine = num::kMetricCosine, Dot = num::kMetricDot };

inline Metric parse_metric(std::string_view name) {
  const int code = num::metric_code(name);
  TORCH_CHECK_VALUE(code >= 0, "metric must be one of ", num::kMetricNames, "; got '", name, "'");
  return static_cast<Metric>(code);
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

// A tuning knob from the environment (>= 1), or dflt when unset.
inline int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  return std::max<int64_t>(1, std::atoll(v));
}

// sum_d v_d^2 in fp64 from the stored values (and whether every v_d is finite): the key terms are sums of squares
// rounded once, not rounded norms squared, so that equidistant codes of exactly representable data tie exactly
// (README "Method" §1). The pass reads every element anyway, so it also enforces the non-finite policy.
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

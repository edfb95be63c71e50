// Shared helpers of the CPU ops: argument checks that name the argument, metric parsing, accumulator types, dtype
// names, layouts.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
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

// The dtype names of cpu_features.h ("fp32", "bf16", "fp16", "fp64").
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "fp32";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    case at::kDouble: return "fp64";
    default: TORCH_CHECK_TYPE(false, "expected float64/float32/bfloat16/float16; got ", t);
  }
  return "";
}

// t itself when its features (the last dim) have unit stride (rows and groups may lie anywhere: a row-strided view,
// or the head split x.view(N, G, D).transpose(0, 1), is read in place), else a contiguous copy.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous();
}

// A 2-D [rows, D] or batched 3-D [G, rows, D] floating operand (README "Method" §1.6) on the CPU.
inline void check_float_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, name,
                    " must be a 2-D tensor [rows, D] or a batched 3-D tensor [G, rows, D]; got ", t.dim(), " dims");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be float64/float32/bfloat16/float16; got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU for the cpu backend; got ", t.device());
}

inline void check_search_args(const at::Tensor& x, const at::Tensor& codebook) {
  check_float_operand(x, "x");
  check_float_operand(codebook, "codebook");
  TORCH_CHECK_VALUE(x.dim() == codebook.dim(), "x and codebook must both be 2-D or both batched 3-D; got x ",
                    x.sizes(), " and codebook ", codebook.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2 || x.size(0) == codebook.size(0),
                    "batched x and codebook must have the same number of groups G; got x ", x.sizes(),
                    " and codebook ", codebook.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == codebook.scalar_type(), "x and codebook must have the same dtype; got ",
                   x.scalar_type(), " and ", codebook.scalar_type());
  TORCH_CHECK_VALUE(codebook.size(-2) >= 1, "codebook must hold at least one code; got K = 0");
  TORCH_CHECK_VALUE(x.size(-1) == codebook.size(-1), "x and codebook must have the same D; got x ", x.sizes(),
                    " and codebook ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(-2) < (int64_t(1) << 31), "codebook may hold at most 2^31 - 1 codes");
}

// The group axis of an operand: G and the stride between groups (a 2-D operand is one group).
inline int64_t groups_of(const at::Tensor& t) { return t.dim() == 3 ? t.size(0) : 1; }
inline int64_t group_stride(const at::Tensor& t) { return t.dim() == 3 ? t.stride(0) : 0; }

}  // namespace vqkernels::cpu

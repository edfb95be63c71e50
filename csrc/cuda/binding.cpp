// CUDA implementations of the vqkernels ops (schemas in csrc/registration.cpp): argument checks that name the
// argument, a device guard, then the plain C launchers of vq_cuda.cu on the current stream. No check here reads
// tensor data: the non-finite policy (README "Method" §1) would cost a host sync per call, so vqkernels/ops.py
// checks for this backend, in eager mode only.
// Built only against a CUDA build of torch (setup.py). Only c10/cuda headers and the CUDA runtime: not
// ATen/cuda/CUDAContext.h, which pulls in the cuBLAS / cuSPARSE / cuSOLVER headers that a bare CUDA toolkit
// (nvcc + cudart) lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "../numerics.h"
#include "vq_cuda.h"

namespace vqkernels::cuda {
namespace {

constexpr int64_t kBM = 64, kBN = 64;  // search tile of vq_cuda.cu (rows per block, codes per block; fp64: 32)
constexpr int64_t kMaxSplits = 65535;  // splits are grid.y of the search launch
namespace num = ::vqkernels::numerics;

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "vqkernels CUDA ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return VQK_F32;
    case at::kDouble: return VQK_F64;
    case at::kBFloat16: return VQK_BF16;
    case at::kHalf: return VQK_F16;
    default: TORCH_CHECK_TYPE(false, "x must be float64/float32/bfloat16/float16; got ", t);
  }
  return -1;
}

int metric_code(c10::string_view m) {
  const std::string_view name(m.data(), m.size());
  const int code = num::metric_code(name);
  TORCH_CHECK_VALUE(code >= 0, "metric must be one of ", num::kMetricNames, "; got '", name, "'");
  return code;
}

// A 2-D [rows, D] or batched 3-D [G, rows, D] floating operand (README "Method" §1.6) on a CUDA device.
void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, name,
                    " must be a 2-D tensor [rows, D] or a batched 3-D tensor [G, rows, D]; got ", t.dim(), " dims");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be float64/float32/bfloat16/float16; got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend; got ", t.device());
}

// Unit stride along features (rows and groups may be strided: the head split x.view(N, G, D).transpose(0, 1) is
// read in place).
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

// The group axis: G and the stride between groups (a 2-D operand is one group).
int64_t groups_of(const at::Tensor& t) { return t.dim() == 3 ? t.size(0) : 1; }
int64_t group_stride(const at::Tensor& t) { return t.dim() == 3 ? t.stride(0) : 0; }

// [G, tail...] for a batched operand, [tail...] for a 2-D one.
std::vector<int64_t> lead_shape(bool batched, int64_t G, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> out;
  if (batched) out.push_back(G);
  out.insert(out.end(), tail.begin(), tail.end());
  return out;
}

int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  return (v == nullptr || *v == '\0') ? dflt : std::max<int64_t>(1, std::atoll(v));
}

void check_pair(const at::Tensor& x_in, const at::Tensor& cb_in) {
  check_operand(x_in, "x");
  check_operand(cb_in, "codebook");
  TORCH_CHECK_VALUE(x_in.dim() == cb_in.dim(), "x and codebook must both be 2-D or both batched 3-D; got x ",
                    x_in.sizes(), " and codebook ", cb_in.sizes());
  TORCH_CHECK_VALUE(x_in.dim() == 2 || x_in.size(0) == cb_in.size(0),
                    "batched x and codebook must have the same number of groups G; got x ", x_in.sizes(),
                    " and codebook ", cb_in.sizes());
  TORCH_CHECK_TYPE(x_in.scalar_type() == cb_in.scalar_type(), "x and codebook must have the same dtype; got ",
                   x_in.scalar_type(), " and ", cb_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.device() == cb_in.device(), "x and codebook must be on the same device; got ",
                    x_in.device(), " and ", cb_in.device());
  TORCH_CHECK_VALUE(cb_in.size(-2) >= 1, "codebook must hold at least one code; got K = 0");
  TORCH_CHECK_VALUE(x_in.size(-1) == cb_in.size(-1), "x and codebook must have the same D; got x ", x_in.sizes(),
                    " and codebook ", cb_in.sizes());
  TORCH_CHECK_VALUE(cb_in.size(-2) < (int64_t(1) << 31), "codebook may hold at most 2^31 - 1 codes");
}

// Splits of the search's codes (its columns): split-K when the row blocks of all `groups` alone cannot fill the GPU
// twice, at most one per code block and at most grid.y's limit (VQK_CUDA_SPLIT may ask for more). Returns
// (splits, per split).
std::pair<int64_t, int64_t> split_codes(int64_t rows, int64_t cols, int device, int64_t groups) {
  int sm_count = 0;
  check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device), "device query");
  const int64_t sms = std::max(1, sm_count);
  const int64_t row_blocks = std::max<int64_t>(1, groups * ((rows + kBM - 1) / kBM));
  int64_t splits =
      row_blocks >= 2 * sms ? 1 : std::min((2 * sms + row_blocks - 1) / row_blocks, (cols + 4 * kBN - 1) / (4 * kBN));
  splits = std::max<int64_t>(1, env_int("VQK_CUDA_SPLIT", splits));
  splits = std::min({splits, (cols + kBN - 1) / kBN, kMaxSplits});
  const int64_t per_split = ((cols + splits - 1) / splits + kBN - 1) / kBN * kBN;
  return {(cols + per_split - 1) / per_split, per_split};  // <= the clamped count: per_split only grew
}

// x [N, D] / codebook [K, D], or batched x [G, N, D] / codebook [G, K, D]: one launch of each kernel for all groups.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> search(const at::Tensor& x_in, const at::Tensor& cb_in,
                                                                  c10::string_view metric_name, bool exact,
                                                                  bool gather) {
  check_pair(x_in, cb_in);
  const int metric = metric_code(metric_name);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_contiguous(x_in), cb = rows_contiguous(cb_in);
  const bool batched = x.dim() == 3;
  const int64_t G = groups_of(x), N = x.size(-2), D = x.size(-1), K = cb.size(-2);
  const int64_t sgx = group_stride(x), sgc = group_stride(cb);
  const int dt = dtype_code(x.scalar_type());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  auto codes = at::empty(lead_shape(batched, G, {N}), x.options().dtype(at::kLong));
  auto dist = at::empty(lead_shape(batched, G, {N}), x.options().dtype(acc));
  at::Tensor zq = gather ? at::empty(lead_shape(batched, G, {N, D}), cb.options()) : at::empty({0}, cb.options());
  at::Tensor counts = gather ? at::zeros(lead_shape(batched, G, {K}), x.options().dtype(at::kLong))
                             : at::empty({0}, x.options().dtype(at::kLong));
  if (G == 0 || N == 0) return {codes, zq, dist, counts};

  auto w = at::empty({G, K}, x.options().dtype(acc));
  auto o = at::empty({G, K}, x.options().dtype(acc));
  auto cnorm = at::empty({G, K + 1}, x.options().dtype(at::kDouble));  // per group: the fp64 norms, then their max
  check(vqk_key_terms(dt, cb.data_ptr(), G, K, D, cb.stride(-2), sgc, metric, w.data_ptr(), o.data_ptr(),
                      cnorm.data_ptr<double>(), K + 1, stream),
        "key terms");
  if (exact) cnorm.narrow(1, K, 1).copy_(std::get<0>(cnorm.narrow(1, 0, K).max(1, /*keepdim=*/true)));

  const auto [splits, per_split] = split_codes(N, K, x.device().index(), G);
  // exact mode keeps its candidates per row and split, the fast path the minimum
  const int64_t top = exact ? num::kExactCandidates : 1;
  auto pv = at::empty({G, splits, N, top}, x.options().dtype(acc));
  auto pi = at::empty({G, splits, N, top}, x.options().dtype(at::kInt));
  check(vqk_search(dt, x.data_ptr(), cb.data_ptr(), w.data_ptr(), o.data_ptr(), G, N, K, D, x.stride(-2),
                   cb.stride(-2), sgx, sgc, static_cast<int>(splits), per_split, static_cast<int>(top), 0,
                   pv.data_ptr(), pi.data_ptr<int32_t>(), stream),
        "search");
  check(vqk_finalize(dt, x.data_ptr(), cb.data_ptr(), cnorm.data_ptr<double>(), G, N, K, D, x.stride(-2),
                     cb.stride(-2), sgx, sgc, static_cast<int>(splits), metric, exact ? 1 : 0, pv.data_ptr(),
                     pi.data_ptr<int32_t>(), codes.data_ptr<int64_t>(), dist.data_ptr(),
                     gather ? zq.data_ptr() : nullptr, gather ? counts.data_ptr<int64_t>() : nullptr, stream),
        "finalize");
  return {codes, zq, dist, counts};
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook,
                                                     c10::string_view metric, bool exact) {
  auto [codes, zq, dist, counts] = search(x, codebook, metric, exact, /*gather=*/false);
  return {codes, dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x,
                                                                         const at::Tensor& codebook,
                                                                         c10::string_view metric, bool exact) {
  return search(x, codebook, metric, exact, /*gather=*/true);
}

// x [N, D], codes [N] -> sums [K, D], counts [K]; batched x [G, N, D], codes [G, N] -> [G, K, D], [G, K].
std::tuple<at::Tensor, at::Tensor> code_stats_cuda(const at::Tensor& x_in, const at::Tensor& codes,
                                                   int64_t num_codes) {
  check_operand(x_in, "x");
  const bool batched = x_in.dim() == 3;
  const auto lead = x_in.sizes().slice(0, x_in.dim() - 1);
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kLong, "codes must be int64; got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.sizes() == lead, "codes must have shape ", batched ? "[G, N] = " : "[N] = ", lead,
                    "; got ", codes.sizes());
  TORCH_CHECK_VALUE(codes.device() == x_in.device(), "x and codes must be on the same device; got ", x_in.device(),
                    " and ", codes.device());
  TORCH_CHECK_VALUE(num_codes >= 1, "num_codes must be a positive int; got ", num_codes);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_contiguous(x_in);
  const at::Tensor c = codes.contiguous();
  const int64_t G = groups_of(x), N = x.size(-2), D = x.size(-1);
  if (G * N > 0) {
    const auto mm = at::aminmax(c);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < num_codes, "codes must lie in [0, num_codes = ", num_codes,
                      "); got values in [", lo, ", ", hi, "]");
  }
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sums = at::zeros(lead_shape(batched, G, {num_codes, D}), x.options().dtype(acc));
  auto counts = at::zeros(lead_shape(batched, G, {num_codes}), x.options().dtype(at::kLong));
  check(vqk_code_stats(dtype_code(x.scalar_type()), x.data_ptr(), c.data_ptr<int64_t>(), G, N, D, x.stride(-2),
                       group_stride(x), num_codes, sums.data_ptr(), counts.data_ptr<int64_t>(),
                       c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
        "code_stats");
  return {sums, counts};
}

// Per code k, argmin_i (d(x_i, c_k) - g(seed, k, i)) (README "Method" §1; CVQ-VAE's "probrandom" anchors, Zheng &
// Vedaldi, ICCV 2023, §3.2): the search kernel with its sampling epilogue, the codes as its rows and the input rows
// as its columns, split over the input rows when the codes are too few to fill the GPU; the splits hold increasing
// rows, so the first minimum over them is the lowest (key, row). Batched ([G, N, D] / [G, K, D] -> [G, K]): one
// launch, group g's code k keyed as code g * K + k.
at::Tensor sample_code_cuda(const at::Tensor& x_in, const at::Tensor& cb_in, c10::string_view metric_name,
                            int64_t seed) {
  check_pair(x_in, cb_in);
  const int metric = metric_code(metric_name);
  TORCH_CHECK_VALUE(x_in.size(-2) >= 1, "x must hold at least one row to sample from; got N = 0");
  TORCH_CHECK_VALUE(x_in.size(-2) < (int64_t(1) << 31), "x may hold at most 2^31 - 1 rows to sample from");
  const c10::cuda::CUDAGuard guard(x_in.device());
  // bf16 / fp16 upcast once: their products are exact in fp32, so the fp32 kernel computes the same keys
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = rows_contiguous(x_in.to(acc)), cb = rows_contiguous(cb_in.to(acc));
  const bool batched = x.dim() == 3;
  const int64_t G = groups_of(x), N = x.size(-2), D = x.size(-1), K = cb.size(-2);
  const int dt = dtype_code(acc);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  if (G == 0) return at::empty(lead_shape(batched, G, {K}), x.options().dtype(at::kLong));

  // the input rows' key terms (they play the codes of the search) and the codes' own, whose factor (cosine:
  // 1 / max(|c|, eps) = -w) and term (l2: |c|^2 = o) complete the distance
  auto w = at::empty({G, N}, x.options());
  auto o = at::empty({G, N}, x.options());
  auto xnorm = at::empty({G, N}, x.options().dtype(at::kDouble));
  check(vqk_key_terms(dt, x.data_ptr(), G, N, D, x.stride(-2), group_stride(x), metric, w.data_ptr(), o.data_ptr(),
                      xnorm.data_ptr<double>(), N, stream),
        "key terms");
  auto cw = at::empty({G, K}, x.options());
  auto co = at::empty({G, K}, x.options());
  auto cnorm = at::empty({G, K}, x.options().dtype(at::kDouble));
  check(vqk_key_terms(dt, cb.data_ptr(), G, K, D, cb.stride(-2), group_stride(cb), metric, cw.data_ptr(),
                      co.data_ptr(), cnorm.data_ptr<double>(), K, stream),
        "key terms");
  const at::Tensor rs = metric == VQK_COSINE ? cw.neg() : at::ones({G, K}, x.options());
  const at::Tensor rt = metric == VQK_L2 ? co : at::zeros({G, K}, x.options());

  const auto [splits, per_split] = split_codes(K, N, x.device().index(), G);
  auto pv = at::empty({G, splits, K, 1}, x.options());
  auto pi = at::empty({G, splits, K, 1}, x.options().dtype(at::kInt));
  check(vqk_sample_search(dt, cb.data_ptr(), x.data_ptr(), w.data_ptr(), o.data_ptr(), rs.data_ptr(), rt.data_ptr(),
                          G, K, N, D, cb.stride(-2), x.stride(-2), group_stride(cb), group_stride(x),
                          static_cast<int>(splits), per_split, num::seed_code(seed), num::seed_row(seed),
                          metric == VQK_L2 ? 1 : 0, pv.data_ptr(), pi.data_ptr<int32_t>(), stream),
        "sample search");
  at::Tensor rows = pi.select(3, 0);  // [G, splits, K]
  if (splits > 1) rows = rows.gather(1, pv.select(3, 0).argmin(1, /*keepdim=*/true));
  rows = rows.squeeze(1).to(at::kLong);  // [G, K]
  if (!batched) rows = rows.squeeze(0);
  // every key infinite (overflow) leaves no index: row 0, the first of the all-equal keys
  return rows.masked_fill_(rows >= N, 0);
}

}  // namespace
}  // namespace vqkernels::cuda

TORCH_LIBRARY_IMPL(vqkernels, CUDA, m) {
  m.impl("nearest_code", &vqkernels::cuda::nearest_code_cuda);
  m.impl("quantize", &vqkernels::cuda::quantize_cuda);
  m.impl("code_stats", &vqkernels::cuda::code_stats_cuda);
  m.impl("sample_code", &vqkernels::cuda::sample_code_cuda);
}

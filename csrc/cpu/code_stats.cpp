// Per-code sums and counts of assigned rows: the backward of the gather, the Lloyd step and the EMA statistics.
//
// Collapse-proof layout: rows are counting-sorted by code, then the sorted order is split evenly between threads.
// A thread owns every code segment that starts and ends inside its range and writes it directly; the at most two
// segments cut by its range boundaries are accumulated privately and added afterwards. Work per thread is N/T
// rows whatever the distribution of codes, and no atomics are used.
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

namespace vqkernels::cpu {
namespace {

template <typename scalar_t>
void code_stats_kernel(const at::Tensor& x, const int64_t* codes, int64_t K, at::Tensor& sums,
                       int64_t* counts) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t N = x.size(0), D = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* sp = sums.data_ptr<acc_t>();

  std::fill(counts, counts + K, int64_t(0));
  for (int64_t i = 0; i < N; ++i) ++counts[codes[i]];
  std::vector<int64_t> start(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) start[k + 1] = start[k] + counts[k];
  std::vector<int64_t> order(N);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < N; ++i) order[fill[codes[i]]++] = i;
  }

  struct Partial {
    int64_t code;
    std::vector<acc_t> sum;
  };
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<Partial>> boundary(nthreads);

  at::parallel_for(0, N, 256, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> acc(D);
    auto& mine = boundary[at::get_thread_num()];
    int64_t p = p0;
    while (p < p1) {
      const int64_t k = codes[order[p]];
      const int64_t seg_end = std::min(start[k + 1], p1);
      const bool owned = start[k] >= p0 && start[k + 1] <= p1;
      acc_t* dst = owned ? sp + k * D : acc.data();
      std::fill(dst, dst + D, acc_t(0));
      for (; p < seg_end; ++p) {
        const scalar_t* xr = xp + order[p] * D;
        for (int64_t j = 0; j < D; ++j) dst[j] += static_cast<acc_t>(xr[j]);
      }
      if (!owned) mine.push_back({k, acc});
    }
  });
  for (const auto& parts : boundary)
    for (const auto& part : parts)
      for (int64_t j = 0; j < D; ++j) sp[part.code * D + j] += part.sum[j];
}

std::tuple<at::Tensor, at::Tensor> code_stats_cpu(const at::Tensor& x_in, const at::Tensor& codes_in,
                                                  int64_t num_codes) {
  check_float_matrix(x_in, "x");
  TORCH_CHECK_VALUE(codes_in.dim() == 1, "codes must be a 1-D tensor [N]; got ", codes_in.dim(), " dims");
  TORCH_CHECK_TYPE(codes_in.scalar_type() == at::kLong, "codes must be int64; got ", codes_in.scalar_type());
  TORCH_CHECK_VALUE(codes_in.size(0) == x_in.size(0), "codes must have one entry per row of x; got ",
                    codes_in.size(0), " codes for ", x_in.size(0), " rows");
  TORCH_CHECK_VALUE(num_codes >= 1, "num_codes must be >= 1; got ", num_codes);
  TORCH_CHECK_VALUE(codes_in.device().is_cpu(), "codes must be on the CPU; got ", codes_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor codes = codes_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  const int64_t* cp = codes.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(cp[i] >= 0 && cp[i] < num_codes, "codes must lie in [0, num_codes = ", num_codes,
                      "); codes[", i, "] = ", cp[i]);
  }
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sums = at::zeros({num_codes, D}, x.options().dtype(acc_dtype));
  auto counts = at::empty({num_codes}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vqkernels_code_stats_cpu", [&] {
    code_stats_kernel<scalar_t>(x, cp, num_codes, sums, counts.data_ptr<int64_t>());
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) { m.impl("code_stats", &code_stats_cpu); }

}  // namespace vqkernels::cpu

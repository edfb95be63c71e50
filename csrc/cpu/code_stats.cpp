// Per-code sums and counts of assigned rows: the backward of the gather, the Lloyd step and the EMA statistics.
//
// Collapse-proof layout: rows are counting-sorted by code, then the sorted order is split evenly between threads.
// A thread owns every code segment that starts and ends inside its range and writes it directly; the at most two
// segments cut by its range boundaries are accumulated privately and added afterwards. Work per thread is N/T
// rows whatever the distribution of codes, and no atomics are used.
//
// The batched form (x [G, N, D], codes [G, N], README "Method" §1.6) is one problem of G * K codes: code k of group
// g is code g * K + k, so the sorted order, and the threads' even split of it, span every group, and the sums come
// out as [G * K, D] = [G, K, D]. Rows are read through their strides (the head split x.view(N, G, D).transpose(0, 1)
// included): the sort keeps each row's element offset, not a copy of the row.
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "tile_gemm.h"

namespace vqkernels::cpu {
namespace {

// x: G groups of N rows; codes [G * N] (group g's in [0, K)); sums [G * K, D] (zeroed), counts [G * K].
template <typename scalar_t>
void code_stats_kernel(const GroupedRows<scalar_t>& x, const int64_t* codes, int64_t K, at::Tensor& sums,
                       int64_t* counts) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t G = x.G, N = x.rows, D = x.D, KT = G * K;
  acc_t* sp = sums.data_ptr<acc_t>();

  std::fill(counts, counts + KT, int64_t(0));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < N; ++i) ++counts[g * K + codes[g * N + i]];
  std::vector<int64_t> start(KT + 1, 0);
  for (int64_t k = 0; k < KT; ++k) start[k + 1] = start[k] + counts[k];
  // order[p]: the element offset (from x.data) of the p-th row in code order; rows of a code in increasing index
  std::vector<int64_t> order(G * N);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < N; ++i) order[fill[g * K + codes[g * N + i]]++] = g * x.gs + i * x.ld;
  }

  struct Partial {
    int64_t code;
    std::vector<acc_t> sum;
  };
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<Partial>> boundary(nthreads);

  at::parallel_for(0, G * N, 256, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> acc(D);
    auto& mine = boundary[at::get_thread_num()];
    int64_t p = p0;
    while (p < p1) {
      // the code whose segment holds p: the last start <= p (empty codes share their start with the next one)
      const int64_t k = std::upper_bound(start.begin(), start.end(), p) - start.begin() - 1;
      const int64_t seg_end = std::min(start[k + 1], p1);
      const bool owned = start[k] >= p0 && start[k + 1] <= p1;
      acc_t* dst = owned ? sp + k * D : acc.data();
      std::fill(dst, dst + D, acc_t(0));
      for (; p < seg_end; ++p) {
        const scalar_t* xr = x.data + order[p];
        for (int64_t j = 0; j < D; ++j) dst[j] += static_cast<acc_t>(xr[j]);
      }
      if (!owned) mine.push_back({k, acc});
    }
  });
  for (const auto& parts : boundary)
    for (const auto& part : parts)
      for (int64_t j = 0; j < D; ++j) sp[part.code * D + j] += part.sum[j];
}

// x [N, D], codes [N] -> sums [K, D], counts [K]; batched x [G, N, D], codes [G, N] -> sums [G, K, D], counts [G, K].
std::tuple<at::Tensor, at::Tensor> code_stats_cpu(const at::Tensor& x_in, const at::Tensor& codes_in,
                                                  int64_t num_codes) {
  check_float_operand(x_in, "x");
  const bool batched = x_in.dim() == 3;
  TORCH_CHECK_TYPE(codes_in.scalar_type() == at::kLong, "codes must be int64; got ", codes_in.scalar_type());
  TORCH_CHECK_VALUE(codes_in.dim() == x_in.dim() - 1 && codes_in.sizes() == x_in.sizes().slice(0, x_in.dim() - 1),
                    "codes must have shape ", batched ? "[G, N] = " : "[N] = ", x_in.sizes().slice(0, x_in.dim() - 1),
                    "; got ", codes_in.sizes());
  TORCH_CHECK_VALUE(num_codes >= 1, "num_codes must be >= 1; got ", num_codes);
  TORCH_CHECK_VALUE(codes_in.device().is_cpu(), "codes must be on the CPU; got ", codes_in.device());
  const at::Tensor x = rows_unit_stride(x_in);
  const at::Tensor codes = codes_in.contiguous();
  const int64_t G = groups_of(x), N = x.size(-2), D = x.size(-1);
  const int64_t* cp = codes.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < G * N; ++r) {
    if (cp[r] >= 0 && cp[r] < num_codes) continue;
    if (batched) {
      TORCH_CHECK_VALUE(false, "codes must lie in [0, num_codes = ", num_codes, "); codes[", r / N, ", ", r % N,
                        "] = ", cp[r]);
    }
    TORCH_CHECK_VALUE(false, "codes must lie in [0, num_codes = ", num_codes, "); codes[", r, "] = ", cp[r]);
  }
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto sums_shape = batched ? std::vector<int64_t>{G, num_codes, D} : std::vector<int64_t>{num_codes, D};
  const auto counts_shape = batched ? std::vector<int64_t>{G, num_codes} : std::vector<int64_t>{num_codes};
  auto sums = at::zeros(sums_shape, x.options().dtype(acc_dtype));
  auto counts = at::empty(counts_shape, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vqkernels_code_stats_cpu", [&] {
    const GroupedRows<scalar_t> xm{x.const_data_ptr<scalar_t>(), group_stride(x), x.stride(-2), G, N, D};
    code_stats_kernel<scalar_t>(xm, cp, num_codes, sums, counts.data_ptr<int64_t>());
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) { m.impl("code_stats", &code_stats_cpu); }

}  // namespace vqkernels::cpu

// One schema per op. Backends register implementations with TORCH_LIBRARY_IMPL in their own files
// (csrc/cpu/*.cpp, csrc/cuda/binding.cpp); fakes and autograd live in vqkernels/ops.py, registered from the
// backend table of vqkernels/dispatch.py.
#include <torch/library.h>

TORCH_LIBRARY(vqkernels, m) {
  // codes int64 [N], dist fp32 [N] (fp64 for fp64 inputs): argmin over the codebook, ties to the lowest index.
  m.def("nearest_code(Tensor x, Tensor codebook, str metric, bool exact) -> (Tensor codes, Tensor dist)");
  // nearest_code plus the gather z_q = codebook[codes] ([N, D], codebook dtype) and usage counts (int64 [K]).
  m.def(
      "quantize(Tensor x, Tensor codebook, str metric, bool exact) -> "
      "(Tensor codes, Tensor z_q, Tensor dist, Tensor counts)");
  // Per-code sum of the assigned rows (fp32 [K, D], fp64 for fp64 x) and per-code counts (int64 [K]).
  m.def("code_stats(Tensor x, Tensor codes, int num_codes) -> (Tensor sums, Tensor counts)");
  // Per code k, the row argmin_i (d(x_i, c_k) - g(seed, k, i)) with g the counter-based Gumbel noise of
  // numerics.h: a draw of P(i) ~ exp(-d(x_i, c_k)) (int64 [K]). seed: 64 bits, s_code low, s_row high.
  m.def("sample_code(Tensor x, Tensor codebook, str metric, int seed) -> Tensor");
}

// One schema per op. Backends register implementations with TORCH_LIBRARY_IMPL in their own files
// (csrc/cpu/*.cpp, csrc/cuda/binding.cpp); fakes and autograd live in vqkernels/ops.py.
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
}

// Run-time CPU feature checks of the hand-written kernels. Each kernel that needs an ISA extension is compiled for
// it with a target attribute (the rest of the build stays baseline x86-64) and is only called after these checks,
// so one binary runs on every x86-64 CPU. Variants for other ISAs add their own check here.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define VQK_X86 1
#endif

namespace vqkernels::cpu {

#ifdef VQK_X86
inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// vpmulld, vplzcntd and vpermt2ps of the sampling epilogue: AVX-512 F + CD (every AVX-512 CPU has CD).
inline bool cpu_has_avx512cd() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd");
  return has;
}

inline bool cpu_has_avx512bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif

}  // namespace vqkernels::cpu

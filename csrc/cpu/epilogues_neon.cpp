// The search epilogues on aarch64 Advanced SIMD (NEON, 4 lanes; every aarch64 CPU has it): epilogue_kernels.h
// with a NEON V. Compiled only on aarch64; on x86 machines `make neon-check` compiles it with the aarch64 cross
// compiler (no torch headers are involved).
#include <cstdint>

#include "../numerics.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#include "epilogue_kernels.h"

namespace vqkernels::cpu {
namespace {

struct Neon {
  using T = float;
  using F = float32x4_t;
  using I = int32x4_t;
  using M = uint32x4_t;
  static constexpr int L = 4;
  static F load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, F v) { vst1q_f32(p, v); }
  static I loadi(const int32_t* p) { return vld1q_s32(p); }
  static void storei(int32_t* p, I v) { vst1q_s32(p, v); }
  static F set1(float v) { return vdupq_n_f32(v); }
  static I set1i(int32_t v) { return vdupq_n_s32(v); }
  static I iota() {
    static const int32_t k[4] = {0, 1, 2, 3};
    return vld1q_s32(k);
  }
  static I addi(I a, I b) { return vaddq_s32(a, b); }
  static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }  // c + a b, one rounding
  static M lt(F a, F b) { return vcltq_f32(a, b); }
  static F sel(M m, F a, F b) { return vbslq_f32(m, a, b); }
  static I seli(M m, I a, I b) { return vbslq_s32(m, a, b); }
  static bool any(M m) { return vmaxvq_u32(m) != 0; }
};

}  // namespace

void argmin_codes_neon(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                       int32_t kb, float* best, int32_t* bidx) {
  epilogue::argmin_codes<Neon>(tile, nb, ld, m, w, o, kb, best, bidx);
}

void top4_codes_neon(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                     int32_t kb, float* topv, int32_t* topi, int64_t stride) {
  epilogue::top4_codes<Neon>(tile, nb, ld, m, w, o, kb, topv, topi, stride);
}

}  // namespace vqkernels::cpu
#endif  // __aarch64__

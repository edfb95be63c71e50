// CPU feature detection and the choice of tile kernel and epilogue (cpu_features.h).
#include "cpu_features.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef VQK_X86
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace vqkernels::cpu {
namespace {

#ifdef VQK_X86
// XCR0: the register state the OS saves on a context switch (XGETBV, valid when CPUID says OSXSAVE).
uint64_t xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// Linux keeps AMX tile data off until a process asks for it (XFD); asking is harmless and process-wide, and oneDNN
// asks too. Without the permission the first tile instruction would fault, so a CPU flag alone is not enough.
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long mask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &mask) != 0) return false;
  return (mask >> kXfeatureXtiledata) & 1u;
#else
  return false;
#endif
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef VQK_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1u, fma = (c >> 12) & 1u, f16c = (c >> 29) & 1u;
  if (!osxsave) return f;
  const uint64_t x = xcr0();
  const bool ymm_state = (x & 0x6) == 0x6;           // SSE + AVX state
  const bool zmm_state = (x & 0xE6) == 0xE6;         // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool tile_state = (x & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0, a71 = 0, b71 = 0, c71 = 0, d71 = 0;
  __get_cpuid_count(7, 0, &a7, &b7, &c7, &d7);
  if (a7 >= 1) __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71);
  const bool avx2 = (b7 >> 5) & 1u;
  f.avx2_fma = ymm_state && avx2 && fma && f16c;
  const bool avx512f = (b7 >> 16) & 1u, avx512cd = (b7 >> 28) & 1u, avx512bw = (b7 >> 30) & 1u,
             avx512vl = (b7 >> 31) & 1u;
  f.avx512 = zmm_state && f.avx2_fma && avx512f && avx512cd && avx512bw && avx512vl;
  f.avx512bf16 = f.avx512 && ((a71 >> 5) & 1u);
  const bool amx_tile = (d7 >> 24) & 1u, amx_bf16 = (d7 >> 22) & 1u, amx_fp16 = (a71 >> 21) & 1u;
  if (tile_state && amx_tile && (amx_bf16 || amx_fp16) && amx_permitted()) {
    f.amx_bf16 = amx_bf16;
    f.amx_fp16 = amx_fp16;
  }
#endif
#ifdef VQK_ARM64
  f.neon = true;
#endif
  return f;
}

bool is_auto(const char* v) { return v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0; }

void check_dtype(const std::string& dtype) {
  if (dtype != "fp32" && dtype != "bf16" && dtype != "fp16" && dtype != "fp64")
    throw std::invalid_argument("dtype must be one of fp32, bf16, fp16, fp64; got '" + dtype + "'");
}

}  // namespace

std::string CpuFeatures::names() const {
  std::string out;
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!out.empty()) out += ",";
    out += name;
  };
  add(avx2_fma, "avx2");
  add(avx512, "avx512");
  add(avx512bf16, "avx512bf16");
  add(amx_bf16, "amx_bf16");
  add(amx_fp16, "amx_fp16");
  add(neon, "neon");
  return out;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

TileKind choose_tile(const std::string& dtype, const CpuFeatures& f, const char* tile_env,
                     const char* bf16_brgemm_env, int64_t rows) {
  check_dtype(dtype);
  if (dtype == "fp64") return TileKind::Mm;  // no low-precision tile GEMM applies; VQK_CPU_TILE does not either
  if (is_auto(tile_env)) {
    if (dtype == "bf16" && bf16_brgemm_env != nullptr && std::strcmp(bf16_brgemm_env, "1") == 0)
      return TileKind::Brgemm;
    // a GEMM kernel vectorises over a block's rows: with fewer than 16 in all, most of its lanes would idle. (The
    // choice depends on N, not on the thread count, so that the answer does too: the kernels sum a dot product
    // in different orders.)
    if (rows < kGemvRows && (f.avx512 || f.avx2_fma))
      return dtype == "bf16" && f.avx512bf16 ? TileKind::GemvBf16 : TileKind::Gemv;
    // bf16 on AMX: oneDNN's brgemm runs on the tiles, several times faster than vdpbf16ps (and than the GEMM of
    // torch.matmul on the same CPU, measured on Sapphire Rapids)
    if (dtype == "bf16" && f.avx512bf16 && !f.amx_bf16) return TileKind::Avx512Bf16;
    // fp32 at twice fp32's FMA rate: vdpbf16ps on operands rounded to bf16, the candidates re-scored in fp64
    if (dtype == "fp32" && f.avx512bf16 && rows >= kRescoreRows)
      return f.amx_bf16 ? TileKind::BrgemmRescore : TileKind::Bf16Rescore;
    return TileKind::Brgemm;
  }
  const std::string t = tile_env;
  if (t == "brgemm" || t == "brgemm+amx") return TileKind::Brgemm;
  if (t == "gemv") return TileKind::Gemv;
  if (t == "avx512bf16+rescore" || t == "brgemm+rescore" || t == "brgemm+amx+rescore") {
    const bool on_brgemm = t != "avx512bf16+rescore";
    // an fp32 search: bf16 needs no rounding and takes the tile underneath, the other dtypes keep theirs
    if (dtype != "fp32") return choose_tile(dtype, f, on_brgemm ? "brgemm" : "avx512bf16", nullptr, rows);
    // the rounding to bf16 is vcvtneps2bf16's
    if (!f.avx512bf16) throw std::runtime_error("VQK_CPU_TILE=" + t + " but this CPU has no AVX512-BF16");
    return on_brgemm ? TileKind::BrgemmRescore : TileKind::Bf16Rescore;
  }
  if (t == "gemv-avx512bf16") {
    if (dtype != "bf16") return TileKind::Gemv;  // a bf16 kernel: other dtypes take the GEMV kernel they have
    if (!f.avx512bf16) throw std::runtime_error("VQK_CPU_TILE=gemv-avx512bf16 but this CPU has no AVX512-BF16");
    return TileKind::GemvBf16;
  }
  if (t == "avx512bf16") {
    if (dtype != "bf16") return TileKind::Brgemm;  // a bf16 kernel: other dtypes keep theirs
    if (!f.avx512bf16) throw std::runtime_error("VQK_CPU_TILE=avx512bf16 but this CPU has no AVX512-BF16");
    return TileKind::Avx512Bf16;
  }
  throw std::invalid_argument("VQK_CPU_TILE must be auto, brgemm, avx512bf16, avx512bf16+rescore, brgemm+rescore, gemv or gemv-avx512bf16; "
                              "got '" + t + "'");
}

EpilogueKind choose_epilogue(const std::string& dtype, const CpuFeatures& f, const char* epilogue_env) {
  check_dtype(dtype);
  if (dtype == "fp64") return EpilogueKind::Scalar;  // the vector epilogues are fp32 (fp64 is the exact path)
  if (is_auto(epilogue_env)) {
    if (f.avx512) return EpilogueKind::Avx512;
    if (f.avx2_fma) return EpilogueKind::Avx2;
    if (f.neon) return EpilogueKind::Neon;
    return EpilogueKind::Scalar;
  }
  const std::string e = epilogue_env;
  auto need = [&](bool have, EpilogueKind k) {
    if (!have) throw std::runtime_error("VQK_CPU_EPILOGUE=" + e + " but this CPU cannot run it (it has: " +
                                        (f.names().empty() ? std::string("none of the vector extensions") : f.names()) + ")");
    return k;
  };
  if (e == "scalar") return EpilogueKind::Scalar;
  if (e == "avx2") return need(f.avx2_fma, EpilogueKind::Avx2);
  if (e == "avx512") return need(f.avx512, EpilogueKind::Avx512);
  if (e == "neon") return need(f.neon, EpilogueKind::Neon);
  throw std::invalid_argument("VQK_CPU_EPILOGUE must be auto, avx512, avx2, neon or scalar; got '" + e + "'");
}

int64_t block_rows(int64_t N, int64_t G, bool thread_independent) {
  const char* v = std::getenv("VQK_CPU_BM");
  const int64_t bm = (v == nullptr || *v == '\0') ? 256 : std::max<int64_t>(1, std::atoll(v));
  if (thread_independent) {  // as few blocks as bm allows, of equal size (the threads split the codes if need be)
    const int64_t blocks = std::max<int64_t>(1, (N + bm - 1) / bm);
    return std::max<int64_t>(1, (N + blocks - 1) / blocks);
  }
  const int64_t nthreads = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>({bm, N, (G * N + nthreads - 1) / nthreads}));
}

TileKind tile_kind(const std::string& dtype, int64_t rows) {
  try {
    return choose_tile(dtype, cpu_features(), std::getenv("VQK_CPU_TILE"), std::getenv("VQK_CPU_BF16_BRGEMM"),
                       rows);
  } catch (const std::exception& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

EpilogueKind epilogue_kind(const std::string& dtype) {
  try {
    return choose_epilogue(dtype, cpu_features(), std::getenv("VQK_CPU_EPILOGUE"));
  } catch (const std::exception& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

CpuFeatures features_from_names(const std::string& names) {
  CpuFeatures f;
  size_t start = 0;
  while (start <= names.size()) {
    const size_t end = std::min(names.find(',', start), names.size());
    const std::string n = names.substr(start, end - start);
    if (n == "avx2") f.avx2_fma = true;
    else if (n == "avx512") f.avx512 = true;
    else if (n == "avx512bf16") f.avx512bf16 = true;
    else if (n == "amx_bf16") f.amx_bf16 = true;
    else if (n == "amx_fp16") f.amx_fp16 = true;
    else if (n == "neon") f.neon = true;
    else if (!n.empty()) throw std::invalid_argument("unknown CPU feature '" + n + "'");
    start = end + 1;
  }
  return f;
}

std::string tile_name(TileKind kind, const std::string& dtype, const CpuFeatures& f) {
  switch (kind) {
    case TileKind::Avx512Bf16: return "avx512bf16";
    case TileKind::Mm: return "mm";
    case TileKind::Gemv: return "gemv";
    case TileKind::GemvBf16: return "gemv-avx512bf16";
    case TileKind::Bf16Rescore: return "avx512bf16+rescore";
    case TileKind::BrgemmRescore: return f.amx_bf16 ? "brgemm+amx+rescore" : "brgemm+rescore";
    case TileKind::Brgemm:
      if ((dtype == "bf16" && f.amx_bf16) || (dtype == "fp16" && f.amx_fp16)) return "brgemm+amx";
      return "brgemm";
  }
  return "?";
}

const char* epilogue_name(EpilogueKind kind) {
  switch (kind) {
    case EpilogueKind::Scalar: return "scalar";
    case EpilogueKind::Avx2: return "avx2";
    case EpilogueKind::Avx512: return "avx512";
    case EpilogueKind::Neon: return "neon";
  }
  return "?";
}

std::string cpu_plan(const std::string& dtype, int64_t rows) {
  return tile_name(tile_kind(dtype, rows), dtype, cpu_features()) + "," +
         epilogue_name(epilogue_kind(dtype));
}

std::string cpu_variants(const std::string& dtype, int64_t rows) {
  const CpuFeatures& f = cpu_features();
  const TileKind tile0 = choose_tile(dtype, f, nullptr, nullptr, rows);
  std::vector<TileKind> tiles{tile0};
  if (dtype != "fp64") {
    // the GEMV kernel only where it could be the right one (few rows): on big blocks it is no contender
    const std::pair<TileKind, bool> all[] = {{TileKind::Avx512Bf16, dtype == "bf16" && f.avx512bf16},
                                             {TileKind::Bf16Rescore, dtype == "fp32" && f.avx512bf16 && rows >= kGemvRows},
                                             {TileKind::BrgemmRescore, dtype == "fp32" && f.avx512bf16 && rows >= kGemvRows},
                                             {TileKind::Brgemm, true},
                                             {TileKind::Gemv, rows < kGemvRows},
                                             {TileKind::GemvBf16, rows < kGemvRows && dtype == "bf16" && f.avx512bf16}};
    for (const auto& [t, ok] : all)
      if (ok && t != tile0) tiles.push_back(t);
  }
  const EpilogueKind epi0 = choose_epilogue(dtype, f, nullptr);
  std::vector<EpilogueKind> epis{epi0};
  if (dtype != "fp64") {
    const std::pair<EpilogueKind, bool> all[] = {{EpilogueKind::Avx512, f.avx512},
                                                 {EpilogueKind::Avx2, f.avx2_fma},
                                                 {EpilogueKind::Neon, f.neon},
                                                 {EpilogueKind::Scalar, true}};
    for (const auto& [e, ok] : all)
      if (ok && e != epi0) epis.push_back(e);
  }
  std::string out;
  for (TileKind t : tiles) {
    for (EpilogueKind e : epis) {
      if (!out.empty()) out += ";";
      out += tile_name(t, dtype, f) + "," + epilogue_name(e);
    }
  }
  return out;
}

}  // namespace vqkernels::cpu

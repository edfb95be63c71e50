// What the CPU offers the hand-written kernels, and which tile kernel and epilogue the CPU ops run for a dtype.
//
// Detection runs once: CPUID for the instruction sets, XGETBV for the state the OS saves (AVX-512 and AMX need the
// OS to save their registers), and on Linux arch_prctl(ARCH_REQ_XCOMP_PERM) for AMX tile data, which a process must
// ask the kernel for before its first tile instruction. Each kernel that needs an extension is compiled for it with
// a target attribute (the rest of the build stays baseline x86-64, or baseline aarch64 with NEON) and is only
// called when detection says it may run, so one binary runs on every CPU of its architecture.
//
// The choice, per call (README "Backends"):
//   tile kernel  searches of fewer than 16 input rows (few rows against many codes), fp32 / bf16 / fp16: our GEMV
//                kernel, vectorised over D (gemv_kernel.h), on CPUs with AVX2 or AVX-512; for bf16 on a CPU with
//                AVX512-BF16 its vdpbf16ps form ("gemv-avx512bf16"). Otherwise bf16: ATen's
//                brgemm when the CPU has usable AMX-BF16 (oneDNN runs it on AMX tiles), else our AVX512-BF16
//                micro-kernel when the CPU has AVX512-BF16, else ATen's brgemm; fp16: ATen's brgemm (on AMX-FP16
//                tiles where the CPU has them); fp32: on CPUs with AVX512-BF16 and at least 256 rows the bf16 prefilter
//                (operands rounded to bf16, a top-4 per row, the candidates within the rounding bound re-scored in
//                fp64) on ATen's brgemm where the CPU has usable AMX-BF16 ("brgemm+amx+rescore"), else on the
//                AVX512-BF16 micro-kernel ("avx512bf16+rescore"); else ATen's brgemm; fp64: at::mm.
//   epilogue     fp32: AVX-512, else AVX2 + FMA, else NEON (aarch64), else scalar; fp64: scalar.
// VQK_CPU_TILE=auto|brgemm|avx512bf16|avx512bf16+rescore|brgemm+rescore|gemv|gemv-avx512bf16 and VQK_CPU_EPILOGUE=auto|avx512|avx2|neon|scalar force a choice (a forced
// kernel the CPU cannot run is an error that says so); VQK_CPU_BF16_BRGEMM=1 is the older name of
// VQK_CPU_TILE=brgemm for bf16.
#pragma once

#include <cstdint>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define VQK_X86 1
#endif
#if defined(__aarch64__)
#define VQK_ARM64 1
#endif

namespace vqkernels::cpu {

struct CpuFeatures {
  bool avx2_fma = false;    // AVX2, FMA and F16C, with the OS saving ymm state
  bool avx512 = false;      // AVX-512 F + CD + BW + VL, with the OS saving zmm state
  bool avx512bf16 = false;  // AVX512-BF16 (vdpbf16ps)
  bool amx_bf16 = false;    // AMX-TILE + AMX-BF16, tile state enabled by the OS and granted to this process
  bool amx_fp16 = false;    // AMX-FP16, likewise
  bool neon = false;        // aarch64 Advanced SIMD (always there on aarch64)

  std::string names() const;  // comma list of the features present ("avx2,avx512,avx512bf16,...")
};

// The features of this CPU (detected once).
const CpuFeatures& cpu_features();

enum class TileKind { Brgemm, Avx512Bf16, Gemv, GemvBf16, Bf16Rescore, BrgemmRescore, Mm };
// fp32 searches of at least this many input rows (per group) take the bf16 prefilter with fp64 re-scoring on CPUs
// with AVX512-BF16 (search.cpp): below it the rounding of the codes per tile is not paid back.
constexpr int64_t kRescoreRows = 256;
// Searches of fewer input rows than this take the GEMV tile kernel.
constexpr int64_t kGemvRows = 16;
enum class EpilogueKind { Scalar, Avx2, Avx512, Neon };

// dtype: "fp32", "bf16", "fp16" or "fp64" (the accumulation and input types of the CPU ops); rows: the input rows
// N of the search.
// The choice for this dtype under `features`, with the overrides `tile_env` / `epilogue_env` (null or "auto": the
// automatic choice). Throws std::invalid_argument for an unknown name and std::runtime_error for a kernel that
// `features` cannot run.
TileKind choose_tile(const std::string& dtype, const CpuFeatures& features, const char* tile_env,
                     const char* bf16_brgemm_env, int64_t rows);
EpilogueKind choose_epilogue(const std::string& dtype, const CpuFeatures& features, const char* epilogue_env);

// The same with this CPU's features and the environment (what a call runs now); a bad or impossible override
// raises a ValueError naming the variable.
TileKind tile_kind(const std::string& dtype, int64_t rows);
EpilogueKind epilogue_kind(const std::string& dtype);

// Input rows per task block of a search of G groups of N rows each (a block holds rows of one group only):
// VQK_CPU_BM (default 256), fewer when the G * N rows are few so that every thread gets rows, and at most N; with
// thread_independent, the fewest blocks of at most VQK_CPU_BM rows, of equal size, whatever the thread count.
int64_t block_rows(int64_t N, int64_t G = 1, bool thread_independent = false);

// Features from a comma list of names() (to test the choice for CPUs this one is not).
CpuFeatures features_from_names(const std::string& names);

// Names: "brgemm" (or "brgemm+amx" where oneDNN runs it on AMX tiles), "avx512bf16", "avx512bf16+rescore",
// "brgemm+rescore" (or "brgemm+amx+rescore"), "gemv", "gemv-avx512bf16", "mm"; "avx512",
// "avx2", "neon", "scalar".
std::string tile_name(TileKind kind, const std::string& dtype, const CpuFeatures& features);
const char* epilogue_name(EpilogueKind kind);

// "tile,epilogue" of what a search of `rows` input rows runs now, and ";"-separated pairs of every combination this
// CPU can run for it (the automatic one first): vqkernels._ext.cpu_plan / cpu_variants parse them.
std::string cpu_plan(const std::string& dtype, int64_t rows);
std::string cpu_variants(const std::string& dtype, int64_t rows);

}  // namespace vqkernels::cpu

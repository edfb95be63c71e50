"""Launchers of the Triton kernels, registered with ``torch.library.triton_op`` so ``torch.compile`` sees them.

Ops (the schemas of every backend; fakes and autograd are registered by :mod:`vqkernels.ops` from the backend
table): ``vqkernels::nearest_code_triton``, ``quantize_triton``, ``code_stats_triton``, ``sample_code_triton``.
Numerics (key terms, the exact-mode bound, the candidate count, the Gumbel noise) follow
:mod:`vqkernels.numerics`; the non-finite check is :mod:`vqkernels.ops`'s (eager mode only).

Tiles come from :data:`SEARCH_CONFIGS`, a table with the reason for each entry (the first entry of a dtype's list
is used; the others are the candidates to time on a GPU). Environment knobs for tests and tuning:
``VQK_TRITON_SPLIT`` (number of code splits; default: enough programs to fill the GPU twice) and
``VQK_TRITON_EXACT_CANDIDATES`` (candidates per row that exact mode re-scores in fp64, 1 to
``numerics.EXACT_CANDIDATES``; fewer force the re-scan path in tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from .. import numerics
from ..numerics import COS_EPS, EXACT_CANDIDATES, acc_dtype, metric_code
from . import interpreting, kernels


# ---------------------------------------------------------------------------------------------------------------
# Tile configurations, as data.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    bm: int  # rows per program
    bn: int  # codes per block of the streamed codebook
    bd: int  # features per tl.dot step (>= 16 for tensor cores; masked when D is not a multiple)
    warps: int
    stages: int
    why: str


SEARCH_CONFIGS: dict[str, tuple[TileConfig, ...]] = {
    # bf16 / fp16: tensor-core MMA
    "half": (
        TileConfig(128, 128, 64, 8, 3, "128x128 MMA tile, 3 stages to hide HBM latency: large N and K"),
        TileConfig(128, 64, 64, 4, 4, "narrower code block: fewer epilogue registers, small D"),
        TileConfig(64, 128, 64, 4, 3, "fewer rows per program: few rows, many splits"),
        TileConfig(128, 128, 128, 8, 2, "wide D (>= 512): fewer k-steps per block"),
    ),
    # fp32: ieee FMA path by default (tf32 only when torch allows it for matmuls)
    "fp32": (
        TileConfig(64, 64, 32, 4, 2, "FMA-bound: moderate tile keeps the accumulator in registers"),
        TileConfig(128, 64, 32, 8, 2, "more rows per program when N is large"),
    ),
    "fp64": (TileConfig(32, 32, 16, 4, 1, "fp64 FMA: small tile, the accumulator is twice as wide"),),
}
# Exact mode keeps a top-4 list per row, whose epilogue (4 extraction passes over the block) needs more registers.
EXACT_CONFIGS: dict[str, TileConfig] = {
    "half": TileConfig(128, 64, 64, 8, 3, "top-4 epilogue: half the code block of the fast tile"),
    "fp32": TileConfig(64, 64, 32, 8, 2, "top-4 epilogue: twice the warps of the fast tile"),
    "fp64": TileConfig(32, 32, 16, 4, 1, "as the fast tile"),
}
# The interpreter runs each program in numpy: bigger blocks mean fewer Python-level iterations.
INTERPRETER_CONFIG = TileConfig(512, 1024, 128, 1, 1, "interpreter: big numpy blocks, few Python iterations")


@dataclass(frozen=True)
class FinalizeTile:
    bm: int  # rows per program (its BM x BM equality matrix dedupes the histogram atomics)
    bd: int  # features per step of |x|^2 and the gather
    bdx: int  # features per step of the fp64 candidate re-score ([BM, BDX] fp64 tiles)
    bnr: int  # codes per step of the fp64 full re-scan of one row
    bdr: int  # features per step of that re-scan ([BNR, BDR] fp64 tiles)
    warps: int  # aligned operands (vectorised loads)
    warps_any: int  # unaligned operands: scalar loads hold a pointer per element, so twice the threads


# Finalize tiles per dtype class: a row chunk of BD features is 128 bytes (one cache line per row), and the fp64
# re-score / re-scan tiles hold 8 fp64 per thread at 4 warps (8 warps for unaligned rows, whose scalar loads need a
# pointer per element).
FINALIZE_TILES = {
    "half": FinalizeTile(64, 64, 16, 64, 16, 4, 8),
    "fp32": FinalizeTile(64, 32, 16, 64, 16, 4, 8),
    "fp64": FinalizeTile(64, 16, 16, 64, 16, 4, 8),
}
SUM_SQUARES_TILE = (64, 32)  # codes x features per step
STATS_TILES = {"half": (64, 32, 8), "fp32": (64, 32, 8), "fp64": (32, 16, 4)}  # rows (the dedupe), features, warps


def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(v))


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "half"
    return "fp64" if dtype == torch.float64 else "fp32"


def _config(dtype: torch.dtype, d: int, top: int = 1) -> TileConfig:
    """The search tile for this dtype and D: ``bd`` is 16 for D <= 16 (the smallest MMA k-step) and the table's
    otherwise (two feature tiers keep the variant count small); ``d <= bd`` means the row tile is loaded once
    (``ONE_D``)."""
    if interpreting():
        c = INTERPRETER_CONFIG
        return TileConfig(c.bm, c.bn, min(_pow2(d), 128), c.warps, c.stages, c.why)
    cls = _dtype_class(dtype)
    cfg = SEARCH_CONFIGS[cls][0] if top == 1 else EXACT_CONFIGS[cls]
    return TileConfig(cfg.bm, cfg.bn, 16 if d <= 16 else cfg.bd, cfg.warps, cfg.stages, cfg.why)


def _finalize_tile(dtype: torch.dtype, d: int) -> FinalizeTile:
    if interpreting():
        b = min(_pow2(d), 128)
        return FinalizeTile(256, b, b, 1024, b, 1, 1)
    return FINALIZE_TILES[_dtype_class(dtype)]


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    v = os.environ.get(name, "")
    return default if not v else max(lo, min(hi, int(v)))


MAX_SPLITS = 65535  # grid.y limit


def _num_splits(n: int, k: int, cfg: TileConfig, device: torch.device) -> int:
    """Code splits: 1 when the row tiles alone fill the GPU twice; else enough to, keeping >= 4 blocks a split."""
    max_splits = min(MAX_SPLITS, triton.cdiv(k, cfg.bn))
    if "VQK_TRITON_SPLIT" in os.environ:
        return _env_int("VQK_TRITON_SPLIT", 1, 1, max_splits)
    if interpreting():
        return 1
    target = 2 * _sm_count(device)
    row_programs = triton.cdiv(n, cfg.bm)
    if row_programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, row_programs), triton.cdiv(k, 4 * cfg.bn), max_splits))


def _precision(dtype: torch.dtype, exact: bool) -> str:
    if dtype == torch.float32 and not exact and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"  # the same-precision torch matmul would use tf32 too
    return "ieee"


def _eager(*tensors: Tensor) -> bool:
    """True outside tracing: value checks that sync with the device run only then."""
    return not torch.compiler.is_compiling() and not any(is_fake(t) for t in tensors)


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers.
# ---------------------------------------------------------------------------------------------------------------
_I32_LIMIT = 2**31 - 1


def _check_extent(n: int, k: int) -> None:
    # row and code indices are int32 inside the kernels (program ids, the partial lists' indices)
    if n >= _I32_LIMIT - (1 << 20) or k >= _I32_LIMIT - (1 << 20):
        raise ValueError(f"the triton backend takes fewer than 2^31 - 2^20 rows and codes; got N = {n}, K = {k}")


def _aligned(ints: tuple[int, ...], tensors: tuple[Tensor, ...]) -> bool:
    """Whether a launch can take the ``aligned`` twin of a kernel (:func:`vqkernels.triton.kernels._twins`): every
    int a multiple of 16 and every data pointer 16-byte aligned."""
    return all(v % 16 == 0 for v in ints) and all(t.data_ptr() % 16 == 0 for t in tensors)


def _features_contiguous(t: Tensor) -> Tensor:
    """The kernels index features with unit stride (coalesced, vectorisable); rows may be strided."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device a launch targets (the stand-in driver's under the compile check)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if interpreting():
        return 1
    from triton.runtime import driver  # a GPU target without a CUDA tensor: the compile check's stand-in driver

    active = driver.active
    return int(active.utils.get_device_properties(active.get_current_device())["multiprocessor_count"])


def sum_squares(cols: Tensor) -> Tensor:
    """``[K]`` fp64 ``sum_d c_kd^2`` by one kernel (:func:`vqkernels.numerics.sum_squares`)."""
    k, d = cols.shape
    sq = torch.empty(k, dtype=torch.float64, device=cols.device)
    if k == 0:
        return sq
    bk, bd = (1024, 128) if interpreting() else SUM_SQUARES_TILE
    wrap_triton(kernels.sum_squares_kernel)[(triton.cdiv(k, bk),)](
        cols, sq, k, d, cols.stride(0), BK=bk, BD=bd, num_warps=4, num_stages=1
    )
    return sq


def key_terms(cols: Tensor, metric: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(w [K], o [K], cnorm64 [K])``: :func:`vqkernels.numerics.key_terms` on the kernel's sums of squares."""
    return numerics.key_terms(cols, metric, sq=sum_squares(cols))


def _search_partials(
    rows: Tensor, cols: Tensor, metric: str, t: int, exact: bool, sample: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor, int, Tensor]:
    """Run the search kernel: ``(pv [S, N, TP], pi [S, N, TP], S, cnorm64 [K])``. Features must be contiguous."""
    n, d = rows.shape
    k = cols.shape[0]
    _check_extent(n, k)
    acc = acc_dtype(rows.dtype)
    cfg = _config(rows.dtype, d, t)
    s = _num_splits(n, k, cfg, rows.device)
    per_split = triton.cdiv(triton.cdiv(k, s), cfg.bn) * cfg.bn
    s = triton.cdiv(k, per_split)
    tp = t
    w, o, cnorm = key_terms(cols, metric)
    if sample is not None:
        rw, ro, _ = key_terms(rows, metric)
        # the row-side factor and term of the distance: 1 / max(|c|, eps) for cosine (= -w of the rows), |c|^2
        # for l2 (= o of the rows)
        rs = -rw if metric == "cosine" else torch.ones(n, dtype=acc, device=rows.device)
        rt = ro if metric == "l2" else torch.zeros(n, dtype=acc, device=rows.device)
        seed_row, seed_col = (_i32(v) for v in sample)  # (s_code, s_row): the search rows are the codes
    else:
        rs, rt, seed_row, seed_col = w, o, 0, 0
    pv = torch.empty((s, n, tp), dtype=acc, device=rows.device)
    pi = torch.empty((s, n, tp), dtype=torch.int32, device=rows.device)
    grid = (triton.cdiv(n, cfg.bm), s)
    aligned = _aligned((d, rows.stride(0), cols.stride(0)), (rows, cols))
    wrap_triton(kernels.search_kernel if aligned else kernels.search_kernel_any)[grid](
        rows,
        cols,
        w,
        o,
        rs,
        rt,
        pv,
        pi,
        n,
        k,
        d,
        rows.stride(0),
        cols.stride(0),
        per_split,
        seed_row,
        seed_col,
        int(sample is not None and metric == "l2"),
        TP=tp,
        SAMPLE=sample is not None,
        UPCAST=interpreting() and rows.dtype != torch.float64,  # fp64 dots under the interpreter (kernels.py)
        PRECISION=_precision(rows.dtype, exact or sample is not None),
        ACC_FP64=acc == torch.float64,
        ONE_D=d <= cfg.bd,
        BM=cfg.bm,
        BN=cfg.bn,
        BD=cfg.bd,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return pv, pi, s, cnorm


EXACT_LIST = 4  # the kernels' top lists hold 4 (key, code) pairs per row (kernels._insert4)
assert EXACT_CANDIDATES == EXACT_LIST, "the Triton kernels keep exactly numerics.EXACT_CANDIDATES candidates"


def exact_candidates() -> int:
    """Candidates per row that exact mode re-scores in fp64 (``numerics.EXACT_CANDIDATES``; fewer with
    ``VQK_TRITON_EXACT_CANDIDATES`` to force the re-scan path; rows with more codes inside the rounding bound are
    re-scanned). The search always keeps the best 4, whose first T are the best T: one compiled variant serves
    every T."""
    return _env_int("VQK_TRITON_EXACT_CANDIDATES", EXACT_LIST, 1, EXACT_LIST)


def _finalize(
    x: Tensor, codebook: Tensor, metric: str, exact: bool, gather: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Search + finalize: ``(codes, z_q or None, dist, counts or None)``."""
    n, d = x.shape
    k = codebook.shape[0]
    acc = acc_dtype(x.dtype)
    codes = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=acc, device=x.device)
    zq = torch.empty((n, d), dtype=codebook.dtype, device=x.device) if gather else None
    counts = torch.zeros(k, dtype=torch.int64, device=x.device) if gather else None
    if n == 0:
        return codes, zq, dist, counts
    x, codebook = _features_contiguous(x), _features_contiguous(codebook)
    top = EXACT_LIST if exact else 1
    pv, pi, s, cnorm = _search_partials(x, codebook, metric, top, exact)
    f = _finalize_tile(x.dtype, d)
    aligned = _aligned((d, x.stride(0), codebook.stride(0)), (x, codebook))
    warps = f.warps if aligned else f.warps_any
    grid = (triton.cdiv(n, f.bm),)
    if not exact:
        kernel = kernels.finalize_kernel if aligned else kernels.finalize_kernel_any
        wrap_triton(kernel)[grid](
            # without gather, stand-ins of the same types (never touched) keep one compiled variant for both ops
            x,
            codebook,
            pv,
            pi,
            codes,
            dist,
            zq if gather else codebook,
            counts if gather else codes,
            n,
            d,
            s,
            x.stride(0),
            codebook.stride(0),
            metric_code(metric),
            int(gather),
            ACC_FP64=acc == torch.float64,
            BM=f.bm,
            BD=f.bd,
            num_warps=warps,
            num_stages=1,
        )
        return codes, zq, dist, counts
    cmax = cnorm.max().reshape(1)
    # fp64 reciprocal norms of the cosine re-score (IEEE divisions, by torch)
    if metric == "cosine":
        rcn = 1.0 / cnorm.clamp_min(COS_EPS)
        rxn = 1.0 / torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).clamp_min(COS_EPS)
    else:  # unread stand-ins of the same types (one compiled variant for every metric)
        rcn, rxn = cnorm, torch.empty(1, dtype=torch.float64, device=x.device)
    gamma = numerics.exact_gamma(d, x.dtype)
    flag = torch.empty(n, dtype=torch.int8, device=x.device)
    kernel = kernels.exact_kernel if aligned else kernels.exact_kernel_any
    wrap_triton(kernel)[grid](
        x,
        codebook,
        pv,
        pi,
        rxn,
        rcn,
        cmax,
        codes,
        dist,
        flag,
        n,
        k,
        d,
        s,
        x.stride(0),
        codebook.stride(0),
        gamma,
        metric_code(metric),
        exact_candidates(),
        TP=top,
        ACC_FP64=acc == torch.float64,
        BM=f.bm,
        BD=f.bd,
        BDX=f.bdx,
        num_warps=warps,
        num_stages=1,
    )
    wrap_triton(kernels.rescan_kernel)[grid](
        x,
        codebook,
        rxn,
        rcn,
        codes,
        dist,
        flag,
        n,
        k,
        d,
        x.stride(0),
        codebook.stride(0),
        metric_code(metric),
        BM=f.bm,
        BNR=f.bnr,
        BDR=f.bdr,
        num_warps=4,
        num_stages=1,
    )
    if gather:
        wrap_triton(kernels.gather_kernel)[grid](
            codebook, codes, zq, counts, n, d, codebook.stride(0), BM=f.bm, BD=f.bd, num_warps=8, num_stages=1
        )
    return codes, zq, dist, counts


_i32 = numerics._i32  # a 32-bit pattern as the int32 value a kernel argument carries


# ---------------------------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------------------------
@triton_op("vqkernels::nearest_code_triton", mutates_args=())
def nearest_code_triton(x: Tensor, codebook: Tensor, metric: str, exact: bool) -> tuple[Tensor, Tensor]:
    codes, _, dist, _ = _finalize(x, codebook, metric, exact, gather=False)
    return codes, dist


@triton_op("vqkernels::quantize_triton", mutates_args=())
def quantize_triton(x: Tensor, codebook: Tensor, metric: str, exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    codes, zq, dist, counts = _finalize(x, codebook, metric, exact, gather=True)
    return codes, zq, dist, counts


@triton_op("vqkernels::code_stats_triton", mutates_args=())
def code_stats_triton(x: Tensor, codes: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    if _eager(x, codes) and n and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(
            f"codes must lie in [0, num_codes = {num_codes}); got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    sums = torch.zeros((num_codes, d), dtype=acc, device=x.device)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=x.device)
    if n == 0:
        return sums, counts
    x = _features_contiguous(x)
    br, bd, warps = STATS_TILES[_dtype_class(x.dtype)]
    if interpreting():
        br, bd, warps = 256, min(_pow2(d), 128), 1
    aligned = _aligned((d, x.stride(0)), (x,))
    kernel = kernels.code_stats_kernel if aligned else kernels.code_stats_kernel_any
    wrap_triton(kernel)[(triton.cdiv(n, br), triton.cdiv(d, bd))](
        x,
        codes,
        sums,
        counts,
        n,
        d,
        x.stride(0),
        ACC_FP64=acc == torch.float64,
        BR=br,
        BD=bd,
        num_warps=warps,
        num_stages=1,
    )
    return sums, counts


@triton_op("vqkernels::sample_code_triton", mutates_args=())
def sample_code_triton(x: Tensor, codebook: Tensor, metric: str, seed: int) -> Tensor:
    """Per code k: ``argmin_i (d(x_i, c_k) - g(seed, k, i))``, a draw of ``P(i) ~ exp(-d(x_i, c_k))``: the search
    with the roles swapped (the codes are the rows), the Gumbel noise subtracted in its epilogue."""
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one row to sample from; got N = 0")
    # bf16 / fp16 upcast once (their products are exact in fp32, so nothing changes): one compiled variant per
    # accumulation dtype instead of one per input dtype
    acc = acc_dtype(x.dtype)
    rows, cols = _features_contiguous(codebook.to(acc)), _features_contiguous(x.to(acc))
    k = rows.shape[0]
    pv, pi, s, _ = _search_partials(rows, cols, metric, 1, False, sample=numerics.seed_from_schema(seed))
    if s == 1:
        return pi[0, :, 0].to(torch.int64)
    # splits hold increasing input rows: the first minimum over splits is the lowest-index one
    best = pv[:, :, 0].argmin(0)
    return pi[:, :, 0].gather(0, best[None, :]).squeeze(0).to(torch.int64).reshape(k)

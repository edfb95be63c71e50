"""Launchers of the Triton kernels, registered with ``torch.library.triton_op`` so ``torch.compile`` sees them.

Ops (same schemas as every other backend; fakes and autograd are registered by :mod:`vqkernels.ops`):
``vqkernels::nearest_code_triton``, ``quantize_triton``, ``code_stats_triton``, and
``gumbel_argmin_triton(x, codebook, metric, seed_code, seed_row) -> [K]`` (CVQ's probrandom sampling).

Tiles come from :data:`SEARCH_CONFIGS`, a table with the reason for each entry (the first entry of a dtype's list
is used; the others are the candidates to time on a GPU). Environment knobs for tests and tuning:
``VQK_TRITON_SPLIT`` (number of code splits; default: enough programs to fill the GPU twice) and
``VQK_TRITON_EXACT_CANDIDATES`` (candidates kept per row by exact mode, 1-4, default 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from .. import reference
from . import interpreting, kernels

_METRIC = {"l2": 0, "cosine": 1, "dot": 2}
COS_EPS = reference.COS_EPS


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
# The interpreter runs each program in numpy: bigger blocks mean fewer Python-level iterations.
INTERPRETER_CONFIG = TileConfig(128, 256, 128, 1, 1, "interpreter: big numpy blocks, few Python iterations")
FINALIZE_BM = 64  # rows per finalize program (its BM x BM equality matrix dedupes the histogram atomics)
STATS_BR = 64  # rows per code_stats program (the same dedupe)
RESCAN_BN, RESCAN_BD = 16, 8  # fp64 full re-scan tile of exact mode: BM x 16 x 8 products at a time


def _rescan_tile() -> tuple[int, int]:
    return (64, 64) if interpreting() else (RESCAN_BN, RESCAN_BD)


def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(v))


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "half"
    return "fp64" if dtype == torch.float64 else "fp32"


def _config(dtype: torch.dtype, d: int) -> TileConfig:
    if interpreting():
        c = INTERPRETER_CONFIG
        return TileConfig(c.bm, c.bn, min(_pow2(d), 128), c.warps, c.stages, c.why)
    cfg = SEARCH_CONFIGS[_dtype_class(dtype)][0]
    return TileConfig(cfg.bm, cfg.bn, min(cfg.bd, _pow2(d)), cfg.warps, cfg.stages, cfg.why)


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    v = os.environ.get(name, "")
    return default if not v else max(lo, min(hi, int(v)))


def _num_splits(n: int, k: int, cfg: TileConfig, device: torch.device) -> int:
    """Code splits: 1 when the row tiles alone fill the GPU twice; else enough to, keeping >= 4 blocks a split."""
    max_splits = triton.cdiv(k, cfg.bn)
    if "VQK_TRITON_SPLIT" in os.environ:
        return _env_int("VQK_TRITON_SPLIT", 1, 1, max_splits)
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    row_programs = triton.cdiv(n, cfg.bm)
    if row_programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, row_programs), triton.cdiv(k, 4 * cfg.bn)))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(dtype: torch.dtype, exact: bool) -> str:
    if dtype == torch.float32 and not exact and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"  # the same-precision torch matmul would use tf32 too
    return "ieee"


def _key_terms(cols: Tensor, metric: str, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-column ``(w, o)`` of the argmin key ``w (x . c) + o`` (METHODS §1), in ``acc``."""
    k = cols.shape[0]
    cols = cols.contiguous()  # the norms' rounding must not depend on the layout
    if metric == "l2":
        sq = torch.linalg.vector_norm(cols, dim=1, dtype=acc).square()
        return torch.full((k,), -2.0, dtype=acc, device=cols.device), sq
    zero = torch.zeros(k, dtype=acc, device=cols.device)
    if metric == "cosine":
        return -1.0 / torch.linalg.vector_norm(cols, dim=1, dtype=acc).clamp_min(COS_EPS), zero
    return torch.full((k,), -1.0, dtype=acc, device=cols.device), zero


def _eager(*tensors: Tensor) -> bool:
    """True outside tracing: value checks that sync with the device run only then."""
    return not torch.compiler.is_compiling() and not any(is_fake(t) for t in tensors)


def _check_finite(checks: list[tuple[Tensor, str]]) -> None:
    """METHODS §1 forbids NaN/Inf in the inputs; the check syncs, so it runs in eager mode only."""
    if _eager(*(t for t, _ in checks)):
        for t, name in checks:
            reference.check_finite(t, name)


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers.
# ---------------------------------------------------------------------------------------------------------------
def _search_partials(rows: Tensor, cols: Tensor, metric: str, t: int, exact: bool,
                     sample: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, int]:
    """Run the search kernel: ``(pv [S, N, TP], pi [S, N, TP], S)``."""
    n, d = rows.shape
    k = cols.shape[0]
    acc = _acc(rows.dtype)
    cfg = _config(rows.dtype, d)
    s = _num_splits(n, k, cfg, rows.device)
    per_split = triton.cdiv(triton.cdiv(k, s), cfg.bn) * cfg.bn
    s = triton.cdiv(k, per_split)
    tp = triton.next_power_of_2(t)
    w, o = _key_terms(cols, metric, acc)
    if sample is not None:
        rows = rows.contiguous()
        if metric == "cosine":
            rs = 1.0 / torch.linalg.vector_norm(rows, dim=1, dtype=acc).clamp_min(COS_EPS)
        else:
            rs = torch.ones(n, dtype=acc, device=rows.device)
        if metric == "l2":
            rt = torch.linalg.vector_norm(rows, dim=1, dtype=acc).square()
        else:
            rt = torch.zeros(n, dtype=acc, device=rows.device)
        seed_row, seed_col = (_i32(v) for v in sample)
    else:
        rs, rt, seed_row, seed_col = w, o, 0, 0
    pv = torch.empty((s, n, tp), dtype=acc, device=rows.device)
    pi = torch.empty((s, n, tp), dtype=torch.int32, device=rows.device)
    grid = (triton.cdiv(n, cfg.bm), s)
    wrap_triton(kernels.search_kernel)[grid](
        rows, cols, w, o, rs, rt, pv, pi,
        n, k, rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1), per_split, seed_row, seed_col,
        D=d, METRIC=_METRIC[metric], T=t, TP=tp, SAMPLE=sample is not None,
        UPCAST=interpreting() and rows.dtype == torch.bfloat16,  # the interpreter's bf16 tl.dot is broken
        PRECISION=_precision(rows.dtype, exact), ACC_FP64=acc == torch.float64,
        BM=cfg.bm, BN=cfg.bn, BD=cfg.bd, num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return pv, pi, s


def _finalize(x: Tensor, codebook: Tensor, metric: str, exact: bool, gather: bool):
    """Search + finalize: ``(codes, z_q or None, dist, counts or None)``."""
    n, d = x.shape
    k = codebook.shape[0]
    acc = _acc(x.dtype)
    t = _env_int("VQK_TRITON_EXACT_CANDIDATES", 2, 1, 4) if exact else 1
    codes = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=acc, device=x.device)
    zq = torch.empty((n, d), dtype=codebook.dtype, device=x.device) if gather else None
    counts = torch.zeros(k, dtype=torch.int64, device=x.device) if gather else None
    if n == 0:
        return codes, zq, dist, counts
    pv, pi, s = _search_partials(x, codebook, metric, t, exact)
    cmax = (torch.linalg.vector_norm(codebook, dim=1, dtype=torch.float64).max() if exact
            else torch.zeros((), dtype=torch.float64, device=x.device))
    # rounding bound of the fast key (2x the classic gamma_D, and 2x again for the MMA's accumulation order)
    u = 2.0 ** -53 if x.dtype == torch.float64 else 2.0 ** -24
    gamma = 4.0 * (d + 4) * u
    bnr, bdr = _rescan_tile()
    wrap_triton(kernels.finalize_kernel)[(triton.cdiv(n, FINALIZE_BM),)](
        x, codebook, pv, pi, cmax, codes, dist, zq if gather else dist, counts if gather else codes,
        n, k, s, x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1), gamma,
        D=d, METRIC=_METRIC[metric], T=t, TP=triton.next_power_of_2(t), EXACT=exact, GATHER=gather,
        ACC_FP64=acc == torch.float64, BM=FINALIZE_BM, BD=min(_pow2(d), 128), BNR=bnr, BDR=bdr,
    )
    return codes, zq, dist, counts


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


# ---------------------------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------------------------
@triton_op("vqkernels::nearest_code_triton", mutates_args=())
def nearest_code_triton(x: Tensor, codebook: Tensor, metric: str, exact: bool) -> tuple[Tensor, Tensor]:
    _check_finite([(codebook, "codebook"), (x, "x")])
    codes, _, dist, _ = _finalize(x, codebook, metric, exact, gather=False)
    return codes, dist


@triton_op("vqkernels::quantize_triton", mutates_args=())
def quantize_triton(x: Tensor, codebook: Tensor, metric: str,
                    exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_finite([(codebook, "codebook"), (x, "x")])
    codes, zq, dist, counts = _finalize(x, codebook, metric, exact, gather=True)
    return codes, zq, dist, counts


@triton_op("vqkernels::code_stats_triton", mutates_args=())
def code_stats_triton(x: Tensor, codes: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    acc = _acc(x.dtype)
    if _eager(x, codes) and n and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(f"codes must lie in [0, num_codes = {num_codes}); got values in "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    sums = torch.zeros((num_codes, d), dtype=acc, device=x.device)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=x.device)
    if n == 0:
        return sums, counts
    bd = min(_pow2(d), 64)
    wrap_triton(kernels.code_stats_kernel)[(triton.cdiv(n, STATS_BR), triton.cdiv(d, bd))](
        x, codes, sums, counts, n, x.stride(0), x.stride(1),
        D=d, ACC_FP64=acc == torch.float64, BR=STATS_BR, BD=bd,
    )
    return sums, counts


@triton_op("vqkernels::gumbel_argmin_triton", mutates_args=())
def gumbel_argmin_triton(x: Tensor, codebook: Tensor, metric: str, seed_code: int, seed_row: int) -> Tensor:
    """Per code k: ``argmin_i (d(x_i, c_k) - g(seed, k, i))``, a sample of ``softmax_i(-d(x_i, c_k))``."""
    acc = torch.float64 if torch.float64 in (x.dtype, codebook.dtype) else torch.float32
    rows, cols = codebook.to(acc), x.to(acc)
    k = rows.shape[0]
    pv, pi, s = _search_partials(rows, cols, metric, 1, False, sample=(seed_code, seed_row))
    if s == 1:
        return pi[0, :, 0].to(torch.int64)
    # splits hold increasing input rows: the first minimum over splits is the lowest-index one
    best = pv[:, :, 0].argmin(0)
    return pi[:, :, 0].gather(0, best[None, :]).squeeze(0).to(torch.int64).reshape(k)


OP_NAMES = ("nearest_code_triton", "quantize_triton", "code_stats_triton")

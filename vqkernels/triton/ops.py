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
# Unaligned rows load element by element, a pointer per element; in the batched variant of the bf16 / fp16 fast tile
# on the feature loop (D > 64) the group offsets on top of those spill (48 B under triton 3.6 for sm_90, at 255
# registers); a 32-wide feature step halves the pointers (no spill under 3.6 or 3.9). The 2-D tile keeps its 64.
GROUPED_ANY_HALF_BD = 32
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


def _config(dtype: torch.dtype, d: int, top: int = 1, grouped_any: bool = False) -> TileConfig:
    """The search tile for this dtype and D: ``bd`` is 16 for D <= 16 (the smallest MMA k-step) and the table's
    otherwise (two feature tiers keep the variant count small); ``d <= bd`` means the row tile is loaded once
    (``ONE_D``). ``grouped_any``: a batched launch on unaligned operands (the ``any`` twin), whose bf16 / fp16 fast
    tile steps through wide rows 32 features at a time (:data:`GROUPED_ANY_HALF_BD`)."""
    if interpreting():
        c = INTERPRETER_CONFIG
        return TileConfig(c.bm, c.bn, min(_pow2(d), 128), c.warps, c.stages, c.why)
    cls = _dtype_class(dtype)
    cfg = SEARCH_CONFIGS[cls][0] if top == 1 else EXACT_CONFIGS[cls]
    bd = 16 if d <= 16 else cfg.bd
    if grouped_any and cls == "half" and top == 1 and d > bd:
        bd = GROUPED_ANY_HALF_BD
    return TileConfig(cfg.bm, cfg.bn, bd, cfg.warps, cfg.stages, cfg.why)


def _finalize_tile(dtype: torch.dtype, d: int) -> FinalizeTile:
    if interpreting():
        b = min(_pow2(d), 128)
        return FinalizeTile(256, b, b, 1024, b, 1, 1)
    return FINALIZE_TILES[_dtype_class(dtype)]


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    v = os.environ.get(name, "")
    return default if not v else max(lo, min(hi, int(v)))


MAX_SPLITS = 65535  # grid.y limit


def _num_splits(n: int, k: int, cfg: TileConfig, device: torch.device, groups: int = 1) -> int:
    """Code splits: 1 when the row tiles (of all ``groups``) alone fill the GPU twice; else enough to, keeping
    >= 4 blocks a split."""
    max_splits = min(MAX_SPLITS, triton.cdiv(k, cfg.bn))
    if "VQK_TRITON_SPLIT" in os.environ:
        return _env_int("VQK_TRITON_SPLIT", 1, 1, max_splits)
    if interpreting():
        return 1
    target = 2 * _sm_count(device)
    row_programs = groups * triton.cdiv(n, cfg.bm)
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


def _check_extent(n: int, k: int, groups: int = 1, keyed_groups: int = 0) -> None:
    """Row and code indices are int32 inside the kernels (program ids, the partial lists' indices), and so are
    the search's key-term indices ``g pad16(K) + k`` (``groups`` in the launch) and sampling's noise ids
    ``g N + r`` of the search rows (``keyed_groups``: the op's groups up to this launch's last)."""
    lim = _I32_LIMIT - (1 << 20)
    if n >= lim or k >= lim:
        raise ValueError(f"the triton backend takes fewer than 2^31 - 2^20 rows and codes; got N = {n}, K = {k}")
    if groups * _pad16(k, groups) >= lim:
        raise ValueError(
            f"the triton backend takes fewer than 2^31 - 2^20 codes over all groups; got G = {groups}, K = {k}"
        )
    if keyed_groups * n >= lim:
        raise ValueError(
            f"the triton backend samples for fewer than 2^31 - 2^20 codes in all; got G = {groups}, K = {n}"
        )


MAX_GROUPS = 65535  # grid.z limit: the groups of a batched launch (more are launched in chunks of this many)


def _group_chunks(groups: int) -> list[tuple[int, int]]:
    """``[(g0, g1), ...]``: the group ranges of the launches of a batch (one range unless G > MAX_GROUPS)."""
    return [(g0, min(g0 + MAX_GROUPS, groups)) for g0 in range(0, groups, MAX_GROUPS)]


def _aligned(ints: tuple[int, ...], tensors: tuple[Tensor, ...]) -> bool:
    """Whether a launch can take the ``aligned`` twin of a kernel (:func:`vqkernels.triton.kernels._twins`): every
    int a multiple of 16 and every data pointer 16-byte aligned."""
    return all(v % 16 == 0 for v in ints) and all(t.data_ptr() % 16 == 0 for t in tensors)


def _groups(t: Tensor) -> tuple[Tensor, int]:
    """``t`` (``[rows, D]`` or ``[G, rows, D]``) as ``[G, rows, D]`` (2-D: G = 1) with unit feature stride, and
    the group stride the kernels take. The kernels index features with unit stride (coalesced, vectorisable);
    rows and groups may be strided, so a head split ``x.view(N, G, D).transpose(0, 1)`` is read in place. A
    single group passes group stride 0: the 2-D form launches exactly the variants it always did (0 is a multiple
    of 16 whatever N D is)."""
    t = t.unsqueeze(0) if t.dim() == 2 else t
    if t.stride(2) != 1 and t.shape[2] != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device a launch targets (the stand-in driver's under the compile check)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if interpreting():
        return 1
    from triton.runtime import driver  # a GPU target without a CUDA tensor: the compile check's stand-in driver

    active = driver.active
    return int(active.utils.get_device_properties(active.get_current_device())["multiprocessor_count"])


def _pad16(n: int, groups: int) -> int:
    """The group stride of the per-code and per-row scratch (key terms, norms, flags), as ``kernels._pad16``:
    ``[G, n]`` is stored as ``[G, pad16(n)]``, so every group's slice starts 16-element aligned and the kernels'
    loads of it stay vectorised; one group (the 2-D form, whose kernels have no group offsets) needs no pad."""
    return n if groups == 1 else triton.cdiv(n, 16) * 16


def sum_squares(cols: Tensor, stride_g: int) -> Tensor:
    """fp64 ``sum_d c_kd^2`` of ``cols [G, K, D]`` (group stride ``stride_g``; features contiguous) by one kernel
    (:func:`vqkernels.numerics.sum_squares`): ``[G, K']``, K' = ``_pad16(K, G)``, the pad columns 0."""
    g, k, d = cols.shape
    sq = torch.empty((g, _pad16(k, g)), dtype=torch.float64, device=cols.device)
    bk, bd = (1024, 128) if interpreting() else SUM_SQUARES_TILE
    wrap_triton(kernels.sum_squares_kernel)[(triton.cdiv(k, bk), 1, g)](
        cols, sq, k, d, stride_g, cols.stride(1), BK=bk, BD=bd, GROUPED=g > 1, num_warps=4, num_stages=1
    )
    return sq


def key_terms(cols: Tensor, metric: str, stride_g: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(w, o, cnorm64)`` of ``cols [G, K, D]``, each ``[G, K']`` (:func:`sum_squares`; finite pads, never read):
    :func:`vqkernels.numerics.key_terms` on the kernel's sums of squares."""
    return numerics.key_terms(cols, metric, sq=sum_squares(cols, stride_g))


def _search_partials(
    rows: Tensor,
    cols: Tensor,
    strides_g: tuple[int, int],
    metric: str,
    t: int,
    exact: bool,
    sample: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor, int, Tensor]:
    """Run the search kernel on ``rows [G, N, D]`` against ``cols [G, K, D]`` (features contiguous; group strides
    ``strides_g`` = (rows', cols')): ``(pv [G, S, N, TP], pi [G, S, N, TP], S, cnorm64 [G, K'])``.

    ``sample``: ``(s_code, s_row, group_base)``, the seeds and the op's index of this launch's group 0 (the noise
    keys search row r of group g as ``(group_base + g) N + r``)."""
    g, n, d = rows.shape
    k = cols.shape[1]
    _check_extent(n, k, g, keyed_groups=sample[2] + g if sample else 0)
    acc = acc_dtype(rows.dtype)
    rgs, cgs = strides_g
    aligned = _aligned((d, rgs, rows.stride(1), cgs, cols.stride(1)), (rows, cols))
    cfg = _config(rows.dtype, d, t, grouped_any=g > 1 and not aligned)
    s = _num_splits(n, k, cfg, rows.device, g)
    per_split = triton.cdiv(triton.cdiv(k, s), cfg.bn) * cfg.bn
    s = triton.cdiv(k, per_split)
    tp = t
    w, o, cnorm = key_terms(cols, metric, cgs)
    if sample is not None:
        rw, ro, _ = key_terms(rows, metric, rgs)
        # the row-side factor and term of the distance: 1 / max(|c|, eps) for cosine (= -w of the rows), |c|^2
        # for l2 (= o of the rows)
        rs = -rw if metric == "cosine" else torch.ones((g, _pad16(n, g)), dtype=acc, device=rows.device)
        rt = ro if metric == "l2" else torch.zeros((g, _pad16(n, g)), dtype=acc, device=rows.device)
        seed_row, seed_col = (_i32(v) for v in sample[:2])  # (s_code, s_row): the search rows are the codes
        group_base = sample[2]
    else:
        rs, rt, seed_row, seed_col, group_base = w, o, 0, 0, 0
    pv = torch.empty((g, s, n, tp), dtype=acc, device=rows.device)
    pi = torch.empty((g, s, n, tp), dtype=torch.int32, device=rows.device)
    grid = (triton.cdiv(n, cfg.bm), s, g)
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
        rgs,
        rows.stride(1),
        cgs,
        cols.stride(1),
        per_split,
        seed_row,
        seed_col,
        int(sample is not None and metric == "l2"),
        group_base,
        TP=tp,
        SAMPLE=sample is not None,
        UPCAST=interpreting() and rows.dtype != torch.float64,  # fp64 dots under the interpreter (kernels.py)
        PRECISION=_precision(rows.dtype, exact or sample is not None),
        ACC_FP64=acc == torch.float64,
        ONE_D=d <= cfg.bd,
        BM=cfg.bm,
        BN=cfg.bn,
        BD=cfg.bd,
        GROUPED=g > 1 or group_base > 0,  # a chunk of one group past the first keys its noise from group_base
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
    """Search + finalize: ``(codes, z_q or None, dist, counts or None)``, 2-D or batched as ``x`` is."""
    if x.dim() == 3 and x.shape[0] > MAX_GROUPS:  # more groups than grid axis 2 holds: one pass per chunk
        parts = [_finalize(x[a:b], codebook[a:b], metric, exact, gather) for a, b in _group_chunks(x.shape[0])]
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))
    acc = acc_dtype(x.dtype)
    codes = torch.empty(x.shape[:-1], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[:-1], dtype=acc, device=x.device)
    zq = torch.empty(x.shape, dtype=codebook.dtype, device=x.device) if gather else None
    counts = torch.zeros(codebook.shape[:-1], dtype=torch.int64, device=x.device) if gather else None
    if codes.numel() == 0:  # G = 0 or N = 0
        return codes, zq, dist, counts
    x, xgs = _groups(x)
    codebook, cgs = _groups(codebook)
    g, n, d = x.shape
    k = codebook.shape[1]
    top = EXACT_LIST if exact else 1
    pv, pi, s, cnorm = _search_partials(x, codebook, (xgs, cgs), metric, top, exact)
    f = _finalize_tile(x.dtype, d)
    layout = (d, xgs, x.stride(1), cgs, codebook.stride(1))
    aligned = _aligned(layout, (x, codebook))
    warps = f.warps if aligned else f.warps_any
    grid = (triton.cdiv(n, f.bm), 1, g)
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
            k,
            d,
            s,
            *layout[1:],
            metric_code(metric),
            int(gather),
            ACC_FP64=acc == torch.float64,
            BM=f.bm,
            BD=f.bd,
            GROUPED=g > 1,
            num_warps=warps,
            num_stages=1,
        )
        return codes, zq, dist, counts
    cmax = cnorm.amax(1)  # [G]: each group's bound uses its own codebook (the pads are 0)
    # fp64 reciprocal norms of the cosine re-score (IEEE divisions, by torch), [G, K'] and [G, N']
    if metric == "cosine":
        rcn = 1.0 / cnorm.clamp_min(COS_EPS)
        rxn = torch.ones((g, _pad16(n, g)), dtype=torch.float64, device=x.device)
        rxn[:, :n] = 1.0 / torch.linalg.vector_norm(x, dim=2, dtype=torch.float64).clamp_min(COS_EPS)
    else:  # unread stand-ins of the same types (one compiled variant for every metric)
        rcn, rxn = cnorm, torch.empty(1, dtype=torch.float64, device=x.device)
    gamma = numerics.exact_gamma(d, x.dtype)
    flag = torch.empty((g, _pad16(n, g)), dtype=torch.int8, device=x.device)
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
        *layout[1:],
        gamma,
        metric_code(metric),
        exact_candidates(),
        TP=top,
        ACC_FP64=acc == torch.float64,
        BM=f.bm,
        BD=f.bd,
        BDX=f.bdx,
        GROUPED=g > 1,
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
        *layout,
        metric_code(metric),
        BM=f.bm,
        BNR=f.bnr,
        BDR=f.bdr,
        GROUPED=g > 1,
        # the batched variant on 4 warps spills under triton 3.6 (sm_90); 8 warps halve its per-thread tiles
        num_warps=8 if g > 1 else 4,
        num_stages=1,
    )
    if gather:
        wrap_triton(kernels.gather_kernel)[grid](
            codebook,
            codes,
            zq,
            counts,
            n,
            k,
            d,
            cgs,
            codebook.stride(1),
            BM=f.bm,
            BD=f.bd,
            GROUPED=g > 1,
            num_warps=8,
            num_stages=1,
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
    acc = acc_dtype(x.dtype)
    if _eager(x, codes) and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(
            f"codes must lie in [0, num_codes = {num_codes}); got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    sums = torch.zeros((*x.shape[:-2], num_codes, x.shape[-1]), dtype=acc, device=x.device)
    counts = torch.zeros((*x.shape[:-2], num_codes), dtype=torch.int64, device=x.device)
    if codes.numel() == 0:  # G = 0 or N = 0
        return sums, counts
    # the kernel reads codes [G, N] as g N + row: a strided view is copied (int64 codes, small beside x)
    codes = codes.contiguous()
    if x.dim() == 2:
        _code_stats(x, codes, sums, counts)
    else:  # more groups than grid axis 2 holds: one launch per chunk, into the chunk's (contiguous) outputs
        for a, b in _group_chunks(x.shape[0]):
            _code_stats(x[a:b], codes[a:b], sums[a:b], counts[a:b])
    return sums, counts


def _code_stats(x: Tensor, codes: Tensor, sums: Tensor, counts: Tensor) -> None:
    """Add the per-code sums and counts of ``x [N, D]`` / ``[G <= MAX_GROUPS, N, D]`` by ``codes`` (contiguous)
    into the zeroed ``sums [(G,) K, D]`` and ``counts [(G,) K]``."""
    num_codes = counts.shape[-1]
    acc = sums.dtype
    x, xgs = _groups(x)
    g, n, d = x.shape
    br, bd, warps = STATS_TILES[_dtype_class(x.dtype)]
    if interpreting():
        br, bd, warps = 256, min(_pow2(d), 128), 1
    aligned = _aligned((d, xgs, x.stride(1)), (x,))
    kernel = kernels.code_stats_kernel if aligned else kernels.code_stats_kernel_any
    wrap_triton(kernel)[(triton.cdiv(n, br), triton.cdiv(d, bd), g)](
        x,
        codes,
        sums,
        counts,
        n,
        num_codes,
        d,
        xgs,
        x.stride(1),
        ACC_FP64=acc == torch.float64,
        BR=br,
        BD=bd,
        GROUPED=g > 1,
        num_warps=warps,
        num_stages=1,
    )


@triton_op("vqkernels::sample_code_triton", mutates_args=())
def sample_code_triton(x: Tensor, codebook: Tensor, metric: str, seed: int) -> Tensor:
    """Per code k: ``argmin_i (d(x_i, c_k) - g(seed, k, i))``, a draw of ``P(i) ~ exp(-d(x_i, c_k))``: the search
    with the roles swapped (the codes are the rows), the Gumbel noise subtracted in its epilogue. Batched: group
    g's code k is keyed as code ``g * K + k`` (the search's noise id of row k of group g), its rows by their index
    within the group."""
    if x.dim() == 3 and x.shape[0] == 0:
        return torch.empty(codebook.shape[:-1], dtype=torch.int64, device=x.device)
    if x.shape[-2] == 0:
        raise ValueError("x must hold at least one row to sample from; got N = 0")
    # bf16 / fp16 upcast once (their products are exact in fp32, so nothing changes): one compiled variant per
    # accumulation dtype instead of one per input dtype
    acc = acc_dtype(x.dtype)
    s_code, s_row = numerics.seed_from_schema(seed)
    if x.dim() == 2:
        return _sample(x, codebook, metric, (s_code, s_row, 0), acc).reshape(codebook.shape[0])
    # more groups than grid axis 2 holds: one launch per chunk, its noise keyed from its first group's index on
    parts = [_sample(x[a:b], codebook[a:b], metric, (s_code, s_row, a), acc) for a, b in _group_chunks(x.shape[0])]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _sample(x: Tensor, codebook: Tensor, metric: str, keys: tuple[int, int, int], acc: torch.dtype) -> Tensor:
    """:func:`sample_code_triton` on at most MAX_GROUPS groups -> int64 ``[G, K]`` (2-D: ``[1, K]``)."""
    rows, rgs = _groups(codebook.to(acc))
    cols, cgs = _groups(x.to(acc))
    pv, pi, s, _ = _search_partials(rows, cols, (rgs, cgs), metric, 1, False, sample=keys)
    if s == 1:
        best = pi[:, 0, :, 0]
    else:
        # splits hold increasing input rows: the first minimum over splits is the lowest-index one
        pick = pv[..., 0].argmin(1, keepdim=True)  # [G, 1, K]
        best = pi[..., 0].gather(1, pick).squeeze(1)
    return best.to(torch.int64)

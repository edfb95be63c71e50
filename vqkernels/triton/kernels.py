"""Triton kernels of the fused VQ ops (``@triton.jit`` only; launchers live in :mod:`vqkernels.triton.ops`).

- :func:`search_kernel`: a tile of BM rows meets a range of codes streamed through in BN blocks; ``tl.dot``
  produces the BM x BN dot products, the epilogue turns them into argmin keys and an online top-T keeps the best
  (key, index) per row (T = 1 for the fast path; ties go to the lowest index). A program covers one split of the
  codes (split-K); its top-T goes to a small ``[S, N, TP]`` partial buffer, never N x K. With ``SAMPLE`` the rows
  are codes and the "codes" are input rows, and the epilogue subtracts counter-based Gumbel noise keyed on
  (seed, code, row): the argmin is then a sample of ``softmax_i(-d(x_i, c_k))`` (Gumbel-max; CVQ-VAE's
  "probrandom" anchors, Zheng & Vedaldi 2023, §3.2).
- :func:`finalize_kernel`: merges the S partial lists of a row block, computes the distance, re-scores the
  candidates in fp64 for ``exact`` (and re-scans every code in fp64, row by row, for the rare rows with more
  candidates within the rounding bound than were kept), gathers ``z_q`` and adds the usage histogram.
- :func:`code_stats_kernel`: per-code sums and counts. Equal codes inside a block of rows are summed in registers
  first (an equality matrix times the rows), so each block issues one atomic per *distinct* code: full collapse
  costs N / BR atomics per element instead of N.

Batched form (x ``[G, N, D]``, codebook ``[G, K, D]``, group g searching only its own codebook): one launch per
kernel serves all groups, the group on grid axis 2 (:func:`_group`; the launchers split batches of more than 65535
groups). A program moves its base pointers to its group once and reads the inputs in place through their group
and row strides (a head split ``x.view(N, G, D).transpose(0, 1)`` has group stride D, row stride G D). The
outputs are contiguous ``[G, N]`` / ``[G, N, D]`` / ``[G, K]``, the partials ``[G, S, N, TP]``, and the per-code
and per-row scratch (key terms, norms, flags) ``[G, pad16(K or N)]``, so each group's slice starts aligned. The
group arithmetic is compiled only into the ``GROUPED`` variants: a 2-D launch (or G = 1) compiles the code the 2-D
form always had.

Argmin key of code k for row x: ``fma(x . c_k, w_k, o_k)`` with (w, o) = (-2, sum_d c_kd^2) for l2,
(-1 / max(|c_k|, eps), 0) for cosine and (-1, 0) for dot (``vqkernels.numerics.key_terms``, the one definition
every backend uses); the per-row term of the distance is added back at the end.

Compiled-GPU rules these kernels follow (the interpreter checks none of them; ``vqkernels.triton.gpu_compile``
compiles every variant for sm_80 and sm_90):

- no module globals inside a kernel (compiled Triton refuses them): constants are literals or constexpr args;
- the feature loop is a runtime ``tl.range``, so shared memory, registers and compile time do not grow with D;
- row and code offsets are int64 (``rows.to(tl.int64) * stride``, once per row) so N x D and K x D may pass 2^31;
  offsets inside a row stay int32 (the launchers make the feature axis contiguous);
- only what changes the generated code is a constexpr (tile, dtype-dependent paths, top-T width); the metric of
  ``finalize_kernel``, gather on/off and the l2 clamp of sampling are runtime flags (uniform branches), and the
  helper kernels do not specialise on D, so the variant count stays small enough to compile all of them in CI;
- where a value is compared or returned, square roots and divisions are IEEE-rounded (``sqrt_rn``/``div_rn``;
  plain ``tl.sqrt`` and ``/`` lower to approximate instructions for fp32) and the key is an explicit ``tl.fma``,
  so it does not depend on the compiler's default for mul-add contraction.
"""

import triton
import triton.language as tl

from .. import numerics

# The numerics of vqkernels.numerics as constexpr globals (the only module globals compiled Triton accepts), so the
# kernels repeat no literal of theirs.
COS_EPS = tl.constexpr(numerics.COS_EPS)
MIX_S0 = tl.constexpr(numerics.MIX_ROUNDS[0][0])
MIX_M0 = tl.constexpr(numerics.MIX_ROUNDS[0][1])
MIX_S1 = tl.constexpr(numerics.MIX_ROUNDS[1][0])
MIX_M1 = tl.constexpr(numerics.MIX_ROUNDS[1][1])
MIX_S2 = tl.constexpr(numerics.MIX_ROUNDS[2][0])
MIX_M2 = tl.constexpr(numerics.MIX_ROUNDS[2][1])
MIX_LAST = tl.constexpr(numerics.MIX_LAST_SHIFT)

# Metric codes (constexpr METRIC): 0 = l2, 1 = cosine, 2 = dot. Index sentinel of empty top-T slots: int32 max.


# ---------------------------------------------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _rows64(idx, stride):
    """Element offset of row ``idx`` (int64: N x D may pass 2^31). Inside hot loops the kernels write it out:
    the interpreter pays for every device-function call."""
    return tl.cast(idx, tl.int64) * stride  # tl.cast: idx may be a Python int (loop counters, interpreter)


@triton.jit
def _group(GROUPED: tl.constexpr):
    """``(g, g as int64)``: this program's group, grid axis 2, in a batched launch (``GROUPED``); else the
    constant 0, so that every group offset folds away and a 2-D launch compiles the code it did before the
    batched form (the group arithmetic's few live registers pushed some 2-D tiles from 128 registers to up to
    176 in the compile check: an occupancy step)."""
    if GROUPED:
        g = tl.program_id(2)
    else:
        g = tl.full([], 0, tl.int32)
    return g, g.to(tl.int64)


@triton.jit
def _pad16(n):
    """Group stride of the per-row / per-code scratch the launchers allocate (``ops._pad16``): n rounded up to a
    multiple of 16, so that a group's slice starts as aligned as the buffer and its loads stay vectorised (the
    compiler infers the divisibility from the multiplication)."""
    return tl.cdiv(n, 16) * 16


@triton.jit
def _sqrt_rn(v):
    if v.dtype == tl.float64:
        r = tl.sqrt(v)  # fp64 sqrt has no approximate form on NVIDIA GPUs: it is sqrt.rn.f64
    else:
        r = tl.sqrt_rn(v)
    return r


@triton.jit
def _norm_upper(sq):
    """An upper bound of ``sqrt(sq)`` (fp64 ``sq >= 0``) within ~2^-18 relative, without an fp64 square root,
    whose slow path is a call that costs a stack frame. For the rounding bound of exact mode only."""
    s = tl.minimum(tl.maximum(sq, 1e-30), 1e30)
    r = tl.sqrt(s.to(tl.float32)).to(tl.float64) * (1.0 + 2.0 ** -18)  # approx sqrt: error < 2^-21, plus rounding
    # sqrt(sq) <= sq / 1e15 once sq > 1e30
    return tl.where(sq > 1e30, sq * 1e-15, r)


@triton.jit
def _div_rn(a, b):
    if a.dtype == tl.float64:
        r = a / b  # div.rn.f64
    else:
        r = tl.div_rn(a, b)
    return r


# ---------------------------------------------------------------------------------------------------------------
# Counter-based Gumbel noise: vqkernels.numerics.gumbel_noise (the same mixer, on uint32).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _mix32(v):
    v = v ^ (v >> MIX_S0)
    v = v * tl.full(v.shape, MIX_M0, tl.uint32)
    v = v ^ (v >> MIX_S1)
    v = v * tl.full(v.shape, MIX_M1, tl.uint32)
    v = v ^ (v >> MIX_S2)
    v = v * tl.full(v.shape, MIX_M2, tl.uint32)
    return v ^ (v >> MIX_LAST)


@triton.jit
def _gumbel(row_idx, col_idx, seed_row, seed_col, dtype: tl.constexpr):
    """Gumbel(0, 1) ``[BM, BN]`` keyed on (seed, search row, search column) as vqkernels.numerics.gumbel_noise,
    where the search rows are the codes (``seed_row`` = the code seed) and the columns the input rows."""
    rk = _mix32(row_idx.to(tl.uint32) ^ seed_row.to(tl.uint32))
    ck = _mix32(col_idx.to(tl.uint32) ^ seed_col.to(tl.uint32))
    h = _mix32(rk[:, None] ^ ck[None, :])
    u = ((h >> 9).to(dtype) + 0.5) * 1.1920928955078125e-07  # (m + 1/2) 2^-23, in (0, 1)
    return -tl.log(-tl.log(u))


# ---------------------------------------------------------------------------------------------------------------
# Top-4 lists: four [BM] (value, index) pairs per row, ascending by (value, index); empty slots hold
# (inf, int32 max). Separate vectors, not a [BM, 4] tensor: insertion is elementwise, with no reduction across
# the list.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _insert4(v0, i0, v1, i1, v2, i2, v3, i3, v, i):
    """Insert ``(v, i)`` into the sorted list; it goes after equal values, as every caller inserts codes in
    increasing index order among equal values (earlier code blocks and splits first)."""
    c0 = v < v0
    c1 = v < v1
    c2 = v < v2
    c3 = v < v3  # c0 => c1 => c2 => c3: the list is sorted
    n3v = tl.where(c2, v2, tl.where(c3, v, v3))
    n3i = tl.where(c2, i2, tl.where(c3, i, i3))
    n2v = tl.where(c1, v1, tl.where(c2, v, v2))
    n2i = tl.where(c1, i1, tl.where(c2, i, i2))
    n1v = tl.where(c0, v0, tl.where(c1, v, v1))
    n1i = tl.where(c0, i0, tl.where(c1, i, i1))
    return tl.where(c0, v, v0), tl.where(c0, i, i0), n1v, n1i, n2v, n2i, n3v, n3i


@triton.jit
def _epilogue(acc, w, o, v0, i0, v1, i1, v2, i2, v3, i3, kb, k_hi, rows, rs, rt, seed_row, seed_col, clamp,
              TP: tl.constexpr, SAMPLE: tl.constexpr, BN: tl.constexpr):
    """Keys of one ``[BM, BN]`` block of dot products (codes ``kb + j``, key terms ``w``, ``o`` ``[BN]``) merged
    into the running minimum (TP = 1: ``v0, i0``) or top-4 list (TP = 4). ``rows``: the ids the noise is keyed
    on (sampling only)."""
    BM: tl.constexpr = acc.shape[0]
    cols = kb + tl.arange(0, BN)
    cmask = cols < k_hi
    key = tl.fma(acc, tl.broadcast_to(w[None, :], (BM, BN)), tl.broadcast_to(o[None, :], (BM, BN)))
    if SAMPLE:  # the full distance (its per-row part matters once noise is added), minus Gumbel noise
        key = tl.fma(key, tl.broadcast_to(rs[:, None], (BM, BN)), tl.broadcast_to(rt[:, None], (BM, BN)))
        if clamp != 0:  # l2: d >= 0, as the reference clamps
            key = tl.maximum(key, 0.0)
        key = key - _gumbel(rows, cols, seed_row, seed_col, acc.dtype)
    key = tl.where(cmask[None, :], key, float("inf"))
    if TP == 1:
        v, j = tl.min(key, 1, return_indices=True, return_indices_tie_break_left=True)
        better = v < v0  # strict: earlier (lower) codes win ties
        v0 = tl.where(better, v, v0)
        i0 = tl.where(better, j + kb, i0)
    else:
        for t in tl.static_range(TP):  # the block's 4 smallest (value, lowest index), in order
            v = tl.min(key, 1)
            j = tl.min(tl.where(key == v[:, None], cols[None, :], 2147483647), 1)
            v0, i0, v1, i1, v2, i2, v3, i3 = _insert4(v0, i0, v1, i1, v2, i2, v3, i3, v, j)
            if t + 1 < TP:
                key = tl.where(cols[None, :] == j[:, None], float("inf"), key)
    return v0, i0, v1, i1, v2, i2, v3, i3


# ---------------------------------------------------------------------------------------------------------------
# The fused search.
# ---------------------------------------------------------------------------------------------------------------
def search_kernel(
    X, C, W, OFF, RS, RT, PV, PI,  # rows [G, N, D], codes [G, K, D], key terms [G, K'], row terms [G, N'], partials
    N, K, D, stride_xg, stride_xn, stride_cg, stride_cn, codes_per_split, seed_row, seed_col, clamp, group_base,
    TP: tl.constexpr, SAMPLE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC_FP64: tl.constexpr, ONE_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    GROUPED: tl.constexpr,
):
    """The smallest (TP = 1) or 4 smallest (TP = 4) (key, code) per row over codes ``[pid_s * codes_per_split,
    ...)`` of its group into ``PV/PI [G, S, N, TP]`` (S = grid axis 1). Features are contiguous (stride 1) in both
    X and C; ``W``, ``OFF`` (and ``RS``, ``RT``) have group stride ``pad16(K)`` (``pad16(N)``). Sampling keys
    the noise of search row r of group g as ``(group_base + g) N + r`` (the op's code ``g K + k``) and its columns
    by their index within the group."""
    g, g64 = _group(GROUPED)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    X += g64 * stride_xg
    C += g64 * stride_cg
    # the key terms' group offset as an int32 index added to the codes' (the launcher keeps G pad16(K) below
    # 2^31), not as moved W / OFF pointers: two 64-bit pointers live through the loop cost the tile its register
    # budget (up to +34 registers per thread in the compile check, an occupancy step)
    tk = g * _pad16(K)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    xrow = _rows64(rows, stride_xn)
    k_lo = pid_s * codes_per_split
    k_hi = tl.minimum(k_lo + codes_per_split, K)
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    # UPCAST (the interpreter only): numpy's fp32 matmul rounds a dot product differently at different positions
    # of a tile, so equal codes in different blocks would not tie exactly; fp64 products and sums rounded once to
    # fp32 do (its bf16 tl.dot is broken besides)
    dot_t: tl.constexpr = tl.float64 if UPCAST else acc_t
    PREC: tl.constexpr = "ieee" if UPCAST else PRECISION
    dd = tl.arange(0, BD)
    if SAMPLE:
        rs = tl.load(RS + g64 * _pad16(N) + rows, mask=rmask, other=1.0).to(acc_t)
        rt = tl.load(RT + g64 * _pad16(N) + rows, mask=rmask, other=0.0).to(acc_t)
        # the noise's row ids: the op's code ids (group_base + g) N + r, group_base the first group of this launch
        # (the launcher splits more groups than grid axis 2 holds); int32: the launcher keeps G N below 2^31
        keyed = rows
        if GROUPED:
            keyed = (group_base + g) * N + rows
    else:
        rs = None
        rt = None
        keyed = rows
    v0 = tl.full([BM], float("inf"), acc_t)
    i0 = tl.full([BM], 2147483647, tl.int32)
    v1, i1, v2, i2, v3, i3 = v0, i0, v0, i0, v0, i0
    if ONE_D:  # D <= BD: the row tile is loaded once and stays on chip for every code block
        a_once = tl.load(X + xrow[:, None] + dd[None, :], mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
        if UPCAST:
            a_once = a_once.to(tl.float64)
        for kb in range(k_lo, k_hi, BN):
            cols = kb + tl.arange(0, BN)
            cmask = cols < k_hi
            b = tl.load(C + (cols.to(tl.int64) * stride_cn)[:, None] + dd[None, :],
                        mask=cmask[:, None] & (dd[None, :] < D), other=0.0)
            if UPCAST:
                b = b.to(tl.float64)
            acc = tl.dot(a_once, tl.trans(b), tl.zeros([BM, BN], dtype=dot_t), input_precision=PREC,
                         out_dtype=dot_t).to(acc_t)
            w = tl.load(W + (tk + cols), mask=cmask, other=0.0).to(acc_t)
            o = tl.load(OFF + (tk + cols), mask=cmask, other=0.0).to(acc_t)
            v0, i0, v1, i1, v2, i2, v3, i3 = _epilogue(acc, w, o, v0, i0, v1, i1, v2, i2, v3, i3, kb, k_hi, keyed,
                                                       rs, rt, seed_row, seed_col, clamp, TP, SAMPLE, BN)
    else:
        # One flat loop over (code block, feature step), as a persistent GEMM walks its K loop: the pipeliner
        # prefetches the next code block's first tiles while a block's epilogue runs, and registers and shared
        # memory do not depend on D.
        nd = tl.cdiv(D, BD)
        steps = tl.cdiv(k_hi - k_lo, BN) * nd
        acc = tl.zeros([BM, BN], dtype=dot_t)
        for it in range(0, steps):
            kb = k_lo + (it // nd) * BN
            d0 = (it % nd) * BD
            cols = kb + tl.arange(0, BN)
            cmask = cols < k_hi
            feat = d0 + dd
            fm = feat < D
            a = tl.load(X + xrow[:, None] + feat[None, :], mask=rmask[:, None] & fm[None, :], other=0.0)
            crow = cols.to(tl.int64) * stride_cn
            b = tl.load(C + crow[:, None] + feat[None, :], mask=cmask[:, None] & fm[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float64)
                b = b.to(tl.float64)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC, out_dtype=dot_t)
            # the key terms load outside the branch, so the pipeliner sees every load of the loop at top level
            w = tl.load(W + (tk + cols), mask=cmask, other=0.0).to(acc_t)
            o = tl.load(OFF + (tk + cols), mask=cmask, other=0.0).to(acc_t)
            if d0 + BD >= D:  # the block's last feature step: epilogue, then a fresh accumulator
                v0, i0, v1, i1, v2, i2, v3, i3 = _epilogue(acc.to(acc_t), w, o, v0, i0, v1, i1, v2, i2, v3, i3, kb,
                                                           k_hi, keyed, rs, rt, seed_row, seed_col, clamp, TP, SAMPLE,
                                                           BN)
                acc = tl.zeros([BM, BN], dtype=dot_t)
    prow = ((g64 * tl.num_programs(1) + pid_s) * N + rows) * TP  # [G, S, N, TP]
    tl.store(PV + prow, v0, mask=rmask)
    tl.store(PI + prow, i0, mask=rmask)
    if TP == 4:
        tl.store(PV + prow + 1, v1, mask=rmask)
        tl.store(PI + prow + 1, i1, mask=rmask)
        tl.store(PV + prow + 2, v2, mask=rmask)
        tl.store(PI + prow + 2, i2, mask=rmask)
        tl.store(PV + prow + 3, v3, mask=rmask)
        tl.store(PI + prow + 3, i3, mask=rmask)


# ---------------------------------------------------------------------------------------------------------------
# Finalize: merge the splits, distance, exact re-score, gather, histogram.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _first_of_equal(c, valid, BR: tl.constexpr):
    """For codes ``c [BR]``: the equality matrix, whether each row is the first of its code, and its code's count."""
    jj = tl.arange(0, BR)
    eq = (c[:, None] == c[None, :]) & valid[:, None] & valid[None, :]
    earlier = eq & (jj[None, :] < jj[:, None])
    first = valid & (tl.sum(earlier.to(tl.int32), 1) == 0)
    cnt = tl.sum(eq.to(tl.int32), 1)
    return eq, first, cnt


@triton.jit
def _finish64(s, rxn, rcn, metric):
    """fp64 distance from the accumulated sum ``s`` (l2: sum (x - c)^2; else x . c) and, for cosine, the
    reciprocal norms ``1 / max(|x|, eps)`` and ``1 / max(|c|, eps)``."""
    d = s
    if metric == 1:
        d = 1.0 - s * rxn * rcn
    elif metric == 2:
        d = -s
    return d


@triton.jit
def _rescore64(X, C, RCN, xrow, codes, ok, D, stride_cn, rxn, metric, BM: tl.constexpr, BD: tl.constexpr):
    """fp64 distance of each row to one code per row (``codes [BM]``, valid where ``ok``), from the stored values
    (l2 as sum (x - c)^2: no cancellation). A runtime loop over D in ``[BM, BD]`` tiles."""
    dd = tl.arange(0, BD)
    crow = _rows64(tl.where(ok, codes, 0), stride_cn)
    s = tl.zeros([BM], dtype=tl.float64)
    for d0 in tl.range(0, D, BD):
        feat = d0 + dd
        m2 = ok[:, None] & (feat < D)[None, :]
        xa = tl.load(X + xrow[:, None] + feat[None, :], mask=m2, other=0.0).to(tl.float64)
        ca = tl.load(C + crow[:, None] + feat[None, :], mask=m2, other=0.0).to(tl.float64)
        if metric == 0:
            s += tl.sum((xa - ca) * (xa - ca), 1)
        else:
            s += tl.sum(xa * ca, 1)
    rcn = tl.load(RCN + codes, mask=ok, other=1.0)
    return _finish64(s, rxn, rcn, metric)


def finalize_kernel(
    X, C, PV, PI, CODES, DIST, ZQ, COUNTS, N, K, D, S, stride_xg, stride_xn, stride_cg, stride_cn, metric, gather,
    ACC_FP64: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, GROUPED: tl.constexpr,
):
    """Fast path, per row: merge the S partial minima (``PV/PI [G, S, N]``), the distance (``CODES``, ``DIST``
    ``[G, N]``), and with ``gather`` z_q (``ZQ [G, N, D]`` contiguous) and the histogram (``COUNTS [G, K]``).
    ``metric``: 0 l2, 1 cosine, 2 dot."""
    g, g64 = _group(GROUPED)
    pid = tl.program_id(0)
    X += g64 * stride_xg
    C += g64 * stride_cg
    PV += g64 * S * N
    PI += g64 * S * N
    CODES += g64 * N
    DIST += g64 * N
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    xrow = _rows64(rows, stride_xn)
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    # merge the splits (split s holds codes before split s + 1: a strict < keeps the earlier split on ties)
    key0 = tl.full([BM], float("inf"), acc_t)
    code = tl.full([BM], 0, tl.int32)
    for s in range(0, S):
        off = rows.to(tl.int64) + tl.cast(s, tl.int64) * N
        pv = tl.load(PV + off, mask=rmask, other=float("inf"))
        pi = tl.load(PI + off, mask=rmask, other=0)
        better = pv < key0
        key0 = tl.where(better, pv, key0)
        code = tl.where(better, pi, code)
    dd = tl.arange(0, BD)
    xsq = tl.zeros([BM], dtype=acc_t)
    for d0 in tl.range(0, D, BD):
        feat = d0 + dd
        xa = tl.load(X + xrow[:, None] + feat[None, :], mask=rmask[:, None] & (feat < D)[None, :],
                     other=0.0).to(acc_t)
        xsq += tl.sum(xa * xa, 1)
    dist = key0  # dot
    if metric == 0:
        dist = tl.maximum(xsq + key0, 0.0)
    elif metric == 1:
        dist = 1.0 + _div_rn(key0, tl.maximum(_sqrt_rn(xsq), COS_EPS))
    tl.store(CODES + rows, code.to(tl.int64), mask=rmask)
    tl.store(DIST + rows, dist, mask=rmask)
    if gather != 0:
        _gather_rows(C, ZQ + g64 * N * D, COUNTS + g64 * K, rows, rmask, code, D, stride_cn, BM, BD)


@triton.jit
def _gather_rows(C, ZQ, COUNTS, rows, rmask, code, D, stride_cn, BM: tl.constexpr, BD: tl.constexpr):
    """``ZQ[rows] = C[code]`` and the histogram: one atomic per distinct code of the block."""
    dd = tl.arange(0, BD)
    crow = _rows64(tl.where(rmask, code, 0), stride_cn)
    zrow = _rows64(rows, D)
    for d0 in tl.range(0, D, BD):
        feat = d0 + dd
        m2 = rmask[:, None] & (feat < D)[None, :]
        zq = tl.load(C + crow[:, None] + feat[None, :], mask=m2, other=0.0)
        tl.store(ZQ + zrow[:, None] + feat[None, :], zq, mask=m2)
    _, first, cnt = _first_of_equal(code, rmask, BM)
    tl.atomic_add(COUNTS + code, cnt.to(tl.int64), mask=first)


def gather_kernel(C, CODES, ZQ, COUNTS, N, K, D, stride_cg, stride_cn, BM: tl.constexpr, BD: tl.constexpr,
                  GROUPED: tl.constexpr):
    """``ZQ [G, N, D] = C[g][CODES [G, N]]`` and the histogram ``COUNTS [G, K]`` (after exact mode, whose codes
    come from two kernels)."""
    g, g64 = _group(GROUPED)
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    code = tl.load(CODES + g64 * N + rows, mask=rmask, other=0).to(tl.int32)
    _gather_rows(C + g64 * stride_cg, ZQ + g64 * N * D, COUNTS + g64 * K, rows, rmask, code, D, stride_cn, BM, BD)


def exact_kernel(
    X, C, PV, PI, RXN, RCN, CMAX, CODES, DIST, FLAG, N, K, D, S, stride_xg, stride_xn, stride_cg, stride_cn, gamma,
    metric, n_cand,
    TP: tl.constexpr, ACC_FP64: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDX: tl.constexpr,
    GROUPED: tl.constexpr,
):
    """Exact mode, per row: merge the S partial top-4 lists, re-score the first ``n_cand`` (<= 4) candidates
    inside the rounding bound in fp64 (``CODES``, ``DIST``), and set ``FLAG`` where the ``n_cand``-th candidate is
    inside the bound too: more codes may be, and :func:`rescan_kernel` re-scores every code of that row.

    Every code whose fast key may round below the true minimum lies within 2E of the fast minimum, E the bound on
    a key's rounding error (``gamma = safety * (D + 4) * u``, set by the launcher). ``RXN [G, N]`` / ``RCN [G, K]``:
    fp64 reciprocal norms (cosine only; an fp64 division here would cost a call frame); ``CMAX [G]`` the largest
    code norm of each group; ``PV/PI [G, S, N, TP]``; ``CODES``, ``DIST`` ``[G, N]``. ``RXN``, ``FLAG`` have
    group stride ``pad16(N)``, ``RCN`` ``pad16(K)``."""
    g, g64 = _group(GROUPED)
    pid = tl.program_id(0)
    X += g64 * stride_xg
    C += g64 * stride_cg
    PV += g64 * S * N * TP
    PI += g64 * S * N * TP
    RCN += g64 * _pad16(K)
    CODES += g64 * N
    DIST += g64 * N
    FLAG += g64 * _pad16(N)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    xrow = _rows64(rows, stride_xn)
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    v0 = tl.full([BM], float("inf"), acc_t)
    i0 = tl.full([BM], 2147483647, tl.int32)
    v1, i1, v2, i2, v3, i3 = v0, i0, v0, i0, v0, i0
    for s in range(0, S):  # split s holds codes before split s + 1: inserting in split order keeps the tie rule
        off = (rows.to(tl.int64) + tl.cast(s, tl.int64) * N) * TP
        for t in tl.static_range(TP):
            pv = tl.load(PV + off + t, mask=rmask, other=float("inf"))
            pi = tl.load(PI + off + t, mask=rmask, other=2147483647)
            v0, i0, v1, i1, v2, i2, v3, i3 = _insert4(v0, i0, v1, i1, v2, i2, v3, i3, pv, pi)
    key0 = v0.to(tl.float64)
    dd = tl.arange(0, BD)
    xsq = tl.zeros([BM], dtype=tl.float64)
    for d0 in tl.range(0, D, BD):
        feat = d0 + dd
        xa = tl.load(X + xrow[:, None] + feat[None, :], mask=rmask[:, None] & (feat < D)[None, :],
                     other=0.0).to(tl.float64)
        xsq += tl.sum(xa * xa, 1)
    xn = _norm_upper(xsq)
    cmax = tl.load(CMAX + g)
    e = gamma * xn * cmax  # dot
    if metric == 0:
        e = gamma * (2.0 * xn * cmax + cmax * cmax)
    elif metric == 1:
        e = gamma * xn
    thresh = key0 + 2.0 * (e + gamma * tl.abs(key0))
    rxn = tl.full([BM], 1.0, tl.float64)
    if metric == 1:
        rxn = tl.load(RXN + g64 * _pad16(N) + rows, mask=rmask, other=1.0)
    best_d = tl.full([BM], float("inf"), tl.float64)
    best_c = tl.full([BM], 0, tl.int32)
    for t in range(0, n_cand):  # the search keeps 4; its first n_cand are exactly the top-n_cand
        ct = tl.where(t == 0, i0, tl.where(t == 1, i1, tl.where(t == 2, i2, i3)))
        vt = tl.where(t == 0, v0, tl.where(t == 1, v1, tl.where(t == 2, v2, v3))).to(tl.float64)
        ok = rmask & (ct >= 0) & (ct < K) & (vt <= thresh)
        dt = _rescore64(X, C, RCN, xrow, ct, ok, D, stride_cn, rxn, metric, BM, BDX)
        better = ok & ((dt < best_d) | ((dt == best_d) & (ct < best_c)))
        best_d = tl.where(better, dt, best_d)
        best_c = tl.where(better, ct, best_c)
    last = n_cand - 1
    last_c = tl.where(last == 0, i0, tl.where(last == 1, i1, tl.where(last == 2, i2, i3)))
    last_v = tl.where(last == 0, v0, tl.where(last == 1, v1, tl.where(last == 2, v2, v3))).to(tl.float64)
    overflow = rmask & (last_c >= 0) & (last_c < K) & (last_v <= thresh)
    tl.store(CODES + rows, best_c.to(tl.int64), mask=rmask)
    tl.store(DIST + rows, best_d.to(acc_t), mask=rmask)
    tl.store(FLAG + rows, overflow.to(tl.int8), mask=rmask)


def rescan_kernel(X, C, RXN, RCN, CODES, DIST, FLAG, N, K, D, stride_xg, stride_xn, stride_cg, stride_cn, metric,
                  BM: tl.constexpr, BNR: tl.constexpr, BDR: tl.constexpr, GROUPED: tl.constexpr):
    """fp64 distance of each flagged row (rare: near-duplicate codes) to every code, one row at a time, in
    ``[BNR, BDR]`` tiles (runtime loops over codes and features): its minimum, ties to the lowest code. A block
    without flagged rows exits after one load. (Written out, not in helpers: the interpreter pays for every
    device-function call, and this loop runs once per flagged row.) Operands as :func:`exact_kernel`'s."""
    g, g64 = _group(GROUPED)
    pid = tl.program_id(0)
    X += g64 * stride_xg
    C += g64 * stride_cg
    RXN += g64 * _pad16(N)
    RCN += g64 * _pad16(K)
    CODES += g64 * N
    DIST += g64 * N
    FLAG += g64 * _pad16(N)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    flag = tl.load(FLAG + rows, mask=rmask, other=0)
    jj = tl.arange(0, BNR)
    dd = tl.arange(0, BDR)
    if tl.max(flag.to(tl.int32), 0) > 0:
        for r in range(0, BM):
            row = pid * BM + r
            if row < N:
                if tl.load(FLAG + row) != 0:
                    rxn = tl.full([], 1.0, tl.float64)
                    if metric == 1:
                        rxn = tl.load(RXN + row)
                    xrow = tl.cast(row, tl.int64) * stride_xn
                    best_d = tl.full([], float("inf"), tl.float64)
                    best_c = tl.full([], 2147483647, tl.int32)
                    for kb in range(0, K, BNR):
                        cols = kb + jj
                        cm = cols < K
                        crow = cols.to(tl.int64) * stride_cn
                        acc = tl.zeros([BNR], dtype=tl.float64)
                        for d0 in tl.range(0, D, BDR):
                            feat = d0 + dd
                            fm = feat < D
                            xa = tl.load(X + xrow + feat, mask=fm, other=0.0).to(tl.float64)
                            ca = tl.load(C + crow[:, None] + feat[None, :], mask=cm[:, None] & fm[None, :],
                                         other=0.0).to(tl.float64)
                            if metric == 0:  # l2 as sum (x - c)^2: no cancellation
                                diff = xa[None, :] - ca
                                acc += tl.sum(diff * diff, 1)
                            else:
                                acc += tl.sum(xa[None, :] * ca, 1)
                        dist = acc  # l2
                        if metric == 1:
                            dist = 1.0 - acc * rxn * tl.load(RCN + cols, mask=cm, other=1.0)
                        elif metric == 2:
                            dist = -acc
                        dist = tl.where(cm, dist, float("inf"))
                        v, j = tl.min(dist, 0, return_indices=True, return_indices_tie_break_left=True)
                        better = v < best_d  # strict: earlier (lower) code blocks win ties
                        best_d = tl.where(better, v, best_d)
                        best_c = tl.where(better, j + kb, best_c)
                    tl.store(CODES + row, best_c.to(tl.int64))
                    tl.store(DIST + row, best_d.to(DIST.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------------
# code_stats
# ---------------------------------------------------------------------------------------------------------------
def code_stats_kernel(
    X, CODES, SUMS, COUNTS, N, K, D, stride_xg, stride_xn,
    ACC_FP64: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, GROUPED: tl.constexpr,
):
    """Per-code sums ``SUMS [G, K, D]`` and counts ``COUNTS [G, K]`` of the rows ``X [G, N, D]`` (features
    contiguous) by ``CODES [G, N]`` (contiguous)."""
    g, g64 = _group(GROUPED)
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    X += g64 * stride_xg
    CODES += g64 * N
    SUMS += g64 * K * D
    COUNTS += g64 * K
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < N
    c = tl.load(CODES + rows, mask=rmask, other=-1)
    eq, first, cnt = _first_of_equal(c, rmask, BR)
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    dcols = pid_d * BD + tl.arange(0, BD)
    dm = dcols < D
    xa = tl.load(X + _rows64(rows, stride_xn)[:, None] + dcols[None, :], mask=rmask[:, None] & dm[None, :],
                 other=0.0).to(acc_t)
    # row i of eq @ x is the sum of the block's rows with row i's code: exact products (0/1 weights), "ieee" so
    # fp32 is not rounded to tf32
    sums = tl.dot(eq.to(acc_t), xa, input_precision="ieee", out_dtype=acc_t)
    safe_c = tl.where(first, c, 0)  # int64 codes: c * D cannot overflow
    tl.atomic_add(SUMS + safe_c[:, None] * D + dcols[None, :], sums, mask=first[:, None] & dm[None, :])
    if pid_d == 0:
        tl.atomic_add(COUNTS + safe_c, cnt.to(tl.int64), mask=first)


# ---------------------------------------------------------------------------------------------------------------
# Key terms
# ---------------------------------------------------------------------------------------------------------------
def sum_squares_kernel(C, SQ, K, D, stride_cg, stride_cn, BK: tl.constexpr, BD: tl.constexpr,
                       GROUPED: tl.constexpr):
    """``SQ[g, k] = sum_d C[g, k, d]^2`` (``SQ [G, pad16(K)]``, the pad columns written 0) in fp64 from the stored
    values (features contiguous): the code-norm term of every key (``vqkernels.numerics.key_terms`` turns it into
    (w, o) and the norms). BK is a multiple of 16, so the programs cover the pads."""
    g, g64 = _group(GROUPED)
    pid = tl.program_id(0)
    C += g64 * stride_cg
    SQ += g64 * _pad16(K)
    codes = pid * BK + tl.arange(0, BK)
    cm = codes < K
    crow = _rows64(codes, stride_cn)
    dd = tl.arange(0, BD)
    s = tl.zeros([BK], dtype=tl.float64)
    for d0 in tl.range(0, D, BD):
        feat = d0 + dd
        ca = tl.load(C + crow[:, None] + feat[None, :], mask=cm[:, None] & (feat < D)[None, :], other=0.0)
        ca = ca.to(tl.float64)
        s += tl.sum(ca * ca, 1)
    kp = K
    if GROUPED:
        kp = _pad16(K)  # the pads: 0 (masked loads), so their key terms are finite
    tl.store(SQ + codes, s, mask=codes < kp)


# ---------------------------------------------------------------------------------------------------------------
# Twins: one compiled variant for aligned operands, one for everything else.
# ---------------------------------------------------------------------------------------------------------------
def _twins(fn, always: list[str], layout_ints: list[str], layout_ptrs: list[str]):
    """``(aligned, any)`` kernels of ``fn``. Triton specialises every int argument on ``== 1`` and ``% 16 == 0``
    and every pointer on 16-byte alignment, so D, strides and data pointers alone would multiply the variants
    (each a compile of seconds). The launchers call ``aligned`` only when all of ``layout_ints`` are multiples of
    16 and all ``layout_ptrs`` 16-byte aligned (vectorised loads, cp.async pipelining), and ``any`` otherwise,
    which specialises on none of them: two variants per set of constexprs, whatever the shapes."""
    aligned = triton.jit(do_not_specialize=always)(fn)
    generic = triton.jit(do_not_specialize=always + layout_ints, do_not_specialize_on_alignment=layout_ptrs)(fn)
    aligned.vqk_layout, generic.vqk_layout = "aligned", "any"
    return aligned, generic


# The group strides are layout ints: a group's base is aligned when the tensor's is and its group stride is a
# multiple of 16 (2-D launches pass 0).
_LAYOUT = ["D", "stride_xg", "stride_xn", "stride_cg", "stride_cn"]
search_kernel, search_kernel_any = _twins(
    search_kernel, ["N", "K", "codes_per_split", "seed_row", "seed_col", "clamp", "group_base"], _LAYOUT, ["X", "C"])
finalize_kernel, finalize_kernel_any = _twins(
    finalize_kernel, ["N", "K", "S", "metric", "gather"], _LAYOUT, ["X", "C"])
exact_kernel, exact_kernel_any = _twins(exact_kernel, ["N", "K", "S", "metric", "n_cand"], _LAYOUT, ["X", "C"])
# the rare paths of exact mode: never specialised
rescan_kernel = triton.jit(do_not_specialize=["N", "K", "metric"] + _LAYOUT,
                           do_not_specialize_on_alignment=["X", "C"])(rescan_kernel)
gather_kernel = triton.jit(do_not_specialize=["N", "K", "D", "stride_cg", "stride_cn"],
                           do_not_specialize_on_alignment=["C", "ZQ"])(gather_kernel)
code_stats_kernel, code_stats_kernel_any = _twins(code_stats_kernel, ["N", "K"], ["D", "stride_xg", "stride_xn"],
                                                  ["X"])
# one pass over the codebook, negligible beside the search: never specialised
sum_squares_kernel = triton.jit(do_not_specialize=["K", "D", "stride_cg", "stride_cn"],
                                do_not_specialize_on_alignment=["C"])(sum_squares_kernel)

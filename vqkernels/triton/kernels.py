"""Triton kernels of the fused VQ ops (``@triton.jit`` only; launchers live in :mod:`vqkernels.triton.ops`).

- :func:`search_kernel`: a tile of BM rows stays in registers while a range of codes streams through in BN blocks;
  ``tl.dot`` produces the BM x BN dot products, the metric epilogue turns them into argmin keys and an online
  top-T keeps the best (key, index) per row (T = 1 for the fast path; ties go to the lowest index). A program
  covers one split of the codes (split-K); its top-T goes to a small ``[S, N, TP]`` partial buffer, never N x K.
  With ``SAMPLE`` the rows are codes and the "codes" are input rows, and the epilogue subtracts counter-based
  Gumbel noise keyed on (seed, code, row): the argmin is then a sample of ``softmax_i(-d(x_i, c_k))``
  (METHODS §1, CVQ's probrandom anchors).
- :func:`finalize_kernel`: merges the S partial lists of a row block, computes the distance, re-scores the
  candidates in fp64 for ``exact`` (and re-scans every code in fp64 for the rare rows with more candidates within
  the rounding bound than were kept), gathers ``z_q`` and adds the usage histogram.
- :func:`code_stats_kernel`: per-code sums and counts. Equal codes inside a block of rows are summed in registers
  first (an equality matrix times the rows), so each block issues one atomic per *distinct* code: full collapse
  costs N / BR atomics per element instead of N.

Argmin key of code k for row x (METHODS §1): ``w_k (x . c_k) + o_k`` with (w, o) = (-2, |c|^2) for l2,
(-1 / max(|c|, eps), 0) for cosine and (-1, 0) for dot; the per-row term of the distance is added back at the end.
"""

import triton
import triton.language as tl

L2: tl.constexpr = 0
COSINE: tl.constexpr = 1
DOT: tl.constexpr = 2
INT_MAX: tl.constexpr = 2147483647


# ---------------------------------------------------------------------------------------------------------------
# Counter-based Gumbel noise: the same 32-bit mixer as vqkernels.nn.cvq (_MIX_ROUNDS), on uint32.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _mix32(v):
    v = v ^ (v >> 17)
    v = v * tl.full(v.shape, 0xED5AD4BB, tl.uint32)
    v = v ^ (v >> 11)
    v = v * tl.full(v.shape, 0xAC4C1B51, tl.uint32)
    v = v ^ (v >> 15)
    v = v * tl.full(v.shape, 0x31848BAB, tl.uint32)
    return v ^ (v >> 14)


@triton.jit
def _gumbel(row_idx, col_idx, seed_row, seed_col, dtype: tl.constexpr):
    """Gumbel(0, 1) ``[BM, BN]`` keyed on (seed, search row, search column) as vqkernels.nn.cvq.gumbel_noise,
    where the search rows are the codes (``seed_row`` = the code seed) and the columns the input rows."""
    rk = _mix32(row_idx.to(tl.uint32) ^ seed_row.to(tl.uint32))
    ck = _mix32(col_idx.to(tl.uint32) ^ seed_col.to(tl.uint32))
    h = _mix32(rk[:, None] ^ ck[None, :])
    u = ((h >> 9).to(dtype) + 0.5) * 1.1920928955078125e-07  # (m + 1/2) 2^-23, in (0, 1)
    return -tl.log(-tl.log(u))


# ---------------------------------------------------------------------------------------------------------------
# Top-T lists: [BM, TP] (value, index) sorted ascending by (value, index); unused slots hold (inf, INT_MAX).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _block_topk(key, kb, BN: tl.constexpr, T: tl.constexpr, TP: tl.constexpr):
    """The T smallest keys of a ``[BM, BN]`` block whose column j is code ``kb + j``."""
    BM: tl.constexpr = key.shape[0]
    jj = tl.arange(0, BN)
    tcol = tl.arange(0, TP)
    cv = tl.full([BM, TP], float("inf"), key.dtype)
    ci = tl.full([BM, TP], INT_MAX, tl.int32)
    for t in tl.static_range(T):
        v, j = tl.min(key, 1, return_indices=True, return_indices_tie_break_left=True)
        cv = tl.where(tcol[None, :] == t, v[:, None], cv)
        ci = tl.where(tcol[None, :] == t, (j + kb)[:, None], ci)
        key = tl.where(jj[None, :] == j[:, None], float("inf"), key)
    return cv, ci


@triton.jit
def _merge_topk(rv, ri, cv, ci, T: tl.constexpr, TP: tl.constexpr):
    """The T smallest (value, index) pairs of two ``[BM, TP]`` lists (ties: lower index)."""
    BM: tl.constexpr = rv.shape[0]
    tcol = tl.arange(0, TP)
    ov = tl.full([BM, TP], float("inf"), rv.dtype)
    oi = tl.full([BM, TP], INT_MAX, tl.int32)
    for t in tl.static_range(T):
        r_min = tl.min(rv, 1)
        r_idx = tl.min(tl.where(rv == r_min[:, None], ri, INT_MAX), 1)
        c_min = tl.min(cv, 1)
        c_idx = tl.min(tl.where(cv == c_min[:, None], ci, INT_MAX), 1)
        take_r = (r_min < c_min) | ((r_min == c_min) & (r_idx <= c_idx))
        v = tl.where(take_r, r_min, c_min)
        i = tl.where(take_r, r_idx, c_idx)
        ov = tl.where(tcol[None, :] == t, v[:, None], ov)
        oi = tl.where(tcol[None, :] == t, i[:, None], oi)
        drop_r = take_r[:, None] & (ri == r_idx[:, None])
        drop_c = (~take_r)[:, None] & (ci == c_idx[:, None])
        rv = tl.where(drop_r, float("inf"), rv)
        ri = tl.where(drop_r, INT_MAX, ri)
        cv = tl.where(drop_c, float("inf"), cv)
        ci = tl.where(drop_c, INT_MAX, ci)
    return ov, oi


@triton.jit
def _column(v, t: tl.constexpr, TP: tl.constexpr, fill):
    """Column t of a ``[BM, TP]`` tensor as ``[BM]``."""
    return tl.max(tl.where(tl.arange(0, TP)[None, :] == t, v, fill), 1)


# ---------------------------------------------------------------------------------------------------------------
# The fused search.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def search_kernel(
    X, C, W, OFF, RS, RT, PV, PI,  # rows [N, D], codes [K, D], key terms [K], row terms [N] (sampling), partials
    N, K, stride_xn, stride_xd, stride_cn, stride_cd, codes_per_split, seed_row, seed_col,
    D: tl.constexpr, METRIC: tl.constexpr, T: tl.constexpr, TP: tl.constexpr, SAMPLE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    k_lo = pid_s * codes_per_split
    k_hi = tl.minimum(k_lo + codes_per_split, K)
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    dd = tl.arange(0, BD)
    ONE_D: tl.constexpr = D <= BD
    if ONE_D:  # the row tile is loaded once and stays in registers for every code block
        a_once = tl.load(X + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                         mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
        if UPCAST:
            a_once = a_once.to(tl.float32)
    if SAMPLE:
        rs = tl.load(RS + rows, mask=rmask, other=1.0).to(acc_t)
        rt = tl.load(RT + rows, mask=rmask, other=0.0).to(acc_t)
    best_v = tl.full([BM, TP], float("inf"), acc_t)
    best_i = tl.full([BM, TP], INT_MAX, tl.int32)
    for kb in range(k_lo, k_hi, BN):
        cols = kb + tl.arange(0, BN)
        cmask = cols < k_hi
        acc = tl.zeros([BM, BN], dtype=acc_t)
        if ONE_D:
            b = tl.load(C + cols[:, None] * stride_cn + dd[None, :] * stride_cd,
                        mask=cmask[:, None] & (dd[None, :] < D), other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            acc = tl.dot(a_once, tl.trans(b), acc, input_precision=PRECISION)
        else:
            for d0 in tl.static_range(0, D, BD):
                dm = (d0 + dd) < D
                a = tl.load(X + rows[:, None] * stride_xn + (d0 + dd)[None, :] * stride_xd,
                            mask=rmask[:, None] & dm[None, :], other=0.0)
                b = tl.load(C + cols[:, None] * stride_cn + (d0 + dd)[None, :] * stride_cd,
                            mask=cmask[:, None] & dm[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(acc_t)
        o = tl.load(OFF + cols, mask=cmask, other=0.0).to(acc_t)
        key = acc * w[None, :] + o[None, :]
        if SAMPLE:  # the full distance (its per-row part matters once noise is added), minus Gumbel noise
            key = key * rs[:, None] + rt[:, None]
            if METRIC == L2:
                key = tl.maximum(key, 0.0)
            key = key - _gumbel(rows, cols, seed_row, seed_col, acc_t)
        key = tl.where(cmask[None, :], key, float("inf"))
        if T == 1:
            v, j = tl.min(key, 1, return_indices=True, return_indices_tie_break_left=True)
            better = v[:, None] < best_v  # strict: earlier (lower) codes win ties
            best_v = tl.where(better, v[:, None], best_v)
            best_i = tl.where(better, (j + kb)[:, None], best_i)
        else:
            cv, ci = _block_topk(key, kb, BN, T, TP)
            best_v, best_i = _merge_topk(best_v, best_i, cv, ci, T, TP)
    tcol = tl.arange(0, TP)
    off = (pid_s * N + rows)[:, None] * TP + tcol[None, :]
    tl.store(PV + off, best_v, mask=rmask[:, None])
    tl.store(PI + off, best_i, mask=rmask[:, None])


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
def _rescore64(X, C, rows, rmask, codes, cmask, stride_xn, stride_xd, stride_cn, stride_cd, xn64,
               D: tl.constexpr, METRIC: tl.constexpr, BD: tl.constexpr):
    """fp64 distance of each row to one code per row, from the stored values (METHODS §1 exact mode)."""
    dd = tl.arange(0, BD)
    s = tl.zeros([rows.shape[0]], dtype=tl.float64)
    cn = tl.zeros([rows.shape[0]], dtype=tl.float64)
    for d0 in tl.static_range(0, D, BD):
        dm = (d0 + dd) < D
        xa = tl.load(X + rows[:, None] * stride_xn + (d0 + dd)[None, :] * stride_xd,
                     mask=rmask[:, None] & dm[None, :], other=0.0).to(tl.float64)
        ca = tl.load(C + codes[:, None] * stride_cn + (d0 + dd)[None, :] * stride_cd,
                     mask=cmask[:, None] & dm[None, :], other=0.0).to(tl.float64)
        if METRIC == L2:
            s += tl.sum((xa - ca) * (xa - ca), 1)
        else:
            s += tl.sum(xa * ca, 1)
            cn += tl.sum(ca * ca, 1)
    if METRIC == L2:
        return s
    if METRIC == DOT:
        return -s
    return 1.0 - s / (tl.maximum(xn64, 1e-12) * tl.maximum(tl.sqrt(cn), 1e-12))


@triton.jit
def finalize_kernel(
    X, C, PV, PI, CMAX, CODES, DIST, ZQ, COUNTS,
    N, K, S, stride_xn, stride_xd, stride_cn, stride_cd, gamma,
    D: tl.constexpr, METRIC: tl.constexpr, T: tl.constexpr, TP: tl.constexpr, EXACT: tl.constexpr,
    GATHER: tl.constexpr, ACC_FP64: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BNR: tl.constexpr,
    BDR: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    tcol = tl.arange(0, TP)
    # merge the splits (split s holds codes before split s + 1: ties keep the earlier split)
    bv = tl.full([BM, TP], float("inf"), acc_t)
    bi = tl.full([BM, TP], INT_MAX, tl.int32)
    for s in range(0, S):
        off = (s * N + rows)[:, None] * TP + tcol[None, :]
        pv = tl.load(PV + off, mask=rmask[:, None], other=float("inf"))
        pi = tl.load(PI + off, mask=rmask[:, None], other=INT_MAX)
        if T == 1:
            better = pv < bv
            bv = tl.where(better, pv, bv)
            bi = tl.where(better, pi, bi)
        else:
            bv, bi = _merge_topk(bv, bi, pv, pi, T, TP)
    key0 = _column(bv, 0, TP, -float("inf"))
    code = _column(bi, 0, TP, -1)
    # |x|^2 per row
    dd = tl.arange(0, BD)
    xsq = tl.zeros([BM], dtype=tl.float64 if EXACT else acc_t)
    for d0 in tl.static_range(0, D, BD):
        dm = (d0 + dd) < D
        xa = tl.load(X + rows[:, None] * stride_xn + (d0 + dd)[None, :] * stride_xd,
                     mask=rmask[:, None] & dm[None, :], other=0.0).to(xsq.dtype)
        xsq += tl.sum(xa * xa, 1)
    if EXACT:
        xn = tl.sqrt(xsq)
        cmax = tl.load(CMAX)
        if METRIC == L2:
            e = gamma * (2.0 * xn * cmax + cmax * cmax)
        elif METRIC == COSINE:
            e = gamma * xn
        else:
            e = gamma * xn * cmax
        e += gamma * tl.abs(key0.to(tl.float64))
        thresh = key0.to(tl.float64) + 2.0 * e
        best_d = tl.full([BM], float("inf"), tl.float64)
        best_c = tl.full([BM], INT_MAX, tl.int32)
        for t in tl.static_range(T):
            ct = _column(bi, t, TP, -1)
            vt = _column(bv, t, TP, -float("inf")).to(tl.float64)
            ok = rmask & (ct < K) & (vt <= thresh)
            dt = _rescore64(X, C, rows, rmask, ct, ok, stride_xn, stride_xd, stride_cn, stride_cd, xn,
                            D, METRIC, BD)
            better = ok & ((dt < best_d) | ((dt == best_d) & (ct < best_c)))
            best_d = tl.where(better, dt, best_d)
            best_c = tl.where(better, ct, best_c)
        last_c = _column(bi, T - 1, TP, -1)
        last_v = _column(bv, T - 1, TP, -float("inf")).to(tl.float64)
        overflow = rmask & (last_c < K) & (last_v <= thresh)
        if tl.max(overflow.to(tl.int32), 0) > 0:
            # more codes within the bound than were kept: re-score every code of those rows in fp64
            jj = tl.arange(0, BNR)
            de = tl.arange(0, BDR)
            for kb in range(0, K, BNR):
                cols = kb + jj
                cm = cols < K
                s_ = tl.zeros([BM, BNR], dtype=tl.float64)
                cn = tl.zeros([BNR], dtype=tl.float64)
                for d0 in tl.static_range(0, D, BDR):
                    dm = (d0 + de) < D
                    xa = tl.load(X + rows[:, None] * stride_xn + (d0 + de)[None, :] * stride_xd,
                                 mask=overflow[:, None] & dm[None, :], other=0.0).to(tl.float64)
                    ca = tl.load(C + cols[:, None] * stride_cn + (d0 + de)[None, :] * stride_cd,
                                 mask=cm[:, None] & dm[None, :], other=0.0).to(tl.float64)
                    if METRIC == L2:
                        diff = xa[:, None, :] - ca[None, :, :]
                        s_ += tl.sum(diff * diff, 2)
                    else:
                        s_ += tl.sum(xa[:, None, :] * ca[None, :, :], 2)
                        cn += tl.sum(ca * ca, 1)
                if METRIC == DOT:
                    s_ = -s_
                elif METRIC == COSINE:
                    s_ = 1.0 - s_ / (tl.maximum(xn, 1e-12)[:, None] * tl.maximum(tl.sqrt(cn), 1e-12)[None, :])
                s_ = tl.where(cm[None, :], s_, float("inf"))
                v, j = tl.min(s_, 1, return_indices=True, return_indices_tie_break_left=True)
                take = overflow & ((v < best_d) | ((v == best_d) & (j + kb < best_c)) | (kb == 0))
                best_d = tl.where(take, v, best_d)
                best_c = tl.where(take, j + kb, best_c)
        code = best_c
        dist = best_d.to(acc_t)
    else:
        if METRIC == L2:
            dist = tl.maximum(xsq + key0, 0.0)
        elif METRIC == COSINE:
            dist = 1.0 + key0 / tl.maximum(tl.sqrt(xsq), 1e-12)
        else:
            dist = key0
    tl.store(CODES + rows, code.to(tl.int64), mask=rmask)
    tl.store(DIST + rows, dist, mask=rmask)
    if GATHER:
        for d0 in tl.static_range(0, D, BD):
            dm = (d0 + dd) < D
            m2 = rmask[:, None] & dm[None, :]
            zq = tl.load(C + code[:, None] * stride_cn + (d0 + dd)[None, :] * stride_cd, mask=m2, other=0.0)
            tl.store(ZQ + rows[:, None] * D + (d0 + dd)[None, :], zq, mask=m2)
        _, first, cnt = _first_of_equal(code, rmask, BM)
        tl.atomic_add(COUNTS + code, cnt.to(tl.int64), mask=first)


# ---------------------------------------------------------------------------------------------------------------
# code_stats
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def code_stats_kernel(
    X, CODES, SUMS, COUNTS, N, stride_xn, stride_xd,
    D: tl.constexpr, ACC_FP64: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < N
    c = tl.load(CODES + rows, mask=rmask, other=-1)
    eq, first, cnt = _first_of_equal(c, rmask, BR)
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    dcols = pid_d * BD + tl.arange(0, BD)
    dm = dcols < D
    xa = tl.load(X + rows[:, None] * stride_xn + dcols[None, :] * stride_xd,
                 mask=rmask[:, None] & dm[None, :], other=0.0).to(acc_t)
    # row i of eq @ x is the sum of the block's rows with row i's code: exact products (0/1 weights), "ieee" so
    # fp32 is not rounded to tf32
    sums = tl.dot(eq.to(acc_t), xa, input_precision="ieee")
    tl.atomic_add(SUMS + c[:, None] * D + dcols[None, :], sums, mask=first[:, None] & dm[None, :])
    if pid_d == 0:
        tl.atomic_add(COUNTS + c, cnt.to(tl.int64), mask=first)

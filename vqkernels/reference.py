"""Pure-PyTorch reference of the four ops (README "Method" §1): the ground truth of every test and the
last-resort backend (``backend="torch"``, ops ``vqkernels::<op>_ref``).

It runs on any device and dtype (fp64 included) and is chunked over rows so that it never holds more than a
bounded ``rows x K`` block (``CHUNK_ELEMS`` elements), never the whole N x K matrix. Low-precision inputs
(bf16/fp16) are upcast to fp32 before the matmul: products of such values are exact in fp32, so this is fp32
accumulation, as the fused kernels do. Keys, bounds and noise come from :mod:`vqkernels.numerics`, as in every
other backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

# EXACT_SAFETY, sum_squares, unit_roundoff and exact_distance (now paired_distances) lived here before
# vqkernels.numerics held them; they stay importable from here.
from .numerics import (  # noqa: F401
    CHUNK_ELEMS,
    COS_EPS,
    EXACT_SAFETY,
    acc_dtype,
    check_finite,
    exact_gamma,
    gumbel_from_keys,
    index_keys,
    key_error_bound,
    key_terms,
    paired_distances,
    seed_from_schema,
    sum_squares,
    unit_roundoff,
)
from .numerics import paired_distances as exact_distance  # noqa: F401

__all__ = ["search", "quantize", "code_stats", "sample"]

# The batched form of every op (a leading group axis G, group g against its own codebook; README "Method" §1.6) is
# a loop over groups here: the reference is the definition, not a fast path.


def _per_group(fn, *args):
    """Stack ``fn`` over the leading group axis of the tensor arguments (the others are passed as they are)."""
    g = next(a for a in args if isinstance(a, Tensor)).shape[0]
    outs = [fn(*(a[i] if isinstance(a, Tensor) else a for a in args)) for i in range(g)]
    if isinstance(outs[0], Tensor):
        return torch.stack(outs)
    return tuple(torch.stack(parts) for parts in zip(*outs))


def search(x: Tensor, codebook: Tensor, metric: str = "l2", exact: bool = False) -> tuple[Tensor, Tensor]:
    """Nearest code of every row. ``x [N, D]``, ``codebook [K, D]`` -> ``(codes int64 [N], dist [N])``.

    ``dist`` is fp32 (fp64 for fp64 inputs). Ties go to the lowest index. With ``exact=True`` every code whose
    fast key lies within the rounding bound of the row minimum is re-scored in fp64 (all of them: the reference
    needs no candidate limit), so the result equals the fp64 brute-force argmin.
    """
    check_finite(codebook, "codebook")
    check_finite(x, "x")
    if x.dim() == 3:
        if x.shape[0] == 0:
            acc = acc_dtype(x.dtype)
            return x.new_empty(0, x.shape[1], dtype=torch.int64), x.new_empty(0, x.shape[1], dtype=acc)
        return _per_group(search, x, codebook, metric, exact)
    n, d = x.shape
    k = codebook.shape[0]
    acc = acc_dtype(x.dtype)
    codes = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=acc, device=x.device)
    if n == 0:
        return codes, dist
    w, o, cnorm = key_terms(codebook, metric)
    cmax = float(cnorm.max())
    gamma = exact_gamma(d, x.dtype)
    ca = codebook.to(acc)
    rows = max(1, CHUNK_ELEMS // k)
    for r0 in range(0, n, rows):
        xc = x[r0 : r0 + rows]
        x64 = xc.to(torch.float64)
        xsq = (x64 * x64).sum(1)  # the row term of l2: a sum of squares, as the code terms
        del x64
        xnorm = xsq.sqrt()
        key = torch.addcmul(o, xc.to(acc) @ ca.T, w)  # w * dot + o, [rows, K]
        idx = key.argmin(1)
        best = key.gather(1, idx[:, None]).squeeze(1)
        if exact:
            best64 = best.to(torch.float64)
            thresh = best64 + 2.0 * key_error_bound(metric, xnorm, cmax, best64, gamma)
            rr, kk = torch.nonzero(key.to(torch.float64) <= thresh[:, None], as_tuple=True)
            del key
            d64 = torch.empty(rr.shape[0], dtype=torch.float64, device=x.device)
            step = max(1, CHUNK_ELEMS // max(d, 1))
            for p0 in range(0, rr.shape[0], step):
                r_, k_ = rr[p0 : p0 + step], kk[p0 : p0 + step]
                d64[p0 : p0 + step] = paired_distances(xc[r_], codebook[k_], metric, xnorm[r_], cnorm[k_])
            m = xc.shape[0]
            dmin = torch.full((m,), float("inf"), dtype=torch.float64, device=x.device)
            dmin.scatter_reduce_(0, rr, d64, reduce="amin")
            at_min = d64 == dmin[rr]
            kmin = torch.full((m,), k, dtype=torch.int64, device=x.device)
            kmin.scatter_reduce_(0, rr[at_min], kk[at_min], reduce="amin")
            codes[r0 : r0 + rows] = kmin
            dist[r0 : r0 + rows] = dmin.to(acc)
        else:
            codes[r0 : r0 + rows] = idx
            if metric == "l2":
                dist[r0 : r0 + rows] = (xsq.to(acc) + best).clamp_min(0)
            elif metric == "cosine":
                dist[r0 : r0 + rows] = 1.0 + best / xnorm.clamp_min(COS_EPS).to(acc)
            else:
                dist[r0 : r0 + rows] = best
    return codes, dist


def quantize(
    x: Tensor, codebook: Tensor, metric: str = "l2", exact: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`search` plus ``z_q = codebook[codes]`` (``[N, D]``) and usage ``counts`` (int64 ``[K]``).

    Returns ``(codes, z_q, dist, counts)``.
    """
    if x.dim() == 3:
        if x.shape[0] == 0:
            codes, dist = search(x, codebook, metric, exact)
            k, d = codebook.shape[1:]
            return codes, codebook.new_empty(0, x.shape[1], d), dist, codes.new_zeros(0, k)
        return _per_group(quantize, x, codebook, metric, exact)
    codes, dist = search(x, codebook, metric, exact)
    z_q = codebook.index_select(0, codes)
    counts = torch.bincount(codes, minlength=codebook.shape[0])
    return codes, z_q, dist, counts


def code_stats(x: Tensor, codes: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Per-code sum of assigned rows (``[K, D]``, fp32; fp64 for fp64 x) and counts (int64 ``[K]``); batched
    ``x [G, N, D]``, ``codes [G, N]`` -> ``[G, K, D]``, ``[G, K]``."""
    if x.dim() == 3:
        if x.shape[0] == 0:
            acc = acc_dtype(x.dtype)
            return x.new_zeros(0, num_codes, x.shape[2], dtype=acc), codes.new_zeros(0, num_codes)
        return _per_group(code_stats, x, codes, num_codes)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        bad = codes[(codes < 0) | (codes >= num_codes)][0].item()
        raise ValueError(f"codes must lie in [0, num_codes = {num_codes}); found {bad}")
    acc = acc_dtype(x.dtype)
    sums = torch.zeros(num_codes, x.shape[1], dtype=acc, device=x.device)
    sums.index_add_(0, codes, x.to(acc))
    counts = torch.bincount(codes, minlength=num_codes)
    return sums, counts


def sample(x: Tensor, codebook: Tensor, metric: str, seed: int, code_offset: int = 0) -> Tensor:
    """Per code k a row ``argmin_i (d(x_i, c_k) - g(seed, k, i))``: a draw of ``P(i) ~ exp(-d(x_i, c_k))``
    (Gumbel-max; ``g`` the counter-based noise of :func:`vqkernels.numerics.gumbel_noise`). ``x [N >= 1, D]``,
    ``codebook [K, D]``, ``seed`` the signed int64 of :func:`vqkernels.numerics.seed_to_schema` -> int64 ``[K]``.

    The keys are those of the fused kernels with the roles of rows and codes swapped, plus the per-code part of the
    distance: l2 ``max(|x|^2 - 2 x.c + |c|^2, 0)``, cosine ``-x.c / (max(|x|, eps) max(|c|, eps))`` (the distance
    less its constant 1), dot ``-x.c``. Walked in ``codes x rows`` blocks of at most ``CHUNK_ELEMS`` elements; ties
    go to the lowest row. ``code_offset``: the codes are keyed as codes ``code_offset .. code_offset + K - 1``.

    Batched (``x [G, N, D]``, ``codebook [G, K, D]`` -> ``[G, K]``): group g keys its codes as ``g * K + k``.
    """
    check_finite(codebook, "codebook")
    check_finite(x, "x")
    if x.dim() == 3:
        kk = codebook.shape[1]
        if x.shape[0] == 0:
            return codebook.new_empty(0, kk, dtype=torch.int64)
        return torch.stack([sample(x[g], codebook[g], metric, seed, g * kk) for g in range(x.shape[0])])
    n, k = x.shape[0], codebook.shape[0]
    if n == 0:
        raise ValueError("x must hold at least one row to sample from; got N = 0")
    s_code, s_row = seed_from_schema(seed)
    acc = acc_dtype(x.dtype)
    dev = x.device
    # the rows play the codes (their key terms w, o), and the codes add their factor and term of the distance:
    # 1 / max(|c|, eps) for cosine (-w of the codes), |c|^2 for l2 (o of the codes)
    w, o, _ = key_terms(x, metric)
    wc, oc, _ = key_terms(codebook, metric)
    ones, zeros = torch.ones(k, dtype=acc, device=dev), torch.zeros(k, dtype=acc, device=dev)
    rs = -wc if metric == "cosine" else ones
    rt = oc if metric == "l2" else zeros
    xa, ca = x.to(acc), codebook.to(acc)
    row_keys = index_keys(torch.arange(n, device=dev), s_row)
    code_keys = index_keys(torch.arange(code_offset, code_offset + k, device=dev), s_code)
    out = torch.empty(k, dtype=torch.int64, device=dev)
    kb = min(k, max(1, CHUNK_ELEMS // n))
    rb = min(n, max(1, CHUNK_ELEMS // kb))
    for k0 in range(0, k, kb):
        c = ca[k0 : k0 + kb]
        best = torch.full((c.shape[0],), float("inf"), dtype=acc, device=dev)
        arg = torch.zeros(c.shape[0], dtype=torch.int64, device=dev)
        for r0 in range(0, n, rb):
            key = torch.addcmul(o[r0 : r0 + rb], c @ xa[r0 : r0 + rb].T, w[r0 : r0 + rb])  # [codes, rows]
            key = torch.addcmul(rt[k0 : k0 + kb, None], key, rs[k0 : k0 + kb, None])
            if metric == "l2":
                key.clamp_min_(0)
            key -= gumbel_from_keys(code_keys[k0 : k0 + kb], row_keys[r0 : r0 + rb], acc)
            val, idx = key.min(1)  # first minimum within the block
            better = val < best  # strict: earlier blocks (lower rows) win ties
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + r0, arg)
        out[k0 : k0 + kb] = arg
    return out


# ---------------------------------------------------------------------------------------------------------------
# The reference backend's ops (fakes and autograd: vqkernels.ops, from the backend table).
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("vqkernels::nearest_code_ref", mutates_args=())
def nearest_code_ref(x: Tensor, codebook: Tensor, metric: str, exact: bool) -> tuple[Tensor, Tensor]:
    return search(x, codebook, metric, exact)


@torch.library.custom_op("vqkernels::quantize_ref", mutates_args=())
def quantize_ref(x: Tensor, codebook: Tensor, metric: str, exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    codes, z_q, dist, counts = quantize(x, codebook, metric, exact)
    return codes, z_q.clone(), dist, counts  # outputs may not alias inputs (z_q of an N=K identity gather)


@torch.library.custom_op("vqkernels::code_stats_ref", mutates_args=())
def code_stats_ref(x: Tensor, codes: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    return code_stats(x, codes, num_codes)


@torch.library.custom_op("vqkernels::sample_code_ref", mutates_args=())
def sample_code_ref(x: Tensor, codebook: Tensor, metric: str, seed: int) -> Tensor:
    return sample(x, codebook, metric, seed)

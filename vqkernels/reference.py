"""Pure-PyTorch reference of the ops (METHODS §1): the ground truth of every test and the last-resort backend.

Works on any device and dtype (fp64 included). It is chunked over rows so that it never holds more than a
bounded ``rows x K`` block (``CHUNK_ELEMS`` elements), never the whole N x K matrix.

Low-precision inputs (bf16/fp16) are upcast to fp32 before the matmul: products of such values are exact in fp32,
so this is fp32 accumulation, as the fused kernels do.
"""

from __future__ import annotations

import torch

COS_EPS = 1e-12
CHUNK_ELEMS = 1 << 22  # rows x K elements per chunk (16 MiB of fp32)
EXACT_SAFETY = 2.0  # multiplies the classic gamma_D dot-product error bound


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / distance dtype: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def check_finite(t: torch.Tensor, name: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf)")


def sum_squares(codebook: torch.Tensor) -> torch.Tensor:
    """``s_k = sum_d c_kd^2`` in fp64 from the values as stored (``[K]``), in chunks: never an fp64 copy of the
    whole codebook."""
    k, d = codebook.shape
    sq = torch.empty(k, dtype=torch.float64, device=codebook.device)
    step = max(1, CHUNK_ELEMS // max(d, 1))
    for k0 in range(0, k, step):
        c = codebook[k0:k0 + step].to(torch.float64)
        sq[k0:k0 + step] = (c * c).sum(1)
    return sq


def key_terms(codebook: torch.Tensor, metric: str,
              sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-code terms of the argmin key ``w * (x . c) + o`` and the fp64 code norms: the one definition every
    backend follows.

    ``s_k = sum_d c_kd^2`` in fp64 (:func:`sum_squares`, or ``sq`` when a kernel computed it), ``cnorm_k =
    sqrt(s_k)``, and, rounded once to the accumulation dtype: l2 ``(w, o) = (-2, s_k)``, cosine
    ``(-1 / max(cnorm_k, eps), 0)``, dot ``(-1, 0)``. ``o`` is the sum of squares, not a rounded norm squared, so
    equidistant codes of exactly representable data (integers, say) get equal keys and the tie goes to the lower
    index.

    Returns ``(w [K], o [K], cnorm64 [K])`` with w, o in the accumulation dtype.
    """
    if metric not in ("l2", "cosine", "dot"):
        raise ValueError(f"metric must be one of 'l2', 'cosine', 'dot'; got {metric!r}")
    acc = acc_dtype(codebook.dtype)
    sq = sum_squares(codebook) if sq is None else sq
    cnorm = sq.sqrt()
    if metric == "l2":
        w, o = torch.full_like(sq, -2.0), sq
    elif metric == "cosine":
        w, o = -1.0 / cnorm.clamp_min(COS_EPS), torch.zeros_like(sq)
    else:
        w, o = torch.full_like(sq, -1.0), torch.zeros_like(sq)
    return w.to(acc), o.to(acc), cnorm


def exact_distance(x: torch.Tensor, c: torch.Tensor, metric: str, xnorm: torch.Tensor | None = None,
                   cnorm: torch.Tensor | None = None) -> torch.Tensor:
    """fp64 distance between paired rows ``x [P, D]`` and ``c [P, D]`` from the original values (``[P]``).

    l2 is ``sum((x - c)^2)`` (no cancellation), cosine ``1 - x.c / (max(|x|, eps) max(|c|, eps))``, dot ``-x.c``.
    """
    x = x.to(torch.float64)
    c = c.to(torch.float64)
    if metric == "l2":
        return ((x - c) ** 2).sum(1)
    dot = (x * c).sum(1)
    if metric == "dot":
        return -dot
    xn = x.norm(dim=1) if xnorm is None else xnorm
    cn = c.norm(dim=1) if cnorm is None else cnorm
    return 1.0 - dot / (xn.clamp_min(COS_EPS) * cn.clamp_min(COS_EPS))


def _error_bound(metric: str, xnorm: torch.Tensor, cmax: float, best: torch.Tensor, D: int, u: float):
    """Per-row bound on the rounding error of a fast key (same formula as csrc/cpu/search.cpp)."""
    gamma = EXACT_SAFETY * (D + 4) * u
    if metric == "l2":
        e = gamma * (2.0 * xnorm * cmax + cmax * cmax)
    elif metric == "cosine":
        e = gamma * xnorm
    else:
        e = gamma * xnorm * cmax
    return e + gamma * best.abs()


def search(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", exact: bool = False):
    """Nearest code of every row. ``x [N, D]``, ``codebook [K, D]`` -> ``(codes int64 [N], dist [N])``.

    ``dist`` is fp32 (fp64 for fp64 inputs). Ties go to the lowest index. With ``exact=True`` every code whose
    fast key lies within the rounding bound of the row minimum is re-scored in fp64, so the result equals the fp64
    brute-force argmin.
    """
    check_finite(codebook, "codebook")
    check_finite(x, "x")
    N, D = x.shape
    K = codebook.shape[0]
    acc = acc_dtype(x.dtype)
    codes = torch.empty(N, dtype=torch.int64, device=x.device)
    dist = torch.empty(N, dtype=acc, device=x.device)
    if N == 0:
        return codes, dist
    w, o, cnorm = key_terms(codebook, metric)
    cmax = float(cnorm.max())
    ca = codebook.to(acc)
    rows = max(1, CHUNK_ELEMS // K)
    u = unit_roundoff(acc)
    for r0 in range(0, N, rows):
        xc = x[r0:r0 + rows]
        x64 = xc.to(torch.float64)
        xsq = (x64 * x64).sum(1)  # the row term of l2: a sum of squares, as the code terms
        del x64
        xnorm = xsq.sqrt()
        key = torch.addcmul(o, xc.to(acc) @ ca.T, w)  # w * dot + o, [rows, K]
        idx = key.argmin(1)
        best = key.gather(1, idx[:, None]).squeeze(1)
        if exact:
            bound = _error_bound(metric, xnorm, cmax, best.to(torch.float64), D, u)
            thresh = best.to(torch.float64) + 2.0 * bound
            rr, kk = torch.nonzero(key.to(torch.float64) <= thresh[:, None], as_tuple=True)
            del key
            d = torch.empty(rr.shape[0], dtype=torch.float64, device=x.device)
            step = max(1, (1 << 22) // max(D, 1))
            for p0 in range(0, rr.shape[0], step):
                r_, k_ = rr[p0:p0 + step], kk[p0:p0 + step]
                d[p0:p0 + step] = exact_distance(xc[r_], codebook[k_], metric, xnorm[r_], cnorm[k_])
            m = xc.shape[0]
            dmin = torch.full((m,), float("inf"), dtype=torch.float64, device=x.device)
            dmin.scatter_reduce_(0, rr, d, reduce="amin")
            at_min = d == dmin[rr]
            kmin = torch.full((m,), K, dtype=torch.int64, device=x.device)
            kmin.scatter_reduce_(0, rr[at_min], kk[at_min], reduce="amin")
            codes[r0:r0 + rows] = kmin
            dist[r0:r0 + rows] = dmin.to(acc)
        else:
            codes[r0:r0 + rows] = idx
            if metric == "l2":
                dist[r0:r0 + rows] = (xsq.to(acc) + best).clamp_min(0)
            elif metric == "cosine":
                dist[r0:r0 + rows] = 1.0 + best / xnorm.clamp_min(COS_EPS).to(acc)
            else:
                dist[r0:r0 + rows] = best
    return codes, dist


def quantize(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", exact: bool = False):
    """``search`` plus ``z_q = codebook[codes]`` (``[N, D]``) and usage ``counts`` (int64 ``[K]``).

    Returns ``(codes, z_q, dist, counts)``.
    """
    codes, dist = search(x, codebook, metric, exact)
    z_q = codebook.index_select(0, codes)
    counts = torch.bincount(codes, minlength=codebook.shape[0])
    return codes, z_q, dist, counts


def code_stats(x: torch.Tensor, codes: torch.Tensor, num_codes: int):
    """Per-code sum of assigned rows (``[K, D]``, fp32; fp64 for fp64 x) and counts (int64 ``[K]``)."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        bad = codes[(codes < 0) | (codes >= num_codes)][0].item()
        raise ValueError(f"codes must lie in [0, num_codes = {num_codes}); found {bad}")
    acc = acc_dtype(x.dtype)
    sums = torch.zeros(num_codes, x.shape[1], dtype=acc, device=x.device)
    sums.index_add_(0, codes, x.to(acc))
    counts = torch.bincount(codes, minlength=num_codes)
    return sums, counts

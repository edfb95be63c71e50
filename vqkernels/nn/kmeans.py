"""k-means on the fused ops (README "Method" §2.5): k-means++ seeding and Lloyd iterations.

Every assignment is a :func:`vqkernels.nearest_code` search and every centroid update a
:func:`vqkernels.code_stats` reduction, so nothing here ever holds an N x K matrix: the extra memory is O(N + K·D)
on top of one working copy of ``x`` (in the accumulation dtype: fp32, or fp64 for fp64 inputs).

``metric="l2"`` is ordinary k-means on squared Euclidean distances. ``metric="cosine"`` is *spherical* k-means
(Dhillon & Modha 2001): rows are compared by angle, the centroids are the unit-normalised means of the
unit-normalised rows assigned to them, the returned centroids have unit norm (zero for a cluster of zero rows), and
the inertia is ``sum_i (1 - cos(x_i, c_{code_i}))`` (half the squared Euclidean distance between the unit vectors).
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import torch
from torch import Generator, Tensor

from ..ops import (
    COS_EPS,
    acc_dtype,
    check_finite,
    code_stats,
    distances,
    nearest_code,
    paired_distances,
    resolve_backend,
)

__all__ = ["KMeansResult", "kmeans", "kmeans_plusplus"]

KMEANS_METRICS = ("l2", "cosine")
NOISE_SCALE = 1e-3  # relative size of the jitter that separates duplicated seeds / centroids
_CHUNK_ELEMS = 1 << 22  # rows x D elements per chunk of the direct fp64 inertia


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans`.

    centroids ``[K, D]`` in ``x.dtype`` (unit rows for ``metric="cosine"``).
    codes     int64 ``[N]``: index of the nearest centroid of every row (ties -> lowest index).
    inertia   python float (fp64): sum over rows of the distance to the assigned centroid (squared Euclidean for
              l2, ``1 - cos`` for cosine).
    iterations number of Lloyd iterations run (0 when only seeding happened: ``iters=0`` or ``K >= N``).
    """

    centroids: Tensor
    codes: Tensor
    inertia: float
    iterations: int


# ---------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------
def _check_common(x: object, num_codes: object, metric: str, generator: object, backend: str) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [N, D]; got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor; got {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must have N >= 1 rows and D >= 1 columns; got shape {tuple(x.shape)}")
    check_finite(x, "x")
    if isinstance(num_codes, bool):
        raise TypeError("num_codes must be an int; got bool")
    try:
        k = operator.index(num_codes)
    except TypeError:
        raise TypeError(f"num_codes must be an int; got {type(num_codes).__name__}") from None
    if k < 1:
        raise ValueError(f"num_codes must be >= 1; got {k}")
    if metric not in KMEANS_METRICS:
        raise ValueError(f"metric must be one of {KMEANS_METRICS}; got {metric!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    resolve_backend(backend, x.device)  # raises for an unknown / unavailable backend
    return k


def _acc(x: Tensor) -> Tensor:
    """Working copy: fp64 for fp64 inputs, else fp32 (exact for bf16/fp16), contiguous."""
    return x.detach().to(acc_dtype(x.dtype)).contiguous()


def _unit(t: Tensor) -> Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(COS_EPS)


# ---------------------------------------------------------------------------------------------------------------
# randomness (drawn on the generator's device so that a CPU generator works for CUDA inputs too)
# ---------------------------------------------------------------------------------------------------------------
def _multinomial(weights: Tensor, n: int, generator: torch.Generator | None, replacement: bool = False) -> Tensor:
    dev = weights.device if generator is None else generator.device
    idx = torch.multinomial(weights.to(dev), n, replacement=replacement, generator=generator)
    return idx.to(weights.device)


def _randint(high: int, n: int, generator: Generator | None, device: torch.device) -> Tensor:
    dev = device if generator is None else generator.device
    return torch.randint(high, (n,), generator=generator, device=dev).to(device)


def _randperm(n: int, generator: Generator | None, device: torch.device) -> Tensor:
    dev = device if generator is None else generator.device
    return torch.randperm(n, generator=generator, device=dev).to(device)


def _randn(shape: tuple[int, ...] | torch.Size, generator: Generator | None, like: Tensor) -> Tensor:
    dev = like.device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _noise_scale(xs: Tensor) -> Tensor:
    """Per-dimension scale ``[D]`` of the data: its std, or the RMS entry where a dimension is constant."""
    std = xs.std(dim=0, unbiased=False) if xs.shape[0] > 1 else torch.zeros_like(xs[0])
    rms = xs.pow(2).mean().sqrt()
    fallback = torch.where(rms > 0, rms, torch.ones_like(rms))
    return torch.where(std > 0, std, fallback)


def _duplicates(c: Tensor) -> Tensor:
    """Bool ``[K]``: rows equal to an earlier row."""
    _, inv = torch.unique(c.float() if c.dtype != torch.float64 else c, dim=0, return_inverse=True)
    pos = torch.arange(c.shape[0], device=c.device)
    first = torch.full((int(inv.max()) + 1,), c.shape[0], dtype=torch.int64, device=c.device)
    first.scatter_reduce_(0, inv, pos, reduce="amin")
    return pos != first[inv]


def _make_distinct(
    c: Tensor, out_dtype: torch.dtype, scale: Tensor, generator: Generator | None, spherical: bool, max_tries: int = 30
) -> bool:
    """Jitter (in place) the rows of ``c`` that equal an earlier row once rounded to ``out_dtype``.

    The jitter is ``1e-3 · scale`` per dimension, at least two units in the last place of ``out_dtype`` so that it
    survives the rounding, doubled on every retry. Returns whether anything was changed.
    """
    changed = False
    eps = torch.finfo(out_dtype).eps
    for t in range(max_tries):
        dup = _duplicates(c.to(out_dtype))
        if not bool(dup.any()):
            return changed
        rows = c[dup]
        sd = torch.maximum(NOISE_SCALE * scale.expand_as(rows), 2 * eps * rows.abs().clamp_min(eps)) * 2.0**t
        rows = rows + sd * _randn(rows.shape, generator, rows)
        c[dup] = _unit(rows) if spherical else rows
        changed = True
    raise RuntimeError("k-means: could not make the centroids distinct")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------------
# k-means++ (Arthur & Vassilvitskii 2007)
# ---------------------------------------------------------------------------------------------------------------
def _dist_rows(xs: Tensor, seeds: Tensor, metric: str) -> Tensor:
    """Distances ``[L, N]`` of ``L`` seeds to the working rows (one small GEMM, :func:`vqkernels.ops.distances`),
    clamped at 0 (so they can weight a draw): squared Euclidean for l2, ``1 - cos`` for cosine."""
    return distances(seeds, xs, metric).clamp_min_(0)


def _seed_with_replacement(xs: Tensor, k: int, generator: Generator | None) -> Tensor:
    """``K >= N``: every row once (random order), then ``K - N`` rows drawn uniformly with replacement."""
    n = xs.shape[0]
    idx = _randperm(n, generator, xs.device)
    if k > n:
        idx = torch.cat([idx, _randint(n, k - n, generator, xs.device)])
    return xs[idx]


def _kmeanspp_idx(
    xs: Tensor, k: int, metric: str, generator: Generator | None, local_trials: int | None = None
) -> Tensor:
    """k-means++ seeding of the working rows ``xs [N, D]`` (unit rows for cosine), ``K < N``: indices ``[K]``.

    Arthur & Vassilvitskii 2007: the first seed is uniform; every next seed is drawn with probability ∝ the
    current min distance D(x)² to the chosen seeds (squared Euclidean, or ``1 - cos`` on the sphere). Greedy
    variant (suggested in their paper; scikit-learn's default): draw ``L = 2 + ⌊ln K⌋`` candidates that way and
    keep the one that lowers the potential ``Σ D²`` most (``local_trials=1`` is plain D² sampling). A running
    min-distance vector ``[N]`` is updated with each new seed: O(N·K·L·D) time, O(N·L) extra memory, never N x K.
    """
    n = xs.shape[0]
    trials = 2 + int(math.log(k)) if local_trials is None else local_trials
    idx = torch.empty(k, dtype=torch.int64, device=xs.device)
    i = int(_randint(n, 1, generator, xs.device))
    idx[0] = i
    mind = _dist_rows(xs, xs[i : i + 1], metric)[0]
    mind[i] = 0
    for j in range(1, k):
        w = mind.to(torch.float64)
        if float(w.sum()) > 0:
            cand = _multinomial(w, trials, generator, replacement=True)
        else:  # every row coincides with a seed: uniform (duplicated centroids are separated later)
            cand = _randint(n, 1, generator, xs.device)
        d = torch.minimum(_dist_rows(xs, xs[cand], metric), mind)  # [L, N]
        best = int(d.sum(1, dtype=torch.float64).argmin()) if cand.numel() > 1 else 0
        i = int(cand[best])
        idx[j] = i
        mind = d[best]
        mind[i] = 0
    return idx


@torch.no_grad()
def kmeans_plusplus(
    x: Tensor,
    num_codes: int,
    *,
    metric: str = "l2",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    local_trials: int | None = None,
) -> Tensor:
    """k-means++ seeds (Arthur & Vassilvitskii 2007, D² sampling; greedy with ``2 + ⌊ln K⌋`` local trials).

    Args:
        x: ``[N, D]`` float rows, N >= 1.
        num_codes: K >= 1.
        metric: ``"l2"`` (D² = squared Euclidean distance) or ``"cosine"`` (``1 - cos``: spherical k-means++).
        generator: source of randomness (the result is deterministic for a seeded generator).
        backend: validated for symmetry with :func:`kmeans`; seeding itself needs no search.
        local_trials: candidates drawn per seed, the best kept (greedy k-means++); ``None`` = ``2 + ⌊ln K⌋``,
            ``1`` = plain D² sampling.

    Returns:
        ``[K, D]`` seeds in ``x.dtype``: distinct rows of ``x`` when ``K < N``. When ``K >= N`` every row is used
        once and the other ``K - N`` are drawn uniformly with replacement; a seed that repeats an earlier one gets
        a jitter of ``1e-3 ×`` the per-dimension std of ``x`` (at least 2 ulp of ``x.dtype``), so all K differ.
    """
    k = _check_common(x, num_codes, metric, generator, backend)
    if local_trials is not None and (
        isinstance(local_trials, bool) or not isinstance(local_trials, int) or local_trials < 1
    ):
        raise ValueError(f"local_trials must be None or an int >= 1; got {local_trials!r}")
    xs = _acc(x)
    if k >= xs.shape[0]:
        seeds = _seed_with_replacement(xs, k, generator)
        _make_distinct(seeds, x.dtype, _noise_scale(xs), generator, spherical=False)
        return seeds.to(x.dtype)
    idx = _kmeanspp_idx(_unit(xs) if metric == "cosine" else xs, k, metric, generator, local_trials)
    return x.detach()[idx].clone()


# ---------------------------------------------------------------------------------------------------------------
# Lloyd iterations (Lloyd 1982)
# ---------------------------------------------------------------------------------------------------------------
def _inertia(xs: Tensor, c: Tensor, codes: Tensor, metric: str) -> float:
    """fp64 sum of the distance of every row to its assigned centroid, by the direct (cancellation-free)
    formula."""
    total = 0.0
    step = max(1, _CHUNK_ELEMS // xs.shape[1])
    for r0 in range(0, xs.shape[0], step):
        total += float(paired_distances(xs[r0 : r0 + step], c[codes[r0 : r0 + step]], metric).sum())
    return total


@torch.no_grad()
def kmeans(
    x: Tensor,
    num_codes: int,
    *,
    iters: int = 20,
    tol: float = 1e-4,
    metric: str = "l2",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> KMeansResult:
    """Fit K centroids to the rows of ``x``: k-means++ seeding, then Lloyd iterations on the fused ops.

    Each iteration assigns every row to its nearest centroid (:func:`vqkernels.nearest_code`) and moves every
    centroid to the mean of its rows (:func:`vqkernels.code_stats`). It stops after ``iters`` iterations, when the
    assignment no longer changes, or when the inertia decreases by less than ``tol`` (relative). An empty cluster
    is re-seeded at the row farthest from its centroid (distinct rows for distinct empty clusters).
    ``K >= N`` needs no iterations: every row becomes a centroid and the remaining ``K - N`` are rows drawn with
    replacement plus a ``1e-3``-scale jitter, so all K centroids differ (the same holds whenever the data have
    fewer than K distinct rows). ``metric="cosine"`` runs spherical k-means (see the module docstring).

    Work is in fp32 (fp64 for fp64 ``x``; bf16/fp16 rows are upcast exactly); the extra memory is one working copy
    of ``x`` plus O(N + K·D), never N x K.

    Args:
        x: ``[N, D]`` float rows, N >= 1, finite.
        num_codes: K >= 1.
        iters: maximum number of Lloyd iterations (>= 0).
        tol: stop when ``(prev_inertia - inertia) <= tol * prev_inertia``.
        metric: ``"l2"`` or ``"cosine"``.
        generator: source of randomness; deterministic for a seeded generator.
        backend: backend of the ops (``"auto"`` or a name of ``python -m vqkernels.info``: ``"cpu"``,
            ``"cuda"``, ``"triton"``, ``"torch"``).
        progress: show a tqdm bar over the iterations (silently skipped when tqdm is missing).

    Returns:
        :class:`KMeansResult` ``(centroids [K, D] in x.dtype, codes int64 [N], inertia float, iterations int)``.

    Example:
        >>> res = kmeans(torch.randn(2000, 8), 16, generator=torch.Generator().manual_seed(0))
        >>> res.centroids.shape, res.codes.shape
        (torch.Size([16, 8]), torch.Size([2000]))
    """
    k = _check_common(x, num_codes, metric, generator, backend)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0; got {iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0; got {tol!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool; got {type(progress).__name__}")
    spherical = metric == "cosine"
    out_dtype = x.dtype
    xs = _acc(x)
    if spherical:
        xs = _unit(xs)  # spherical k-means works on the unit rows (the angle is all the metric sees)
    n = xs.shape[0]
    scale = _noise_scale(xs)

    if k >= n:  # every row its own centroid, extra centroids are jittered copies
        c = _seed_with_replacement(xs, k, generator)
        _make_distinct(c, out_dtype, scale, generator, spherical)
        return _finish(xs, c, out_dtype, metric, backend, 0)

    c = xs[_kmeanspp_idx(xs, k, metric, generator)]
    codes, dist = nearest_code(xs, c, metric=metric, backend=backend)
    inertia = float(dist.sum(dtype=torch.float64))
    bar = _progress_bar(iters) if progress and iters > 0 else None
    it = 0
    try:
        for it in range(1, iters + 1):  # noqa: B007 - `it` is the iteration count returned below
            # Lloyd 1982: centroid <- mean of its rows (assigned in the previous step)
            sums, counts = code_stats(xs, codes, k, backend=backend)
            full = counts > 0
            c = torch.where(full[:, None], sums / counts.clamp_min(1)[:, None].to(sums.dtype), c)
            if spherical:
                c = _unit(c)
            empty = (~full).nonzero().squeeze(1)
            if empty.numel():  # re-seed at the rows farthest from their centroids
                far = torch.topk(dist, empty.numel()).indices
                c[empty] = xs[far]
            new_codes, dist = nearest_code(xs, c, metric=metric, backend=backend)
            new_inertia = float(dist.sum(dtype=torch.float64))
            stable = empty.numel() == 0 and torch.equal(new_codes, codes)
            converged = stable or inertia - new_inertia <= tol * inertia
            codes, inertia = new_codes, new_inertia
            if bar is not None:
                bar.update(1)
                bar.set_postfix(inertia=f"{inertia:.4g}")
            if converged:
                break
    finally:
        if bar is not None:
            bar.close()
    changed = _make_distinct(c, out_dtype, scale, generator, spherical)  # only on degenerate data
    return _finish(xs, c, out_dtype, metric, backend, it, None if changed else codes)


def _finish(
    xs: Tensor,
    c: Tensor,
    out_dtype: torch.dtype,
    metric: str,
    backend: str,
    iterations: int,
    codes: Tensor | None = None,
) -> KMeansResult:
    """Round the centroids to ``out_dtype``; assign and score every row against the rounded centroids (exactly:
    the reported codes are the fp64 nearest centroids, so a row with an exact copy among them scores 0 whatever
    the fast search's rounding)."""
    centroids = c.to(out_dtype)
    cw = centroids.to(xs.dtype)
    if codes is None or out_dtype != xs.dtype:  # ``codes`` are only valid for unrounded, unchanged centroids
        codes, _ = nearest_code(xs, cw, metric=metric, exact=True, backend=backend)
    return KMeansResult(centroids, codes, _inertia(xs, cw, codes, metric), iterations)


def _progress_bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is cosmetic
        return None
    return tqdm(total=total, desc="k-means", unit="it", leave=False)

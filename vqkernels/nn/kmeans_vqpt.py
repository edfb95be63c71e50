"""vector-quantize-pytorch's k-means init of :class:`vqkernels.nn.VectorQuantize`, on the fused ops.

Its recipe, per codebook g (every head of a separate codebook is a group): the initial means are K rows of the
batch drawn as :func:`vqkernels.nn.ema.sample_rows` draws them (a random permutation when the batch has at least K
rows, else uniform with replacement: the same draws as vector-quantize-pytorch, so a seeded run starts from the
same means), then ``iters`` Lloyd steps, each one search and one per-code reduction:

    a_i = argmin_k d(x_i, m_k),   n_k = |{i : a_i = k}|,   m_k <- sum_{a_i = k} x_i / n_k   (n_k > 0),

an empty cluster keeping its mean. ``d`` is the Euclidean distance, or for cosine codebooks ``-x.m`` on unit rows
(the means are renormalised after each step). The init then sets the EMA state from the last step:
``cluster_size = n``, ``embed_avg = m * n`` and the codebook to their Laplace-smoothed quotient
(:func:`vqkernels.nn.ema.smoothed_codebook`), so that a cluster left empty by the last assignment gets a zero code,
as in vector-quantize-pytorch.

Every assignment is :func:`vqkernels.nearest_code` and every update :func:`vqkernels.code_stats`, batched over the
groups (``[G, n, D]`` rows against ``[G, K, D]`` means): no N x K matrix. Under a process group the fit runs on rank
0 on the rows of every rank (gathered, at most ``KMEANS_MAX_ROWS``) and the state is broadcast, so every rank starts
from the same codebook (README "Method" §4).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from . import distributed as vq_dist
from .ema import NORM_EPS, sample_rows

KMEANS_MAX_ROWS = 1 << 16  # rows gathered over ranks for the fit (a uniform sample of each rank's share)


@torch.no_grad()
def lloyd(rows: Tensor, num_codes: int, iters: int, cosine: bool, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The fit of the module docstring: ``rows [G, n >= 1, D]`` (unit rows for cosine) -> ``(means [G, K, D],
    counts [G, K])``, the means in the rows' accumulation dtype (fp32, fp64 for fp64 rows) and the cluster sizes of
    the last assignment (fp32). ``iters >= 1``."""
    if iters < 1:
        raise ValueError(f"kmeans_iters must be >= 1; got {iters}")
    g, n, _ = rows.shape
    if n < num_codes:
        warnings.warn(
            f"k-means init received {n} vectors for a codebook of {num_codes} codes: some initial means repeat",
            stacklevel=3,
        )
    work = rows.to(ops.acc_dtype(rows.dtype))
    means = torch.stack([sample_rows(work[i], num_codes) for i in range(g)])
    metric = "dot" if cosine else "l2"  # on unit rows, the largest x.m (as vector-quantize-pytorch ranks them)
    counts = None
    for _ in range(iters):
        codes = ops.nearest_code(work, means, metric=metric, backend=backend)[0]  # batched: [G, n]
        sums, counts = ops.code_stats(work, codes, num_codes, backend=backend)
        counts = counts.to(work.dtype)
        new = sums.to(work.dtype) / counts.clamp_min(1).unsqueeze(-1)
        if cosine:
            new = F.normalize(new, dim=-1, eps=NORM_EPS)
        means = torch.where((counts == 0).unsqueeze(-1), means, new)
    return means, counts


def gather_groups(rows: Tensor) -> Tensor:
    """``rows [G, n_r, D]`` of every rank concatenated along n in rank order (at most ``KMEANS_MAX_ROWS`` in all:
    a uniform sample of each rank's share); one gather of ``[n_r, G * D]`` rows."""
    g, n, d = rows.shape
    flat = rows.transpose(0, 1).reshape(n, g * d)
    every = vq_dist.all_gather_rows(flat, KMEANS_MAX_ROWS)
    return every.view(-1, g, d).transpose(0, 1)

"""The EMA codebook update (van den Oord et al. 2017, appendix A.1; Razavi et al. 2019, "VQ-VAE-2", §3.1) and
dead-code expiry by EMA cluster size, on the fused ops.

State per code k (per group g for separate codebooks): the EMA cluster size ``N_k`` and the EMA sum of its rows
``m_k``. A training step with batch counts ``n_k`` and sums ``s_k`` (one :func:`vqkernels.code_stats` call: no
N x K one-hot) does

    N_k <- gamma N_k + (1 - gamma) n_k,      m_k <- gamma m_k + (1 - gamma) s_k,

and sets the code to ``e_k = m_k / N~_k`` with Laplace smoothing ``N~_k = (N_k + eps) / (n + K eps) * n``,
``n = sum_k N_k`` (so an unused code never divides by zero). Codes whose ``N_k`` falls below a threshold are
expired: they become random rows of the batch, with ``N_k`` reset to the threshold and ``m_k`` to that row times
it (vector-quantize-pytorch's rule). Under a process group the sums and counts are all-reduced (one collective)
before the update, so every rank computes the same codebook; expiry rows are drawn on rank 0 and broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from . import distributed as vq_dist

NORM_EPS = 1e-6


def batch_stats(
    rows: Tensor, codes: Tensor, num_codes: int, sync: bool, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Per-code sums (fp32 ``[..., K, D]``) and counts (fp32 ``[..., K]``) of ``rows [..., N, D]`` assigned to
    ``codes [..., N]`` (``...`` empty or a group axis G), summed over ranks when ``sync``."""
    sums, counts = ops.code_stats(rows, codes, num_codes, backend=backend)
    sums, counts = sums.float(), counts.float()
    if sync:  # one collective for both
        flat = vq_dist.all_reduce_sum(torch.cat([sums.flatten(), counts.flatten()]))
        sums, counts = flat[: sums.numel()].view_as(sums), flat[sums.numel() :].view_as(counts)
    return sums, counts


@torch.no_grad()
def ema_step_(cluster_size: Tensor, embed_avg: Tensor, counts: Tensor, sums: Tensor, decay: float) -> None:
    """``N <- decay N + (1 - decay) n``, ``m <- decay m + (1 - decay) s`` in place (``[..., K]``, ``[..., K, D]``)."""
    cluster_size.lerp_(counts.to(cluster_size.dtype), 1.0 - decay)
    embed_avg.lerp_(sums.to(embed_avg.dtype), 1.0 - decay)


def smoothed_codebook(cluster_size: Tensor, embed_avg: Tensor, eps: float, normalize: bool = False) -> Tensor:
    """``e_k = m_k / N~_k`` with the Laplace-smoothed cluster size (module docstring); ``[..., K, D]``; l2-normalised
    rows when ``normalize`` (cosine codebooks)."""
    k = cluster_size.shape[-1]
    n = cluster_size.sum(-1, keepdim=True)
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    embed = embed_avg / smoothed.unsqueeze(-1)
    return F.normalize(embed, dim=-1, eps=NORM_EPS) if normalize else embed


def sample_rows(rows: Tensor, num: int) -> Tensor:
    """``num`` rows of ``rows [n >= 1, D]``: without replacement when ``n >= num`` (a random permutation), else with
    replacement; the same draws as vector-quantize-pytorch, so a seeded run matches it."""
    n = rows.shape[0]
    if n >= num:
        pick = torch.randperm(n, device=rows.device)[:num]
    else:
        pick = torch.randint(0, n, (num,), device=rows.device)
    return rows[pick]


@torch.no_grad()
def expire_codes_(
    embed: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    rows: Tensor,
    threshold: float,
    reset: float,
    sync: bool = False,
    normalize: bool = False,
) -> int:
    """Replace the codes with ``cluster_size < threshold`` by random rows of the batch, per group.

    ``embed``, ``embed_avg`` ``[G, K, D]``, ``cluster_size`` ``[G, K]``, ``rows [G, N, D]`` (the rows each group
    searched with). When a group has more dead codes than rows, a random subset of them (as many as rows) is
    replaced now and the rest later, so no two codes get the same row. With ``sync`` the state after the update is
    rank 0's on every rank. Returns the number of codes replaced (on this rank).
    """
    replaced = 0
    dead_all = cluster_size < threshold
    if bool(dead_all.any()):
        for g in range(embed.shape[0]):
            dead = torch.nonzero(dead_all[g]).squeeze(1)
            samples = rows[g]
            if dead.numel() == 0 or samples.shape[0] == 0:
                continue
            if dead.numel() > samples.shape[0]:
                dead = dead[torch.randperm(dead.numel(), device=dead.device)[: samples.shape[0]]].sort().values
            v = sample_rows(F.normalize(samples, dim=-1, eps=NORM_EPS) if normalize else samples, dead.numel())
            v = v.to(embed.dtype)
            embed[g, dead] = v
            cluster_size[g, dead] = reset
            embed_avg[g, dead] = v.to(embed_avg.dtype) * reset
            replaced += dead.numel()
    if sync:
        vq_dist.broadcast_state([embed, cluster_size, embed_avg])
    return replaced

"""The collectives that keep every rank's codebook identical under ``torch.distributed`` (README "Method" §4).

The gradient path needs nothing of ours (DDP all-reduces the gradients). The non-gradient updates do, and each
update module holds its own sync (:mod:`.codebook` the running affine, :mod:`.kmeans_init`, :mod:`.dead_codes`,
:mod:`.anchors`) built from the helpers here:

- usage counts and row counts are summed over ranks before the usage EMA and the LRU counters see them;
- running-statistics affine moments are summed (sum, sum of squares, count) before they are folded in;
- k-means init fits on the rows of every rank (gathered, at most ``kmeans_init.KMEANS_MAX_ROWS``) on rank 0;
- the "closest" anchor of a code is the globally nearest row: every rank proposes its nearest row and its distance,
  the smallest distance wins (ties: the lowest rank, i.e. the lowest index of the concatenated batch), so the
  update equals a single-process run on the concatenated batch;
- what stays random (dead-code replacement vectors, the "random" feature pool, "probrandom" samples) is drawn on
  rank 0 and broadcast with the rest of the state after the update, so nothing can drift.

Every rank enters the same collectives in the same order whatever its batch size (an empty batch included). A
layer in eval mode, with ``sync=False``, or outside an initialised process group of more than one rank issues
none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def enabled(sync: bool | None) -> bool:
    """Whether to synchronise: ``sync=None`` means "when a process group of more than one rank is initialised"."""
    if sync is False or not dist.is_available() or not dist.is_initialized():
        if sync is True and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync=True but torch.distributed has no initialised process group")
        return False
    return dist.get_world_size() > 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """A summed copy of ``t`` over ranks (the input is left alone)."""
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_counts(counts: Tensor, num_rows: int) -> tuple[Tensor, int]:
    """Usage counts ``[K]`` and the number of rows behind them, summed over ranks (one collective)."""
    tot = all_reduce_sum(torch.cat([counts.to(torch.int64), torch.tensor([num_rows], device=counts.device)]))
    return tot[:-1], int(tot[-1])


def all_gather_rows(rows: Tensor, max_rows: int | None = None) -> Tensor:
    """Rows ``[n_r, D]`` of every rank concatenated in rank order (ranks may hold different numbers of rows).

    With ``max_rows``, each rank first keeps a uniform sample of at most ``max_rows // world`` of its rows.
    """
    world = dist.get_world_size()
    if max_rows is not None and rows.shape[0] > max_rows // world:
        keep = torch.randperm(rows.shape[0], device=rows.device)[: max(1, max_rows // world)]
        rows = rows[keep.sort().values]
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    top = max(sizes_i)
    padded = rows.new_zeros((top, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)])


def global_closest(local_dist: Tensor, local_rows: Tensor) -> Tensor:
    """Per code, the row with the smallest distance over ranks (ties: lowest rank).

    ``local_dist [K]`` (inf where a rank has no row), ``local_rows [K, D]`` this rank's candidates.
    """
    world = dist.get_world_size()
    dists = [torch.empty_like(local_dist) for _ in range(world)]
    rows = [torch.empty_like(local_rows) for _ in range(world)]
    dist.all_gather(dists, local_dist.contiguous())
    dist.all_gather(rows, local_rows.contiguous())
    best = torch.stack(dists).argmin(0)  # first minimum: the lowest rank
    return torch.stack(rows).gather(0, best[None, :, None].expand(1, *local_rows.shape)).squeeze(0)


def broadcast_state(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values."""
    for t in tensors:
        dist.broadcast(t.data if isinstance(t, torch.nn.Parameter) else t, src=0)

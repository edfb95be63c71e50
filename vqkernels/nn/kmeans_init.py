"""k-means initialisation of a layer's codebook (README "Method" §2.5), with its distributed sync (§4).

On the first training forward, before the search, every segment's block of codes is fitted by k-means++ and Lloyd
(:func:`vqkernels.nn.kmeans.kmeans`, on the fused ops) to the rows that will search it, and written as effective
codes. Under a process group the fit runs on rank 0 on the rows of every rank (gathered, at most
``KMEANS_MAX_ROWS`` of them) and the codebook (with the EMA buffers re-seeded from it, when on) is broadcast, so
every rank starts from the same codes. The buffer
``data_initialized`` (vqtorch's name) records that it happened.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed as vq_dist
from . import ema_update as ema_layer
from .kmeans import kmeans
from .segments import Segment

KMEANS_MAX_ROWS = 1 << 16  # rows gathered over ranks for the fit (a uniform sample of each rank's share)


def register(layer: nn.Module) -> None:
    layer.register_buffer("data_initialized", torch.zeros(1))


def enabled(layer: nn.Module) -> bool:
    """Static: whether the layer has k-means init at all (a layer without it traces straight through)."""
    return hasattr(layer, "data_initialized")


@torch.compiler.disable
def pending(layer: nn.Module) -> bool:
    """Training and not yet initialised (reads a buffer: a graph break under torch.compile, only when enabled)."""
    return layer.training and enabled(layer) and not bool(layer.data_initialized.item())


@torch.no_grad()
def _fit(layer: nn.Module, segments: list[Segment]) -> None:
    for seg in segments:
        if seg.rows.shape[0] == 0:
            continue
        res = kmeans(
            seg.rows.float(),
            seg.hi - seg.lo,
            iters=layer.kmeans_iters,
            backend=layer.backend,
            metric="cosine" if layer.metric == "cosine" else "l2",
        )
        idx = torch.arange(seg.lo, seg.hi, device=seg.rows.device)
        layer._write_effective(idx, res.centroids.float())


@torch.no_grad()
def fit(layer: nn.Module, segments: list[Segment]) -> None:
    """Fit the segments' codes now (every rank must call it: under sync it holds collectives)."""
    if not layer._sync_active():
        _fit(layer, segments)
        return
    gathered = [Segment(vq_dist.all_gather_rows(s.rows, KMEANS_MAX_ROWS), s.lo, s.hi) for s in segments]
    if torch.distributed.get_rank() == 0:
        _fit(layer, gathered)
    vq_dist.broadcast_state([layer.codebook_weight, *ema_layer.state(layer)])


def mark_done(layer: nn.Module) -> None:
    layer.data_initialized.fill_(1)


# Runs eagerly: under torch.compile one clean graph break, paid only by layers that enable it.
@torch.compiler.disable
@torch.no_grad()
def init_once(layer: nn.Module, segments: list[Segment]) -> None:
    """The first training forward's fit; later calls do nothing."""
    if pending(layer):
        fit(layer, segments)
        mark_done(layer)

"""CVQ anchor replacement on a layer (Zheng & Vedaldi 2023, §3.2; README "Method" §3), with its distributed sync
(§4).

After the output is formed, in training only: the usage EMA ``embed_prob`` takes the batch's usage, every code
gets its decay ``alpha_k``, and every code moves towards its anchor, ``c_k <- (1 - alpha_k) c_k + alpha_k a_k``
(written as effective codes). The maths is in :mod:`.cvq`; this module wires it to the layer's buffers
(``embed_prob`` and ``anchor_initialized``, plus ``feature_pool`` / ``pool_filled`` for "random" anchors).

Under a process group: usage counts are summed over ranks; the "closest" anchor is the globally nearest row
(every rank proposes its nearest row with its distance, the smallest wins, ties to the lowest rank), equal to a
single-process run on the concatenated batch; what is random (the pool, probrandom draws) is rank 0's, broadcast
with the rest of the state after the update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from . import cvq
from . import distributed as vq_dist
from .segments import Segment

ANCHORS = (None, "closest", "random", "probrandom")


def register(layer: nn.Module, anchor: str, code_dim: int) -> None:
    layer.register_buffer("embed_prob", torch.zeros(layer.num_codes))
    layer.register_buffer("anchor_initialized", torch.zeros((), dtype=torch.int64))
    if anchor == "random":
        layer.register_buffer("feature_pool", torch.zeros(layer.num_codes, code_dim))
        layer.register_buffer("pool_filled", torch.zeros((), dtype=torch.int64))


def _state(layer: nn.Module) -> list[Tensor]:
    return [layer.codebook_weight] + [
        getattr(layer, n)
        for n in ("embed_prob", "anchor_initialized", "feature_pool", "pool_filled")
        if hasattr(layer, n)
    ]


def _global_closest(layer: nn.Module, rows: Tensor, block: Tensor) -> Tensor:
    """Per code, the nearest row over every rank's batch (the swapped-role search, then a min over ranks)."""
    if rows.shape[0]:
        idx, d = ops.nearest_code(block.to(rows.dtype), rows, metric=layer.metric, backend=layer.backend)
        local_rows, local_d = rows.index_select(0, idx).to(block.dtype), d.to(torch.float64)
    else:
        local_rows = torch.zeros_like(block)
        local_d = torch.full((block.shape[0],), float("inf"), dtype=torch.float64, device=block.device)
    return vq_dist.global_closest(local_d, local_rows)


@torch.no_grad()
def update(layer: nn.Module, segments: list[Segment], counts: Tensor) -> None:
    """Usage EMA, per-code decay, anchors and the running update (every rank must call it: under sync it holds
    collectives)."""
    sync = layer._sync_active()
    num_rows = sum(s.rows.shape[0] for s in segments)
    if sync:
        counts, num_rows = vq_dist.global_counts(counts, num_rows)
    if num_rows > 0:
        _update(layer, segments, counts, num_rows, sync)
    if sync:
        vq_dist.broadcast_state(_state(layer))


def _update(layer: nn.Module, segments: list[Segment], counts: Tensor, num_rows: int, sync: bool) -> None:
    cvq.update_usage_ema(layer.embed_prob, counts, num_rows, layer.anchor_decay)
    if layer.anchor == "random":
        cvq.update_feature_pool(layer.feature_pool, layer.pool_filled, torch.cat([s.rows for s in segments]))
    if layer.first_batch and bool(layer.anchor_initialized.item()):
        return
    alpha = cvq.anchor_alpha(layer.embed_prob, layer.anchor_decay)
    cb = layer.effective_codebook().detach().float()
    for seg in segments:
        if seg.rows.shape[0] == 0 and not (sync and layer.anchor == "closest"):
            continue  # (a synchronised closest update still joins the collective with no candidates)
        block = cb[seg.lo : seg.hi]
        if layer.anchor == "closest" and sync:
            anchors = _global_closest(layer, seg.rows, block)
        elif layer.anchor == "closest":
            anchors = cvq.closest_anchors(seg.rows, block.to(seg.rows.dtype), layer.metric, backend=layer.backend)
        elif layer.anchor == "probrandom":
            anchors = cvq.probrandom_anchors(seg.rows, block.to(seg.rows.dtype), layer.metric, backend=layer.backend)
        else:
            anchors = cvq.random_anchors(layer.feature_pool, layer.pool_filled)[seg.lo : seg.hi]
        a = alpha[seg.lo : seg.hi, None]
        new = (1 - a) * block + a * anchors.float()
        layer._write_effective(torch.arange(seg.lo, seg.hi, device=block.device), new)
    layer.anchor_initialized.fill_(1)

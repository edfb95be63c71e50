"""Dead-code replacement by least-recent use (vqtorch's LRU; README "Method" §2.6), with its distributed sync (§4).

Per-code counters start at ``T = replace_freq``; every training forward decrements all of them and resets the
codes used in the batch to T; codes at 0 are dead and become random batch vectors ``v + 0.01 |v| eps``
(``eps ~ N(0, I)``), written so that the *effective* code (after affine) equals that vector. Under a process group
the usage counts are summed over ranks first, and rank 0's codebook and counters (whose replacement vectors were
drawn at random; with the EMA on, its re-seeded EMA buffers too) are broadcast after the update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed as vq_dist
from . import ema_update as ema_layer
from .segments import Segment


def register(layer: nn.Module, replace_freq: int) -> None:
    layer.register_buffer("lru_counters", torch.full((layer.num_codes,), replace_freq, dtype=torch.int64))


@torch.no_grad()
def replace(layer: nn.Module, segments: list[Segment], counts: Tensor) -> None:
    """One training step of the LRU counters and the replacement of the codes that died (every rank must call
    it: under sync it holds collectives)."""
    sync = layer._sync_active()
    if sync:
        counts, _ = vq_dist.global_counts(counts, sum(s.rows.shape[0] for s in segments))
    t = layer.replace_freq
    layer.lru_counters.sub_(1)
    layer.lru_counters[counts > 0] = t
    for seg in segments:
        dead = torch.nonzero(layer.lru_counters[seg.lo : seg.hi] <= 0).squeeze(1) + seg.lo
        n = seg.rows.shape[0]
        if dead.numel() == 0 or n == 0:
            continue
        pick = torch.randint(0, n, (dead.numel(),), device=seg.rows.device)
        v = seg.rows[pick].float()
        v = v + 0.01 * v.norm(dim=1, keepdim=True) * torch.randn_like(v)
        layer._write_effective(dead, v)
        layer.lru_counters[dead] = t
    if sync:  # the replacement vectors are rank 0's (and so are the EMA sums re-seeded from them)
        vq_dist.broadcast_state([layer.codebook_weight, layer.lru_counters, *ema_layer.state(layer)])

"""``GroupVectorQuant``: features split into G sub-vectors, each quantised (README "Method" §2.8)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Segment, move_features_last
from .functional import convex_vq_loss, perplexity, straight_through
from .vector_quant import VectorQuant


class GroupVectorQuant(VectorQuant):
    """Group VQ: the D features are split into ``groups`` sub-vectors of D/G features.

    ``share=True``: all groups search one codebook of K codes (``[K, D/G]``), in one batched search over the
    N*G sub-vectors. ``share=False``: group g searches only its own block of K/G codes (codes are offset by
    g*K/G in ``q``); one search per group, since a single search cannot restrict rows to code ranges.

    Same other arguments as :class:`VectorQuant`. ``out["q"]`` and ``out["d"]`` are ``[..., G]``; ``out["z"]``
    and ``out["z_q"]`` are ``[..., G, D/G]``.
    """

    def __init__(self, feature_size: int, num_codes: int, groups: int = 1, share: bool = True, **kwargs):
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or feature_size % groups:
            raise ValueError(f"groups must be a positive divisor of feature_size = {feature_size}; got {groups!r}")
        if not share and num_codes % groups:
            raise ValueError(f"share=False needs num_codes ({num_codes}) divisible by groups ({groups})")
        norm = kwargs.pop("norm", None)
        super().__init__(feature_size // groups, num_codes, **kwargs)
        # the input norm acts on whole vectors (before grouping)
        self.feature_size, self.groups, self.share = feature_size, groups, share
        from .norms import VectorNorm

        self.norm = norm
        self.norm_layer = VectorNorm(norm, feature_size)

    def _blocks(self) -> list[tuple[int, int]]:
        if self.share:
            return [(0, self.num_codes)] * self.groups
        size = self.num_codes // self.groups
        return [(g * size, (g + 1) * size) for g in range(self.groups)]

    def forward(self, z: Tensor) -> tuple[Tensor, dict]:
        x = self.norm_layer(move_features_last(z, self.dim, self.feature_size))
        if not self.enabled:
            return x.movedim(-1, self.dim), {}
        shape = x.shape
        g, dg = self.groups, self.feature_size // self.groups
        xg = x.reshape(-1, g, dg)  # [N, G, D/G]
        if self.share:
            segments = [Segment(xg.reshape(-1, dg).detach(), 0, self.num_codes)]
        else:
            segments = [Segment(xg[:, i].detach(), lo, hi) for i, (lo, hi) in enumerate(self._blocks())]
        self._before_search(segments)
        cb = self.effective_codebook()
        if self.share:
            res = self._search(xg.reshape(-1, dg), cb)
            codes, z_q, dist, counts = res.codes.view(-1, g), res.z_q.view(-1, g, dg), res.dist.view(-1, g), res.counts
        else:
            parts = [self._search(xg[:, i], cb, lo, hi) for i, (lo, hi) in enumerate(self._blocks())]
            codes = torch.stack([p.codes + lo for p, (lo, _) in zip(parts, self._blocks())], 1)
            z_q = torch.stack([p.z_q for p in parts], 1)
            dist = torch.stack([p.dist for p in parts], 1)
            counts = torch.cat([p.counts for p in parts])
        loss = convex_vq_loss(xg, z_q, self.beta)
        if self.contrastive and self.training:
            loss = loss + sum(self._contrastive_loss(s.rows, cb[s.lo : s.hi]) for s in segments) / len(segments)
        out_rows = straight_through(xg, z_q, self.nu)
        self._after_forward(segments, counts)
        d = dist.sqrt() if self.metric == "l2" else dist
        lead = shape[:-1]
        out = {
            "z": xg.view(*lead, g, dg),
            "z_q": z_q.view(*lead, g, dg),
            "d": d.view(*lead, g),
            "q": codes.view(*lead, g),
            "loss": loss,
            "perplexity": perplexity(counts),
        }
        return out_rows.reshape(shape).movedim(-1, self.dim), out

"""``GroupVectorQuant``: features split into G sub-vectors, each quantised (README "Method" §2.8)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Segment
from .functional import perplexity
from .vector_quant import VectorQuant, _check_codebook_dim


class GroupVectorQuant(VectorQuant):
    """Group VQ: the D features are split into ``groups`` sub-vectors of D/G features.

    ``share=True``: all groups search one codebook of K codes (``[K, D/G]``), in one search over the N*G
    sub-vectors. ``share=False``: group g searches only its own block of K/G codes (codes are offset by g*K/G in
    ``q``), all groups in one batched search (``x [G, N, D/G]`` against ``codebook.view(G, K/G, D/G)``).

    ``codebook_dim``: the sub-vectors have ``codebook_dim`` features instead, through ``Linear(D, G *
    codebook_dim)`` before the split and ``Linear(G * codebook_dim, D)`` after it (D need not divide by G then).
    Same other arguments as :class:`VectorQuant`; with ``share=False`` the EMA smoothing, the expiry and the
    orthogonal term act per block. ``out["q"]`` and ``out["d"]`` are ``[..., G]``; ``out["z"]`` and ``out["z_q"]``
    are ``[..., G, D']``.
    """

    def __init__(self, feature_size: int, num_codes: int, groups: int = 1, share: bool = True, **kwargs):
        codebook_dim = kwargs.pop("codebook_dim", None)
        if codebook_dim is not None:
            _check_codebook_dim(codebook_dim)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int; got {groups!r}")
        if codebook_dim is None and feature_size % groups:
            raise ValueError(f"groups must be a positive divisor of feature_size = {feature_size}; got {groups!r}")
        if not share and num_codes % groups:
            raise ValueError(f"share=False needs num_codes ({num_codes}) divisible by groups ({groups})")
        norm = kwargs.pop("norm", None)
        sub = feature_size // groups if codebook_dim is None else codebook_dim
        super().__init__(sub, num_codes, **kwargs)  # a layer of sub-vectors; the input side is set up below
        self.feature_size, self.groups, self.share, self.codebook_dim = feature_size, groups, share, codebook_dim
        # the projection and the input norm act on whole vectors (before grouping)
        self._init_io(feature_size, groups * sub, norm)

    def _blocks(self) -> list[tuple[int, int]]:
        if self.share:
            return [(0, self.num_codes)] * self.groups
        size = self.num_codes // self.groups
        return [(g * size, (g + 1) * size) for g in range(self.groups)]

    def forward(self, z: Tensor) -> tuple[Tensor, dict]:
        x = self._inputs(z)
        if not self.enabled:
            return self._outputs(x), {}
        shape = x.shape
        g, dg = self.groups, self.code_dim
        xg = x.reshape(-1, g, dg)  # [N, G, D']
        if self.share:
            segments = [Segment(xg.reshape(-1, dg).detach(), 0, self.num_codes)]
        else:
            segments = [Segment(xg[:, i].detach(), lo, hi) for i, (lo, hi) in enumerate(self._blocks())]
        self._before_search(segments)
        cb = self.effective_codebook()
        if self.share:
            res = self._search(xg.reshape(-1, dg), cb)
            codes, z_q, dist, counts = res.codes.view(-1, g), res.z_q.view(-1, g, dg), res.dist.view(-1, g), res.counts
            seg_codes = [res.codes]
        else:
            res = self._search_batched(xg.transpose(0, 1), cb)  # [G, N, D'] as a view: no copy
            global_codes = res.codes + torch.arange(g, device=res.codes.device)[:, None] * (self.num_codes // g)
            codes, z_q, dist = global_codes.t(), res.z_q.transpose(0, 1), res.dist.t()
            counts = res.counts.reshape(-1)
            seg_codes = list(global_codes.unbind(0))
        loss = self._vq_loss(xg, z_q)
        if self.contrastive and self.training:
            loss = loss + sum(self._contrastive_loss(s.rows, cb[s.lo : s.hi]) for s in segments) / len(segments)
        loss = self._with_orthogonal(loss, cb, counts)
        out_rows = self._straight_through(xg, z_q)
        self._after_forward(segments, counts, seg_codes)
        d = dist.sqrt() if self.metric == "l2" else dist
        lead = shape[:-1]
        out = {
            "z": xg.view(*lead, g, dg),
            "z_q": z_q.reshape(*lead, g, dg),
            "d": d.reshape(*lead, g),
            "q": codes.reshape(*lead, g),
            "loss": loss,
            "perplexity": perplexity(counts),
        }
        return self._outputs(out_rows.reshape(shape)), out

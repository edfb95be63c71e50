"""``ResidualVectorQuant``: G stages, each quantising what the previous ones left (README "Method" §2.8)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import kmeans_init as km_init
from .base import Segment
from .functional import perplexity
from .vector_quant import VectorQuant


class ResidualVectorQuant(VectorQuant):
    """Residual VQ with ``groups`` stages: stage i quantises ``r_i = x - sum_{j<i} sg(z_hat_j)``; the output is
    ``sum_i z_hat_i``.

    ``share=True``: every stage searches the same K codes; ``share=False``: stage i searches its own block of
    K/G codes (codes offset by i*K/G). Stages depend on each other, so they run one search each. The loss is the
    mean over stages of the convex loss between ``r_i`` and ``z_hat_i``. ``out["q"]``/``out["d"]`` are
    ``[..., G]``; ``out["z"]``/``out["z_q"]`` are ``[..., 1, D']`` (input and summed quantisation, in the search
    space). The options of :class:`VectorQuant` act on every stage (with ``share=False`` the EMA smoothing, the
    expiry and the orthogonal term per block; ``codebook_dim`` projects once, around all the stages; the rotation
    trick rotates the input onto the summed quantisation).
    """

    def __init__(self, feature_size: int, num_codes: int, groups: int = 1, share: bool = True, **kwargs):
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups (the number of stages) must be a positive int; got {groups!r}")
        if not share and num_codes % groups:
            raise ValueError(f"share=False needs num_codes ({num_codes}) divisible by groups ({groups})")
        super().__init__(feature_size, num_codes, **kwargs)
        self.groups, self.share = groups, share

    def _block(self, stage: int) -> tuple[int, int]:
        if self.share:
            return 0, self.num_codes
        size = self.num_codes // self.groups
        return stage * size, (stage + 1) * size

    def forward(self, z: Tensor) -> tuple[Tensor, dict]:
        x = self._inputs(z)
        if not self.enabled:
            return self._outputs(x), {}
        shape = x.shape
        xf = x.reshape(-1, self.code_dim)
        init = km_init.enabled(self) and self.training and km_init.pending(self)
        if self.training and self._running_affine():
            self._update_running_affine(xf.detach())
        cb, residual, total, losses, segments = None, xf, 0, [], []
        codes, dists, counts = [], [], torch.zeros(self.num_codes, dtype=torch.int64, device=x.device)
        for i in range(self.groups):
            lo, hi = self._block(i)
            seg = Segment(residual.detach(), lo, hi)
            if init and (i == 0 or not self.share):  # k-means fits each block on the residual it quantises
                km_init.fit(self, [seg])
                cb = None
            if cb is None:
                cb = self.effective_codebook()
            res = self._search(residual, cb, lo, hi)
            losses.append(self._vq_loss(residual, res.z_q))
            total = total + res.z_q
            codes.append(res.codes + lo)
            dists.append(res.dist)
            counts[lo:hi] += res.counts
            segments.append(seg)
            residual = residual - res.z_q.detach()
        if init:
            km_init.mark_done(self)
        loss = torch.stack(losses).mean()
        if self.contrastive and self.training:
            loss = loss + sum(self._contrastive_loss(s.rows, cb[s.lo : s.hi]) for s in segments) / len(segments)
        loss = self._with_orthogonal(loss, cb, counts)
        out_rows = self._straight_through(xf, total)
        seg_codes = codes
        if self.share:
            segments = [Segment(torch.cat([s.rows for s in segments]), 0, self.num_codes)]
            seg_codes = [torch.cat(codes)]
        self._after_forward(segments, counts, seg_codes)
        d = torch.stack(dists, 1)
        d = d.sqrt() if self.metric == "l2" else d
        lead = shape[:-1]
        out = {
            "z": x.unsqueeze(-2),
            "z_q": total.view(shape).unsqueeze(-2),
            "d": d.view(*lead, self.groups),
            "q": torch.stack(codes, 1).view(*lead, self.groups),
            "loss": loss,
            "perplexity": perplexity(counts),
        }
        return self._outputs(out_rows.view(shape)), out

"""``VectorQuantiser``: a drop-in for CVQ-VAE's quantiser (Zheng & Vedaldi, ICCV 2023; README "Method" §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Segment, VQBase, move_features_last
from .functional import perplexity, straight_through, vqvae_loss

DISTANCES = {"cos": "cosine", "l2": "l2"}


class VectorQuantiser(VQBase):
    """CVQ-VAE's quantiser with its constructor, NCHW input and ``(z_q, loss, (perplexity, encodings, indices))``.

    Args:
        num_embed: K codes, initialised U(-1/K, 1/K) as CVQ-VAE does.
        embed_dim: D.
        beta: commitment weight of the VQ-VAE loss ``beta mean((sg(z_q) - x)^2) + mean((z_q - sg(x))^2)``.
        distance: "cos" (search by angle; ``z_q`` and the loss use the raw codes) or "l2".
        anchor: "closest", "random" or "probrandom" anchors for the running codebook update.
        first_batch: update the codebook from anchors on the first training batch only.
        contras_loss: add the contrastive term (tau = 0.07).
        anchor_decay: gamma of the usage EMA ``embed_prob``.
        return_encodings: build the N x K one-hot ``encodings`` (off by default: it is N x K).
        backend: backend of the ops: "auto" or one of "cpu", "cuda", "triton", "torch".

    Forward: ``z [B, D, ...]`` -> ``(z_q [B, D, ...], loss, (perplexity, encodings or None, indices [N]))``.
    """

    _codebook_attr = "embedding"

    def __init__(
        self,
        num_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        distance: str = "cos",
        anchor: str = "probrandom",
        first_batch: bool = False,
        contras_loss: bool = False,
        *,
        anchor_decay: float = 0.99,
        return_encodings: bool = False,
        backend: str = "auto",
        sync: bool | None = None,
    ):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {tuple(DISTANCES)}; got {distance!r}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1]; got {beta}")
        self._init_vq(
            num_embed,
            embed_dim,
            metric=DISTANCES[distance],
            anchor=anchor,
            anchor_decay=anchor_decay,
            first_batch=first_batch,
            contrastive=contras_loss,
            backend=backend,
            codebook_init="uniform",
            sync=sync,
        )
        self.num_embed, self.embed_dim, self.beta, self.distance = num_embed, embed_dim, float(beta), distance
        self.contras_loss, self.decay, self.return_encodings = contras_loss, anchor_decay, return_encodings

    def forward(self, z: Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        # the extra arguments exist for interface compatibility with Gumbel quantisers, as in CVQ-VAE
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError(
                "temp, rescale_logits and return_logits exist only for interface compatibility "
                "(temp must be None or 1.0, the others False)"
            )
        x = move_features_last(z, 1, self.embed_dim)
        if not self.enabled:
            return z, torch.zeros((), device=z.device), (None, None, None)
        xf = x.reshape(-1, self.embed_dim)
        cb = self.effective_codebook()
        res = self._search(xf, cb)
        loss = vqvae_loss(xf, res.z_q, self.beta)  # beta weighs the commitment term
        if self.contras_loss and self.training:  # as CVQ-VAE: the contrastive term is a training loss
            loss = loss + self._contrastive_loss(xf, cb)
        out = straight_through(xf, res.z_q)
        self._after_forward([Segment(xf.detach(), 0, self.num_embed)], res.counts)
        encodings = F.one_hot(res.codes, self.num_embed).to(x.dtype) if self.return_encodings else None
        z_q = out.view(x.shape).movedim(-1, 1)
        return z_q, loss, (perplexity(res.counts), encodings, res.codes)

    def extra_repr(self) -> str:
        return (
            f"num_embed={self.num_embed}, embed_dim={self.embed_dim}, beta={self.beta}, "
            f"distance={self.distance}, anchor={self.anchor}"
        )

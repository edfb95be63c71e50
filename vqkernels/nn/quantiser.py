"""``VectorQuantiser``: a drop-in for CVQ-VAE's quantiser (Zheng & Vedaldi, ICCV 2023; README "Method" §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Segment, VQBase, move_features_last
from .functional import convex_vq_loss, perplexity, vqvae_loss

DISTANCES = {"cos": "cosine", "l2": "l2"}


class VectorQuantiser(VQBase):
    """CVQ-VAE's quantiser with its constructor, NCHW input and ``(z_q, loss, (perplexity, encodings, indices))``.

    Args:
        num_embed: K codes, initialised U(-1/K, 1/K) as CVQ-VAE does.
        embed_dim: D.
        beta: commitment weight of the VQ-VAE loss ``beta mean((sg(z_q) - x)^2) + mean((z_q - sg(x))^2)``.
        distance: "cos" (search by angle; ``z_q`` and the loss use the raw codes) or "l2".
        anchor: "closest", "random" or "probrandom" anchors for the running codebook update (None: no anchors).
        first_batch: update the codebook from anchors on the first training batch only.
        contras_loss: add the contrastive term (tau = 0.07).
        anchor_decay: gamma of the usage EMA ``embed_prob`` (also the attribute ``decay``, CVQ-VAE's name).
        return_encodings: build the N x K one-hot ``encodings`` (off by default: it is N x K).
        ema_update, decay, eps: EMA codebook update (van den Oord et al. 2017, app. A.1; ``decay`` is the EMA's,
            stored as ``ema_decay``); the codebook then takes no gradient and the loss is VQ-VAE's EMA loss, the
            commitment term alone ``beta mean((x - sg(z_q))^2)`` (README "Method" §2.9).
        threshold_ema_dead_code, rotation_trick, stochastic_sample_codes, sample_codebook_temp,
        orthogonal_reg_weight, orthogonal_reg_active_codes_only, orthogonal_reg_max_codes, codebook_dim: as for
            :class:`vqkernels.nn.VectorQuant` (README "Method" §2.10-§2.14).
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
        ema_update: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0,
        rotation_trick: bool = False,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        codebook_dim: int | None = None,
        backend: str = "auto",
        sync: bool | None = None,
    ):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {tuple(DISTANCES)}; got {distance!r}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1]; got {beta}")
        if codebook_dim is not None and (
            isinstance(codebook_dim, bool) or not isinstance(codebook_dim, int) or codebook_dim < 1
        ):
            raise ValueError(f"codebook_dim must be None or a positive int; got {codebook_dim!r}")
        self.nu = 0.0  # CVQ-VAE's plain straight-through estimator
        self._init_vq(
            num_embed,
            embed_dim if codebook_dim is None else codebook_dim,
            metric=DISTANCES[distance],
            anchor=anchor,
            anchor_decay=anchor_decay,
            first_batch=first_batch,
            contrastive=contras_loss,
            ema_update=ema_update,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            rotation_trick=rotation_trick,
            stochastic_sample_codes=stochastic_sample_codes,
            sample_codebook_temp=sample_codebook_temp,
            orthogonal_reg_weight=orthogonal_reg_weight,
            orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
            orthogonal_reg_max_codes=orthogonal_reg_max_codes,
            backend=backend,
            codebook_init="uniform",
            sync=sync,
        )
        self._init_projection(embed_dim, self.code_dim)
        self.num_embed, self.embed_dim, self.beta, self.distance = num_embed, embed_dim, float(beta), distance
        self.contras_loss, self.decay, self.return_encodings = contras_loss, anchor_decay, return_encodings
        self.codebook_dim = codebook_dim

    def _vq_loss(self, x: Tensor, z_q: Tensor) -> Tensor:
        """The VQ-VAE loss (``beta`` weighs the commitment term); with ``ema_update`` the commitment term alone."""
        if self.ema_update:
            return self.beta * convex_vq_loss(x, z_q, 0.0)  # (weights 1 on the commitment term, 0 on the other)
        return vqvae_loss(x, z_q, self.beta)

    def forward(self, z: Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        # the extra arguments exist for interface compatibility with Gumbel quantisers, as in CVQ-VAE
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError(
                "temp, rescale_logits and return_logits exist only for interface compatibility "
                "(temp must be None or 1.0, the others False)"
            )
        x = move_features_last(z, 1, self.embed_dim)
        x = self._project_in(x)
        if not self.enabled:
            return self._project_out(x).movedim(-1, 1), torch.zeros((), device=z.device), (None, None, None)
        xf = x.reshape(-1, self.code_dim)
        cb = self.effective_codebook()
        res = self._search(xf, cb)
        loss = self._vq_loss(xf, res.z_q)
        if self.contras_loss and self.training:  # as CVQ-VAE: the contrastive term is a training loss
            loss = loss + self._contrastive_loss(xf, cb)
        loss = self._with_orthogonal(loss, cb, res.counts)
        out = self._straight_through(xf, res.z_q)
        self._after_forward([Segment(xf.detach(), 0, self.num_embed)], res.counts, [res.codes])
        encodings = F.one_hot(res.codes, self.num_embed).to(x.dtype) if self.return_encodings else None
        z_q = self._project_out(out.view(x.shape)).movedim(-1, 1)
        return z_q, loss, (perplexity(res.counts), encodings, res.codes)

    def extra_repr(self) -> str:
        return (
            f"num_embed={self.num_embed}, embed_dim={self.embed_dim}, beta={self.beta}, "
            f"distance={self.distance}, anchor={self.anchor}{self._rules_repr()}"
        )

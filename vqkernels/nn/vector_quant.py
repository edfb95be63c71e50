"""``VectorQuant``: a drop-in for vqtorch's layer (Huh et al., ICML 2023) on the fused ops (README "Method" §2)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import Segment, VQBase, move_features_last
from .functional import convex_vq_loss, perplexity, straight_through
from .norms import VectorNorm


class VectorQuant(VQBase):
    """Vector quantisation with straight-through gradients, vqtorch's constructor and ``(z_q, out)`` return.

    Args:
        feature_size: D, the size of each vector (the size of ``dim`` of the input).
        num_codes: K.
        beta: weight of the codebook term of the convex loss
            ``(1 - beta) mean((x - sg(z_q))^2) + beta mean((sg(x) - z_q)^2)``; in [0, 1].
        sync_nu: synchronised update: the codebook also receives ``sync_nu`` x the downstream gradient.
        affine_lr: > 0 enables the learned affine re-parameterisation ``A = 1 + affine_lr * s``.
        affine_groups: G contiguous blocks of K/G codes, each with its own affine parameters.
        replace_freq: T > 0 replaces codes unused for T training steps by perturbed batch vectors (LRU).
        inplace_optimizer: callable ``params -> Optimizer``; alternating optimisation (needs ``beta = 1``).
        kmeans_init: fit the codebook by k-means++ and Lloyd on the first training batch.
        norm: input normalisation: None, "l2", "l2c", "bn", "gn", "in".
        cb_norm: codebook normalisation: None, "l2", "l2c".
        dim: feature axis of the input (default 1, NCHW channels); any input rank >= 2.
        metric: "l2" or "cosine" (search by angle; ``z_q`` and the loss use the effective codes).
        affine_mode: "learned" (default when ``affine_lr > 0``) or "running" (running statistics).
        kmeans_iters: Lloyd iterations of the k-means init.
        anchor, anchor_decay, first_batch, contrastive: CVQ anchor replacement (README "Method" §3), off by default.
        backend: backend of the ops: "auto" or one of "cpu", "cuda", "triton", "torch".
        sync: keep codebooks and buffers identical on every rank of a torch.distributed process group
            (README "Method" §4); None: whenever a process group of more than one rank is initialised.

    Forward: ``z`` of any shape with ``feature_size`` on ``dim`` -> ``(z_q, out)`` where ``z_q`` has the shape
    of ``z`` and ``out`` holds ``z`` and ``z_q`` (``[..., 1, D]``), ``d`` (Euclidean distance, ``[..., 1]``; the
    cosine distance for metric="cosine"), ``q`` (int64 codes ``[..., 1]``), ``loss`` and ``perplexity``.

    Example:
        >>> vq = VectorQuant(64, 1024, dim=-1)
        >>> z_q, out = vq(torch.randn(8, 100, 64))
        >>> out["loss"].backward()
    """

    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        beta: float = 0.95,
        sync_nu: float = 0.0,
        affine_lr: float = 0.0,
        affine_groups: int = 1,
        replace_freq: int = 0,
        inplace_optimizer: Callable | None = None,
        kmeans_init: bool = False,
        norm: str | None = None,
        cb_norm: str | None = None,
        dim: int = 1,
        *,
        metric: str = "l2",
        affine_mode: str | None = None,
        kmeans_iters: int = 20,
        anchor: str | None = None,
        anchor_decay: float = 0.99,
        first_batch: bool = False,
        contrastive: bool = False,
        backend: str = "auto",
        sync: bool | None = None,
    ):
        super().__init__()
        self.feature_size, self.dim, self.nu, self.affine_lr = feature_size, dim, float(sync_nu), affine_lr
        self.groups = 1
        self._init_vq(
            num_codes,
            feature_size,
            metric=metric,
            cb_norm=cb_norm,
            affine_lr=affine_lr,
            affine_groups=affine_groups,
            affine_mode=affine_mode,
            replace_freq=replace_freq,
            inplace_optimizer=inplace_optimizer,
            beta=beta,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            anchor=anchor,
            anchor_decay=anchor_decay,
            first_batch=first_batch,
            contrastive=contrastive,
            backend=backend,
            sync=sync,
        )
        self.norm = norm
        self.norm_layer = VectorNorm(norm, feature_size)

    def forward(self, z: Tensor) -> tuple[Tensor, dict]:
        x = self.norm_layer(move_features_last(z, self.dim, self.feature_size))
        if not self.enabled:
            return x.movedim(-1, self.dim), {}
        shape = x.shape
        xf = x.reshape(-1, self.feature_size)
        segments = [Segment(xf.detach(), 0, self.num_codes)]
        self._before_search(segments)
        cb = self.effective_codebook()
        res = self._search(xf, cb)
        loss = convex_vq_loss(xf, res.z_q, self.beta)
        if self.contrastive and self.training:  # CVQ adds it in training only
            loss = loss + self._contrastive_loss(xf, cb)
        out_rows = straight_through(xf, res.z_q, self.nu)
        self._after_forward(segments, res.counts)
        d = res.dist.sqrt() if self.metric == "l2" else res.dist
        out = {
            "z": x.unsqueeze(-2),
            "z_q": res.z_q.view(shape).unsqueeze(-2),
            "d": d.view(shape[:-1]).unsqueeze(-1),
            "q": res.codes.view(shape[:-1]).unsqueeze(-1),
            "loss": loss,
            "perplexity": perplexity(res.counts),
        }
        return out_rows.view(shape).movedim(-1, self.dim), out

    def extra_repr(self) -> str:
        return (
            f"feature_size={self.feature_size}, num_codes={self.num_codes}, beta={self.beta}, nu={self.nu}, "
            f"metric={self.metric}, dim={self.dim}, enabled={self.enabled}"
        )

"""The base of every VQ layer: construction, the fused search (with the alternating step), and the hooks where the
codebook updates run.

The layers hold no search code of their own: every search, gather and per-code reduction goes through
:mod:`vqkernels.ops`, so they run on every backend. Each piece of state has its own module:

- :mod:`.codebook`: the raw codes, the effective codebook (norm + affine) and the running-affine update;
- :mod:`.kmeans_init`: k-means init on the first training batch (before the search);
- :mod:`.dead_codes`: LRU dead-code replacement (after the forward);
- :mod:`.anchors`: CVQ anchor replacement (after the forward);
- :mod:`.checkpoint`: loading the original libraries' checkpoints.

Each update module owns its distributed sync (:mod:`.distributed` has the collectives), so that codebooks stay
identical on every rank (README "Method" §4).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .. import ops
from . import anchors, checkpoint, dead_codes
from . import distributed as vq_dist
from . import kmeans_init as km_init  # (``kmeans_init`` is a constructor argument)
from .codebook import CodebookMixin
from .contrastive import contrastive_loss
from .functional import gather_codes
from .segments import SearchResult, Segment

__all__ = ["VQBase", "Segment", "SearchResult", "move_features_last"]

ANCHORS = anchors.ANCHORS
METRICS = ("l2", "cosine")


class VQBase(CodebookMixin, nn.Module):
    """Base of the VQ layers. Subclasses call :meth:`_init_vq` and implement ``forward``.

    ``_codebook_attr`` names the ``nn.Embedding`` holding the raw codes (``codebook`` for vqtorch,
    ``embedding`` for CVQ-VAE) so that the original checkpoints load.
    """

    enabled = True  # False: the layer is the identity (see vqkernels.nn.no_vq)

    def _init_vq(
        self,
        num_codes: int,
        code_dim: int,
        *,
        metric: str = "l2",
        cb_norm: str | None = None,
        affine_lr: float = 0.0,
        affine_groups: int = 1,
        affine_mode: str | None = None,
        replace_freq: int = 0,
        inplace_optimizer: Callable | None = None,
        beta: float = 0.95,
        kmeans_init: bool = False,
        kmeans_iters: int = 20,
        anchor: str | None = None,
        anchor_decay: float = 0.99,
        first_batch: bool = False,
        contrastive: bool = False,
        backend: str = "auto",
        codebook_init: str = "normal",
        sync: bool | None = None,
    ) -> None:
        _check_positive_int(num_codes, "num_codes")
        _check_positive_int(code_dim, "feature_size")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1]; got {beta}")
        if not isinstance(replace_freq, int) or replace_freq < 0:
            raise ValueError(f"replace_freq must be an int >= 0; got {replace_freq!r}")
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}; got {anchor!r}")
        if not 0.0 < anchor_decay < 1.0:
            raise ValueError(f"anchor_decay must be in (0, 1); got {anchor_decay}")
        if inplace_optimizer is not None and float(beta) != 1.0:
            raise ValueError("inplace_optimizer (alternating optimisation) requires beta = 1.0")
        if not isinstance(kmeans_iters, int) or kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be an int >= 0; got {kmeans_iters!r}")
        if sync not in (None, True, False):
            raise ValueError(f"sync must be None, True or False; got {sync!r}")
        self.sync = sync
        self.num_codes, self.code_dim, self.metric = num_codes, code_dim, metric
        self.beta, self.backend, self.kmeans_iters = float(beta), backend, kmeans_iters
        self.anchor, self.anchor_decay = anchor, anchor_decay
        self.first_batch, self.contrastive = first_batch, contrastive
        self.replace_freq = replace_freq

        self._init_codebook(num_codes, code_dim, cb_norm, affine_lr, affine_groups, affine_mode, codebook_init)
        if kmeans_init:
            km_init.register(self)
        if replace_freq > 0:
            dead_codes.register(self, replace_freq)
        if anchor is not None:
            anchors.register(self, anchor, code_dim)
        self.inplace_optimizer_fn = inplace_optimizer
        if inplace_optimizer is not None:
            self.inplace_codebook_optimizer = inplace_optimizer(self._codebook_params())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        checkpoint.adapt_state_dict(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _updates_after_forward(self) -> bool:
        return self.replace_freq > 0 or self.anchor is not None

    def _sync_active(self) -> bool:
        """Training with a process group of > 1 ranks (and sync not False): the updates go through collectives."""
        return self.training and vq_dist.enabled(getattr(self, "sync", None))

    # ----------------------------------------------------------------------------------------------------------
    # the search
    # ----------------------------------------------------------------------------------------------------------
    def _search(self, x: Tensor, cb: Tensor, lo: int = 0, hi: int | None = None) -> SearchResult:
        """Quantise rows ``x [N, D']`` with effective codes ``cb[lo:hi]``; codes are returned in ``[0, hi - lo)``.

        The search runs in the dtype of ``x`` (so autocast gives a low-precision search); ``z_q`` is differentiable
        w.r.t. ``cb``. With the alternating optimiser, one optimiser step on the codebook happens between the
        search and the gather (README "Method" §2.4).
        """
        hi = cb.shape[0] if hi is None else hi
        block = cb[lo:hi].to(x.dtype)
        xd = x.detach()
        if self._alternating_active():
            with torch.no_grad():
                codes, _, dist, counts = ops.quantize(xd, block.detach(), metric=self.metric, backend=self.backend)
            self._alternating_step(xd, codes + lo)
            block = self.effective_codebook()[lo:hi].to(x.dtype)
            return SearchResult(codes, gather_codes(block, codes), dist, counts)
        q = ops.quantize(xd, block, metric=self.metric, backend=self.backend)
        return SearchResult(q.codes, q.z_q, q.dist, q.counts)

    def _alternating_active(self) -> bool:
        return hasattr(self, "inplace_codebook_optimizer") and self.training and torch.is_grad_enabled()

    def _alternating_step(self, x: Tensor, codes: Tensor) -> None:
        """One optimiser step on ``mean((C_hat[codes] - sg(x))^2)`` (Huh et al. 2023, §4.3 alternating optimisation)."""
        opt = self.inplace_codebook_optimizer
        opt.zero_grad(set_to_none=True)
        cb = self.effective_codebook()
        loss = ((gather_codes(cb, codes).float() - x.float()) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _contrastive_loss(self, x: Tensor, cb: Tensor) -> Tensor:
        return contrastive_loss(x.detach(), cb, self.metric)

    # ----------------------------------------------------------------------------------------------------------
    # where the non-gradient updates run (each is one clean graph break under torch.compile, paid only by layers
    # that enable it: the checks guarding the calls are static)
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _before_search(self, segments: list[Segment]) -> None:
        """Training only: k-means init on the first forward (before the search; README "Method" §2.5) and the
        running-statistics affine update."""
        if not self.training:
            return
        if km_init.enabled(self):
            km_init.init_once(self, segments)
        if self._running_affine():
            self._update_running_affine(torch.cat([s.rows for s in segments]))

    @torch.no_grad()
    def _after_forward(self, segments: list[Segment], counts: Tensor) -> None:
        """Training only: LRU dead-code replacement and CVQ anchor update (they affect the next step)."""
        if self.training and self._updates_after_forward():
            self._after_forward_eager(segments, counts)

    @torch.compiler.disable
    @torch.no_grad()
    def _after_forward_eager(self, segments: list[Segment], counts: Tensor) -> None:
        if self.replace_freq > 0:
            dead_codes.replace(self, segments, counts)
        if self.anchor is not None:
            anchors.update(self, segments, counts)


def _check_positive_int(v: object, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int; got {v!r}")


def move_features_last(z: Tensor, dim: int, feature_size: int) -> Tensor:
    """``z`` with its feature axis ``dim`` moved last; checks rank >= 2 and the feature size."""
    if not isinstance(z, Tensor):
        raise TypeError(f"input must be a torch.Tensor; got {type(z).__name__}")
    if z.dim() < 2:
        raise ValueError(f"input must have rank >= 2 (a batch axis and a feature axis); got shape {tuple(z.shape)}")
    if not -z.dim() <= dim < z.dim():
        raise ValueError(f"dim={dim} is out of range for an input of rank {z.dim()}")
    if z.shape[dim] != feature_size:
        raise ValueError(f"input has {z.shape[dim]} features on dim={dim}; the layer expects {feature_size}")
    if not z.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor; got {z.dtype}")
    return z.movedim(dim, -1)

"""Machinery shared by every VQ layer: the codebook and its effective form, the fused search, and the
non-gradient codebook updates (k-means init, LRU dead-code replacement, CVQ anchors).

The layers hold no search code of their own: every search, gather and per-code reduction goes through the ops
(:func:`vqkernels.quantize`, :func:`vqkernels.nearest_code`, :func:`vqkernels.code_stats`), so they run on
every backend.

Rows handed to the updates come as *segments* ``(rows [n, D'], lo, hi)``: the rows that searched codes
``lo..hi-1``. A plain layer has one segment; a GroupVectorQuant with separate code blocks has one per group.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from .. import ops
from . import cvq
from . import distributed as vq_dist
from .affine import AffineTransform
from .functional import gather_codes
from .kmeans import kmeans
from .norms import CODEBOOK_NORMS, codebook_norm

ANCHORS = (None, "closest", "random", "probrandom")
METRICS = ("l2", "cosine")


class Segment(NamedTuple):
    rows: Tensor  # [n, D'] detached inputs that searched codes lo..hi-1
    lo: int
    hi: int


class SearchResult(NamedTuple):
    codes: Tensor  # int64 [N]
    z_q: Tensor  # [N, D'] in the input dtype, differentiable w.r.t. the codebook
    dist: Tensor  # fp32 [N] (squared Euclidean for l2)
    counts: Tensor  # int64 [K_block]


class VQBase(nn.Module):
    """Base of the VQ layers. Subclasses call :meth:`_init_vq` and implement ``forward``.

    ``_codebook_attr`` names the ``nn.Embedding`` holding the raw codes (``codebook`` for vqtorch,
    ``embedding`` for CVQ-VAE) so that the original checkpoints load.
    """

    _codebook_attr = "codebook"
    enabled = True  # False: the layer is the identity (see vqkernels.nn.no_vq)

    # ----------------------------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------------------------
    def _init_vq(self, num_codes: int, code_dim: int, *, metric: str = "l2", cb_norm: str | None = None,
                 affine_lr: float = 0.0, affine_groups: int = 1, affine_mode: str | None = None,
                 replace_freq: int = 0, inplace_optimizer: Callable | None = None, beta: float = 0.95,
                 kmeans_init: bool = False, kmeans_iters: int = 20, anchor: str | None = None,
                 anchor_decay: float = 0.99, first_batch: bool = False, contrastive: bool = False,
                 backend: str = "auto", codebook_init: str = "normal", sync: bool | None = None) -> None:
        _check_positive_int(num_codes, "num_codes")
        _check_positive_int(code_dim, "feature_size")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
        if cb_norm not in CODEBOOK_NORMS:
            raise ValueError(f"cb_norm must be one of {CODEBOOK_NORMS}; got {cb_norm!r}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1]; got {beta}")
        if affine_lr < 0:
            raise ValueError(f"affine_lr must be >= 0; got {affine_lr}")
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

        self.num_codes, self.code_dim, self.metric, self.codebook_norm = num_codes, code_dim, metric, cb_norm
        self.beta, self.backend, self.kmeans_iters = float(beta), backend, kmeans_iters
        self.anchor, self.anchor_decay = anchor, anchor_decay
        self.first_batch, self.contrastive = first_batch, contrastive
        self.replace_freq = replace_freq

        emb = nn.Embedding(num_codes, code_dim)
        if codebook_init == "uniform":  # CVQ-VAE's U(-1/K, 1/K)
            nn.init.uniform_(emb.weight, -1.0 / num_codes, 1.0 / num_codes)
        setattr(self, self._codebook_attr, emb)

        if affine_mode is None and affine_lr > 0:
            affine_mode = "learned"
        if affine_mode is not None:
            self.affine_transform = AffineTransform(code_dim, num_codes, affine_groups,
                                                    lr_scale=affine_lr if affine_lr > 0 else 1.0, mode=affine_mode)
        elif not isinstance(affine_groups, int) or affine_groups < 1 or num_codes % affine_groups:
            raise ValueError(f"affine_groups must be a positive divisor of num_codes = {num_codes}")
        if kmeans_init:
            self.register_buffer("data_initialized", torch.zeros(1))
        if replace_freq > 0:
            self.register_buffer("lru_counters", torch.full((num_codes,), replace_freq, dtype=torch.int64))
        if anchor is not None:
            self.register_buffer("embed_prob", torch.zeros(num_codes))
            self.register_buffer("anchor_initialized", torch.zeros((), dtype=torch.int64))
            if anchor == "random":
                self.register_buffer("feature_pool", torch.zeros(num_codes, code_dim))
                self.register_buffer("pool_filled", torch.zeros((), dtype=torch.int64))
        self.inplace_optimizer_fn = inplace_optimizer
        if inplace_optimizer is not None:
            self.inplace_codebook_optimizer = inplace_optimizer(self._codebook_params())

    # Bookkeeping buffers that vqtorch / CVQ-VAE checkpoints do not hold: loading such a checkpoint keeps their
    # current values instead of failing a strict load (they restart, as they would in the original code).
    _OPTIONAL_STATE = ("lru_counters", "embed_prob", "anchor_initialized", "feature_pool", "pool_filled",
                       "affine_transform.running_statistics_initialized")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        legacy = prefix + "_counts"  # vqtorch's LRU counters (float)
        if legacy in state_dict and hasattr(self, "lru_counters"):
            state_dict[prefix + "lru_counters"] = state_dict.pop(legacy).round().to(torch.int64)
        own = dict(self.named_buffers())
        for name in self._OPTIONAL_STATE:
            if name in own and prefix + name not in state_dict:
                state_dict[prefix + name] = own[name].detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _codebook_params(self) -> list[nn.Parameter]:
        params = [self.codebook_weight]
        if hasattr(self, "affine_transform") and self.affine_transform.mode == "learned":
            params += [self.affine_transform.scale, self.affine_transform.bias]
        return params

    # ----------------------------------------------------------------------------------------------------------
    # the codebook
    # ----------------------------------------------------------------------------------------------------------
    @property
    def codebook_weight(self) -> nn.Parameter:
        """The raw codes ``[K, D']`` (the ``nn.Embedding`` weight)."""
        return getattr(self, self._codebook_attr).weight

    def _has_transform(self) -> bool:
        return hasattr(self, "affine_transform") or self.codebook_norm not in (None, "none")

    def _updates_after_forward(self) -> bool:
        return self.replace_freq > 0 or self.anchor is not None

    def effective_codebook(self) -> Tensor:
        """``C_hat = affine(cb_norm(C))`` ``[K, D']``, differentiable w.r.t. the codebook and affine parameters."""
        w = self.codebook_weight
        if self.training and self._has_transform() and self._updates_after_forward():
            # The transform saves its input for backward; the in-place updates after the forward must not
            # change what backward sees, so the transform works on a copy (one K x D' copy per step).
            w = w.clone()
        c = codebook_norm(w, self.codebook_norm)
        if hasattr(self, "affine_transform"):
            c = self.affine_transform(c)
        return c

    @torch.no_grad()
    def get_codebook(self) -> Tensor:
        """The effective codebook ``C_hat`` ``[K, D']`` (no grad)."""
        return self.effective_codebook().detach().clone()

    def get_codebook_affine_params(self) -> tuple[Tensor, Tensor] | None:
        """``(A, bias)`` of the affine transform (``[G, D']`` each), or None when it is off."""
        if hasattr(self, "affine_transform"):
            return self.affine_transform.get_affine_params()
        return None

    @torch.no_grad()
    def _write_effective(self, codes: Tensor, vectors: Tensor) -> None:
        """Set raw codes so that their *effective* value (after affine) equals ``vectors [M, D']``.

        With ``cb_norm`` the raw code is written as the inverse-affine vector; its effective value is then that
        vector after the codebook normalisation.
        """
        raw = vectors.to(self.codebook_weight.dtype)
        if hasattr(self, "affine_transform"):
            raw = self.affine_transform.inverse(raw.float(), codes, self.num_codes).to(raw.dtype)
        self.codebook_weight.index_copy_(0, codes, raw)

    # ----------------------------------------------------------------------------------------------------------
    # the search
    # ----------------------------------------------------------------------------------------------------------
    def _search(self, x: Tensor, cb: Tensor, lo: int = 0, hi: int | None = None) -> SearchResult:
        """Quantise rows ``x [N, D']`` with effective codes ``cb[lo:hi]``; codes are returned in ``[0, hi - lo)``.

        The search runs in the dtype of ``x`` (so autocast gives a low-precision search); ``z_q`` is differentiable
        w.r.t. ``cb``. With the alternating optimiser, one optimiser step on the codebook happens between the
        search and the gather (METHODS §2.4).
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

    # ----------------------------------------------------------------------------------------------------------
    # non-gradient updates
    # ----------------------------------------------------------------------------------------------------------
    @torch.compiler.disable
    def _kmeans_pending(self) -> bool:
        return self._needs_kmeans_init()

    def _needs_kmeans_init(self) -> bool:
        return self.training and hasattr(self, "data_initialized") and not bool(self.data_initialized.item())

    @torch.no_grad()
    def _kmeans_fit(self, segments: list[Segment]) -> None:
        """Fit each segment's codes by k-means++ and Lloyd on its rows; written as effective codes."""
        for seg in segments:
            if seg.rows.shape[0] == 0:
                continue
            res = kmeans(seg.rows.float(), seg.hi - seg.lo, iters=self.kmeans_iters, backend=self.backend,
                         metric="cosine" if self.metric == "cosine" else "l2")
            idx = torch.arange(seg.lo, seg.hi, device=seg.rows.device)
            self._write_effective(idx, res.centroids.float())

    @torch.no_grad()
    def _kmeans_init(self, segments: list[Segment]) -> None:
        """k-means init of the segments' codes; synchronised: on every rank's rows, on rank 0, then broadcast."""
        if not self._sync_active():
            self._kmeans_fit(segments)
            return
        gathered = [Segment(vq_dist.all_gather_rows(s.rows, vq_dist.KMEANS_MAX_ROWS), s.lo, s.hi) for s in segments]
        if torch.distributed.get_rank() == 0:
            self._kmeans_fit(gathered)
        vq_dist.broadcast_state([self.codebook_weight])

    @torch.no_grad()
    def _before_search(self, segments: list[Segment]) -> None:
        """Training only: k-means init on the first forward (before the search; METHODS §2.5) and the
        running-statistics affine update."""
        if not self.training:
            return
        if hasattr(self, "data_initialized"):  # static: a layer without k-means init traces straight through
            self._kmeans_init_once(segments)
        if self._running_affine():
            self._update_running_affine(torch.cat([s.rows for s in segments]))

    # The non-gradient updates run eagerly: under torch.compile each is one clean graph break, and only layers that
    # enable it pay for it (METHODS §4; the checks guarding the calls are static).
    @torch.compiler.disable
    @torch.no_grad()
    def _kmeans_init_once(self, segments: list[Segment]) -> None:
        if self._needs_kmeans_init():
            self._kmeans_init(segments)
            self.data_initialized.fill_(1)

    def _running_affine(self) -> bool:
        return hasattr(self, "affine_transform") and self.affine_transform.mode == "running"

    @torch.compiler.disable
    @torch.no_grad()
    def _update_running_affine(self, rows: Tensor) -> None:
        """Running-statistics affine mode, training only: fold the moments of ``rows`` and the codes in (the
        input moments summed over ranks when synchronised)."""
        if self.training and hasattr(self, "affine_transform") and self.affine_transform.mode == "running":
            raw = codebook_norm(self.codebook_weight, self.codebook_norm)
            moments = None
            if self._sync_active():
                acc = torch.promote_types(rows.dtype, torch.float32)
                r = rows.to(acc)
                n = torch.tensor([float(rows.shape[0])], dtype=acc, device=rows.device)
                tot = vq_dist.all_reduce_sum(torch.cat([r.sum(0), (r * r).sum(0), n]))
                d = rows.shape[1]
                count = float(tot[-1])
                if count == 0:
                    return
                mean = tot[:d] / count
                moments = (mean, (tot[d:2 * d] / count - mean * mean).clamp_min(0))
            self.affine_transform.update_running_statistics(rows, raw, moments)

    def _sync_active(self) -> bool:
        """Training with a process group of > 1 ranks (and sync not False): the updates go through collectives."""
        return self.training and vq_dist.enabled(getattr(self, "sync", None))

    @torch.no_grad()
    def _after_forward(self, segments: list[Segment], counts: Tensor) -> None:
        """Training only: LRU dead-code replacement and CVQ anchor update (they affect the next step)."""
        if self.training and self._updates_after_forward():
            self._after_forward_eager(segments, counts)

    @torch.compiler.disable
    @torch.no_grad()
    def _after_forward_eager(self, segments: list[Segment], counts: Tensor) -> None:
        num_rows = sum(s.rows.shape[0] for s in segments)
        sync = self._sync_active()
        if sync and (self.replace_freq > 0 or self.anchor is not None):  # global usage (METHODS §4)
            tot = vq_dist.all_reduce_sum(torch.cat([counts.to(torch.int64),
                                                    torch.tensor([num_rows], device=counts.device)]))
            counts, num_rows = tot[:-1], int(tot[-1])
        if self.replace_freq > 0:
            self._replace_dead_codes(segments, counts)
        if self.anchor is not None and num_rows > 0:
            self._cvq_update(segments, counts, num_rows, sync)
        if sync and (self.replace_freq > 0 or self.anchor is not None):
            # what was drawn at random (replacements, pool, samples) is rank 0's: every rank takes its state
            state = [self.codebook_weight] + [getattr(self, n) for n in
                                              ("lru_counters", "embed_prob", "anchor_initialized", "feature_pool",
                                               "pool_filled") if hasattr(self, n)]
            vq_dist.broadcast_state(state)

    def _replace_dead_codes(self, segments: list[Segment], counts: Tensor) -> None:
        """LRU (METHODS §2.6): counters start at T, all decrement each step, used codes reset to T; codes at 0
        become random batch vectors ``v + 0.01 |v| eps`` written as effective codes."""
        t = self.replace_freq
        self.lru_counters.sub_(1)
        self.lru_counters[counts > 0] = t
        for seg in segments:
            dead = torch.nonzero(self.lru_counters[seg.lo:seg.hi] <= 0).squeeze(1) + seg.lo
            n = seg.rows.shape[0]
            if dead.numel() == 0 or n == 0:
                continue
            pick = torch.randint(0, n, (dead.numel(),), device=seg.rows.device)
            v = seg.rows[pick].float()
            v = v + 0.01 * v.norm(dim=1, keepdim=True) * torch.randn_like(v)
            self._write_effective(dead, v)
            self.lru_counters[dead] = t

    def _cvq_update(self, segments: list[Segment], counts: Tensor, num_rows: int, sync: bool = False) -> None:
        """CVQ (Zheng & Vedaldi 2023, §3.2; METHODS §3): usage EMA, per-code decay, anchors, running update."""
        cvq.update_usage_ema(self.embed_prob, counts, num_rows, self.anchor_decay)
        if self.anchor == "random":
            cvq.update_feature_pool(self.feature_pool, self.pool_filled, torch.cat([s.rows for s in segments]))
        if self.first_batch and bool(self.anchor_initialized.item()):
            return
        alpha = cvq.anchor_alpha(self.embed_prob, self.anchor_decay)
        cb = self.effective_codebook().detach().float()
        for seg in segments:
            if seg.rows.shape[0] == 0 and not (sync and self.anchor == "closest"):
                continue  # (a synchronised closest update still joins the collective with no candidates)
            block = cb[seg.lo:seg.hi]
            if self.anchor == "closest" and sync:
                anchors = self._global_closest(seg.rows, block)
            elif self.anchor == "closest":
                anchors = cvq.closest_anchors(seg.rows, block.to(seg.rows.dtype), self.metric, backend=self.backend)
            elif self.anchor == "probrandom":
                anchors = cvq.probrandom_anchors(seg.rows, block.to(seg.rows.dtype), self.metric,
                                                  backend=self.backend)
            else:
                anchors = cvq.random_anchors(self.feature_pool, self.pool_filled)[seg.lo:seg.hi]
            a = alpha[seg.lo:seg.hi, None]
            new = (1 - a) * block + a * anchors.float()
            self._write_effective(torch.arange(seg.lo, seg.hi, device=block.device), new)
        self.anchor_initialized.fill_(1)

    def _global_closest(self, rows: Tensor, block: Tensor) -> Tensor:
        """Per code, the nearest row over every rank's batch (the swapped-role search, then a min over ranks)."""
        if rows.shape[0]:
            idx, d = ops.nearest_code(block.to(rows.dtype), rows, metric=self.metric, backend=self.backend)
            local_rows, local_d = rows.index_select(0, idx).to(block.dtype), d.to(torch.float64)
        else:
            local_rows = torch.zeros_like(block)
            local_d = torch.full((block.shape[0],), float("inf"), dtype=torch.float64, device=block.device)
        return vq_dist.global_closest(local_d, local_rows)

    def _contrastive_loss(self, x: Tensor, cb: Tensor) -> Tensor:
        return cvq.contrastive_loss(x.detach(), cb, self.metric)


def _check_positive_int(v, name: str) -> None:
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

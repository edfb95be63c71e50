"""The base of every VQ layer: construction, the fused search (with the alternating step), and the hooks where the
codebook updates run.

The layers hold no search code of their own: every search, gather and per-code reduction goes through
:mod:`vqkernels.ops`, so they run on every backend. Each piece of state has its own module:

- :mod:`.codebook`: the raw codes, the effective codebook (norm + affine) and the running-affine update;
- :mod:`.kmeans_init`: k-means init on the first training batch (before the search);
- :mod:`.dead_codes`: LRU dead-code replacement (after the forward);
- :mod:`.anchors`: CVQ anchor replacement (after the forward);
- :mod:`.ema_update`: the EMA codebook update and expiry by EMA cluster size (after the forward);
- :mod:`.checkpoint`: loading the original libraries' checkpoints.

The gradient-side rules are functions the layers call: the rotation trick (:mod:`.rotation`) in place of the
straight-through estimator, tempered code sampling (:mod:`.sampling`) in place of the search in training, and the
orthogonal regulariser (:mod:`.orthogonal`) added to the loss; the low-dimensional codebook projection
(``codebook_dim``) wraps the whole quantiser (README "Method" §2.9-§2.14).

Each update module owns its distributed sync (:mod:`.distributed` has the collectives), so that codebooks stay
identical on every rank (README "Method" §4).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import anchors, checkpoint, dead_codes
from . import distributed as vq_dist
from . import ema_update as ema_layer  # (``ema_update`` is a constructor argument)
from . import kmeans_init as km_init  # (``kmeans_init`` is a constructor argument)
from .codebook import CodebookMixin
from .contrastive import contrastive_loss
from .functional import convex_vq_loss, gather_codes, straight_through
from .orthogonal import NORM_EPS as ORTHO_NORM_EPS
from .orthogonal import orthogonal_loss
from .rotation import rotation_trick as rotation_estimator
from .sampling import sample_codes
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
        inplace_optimizer_affine: bool = False,
        beta: float = 0.95,
        sync_nu: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 20,
        anchor: str | None = None,
        anchor_decay: float = 0.99,
        first_batch: bool = False,
        contrastive: bool = False,
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
        _check_rule_options(
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
            inplace_optimizer_affine=inplace_optimizer_affine,
        )
        if inplace_optimizer_affine and inplace_optimizer is None:
            raise ValueError("inplace_optimizer_affine=True needs an inplace_optimizer")
        if ema_update:
            # The EMA sets the codes; a rule that trains the codebook by gradient would be overwritten every step.
            learned_affine = affine_mode == "learned" or (affine_mode is None and affine_lr > 0)
            conflicts = {
                "sync_nu": float(sync_nu) != 0.0,
                "inplace_optimizer": inplace_optimizer is not None,
                "orthogonal_reg_weight": orthogonal_reg_weight > 0,
                "contrastive": bool(contrastive),
                "affine_lr (learned affine)": learned_affine,
            }
            for name, on in conflicts.items():
                if on:
                    raise ValueError(
                        f"ema_update=True sets the codebook by EMA and gives it no gradient; {name} trains it by "
                        "gradient: turn one of them off"
                    )
        self.sync = sync
        self.num_codes, self.code_dim, self.metric = num_codes, code_dim, metric
        self.beta, self.backend, self.kmeans_iters = float(beta), backend, kmeans_iters
        self.anchor, self.anchor_decay = anchor, anchor_decay
        self.first_batch, self.contrastive = first_batch, contrastive
        self.replace_freq = replace_freq
        self.ema_update, self.ema_decay, self.ema_eps = ema_update, float(decay), float(eps)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.rotation_trick = rotation_trick
        self.stochastic_sample_codes, self.sample_codebook_temp = stochastic_sample_codes, float(sample_codebook_temp)
        self.orthogonal_reg_weight = float(orthogonal_reg_weight)
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.inplace_optimizer_affine = inplace_optimizer_affine

        self._init_codebook(num_codes, code_dim, cb_norm, affine_lr, affine_groups, affine_mode, codebook_init)
        if kmeans_init:
            km_init.register(self)
        if replace_freq > 0:
            dead_codes.register(self, replace_freq)
        if anchor is not None:
            anchors.register(self, anchor, code_dim)
        if ema_update or self.threshold_ema_dead_code > 0:
            ema_layer.register(self)
            self.register_load_state_dict_post_hook(_restart_ema_after_load)
        if ema_update:
            self.codebook_weight.requires_grad_(False)  # (an optimiser skips it; DDP expects no gradient for it)
        self.inplace_optimizer_fn = inplace_optimizer
        if inplace_optimizer is not None:
            # vqtorch steps the codebook only; the affine parameters join on request (README "Method" §2.4)
            self.inplace_codebook_optimizer = inplace_optimizer(self._codebook_params(inplace_optimizer_affine))

    def _init_projection(self, in_features: int, search_features: int) -> None:
        """``codebook_dim``: ``project_in`` (Linear ``in_features -> search_features``) before the search and
        ``project_out`` back after it (Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN",
        §3.2 factorised codes); none when the sizes agree."""
        if in_features != search_features:
            self.project_in = nn.Linear(in_features, search_features)
            self.project_out = nn.Linear(search_features, in_features)

    def _project_in(self, x: Tensor) -> Tensor:
        return self.project_in(x) if hasattr(self, "project_in") else x

    def _project_out(self, x: Tensor) -> Tensor:
        return self.project_out(x) if hasattr(self, "project_out") else x

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        checkpoint.adapt_state_dict(self, state_dict, prefix)
        if ema_layer.enabled(self) and not any(prefix + n in state_dict for n in ("cluster_size", "embed_avg")):
            # a checkpoint of a layer without EMA statistics: they restart from the loaded codes once the whole
            # layer has loaded (the post-hook); the placeholders keep a strict load from failing
            state_dict[prefix + "cluster_size"] = self.cluster_size.detach().clone()
            state_dict[prefix + "embed_avg"] = self.embed_avg.detach().clone()
            self._ema_restart_on_load = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _updates_after_forward(self) -> bool:
        return self.replace_freq > 0 or self.anchor is not None or ema_layer.enabled(self)

    def _sync_active(self) -> bool:
        """Training with a process group of > 1 ranks (and sync not False): the updates go through collectives."""
        return self.training and vq_dist.enabled(getattr(self, "sync", None))

    def _rules_repr(self) -> str:
        """The codebook-rule options that are on, for ``extra_repr``."""
        on = []
        if self.ema_update:
            on.append(f"ema_update=True, decay={self.ema_decay}, eps={self.ema_eps}")
        if self.threshold_ema_dead_code > 0:
            on.append(f"threshold_ema_dead_code={self.threshold_ema_dead_code}")
        if self.rotation_trick:
            on.append("rotation_trick=True")
        if self.stochastic_sample_codes:
            on.append(f"stochastic_sample_codes=True, sample_codebook_temp={self.sample_codebook_temp}")
        if self.orthogonal_reg_weight > 0:
            on.append(f"orthogonal_reg_weight={self.orthogonal_reg_weight}")
        if hasattr(self, "project_in"):
            on.append(f"codebook_dim={self.code_dim}")
        return "".join(", " + s for s in on)

    def _num_code_blocks(self) -> int:
        """How many blocks of codes are searched separately: G for ``share=False`` groups or stages, else 1."""
        return 1 if getattr(self, "share", True) else self.groups

    # ----------------------------------------------------------------------------------------------------------
    # the search
    # ----------------------------------------------------------------------------------------------------------
    def _search(self, x: Tensor, cb: Tensor, lo: int = 0, hi: int | None = None) -> SearchResult:
        """Quantise rows ``x [N, D']`` with effective codes ``cb[lo:hi]``; codes are returned in ``[0, hi - lo)``.

        The search runs in the dtype of ``x`` (so autocast gives a low-precision search); ``z_q`` is differentiable
        w.r.t. ``cb``. With ``stochastic_sample_codes``, training draws the codes (README "Method" §2.12). With the
        alternating optimiser, one optimiser step on the codebook happens between the search and the gather
        (README "Method" §2.4).
        """
        hi = cb.shape[0] if hi is None else hi
        block = cb[lo:hi].to(x.dtype)
        xd = x.detach()
        alternating = self._alternating_active()
        if not (alternating or self._sampling_active()):
            q = ops.quantize(xd, block, metric=self.metric, backend=self.backend)
            return SearchResult(q.codes, q.z_q, q.dist, q.counts)
        codes, dist, counts = self._choose_codes(xd, block.detach())
        if alternating:
            self._alternating_step(xd, codes + lo)
            block = self.effective_codebook()[lo:hi].to(x.dtype)
        return SearchResult(codes, gather_codes(block, codes), dist, counts)

    def _search_batched(self, xb: Tensor, cb: Tensor) -> SearchResult:
        """Quantise ``xb [G, N, D']`` (any strides: e.g. the view ``xg.transpose(0, 1)`` of ``[N, G, D']``), group g
        against its block ``cb[g K/G : (g + 1) K/G]`` of the effective codes ``cb [K, D']``, in one batched search.

        Returns codes ``[G, N]`` in ``[0, K/G)`` (block-local), ``z_q [G, N, D']`` (differentiable w.r.t. ``cb``),
        ``dist [G, N]`` and ``counts [G, K/G]``. Every group searches the codebook as it is at the start of the
        forward; with the alternating optimiser each group then takes its own step (G steps, as one search per
        group did) and is gathered again after it.
        """
        g = xb.shape[0]
        kg = cb.shape[0] // g
        blocks = cb.to(xb.dtype).reshape(g, kg, cb.shape[1])
        xd = xb.detach()
        alternating = self._alternating_active()
        if not (alternating or self._sampling_active()):
            q = ops.quantize(xd, blocks, metric=self.metric, backend=self.backend)
            return SearchResult(q.codes, q.z_q, q.dist, q.counts)
        codes, dist, counts = self._choose_codes(xd, blocks.detach())
        if alternating:
            z_q = []
            for i in range(g):
                self._alternating_step(xd[i], codes[i] + i * kg)
                z_q.append(gather_codes(self.effective_codebook()[i * kg : (i + 1) * kg].to(xb.dtype), codes[i]))
            return SearchResult(codes, torch.stack(z_q), dist, counts)
        offsets = torch.arange(g, device=codes.device)[:, None] * kg
        z_q = gather_codes(cb.to(xb.dtype), (codes + offsets).reshape(-1)).view(g, -1, cb.shape[1])
        return SearchResult(codes, z_q, dist, counts)

    @torch.no_grad()
    def _choose_codes(self, x: Tensor, block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes, dist, counts)`` of ``x [..., N, D']`` against ``block [..., K_b, D']`` with no gradient path:
        drawn in training with ``stochastic_sample_codes``, else the nearest codes."""
        if not self._sampling_active():
            codes, _, dist, counts = ops.quantize(x, block, metric=self.metric, backend=self.backend)
            return codes, dist, counts
        codes = self._draw_codes(x, block)
        if block.dim() == 2:
            chosen = block.index_select(0, codes)
        else:
            chosen = torch.gather(block, 1, codes.unsqueeze(-1).expand(-1, -1, block.shape[-1]))
        counts = torch.zeros(*block.shape[:-1], dtype=torch.int64, device=codes.device)
        counts.scatter_add_(-1, codes, torch.ones_like(codes))
        return codes, _paired_distance(x, chosen, self.metric), counts

    def _sampling_active(self) -> bool:
        return self.stochastic_sample_codes and self.training

    @torch.compiler.disable
    def _draw_codes(self, x: Tensor, block: Tensor) -> Tensor:
        """Codes drawn with ``P(k | x) ~ exp(-d(x, c_k) / T)`` (:func:`vqkernels.nn.sampling.sample_codes`). Eager:
        the seed comes from torch's default generator, which a compiled graph would freeze into a constant."""
        return sample_codes(x, block, self.sample_codebook_temp, self.metric, backend=self.backend)

    def _alternating_active(self) -> bool:
        return hasattr(self, "inplace_codebook_optimizer") and self.training and torch.is_grad_enabled()

    def _alternating_step(self, x: Tensor, codes: Tensor) -> None:
        """One optimiser step on ``mean((C_hat[codes] - sg(x))^2)`` (Huh et al. 2023, §4.3 alternating
        optimisation) for the optimiser's parameters only: the gradients the task's backward accumulated (on these
        and on every other parameter) are left as they were."""
        opt = self.inplace_codebook_optimizer
        params = [p for group in opt.param_groups for p in group["params"]]
        acc = torch.promote_types(x.dtype, torch.float32)
        loss = ((gather_codes(self.effective_codebook(), codes).to(acc) - x.to(acc)) ** 2).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        saved = [p.grad for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, g in zip(params, saved):
            p.grad = g

    # ----------------------------------------------------------------------------------------------------------
    # the output and the loss terms
    # ----------------------------------------------------------------------------------------------------------
    def _straight_through(self, x: Tensor, z_q: Tensor) -> Tensor:
        """The output rows: value ``z_q``; to ``x`` the straight-through gradient, or the rotation trick's
        (README "Method" §2.11); ``nu`` x the downstream gradient to ``z_q`` (synchronised update)."""
        if self.rotation_trick:
            return rotation_estimator(x, z_q, self.nu)
        return straight_through(x, z_q, self.nu)

    def _vq_loss(self, x: Tensor, z_q: Tensor) -> Tensor:
        """vqtorch's convex loss (README "Method" §2.1); with ``ema_update`` its codebook term (weight beta) is
        dropped, since the EMA trains the codebook, leaving the commitment term ``(1 - beta) mean((x - sg(z_q))^2)``."""
        if self.ema_update:
            return (1.0 - self.beta) * convex_vq_loss(x, z_q, 0.0)
        return convex_vq_loss(x, z_q, self.beta)

    def _contrastive_loss(self, x: Tensor, cb: Tensor) -> Tensor:
        return contrastive_loss(x.detach(), cb, self.metric)

    def _with_orthogonal(self, loss: Tensor, cb: Tensor, counts: Tensor) -> Tensor:
        """``loss`` plus, in training with ``orthogonal_reg_weight = w > 0``, ``w`` x the orthogonal loss of the
        effective codes ``cb [K, D']`` (README "Method" §2.13), per code block (averaged over blocks); restricted to
        the codes used in this batch (``counts [K]`` > 0) and/or a random subset of at most
        ``orthogonal_reg_max_codes`` codes per block."""
        if self.orthogonal_reg_weight == 0.0 or not self.training:
            return loss
        b = self._num_code_blocks()
        kb = self.num_codes // b
        heads = cb.reshape(b, kb, cb.shape[-1])
        cap = self.orthogonal_reg_max_codes
        capped = cap is not None and cap < kb
        if not (self.orthogonal_reg_active_codes_only or capped):
            term = orthogonal_loss(heads)
        else:
            keep = torch.ones(b, kb, dtype=torch.bool, device=cb.device)
            if self.orthogonal_reg_active_codes_only:
                keep = counts.reshape(b, kb) > 0
            if capped:  # a uniform subset of the candidates: the `cap` smallest of one uniform draw each
                r = torch.rand(b, kb, device=cb.device).masked_fill(~keep, 2.0)
                keep = keep & (r.argsort(-1).argsort(-1) < cap)
            term = _orthogonal_loss_of_subsets(heads, keep)
        return loss + self.orthogonal_reg_weight * term

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
    def _after_forward(self, segments: list[Segment], counts: Tensor, codes: list[Tensor]) -> None:
        """Training only: the EMA update and expiry, LRU dead-code replacement and CVQ anchor update (they affect
        the next step). ``codes[i]``: the codes (in ``[0, K)``) that ``segments[i].rows`` chose."""
        if self.training and self._updates_after_forward():
            self._after_forward_eager(segments, counts, codes)

    @torch.compiler.disable
    @torch.no_grad()
    def _after_forward_eager(self, segments: list[Segment], counts: Tensor, codes: list[Tensor]) -> None:
        if ema_layer.enabled(self):
            ema_layer.update(self, segments, codes)
        if self.replace_freq > 0:
            dead_codes.replace(self, segments, counts)
        if self.anchor is not None:
            anchors.update(self, segments, counts)
            if self.ema_update and self._sync_active():
                # the anchors broadcast rank 0's codes; the EMA sums re-seeded from them must follow
                vq_dist.broadcast_state(ema_layer.state(self))


def _restart_ema_after_load(module: nn.Module, incompatible_keys) -> None:
    """Load post-hook: a checkpoint without EMA statistics restarts them from the codes it loaded."""
    if module.__dict__.pop("_ema_restart_on_load", False):
        ema_layer.restart(module)


def _paired_distance(x: Tensor, c: Tensor, metric: str) -> Tensor:
    """``d(x_i, c_i)`` of paired rows ``[..., D]`` -> ``[...]`` in the accumulation dtype (README "Method" §1.1):
    the squared Euclidean distance for l2, ``1 - cos`` for cosine."""
    acc = ops.acc_dtype(x.dtype)
    xa, ca = x.to(acc), c.to(acc)
    if metric == "l2":
        return (xa - ca).square().sum(-1)
    xn = xa.norm(dim=-1).clamp_min(ops.COS_EPS)
    cn = ca.norm(dim=-1).clamp_min(ops.COS_EPS)
    return 1.0 - (xa * ca).sum(-1) / (xn * cn)


def _orthogonal_loss_of_subsets(heads: Tensor, keep: Tensor) -> Tensor:
    """The orthogonal loss of each head's kept codes, averaged over heads: with ``S_h`` the codes of head h where
    ``keep [H, K]`` is True, ``sum_{i,j in S_h} cos(c_i, c_j)^2 / |S_h|^2 - 1/|S_h|`` (0 for an empty ``S_h``).
    The dropped codes become zero rows of the unit codes, so the D x D Gram form of :func:`orthogonal_loss` gives
    the subset's sum with no data-dependent shape (no K x K either). ``heads [H, K, D]``."""
    acc = torch.promote_types(heads.dtype, torch.float32)
    u = F.normalize(heads.to(acc), dim=-1, eps=ORTHO_NORM_EPS) * keep.unsqueeze(-1).to(acc)
    k, d = heads.shape[1:]
    gram = u @ u.transpose(1, 2) if k < d else u.transpose(1, 2) @ u
    size = keep.sum(-1).to(acc)
    n = size.clamp_min(1.0)
    per_head = torch.where(size > 0, gram.square().sum((1, 2)) / (n * n) - 1.0 / n, torch.zeros_like(n))
    return per_head.mean()


def _check_rule_options(**opts) -> None:
    """The codebook-rule options (README "VQ layers"), each error naming its argument."""
    for name in (
        "ema_update",
        "rotation_trick",
        "stochastic_sample_codes",
        "orthogonal_reg_active_codes_only",
        "inplace_optimizer_affine",
    ):
        if not isinstance(opts[name], bool):
            raise ValueError(f"{name} must be a bool; got {opts[name]!r}")

    def number(name: str) -> float:
        v = opts[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number; got {v!r}")
        return float(v)

    if not 0.0 <= number("decay") < 1.0:
        raise ValueError(f"decay must be in [0, 1); got {opts['decay']!r}")
    if not number("eps") > 0.0:
        raise ValueError(f"eps must be > 0; got {opts['eps']!r}")
    for name in ("threshold_ema_dead_code", "sample_codebook_temp", "orthogonal_reg_weight"):
        if number(name) < 0.0:
            raise ValueError(f"{name} must be >= 0; got {opts[name]!r}")
    cap = opts["orthogonal_reg_max_codes"]
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"orthogonal_reg_max_codes must be None or a positive int; got {cap!r}")


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

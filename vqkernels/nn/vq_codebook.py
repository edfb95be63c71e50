"""The codebook of :class:`vqkernels.nn.VectorQuantize`: vector-quantize-pytorch 1.32's state, under its names, and
its non-gradient updates on the fused ops.

State (``G`` codebooks: the heads of a separate codebook, else 1; ``K`` codes of ``D`` features):

- ``embed [G, K, D]``: the codes (a buffer, or a parameter when the codebook learns by gradient);
- ``cluster_size [G, K]``, ``embed_avg [G, K, D]``: the EMA cluster sizes ``N_k`` and sums ``m_k``
  (:mod:`vqkernels.nn.ema`: ``N <- gamma N + (1 - gamma) n``, ``m <- gamma m + (1 - gamma) s`` and
  ``e_k = m_k / N~_k`` with Laplace smoothing; van den Oord et al. 2017, appendix A.1; Razavi et al. 2019, §3.1);
- ``initted``: whether the k-means init has run (:mod:`.kmeans_vqpt`);
- with ``affine_param``: running moments of the batch (``batch_mean``, ``batch_variance``, ``[G, 1, D]``, None
  until the first training step) and of the codes (``codebook_mean``, ``codebook_variance`` and their
  ``*_needs_init`` flags). The search then uses the codes moved onto the batch's moments,
  ``e' = (e - mu_c) * sigma_b / sigma_c + mu_b`` (``sigma = sqrt(max(var, 1e-5))``), and the EMA learns the raw
  codes from the rows moved the other way, ``x' = (x - mu_b) * sigma_c / sigma_b + mu_c``: since ``x'`` is affine
  in ``x``, its per-code sums are ``a * s_k + n_k * b`` (``a = sigma_c / sigma_b``, ``b = mu_c - a * mu_b``),
  computed from the one ``code_stats`` call without moving any row.

The EMA state stays fp32 whatever the input dtype. Under a process group (``sync``) the per-code sums and counts
are all-reduced in one collective before the EMA, the affine batch moments are all-reduced when
``sync_affine_param``, and the replacement of expired codes is rank 0's, broadcast (README "Method" §4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as vq_dist
from . import ema
from .kmeans_vqpt import gather_groups, lloyd

AFFINE_VAR_FLOOR = 1e-5  # the variance floor of the affine moments (vector-quantize-pytorch's)
NORM_EPS = ema.NORM_EPS


def _moments(t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over the rows of ``t [G, n, D]`` -> ``[G, 1, D]`` each."""
    return t.mean(1, keepdim=True), t.var(1, unbiased=False, keepdim=True)


class VQCodebook(nn.Module):
    """vector-quantize-pytorch's ``Codebook`` state and updates (module docstring); the search lives in the layer.

    Args:
        dim: D, the features of a code.
        codebook_size: K.
        num_codebooks: G.
        kmeans_init: start from zeros and fit by k-means on the first batch (else kaiming-uniform codes,
            l2-normalised for cosine codebooks).
        learnable: ``embed`` is a parameter (learnable codebook or orthogonal regularisation).
        use_cosine_sim: unit codes (the EMA renormalises them, expired codes are unit rows).
        affine_param: the running-moment affine re-parameterisation above.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_codebooks: int = 1,
        *,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        decay: float = 0.8,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0,
        reset_cluster_size: float | None = None,
        learnable: bool = False,
        ema_update: bool = True,
        use_cosine_sim: bool = False,
        affine_param: bool = False,
        sync_affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        backend: str = "auto",
    ):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks = dim, codebook_size, num_codebooks
        self.decay, self.eps, self.ema_update = float(decay), float(eps), ema_update
        self.kmeans_iters, self.sync_kmeans = kmeans_iters, sync_kmeans
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.reset_cluster_size = threshold_ema_dead_code if reset_cluster_size is None else reset_cluster_size
        self.learnable_codebook, self.use_cosine_sim = learnable, use_cosine_sim
        self.backend = backend
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            # vector-quantize-pytorch's initialisation, with the same draws from the same seed
            embed = nn.init.kaiming_uniform_(torch.empty(num_codebooks, codebook_size, dim))
            if use_cosine_sim:
                embed = F.normalize(embed, dim=-1, eps=NORM_EPS)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        # read by the layer on every forward: a Python flag, so that the check is no host sync (and no graph break)
        self.kmeans_pending = bool(kmeans_init)
        self.affine_param, self.sync_affine_param = affine_param, sync_affine_param
        if affine_param:
            self.affine_param_batch_decay = float(affine_param_batch_decay)
            self.affine_param_codebook_decay = float(affine_param_codebook_decay)
            self.register_buffer("batch_mean", None)
            self.register_buffer("batch_variance", None)
            self.register_buffer("codebook_mean_needs_init", torch.tensor(True))
            self.register_buffer("codebook_mean", torch.zeros(num_codebooks, 1, dim))
            self.register_buffer("codebook_variance_needs_init", torch.tensor(True))
            self.register_buffer("codebook_variance", torch.zeros(num_codebooks, 1, dim))

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints
    # ----------------------------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # The batch moments exist only once a training step has run (a None buffer is not saved): a checkpoint
        # that has them loads into a fresh layer, and one without them resets a trained layer's to "not yet".
        if self.affine_param:
            for name in ("batch_mean", "batch_variance"):
                if prefix + name in state_dict:
                    if getattr(self, name) is None:
                        setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.embed.device))
                else:
                    setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "initted" in state_dict:
            self.kmeans_pending = not bool(state_dict[prefix + "initted"])

    # ----------------------------------------------------------------------------------------------------------
    # the codes the search uses
    # ----------------------------------------------------------------------------------------------------------
    def search_codebook(self, dtype: torch.dtype, moments: tuple[Tensor, ...] | None) -> Tensor:
        """The codes to search ``[G, K, D]`` in ``dtype``: differentiable w.r.t. ``embed`` when it is a parameter;
        with ``moments`` (from :meth:`affine_moments`), moved onto the batch's moments."""
        e = self.embed if self.learnable_codebook else self.embed.detach()
        if moments is not None:
            bm, bv, cm, cv = moments
            scale = bv.clamp_min(AFFINE_VAR_FLOOR).sqrt() / cv.clamp_min(AFFINE_VAR_FLOOR).sqrt()
            e = (e - cm) * scale + bm
        return e.to(dtype)

    # ----------------------------------------------------------------------------------------------------------
    # affine moments
    # ----------------------------------------------------------------------------------------------------------
    def _batch_moments(self, rows: Tensor, sync: bool) -> tuple[Tensor, Tensor]:
        """Mean and biased variance ``[G, 1, D]`` of ``rows [G, n, D]`` (of every rank's rows when ``sync``: the
        count and sum in one collective, then the centred sum of squares, a two-pass variance)."""
        r = rows.float() if rows.dtype != torch.float64 else rows
        if not sync:
            return _moments(r)
        g, _, d = r.shape
        count = torch.full((g, 1, 1), float(r.shape[1]), dtype=r.dtype, device=r.device)
        tot = vq_dist.all_reduce_sum(torch.cat([r.sum(1, keepdim=True), count], -1))
        mean = tot[..., :d] / tot[..., d:]
        var = vq_dist.all_reduce_sum(((r - mean) ** 2).sum(1, keepdim=True)) / tot[..., d:]
        return mean, var

    @torch.no_grad()
    def affine_moments(self, rows: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fold this batch's moments in (training only) and return ``(mu_b, var_b, mu_c, var_c)`` to search with.

        ``rows [G, n, D]``: the rows that count (padding removed). Training: the codebook moments decay with
        ``affine_param_codebook_decay``, the batch moments with ``affine_param_batch_decay`` (the first step sets
        them). Eval changes nothing (vector-quantize-pytorch also folds the batch moments in during eval); moments
        never set yet are this batch's and the current codes'.
        """
        e = self.embed.detach()
        c_now = _moments(e if e.dtype == torch.float64 else e.float())
        if training:
            sync_b = False
            if self.sync_affine_param:
                if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                    raise RuntimeError("sync_affine_param=True needs an initialised torch.distributed process group")
                sync_b = vq_dist.enabled(True)
            b_now = self._batch_moments(rows, sync_b) if sync_b or rows.shape[1] > 0 else None
            for name, now in zip(("codebook_mean", "codebook_variance"), c_now):
                old, needs = getattr(self, name), getattr(self, name + "_needs_init")
                mixed = old * self.affine_param_codebook_decay + now * (1 - self.affine_param_codebook_decay)
                old.copy_(torch.where(needs, now, mixed))
                needs.fill_(False)
            for name, now in zip(("batch_mean", "batch_variance"), b_now or ()):  # no rows: nothing to fold
                old = getattr(self, name)
                if old is None:
                    setattr(self, name, now.to(self.embed.dtype).clone())
                else:
                    d = self.affine_param_batch_decay
                    old.copy_(old * d + now * (1 - d))
            if self.batch_mean is None:  # no row seen yet: the identity transform
                return self.codebook_mean, self.codebook_variance, self.codebook_mean, self.codebook_variance
            return self.batch_mean, self.batch_variance, self.codebook_mean, self.codebook_variance
        if self.batch_mean is None:
            bm, bv = self._batch_moments(rows, False)
        else:
            bm, bv = self.batch_mean, self.batch_variance
        cm = torch.where(self.codebook_mean_needs_init, c_now[0], self.codebook_mean)
        cv = torch.where(self.codebook_variance_needs_init, c_now[1], self.codebook_variance)
        return bm, bv, cm, cv

    # ----------------------------------------------------------------------------------------------------------
    # k-means init
    # ----------------------------------------------------------------------------------------------------------
    def _set_from_clusters(self, means: Tensor, counts: Tensor) -> None:
        self.embed_avg.copy_(means * counts.unsqueeze(-1))
        self.cluster_size.copy_(counts)
        self._refresh_embed()

    @torch.no_grad()
    def kmeans_init_(self, rows: Tensor, sync: bool) -> None:
        """Fit the codebook to ``rows [G, n, D]`` (the batch in vector-quantize-pytorch's row order, padding
        removed; unit rows for cosine) once; with ``sync`` (and ``sync_kmeans``) on rank 0 from every rank's rows,
        then broadcast. An empty batch (on every rank) leaves it for the next one."""
        if sync and self.sync_kmeans:
            every = gather_groups(rows)
            if every.shape[1] == 0:
                return
            if torch.distributed.get_rank() == 0:
                self._set_from_clusters(*self._fit(every))
            vq_dist.broadcast_state([self.embed, self.embed_avg, self.cluster_size])
        else:
            if rows.shape[1] == 0:
                return
            self._set_from_clusters(*self._fit(rows))
        self.initted.fill_(True)
        self.kmeans_pending = False

    def _fit(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return lloyd(rows, self.codebook_size, self.kmeans_iters, self.use_cosine_sim, self.backend)

    # ----------------------------------------------------------------------------------------------------------
    # EMA update and expiry
    # ----------------------------------------------------------------------------------------------------------
    def _refresh_embed(self) -> None:
        e = ema.smoothed_codebook(self.cluster_size, self.embed_avg, self.eps, normalize=self.use_cosine_sim)
        self.embed.data.copy_(e)

    def _stats(self, rows: Tensor, codes: Tensor, sync: bool) -> tuple[Tensor, Tensor]:
        if rows.shape[0] == 1:  # one codebook: the 2-D op
            sums, counts = ema.batch_stats(rows[0], codes[0], self.codebook_size, sync, self.backend)
            return sums.unsqueeze(0), counts.unsqueeze(0)
        return ema.batch_stats(rows, codes, self.codebook_size, sync, self.backend)

    @torch.no_grad()
    def update_(
        self, rows: Tensor, codes: Tensor, ema_update: bool, sync: bool, moments: tuple[Tensor, ...] | None
    ) -> None:
        """One training step of the EMA state from ``rows [G, n, D]`` assigned to ``codes [G, n]`` (padding
        removed), and of the codes when ``ema_update``; with affine ``moments``, the sums of the rows moved onto
        the codes' moments (module docstring). Expiry is separate (:meth:`expire_`)."""
        sums, counts = self._stats(rows, codes, sync)
        if moments is not None:
            bm, bv, cm, cv = moments
            a = cv.clamp_min(AFFINE_VAR_FLOOR).sqrt() / bv.clamp_min(AFFINE_VAR_FLOOR).sqrt()
            sums = a * sums + counts.unsqueeze(-1) * (cm - a * bm)
        ema.ema_step_(self.cluster_size, self.embed_avg, counts, sums, self.decay)
        if ema_update:
            self._refresh_embed()

    def has_expired(self, sync: bool = False) -> bool:
        """Whether some code's EMA size is below the threshold (a host read). Under ``sync`` the answer is the
        ranks' "any" (one scalar all-reduce): the sizes agree after a synced k-means init, but not with
        ``sync_kmeans=False``, and the expiry holds a collective that every rank must enter."""
        if self.threshold_ema_dead_code <= 0:
            return False
        dead = (self.cluster_size < self.threshold_ema_dead_code).any()
        if sync:
            dead = vq_dist.all_reduce_sum(dead.to(torch.int32).reshape(1))
        return bool(dead)

    @torch.no_grad()
    def expire_(self, rows: Tensor, sync: bool) -> None:
        """Replace the expired codes by rows of ``rows [G, n, D]`` (vector-quantize-pytorch's row order, padding
        removed): :func:`vqkernels.nn.ema.expire_codes_`, rank 0's choice under ``sync``."""
        ema.expire_codes_(
            self.embed.data,
            self.cluster_size,
            self.embed_avg,
            rows,
            self.threshold_ema_dead_code,
            self.reset_cluster_size,
            sync=sync,
            normalize=self.use_cosine_sim,
        )

    def extra_repr(self) -> str:
        return (
            f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, dim={self.dim}, "
            f"decay={self.decay}, learnable={self.learnable_codebook}, cosine={self.use_cosine_sim}"
        )

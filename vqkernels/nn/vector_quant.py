"""``VectorQuant``: a drop-in for vqtorch's layer (Huh et al., ICML 2023) on the fused ops (README "Method" §2)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import Segment, VQBase, move_features_last
from .functional import perplexity
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
        inplace_optimizer: callable ``params -> Optimizer``; alternating optimisation (needs ``beta = 1``): one step
            per training forward on the codebook only, as vqtorch does.
        kmeans_init: fit the codebook by k-means++ and Lloyd on the first training batch.
        norm: input normalisation: None, "l2", "l2c", "bn", "gn", "in".
        cb_norm: codebook normalisation: None, "l2", "l2c".
        dim: feature axis of the input (default 1, NCHW channels); any input rank >= 2.
        metric: "l2" or "cosine" (search by angle; ``z_q`` and the loss use the effective codes).
        affine_mode: "learned" (default when ``affine_lr > 0``) or "running" (running statistics).
        kmeans_iters: Lloyd iterations of the k-means init.
        anchor, anchor_decay, first_batch, contrastive: CVQ anchor replacement (README "Method" §3), off by default.
        inplace_optimizer_affine: the in-place optimiser also steps the learned affine parameters (vqtorch's
            ``SGD(lr=50)`` recipe then diverges; off by default).
        ema_update, decay, eps: EMA codebook update (van den Oord et al. 2017, app. A.1) with decay ``decay``
            (0.99, the paper's) and Laplace smoothing ``eps``; the codebook then takes no gradient and the loss is
            the commitment term alone, ``(1 - beta) mean((x - sg(z_q))^2)`` (README "Method" §2.9).
        threshold_ema_dead_code: codes whose EMA cluster size falls below it become random batch rows (§2.10).
        rotation_trick: the rotation-trick gradient to the input in place of the straight-through one (§2.11).
        stochastic_sample_codes, sample_codebook_temp: in training, codes drawn with
            ``P(k | x) ~ exp(-d(x, c_k) / T)`` instead of the nearest code (§2.12).
        orthogonal_reg_weight, orthogonal_reg_active_codes_only, orthogonal_reg_max_codes: orthogonal regulariser
            of the effective codebook added to the training loss (§2.13).
        codebook_dim: search in a codebook of this size: ``Linear(D, codebook_dim)`` before the quantiser and
            ``Linear(codebook_dim, D)`` after it (Yu et al. 2022, §3.2; README "Method" §2.14).
        backend: backend of the ops: "auto" or one of "cpu", "cuda", "triton", "torch".
        sync: keep codebooks and buffers identical on every rank of a torch.distributed process group
            (README "Method" §4); None: whenever a process group of more than one rank is initialised.

    Forward: ``z`` of any shape with ``feature_size`` on ``dim`` -> ``(z_q, out)`` where ``z_q`` has the shape
    of ``z`` and ``out`` holds ``z`` and ``z_q`` (``[..., 1, D']``, in the search space: after the projection and
    the norm), ``d`` (Euclidean distance, ``[..., 1]``; the cosine distance for metric="cosine"), ``q`` (int64
    codes ``[..., 1]``), ``loss`` and ``perplexity``.

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
        inplace_optimizer_affine: bool = False,
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
        if codebook_dim is not None:
            _check_codebook_dim(codebook_dim)
        self.feature_size, self.dim, self.nu, self.affine_lr = feature_size, dim, float(sync_nu), affine_lr
        self.groups = 1
        self._init_vq(
            num_codes,
            feature_size if codebook_dim is None else codebook_dim,
            metric=metric,
            cb_norm=cb_norm,
            affine_lr=affine_lr,
            affine_groups=affine_groups,
            affine_mode=affine_mode,
            replace_freq=replace_freq,
            inplace_optimizer=inplace_optimizer,
            inplace_optimizer_affine=inplace_optimizer_affine,
            beta=beta,
            sync_nu=sync_nu,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            anchor=anchor,
            anchor_decay=anchor_decay,
            first_batch=first_batch,
            contrastive=contrastive,
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
            sync=sync,
        )
        self.codebook_dim = codebook_dim
        self._init_io(feature_size, self.code_dim, norm)

    def _init_io(self, in_features: int, search_features: int, norm: str | None) -> None:
        """The projection (``codebook_dim``) and the input norm, which acts on the whole search-space vector."""
        self._init_projection(in_features, search_features)
        self.norm = norm
        self.norm_layer = VectorNorm(norm, search_features)

    def _inputs(self, z: Tensor) -> Tensor:
        """``z`` with its features last, projected and normalised: the vectors the layer quantises."""
        return self.norm_layer(self._project_in(move_features_last(z, self.dim, self.feature_size)))

    def _outputs(self, rows: Tensor) -> Tensor:
        """Search-space rows ``[..., D']`` back to the input's layout (projected out, features on ``dim``)."""
        return self._project_out(rows).movedim(-1, self.dim)

    def forward(self, z: Tensor) -> tuple[Tensor, dict]:
        x = self._inputs(z)
        if not self.enabled:
            return self._outputs(x), {}
        shape = x.shape
        xf = x.reshape(-1, self.code_dim)
        segments = [Segment(xf.detach(), 0, self.num_codes)]
        self._before_search(segments)
        cb = self.effective_codebook()
        res = self._search(xf, cb)
        loss = self._vq_loss(xf, res.z_q)
        if self.contrastive and self.training:  # CVQ adds it in training only
            loss = loss + self._contrastive_loss(xf, cb)
        loss = self._with_orthogonal(loss, cb, res.counts)
        out_rows = self._straight_through(xf, res.z_q)
        self._after_forward(segments, res.counts, [res.codes])
        d = res.dist.sqrt() if self.metric == "l2" else res.dist
        out = {
            "z": x.unsqueeze(-2),
            "z_q": res.z_q.view(shape).unsqueeze(-2),
            "d": d.view(shape[:-1]).unsqueeze(-1),
            "q": res.codes.view(shape[:-1]).unsqueeze(-1),
            "loss": loss,
            "perplexity": perplexity(res.counts),
        }
        return self._outputs(out_rows.view(shape)), out

    def extra_repr(self) -> str:
        return (
            f"feature_size={self.feature_size}, num_codes={self.num_codes}, beta={self.beta}, nu={self.nu}, "
            f"metric={self.metric}, dim={self.dim}, enabled={self.enabled}{self._rules_repr()}"
        )


def _check_codebook_dim(codebook_dim: object) -> None:
    if isinstance(codebook_dim, bool) or not isinstance(codebook_dim, int) or codebook_dim < 1:
        raise ValueError(f"codebook_dim must be None or a positive int; got {codebook_dim!r}")

"""``VectorQuantize``: a drop-in for vector-quantize-pytorch 1.32's layer, on the fused ops.

The search of every head is one :func:`vqkernels.quantize` call (codes, ``z_q`` and usage in one pass; the heads of
separate codebooks as one batched search ``[G, N, D]`` against ``[G, K, D]``), the EMA statistics one
:func:`vqkernels.code_stats` call, the k-means init Lloyd steps on the same two ops, stochastic sampling the
Gumbel-max :func:`vqkernels.sample_code` op, the orthogonal loss a D x D Gram: nothing of size N x K exists at any
point (vector-quantize-pytorch builds the N x K distances and an N x K one-hot on every step).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import distributed as vq_dist
from .functional import gather_codes, straight_through
from .orthogonal import orthogonal_loss
from .rotation import rotation_trick
from .sampling import sample_codes
from .vq_codebook import NORM_EPS, VQCodebook

__all__ = ["VectorQuantize", "LossBreakdown"]

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])
"""The unweighted loss terms (``return_loss_breakdown=True``); ``codebook_diversity`` is always 0 here."""


class _Layout(NamedTuple):
    """How the input was laid out: ``kind`` in {"seq" (b n d), "seq_cf" (b d n), "one" (b d), "fmap" (b c ...)}."""

    kind: str
    spatial: tuple[int, ...]  # the positions' shape: (n,), (h, w) or (d, h, w); () for "one"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (vector-quantize-pytorch's ``q + v (q - sg(q))``)."""

    @staticmethod
    def forward(ctx, t: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.scale, None


def _scale_grad(t: Tensor, scale: float) -> Tensor:
    return _ScaleGrad.apply(t, scale) if t.requires_grad and scale != 1.0 else t


@torch.compiler.disable
def _zero_requiring_grad(device: torch.device) -> Tensor:
    return torch.zeros((), device=device, requires_grad=True)


def _positive_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int; got {v!r}")
    return v


class VectorQuantize(nn.Module):
    """Vector quantisation with vector-quantize-pytorch 1.32's constructor, forward, outputs and state_dict.

    ``from vqkernels.nn import VectorQuantize`` replaces ``from vector_quantize_pytorch import VectorQuantize``:
    same arguments and defaults (below, plus ``backend``), same ``(quantized, indices, loss)`` return, same
    ``state_dict`` keys (its checkpoints load strictly), on the fused ops (module docstring).

    Shapes (``b`` batch, ``n`` positions, ``dim`` features, ``h`` heads):

    - input ``[b, n, dim]``; ``[b, dim, n]`` with ``channel_last=False``; ``[b, dim]`` (one token);
      ``[b, dim, H, W]`` with ``accept_image_fmap``; ``[b, dim, D, H, W]`` with ``accept_3d_fmap``;
    - ``quantized``: the input's shape; ``indices`` int64 ``[b, n]`` (``[b, n, h]`` with heads; ``[b]`` / ``[b, h]``
      for one token, ``[b, H, W(, h)]`` for feature maps), -1 at masked positions; ``loss`` a scalar.

    Per head, the input (after ``project_in`` to ``h * codebook_dim`` features when that differs from ``dim``, and
    l2-normalised with ``use_cosine_sim``) is searched among K codes, one shared codebook or one per head.

    The rules (README "vector-quantize-pytorch drop-in"):

    - **EMA codebook** (default; van den Oord et al. 2017, appendix A.1; Razavi et al. 2019, §3.1): with batch
      counts ``n_k`` and sums ``s_k``, ``N_k <- gamma N_k + (1 - gamma) n_k``, ``m_k <- gamma m_k + (1 - gamma) s_k``
      (``gamma = decay``), ``e_k = m_k / N~_k``, ``N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j`` (Laplace
      smoothing); codes whose ``N_k`` drops below ``threshold_ema_dead_code`` become random batch rows.
    - **Gradient to the input**: the rotation trick (default when ``dim > 1``; Fifty et al. 2024, §4.2): the output
      is the code ``q``, the input receives ``s R^T g`` with ``s = |q| / |x|`` and ``R`` the rotation taking
      ``x / |x|`` to ``q / |q|``; or the straight-through estimator (``rotation_trick=False``; ``g`` as is).
    - **Loss**: ``commitment_weight * mean((x - sg(q))^2)`` (``q`` not detached with ``learnable_codebook``: the
      codebook then gets the same term), plus ``orthogonal_reg_weight * L_orth`` (Shin et al. 2021, eq. 2:
      ``sum_{i,j} cos(c_i, c_j)^2 / (H K^2) - 1/K`` over all codes, the codes used in the batch, or at most
      ``orthogonal_reg_max_codes`` random ones).
    - **sync_update_v** ``v`` (Huh et al. 2023, eq. 21: the synchronised update, which sends ``v`` times the
      downstream gradient to the code): vector-quantize-pytorch 1.32 adds ``v (out - sg(out))`` *after* the
      estimator, so the input's gradient is scaled by ``1 + v`` and the code gets none; that is what this layer
      does by default, for parity. ``sync_update_codebook=True`` gives the paper's rule instead: the input gets the
      estimator's gradient unscaled and the code ``v`` times the downstream gradient.
    - **affine_param**: the search uses codes moved onto the running batch moments (:mod:`.vq_codebook`).
    - **stochastic_sample_codes**: in training, codes drawn by Gumbel-max with the temperature T
      (:mod:`.sampling`): ``P(k) ~ exp(-|x - c_k|^2 / T)``, the *squared* distance, where vector-quantize-pytorch
      draws with ``exp(-|x - c_k| / T)`` (cosine: ``exp(cos / T)`` in both); the draws themselves differ.

    Arguments (vector-quantize-pytorch's, with its defaults): ``dim``, ``codebook_size``, ``codebook_dim``,
    ``heads``, ``separate_codebook_per_head``, ``decay``, ``eps``, ``freeze_codebook``, ``kmeans_init``,
    ``kmeans_iters``, ``sync_kmeans``, ``use_cosine_sim``, ``layernorm_after_project_in``,
    ``threshold_ema_dead_code``, ``channel_last``, ``accept_image_fmap``, ``accept_3d_fmap``,
    ``commitment_weight``, ``orthogonal_reg_weight``, ``orthogonal_reg_active_codes_only``,
    ``orthogonal_reg_max_codes``, ``stochastic_sample_codes``, ``sample_codebook_temp``, ``straight_through``,
    ``rotation_trick``, ``sync_codebook``, ``sync_affine_param``, ``ema_update``, ``learnable_codebook``,
    ``in_place_codebook_optimizer``, ``manual_in_place_optimizer_update``, ``affine_param``,
    ``affine_param_batch_decay``, ``affine_param_codebook_decay``, ``sync_update_v``,
    ``return_zeros_for_masked_padding``, ``route_gradients_to_input``. Not supported (a ``ValueError`` names
    them): ``directional_reparam=True``, ``vq_bridge``, ``codebook_diversity_loss_weight > 0``,
    ``commitment_use_cross_entropy_loss=True``, ``manual_ema_update=True``; forward's ``indices``, ``topk``,
    ``codebook_transform_fn``, ``ema_update_weight``, ``accum_ema_update=True``. Keyword-only extras:
    ``reset_cluster_size`` (EMA size given to a replaced code; default the threshold), ``sync_update_codebook``
    (above) and ``backend`` (of the ops: "auto", "cpu", "cuda", "triton", "torch").

    Under a ``torch.distributed`` process group (``sync_codebook``, default: whenever one of more than one rank is
    initialised) the EMA sums and counts are all-reduced, the k-means init and the expired codes are rank 0's
    (broadcast), and the in-place optimiser's gradients are averaged: every rank keeps the same codebook.

    Example:
        >>> vq = VectorQuantize(dim=256, codebook_size=512)
        >>> quantized, indices, loss = vq(torch.randn(1, 1024, 256))
    """

    enabled = True  # False: the layer is the identity (see vqkernels.nn.no_vq)

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        commitment_use_cross_entropy_loss: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        rotation_trick: bool | None = None,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        sync_codebook: bool | None = None,
        sync_affine_param: bool = False,
        ema_update: bool | None = None,
        vq_bridge: nn.Module | None = None,
        manual_ema_update: bool = False,
        learnable_codebook: bool | None = None,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        manual_in_place_optimizer_update: bool = False,
        affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        sync_update_v: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
        *,
        reset_cluster_size: float | None = None,
        sync_update_codebook: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        unsupported = {
            "directional_reparam": directional_reparam,
            "vq_bridge": vq_bridge is not None,
            "codebook_diversity_loss_weight": codebook_diversity_loss_weight > 0,
            "commitment_use_cross_entropy_loss": commitment_use_cross_entropy_loss,
            "manual_ema_update": manual_ema_update,
        }
        for name, used in unsupported.items():
            if used:
                raise ValueError(
                    f"{name}: this vector-quantize-pytorch option is not supported by vqkernels.nn.VectorQuantize "
                    "(leave it at its default)"
                )
        _positive_int(dim, "dim")
        _positive_int(codebook_size, "codebook_size")
        _positive_int(heads, "heads")
        codebook_dim = dim if codebook_dim is None else _positive_int(codebook_dim, "codebook_dim")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1]; got {decay}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0; got {eps}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0; got {threshold_ema_dead_code}")
        if kmeans_init and (isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 1):
            raise ValueError(f"kmeans_iters must be an int >= 1 with kmeans_init; got {kmeans_iters!r}")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")
        if orthogonal_reg_max_codes is not None:
            _positive_int(orthogonal_reg_max_codes, "orthogonal_reg_max_codes")
        if sync_codebook not in (None, True, False):
            raise ValueError(f"sync_codebook must be None, True or False; got {sync_codebook!r}")

        ema_update = True if ema_update is None else bool(ema_update)
        learnable_codebook = False if learnable_codebook is None else bool(learnable_codebook)
        rotation_trick = dim > 1 if rotation_trick is None else bool(rotation_trick)
        if use_cosine_sim and learnable_codebook:
            raise ValueError("use_cosine_sim=True is not compatible with learnable_codebook=True")
        if straight_through and rotation_trick:
            raise ValueError(
                "straight_through=True and rotation_trick=True are exclusive (rotation_trick defaults to True when "
                "dim > 1: pass rotation_trick=False)"
            )
        if straight_through and learnable_codebook:
            raise ValueError("straight_through=True is not compatible with learnable_codebook=True")
        if ema_update and learnable_codebook:
            raise ValueError("learnable_codebook=True needs ema_update=False (the EMA would overwrite the codes)")
        if not 0.0 <= sync_update_v <= 1.0:
            raise ValueError(f"sync_update_v must be in [0, 1]; got {sync_update_v}")
        if sync_update_v > 0 and not learnable_codebook:
            raise ValueError("sync_update_v > 0 needs learnable_codebook=True")
        if affine_param and use_cosine_sim:
            raise ValueError("affine_param=True is only compatible with the Euclidean codebook (use_cosine_sim=False)")
        if orthogonal_reg_weight > 0 and orthogonal_reg_active_codes_only and separate_codebook_per_head and heads > 1:
            raise ValueError(
                "orthogonal_reg_active_codes_only=True is not compatible with separate_codebook_per_head=True and "
                "heads > 1"
            )
        self.dim, self.codebook_size, self.heads = dim, codebook_size, heads
        self.codebook_dim = codebook_dim
        self.separate_codebook_per_head = bool(separate_codebook_per_head)
        self.eps = eps
        self.backend = backend
        self.use_cosine_sim = bool(use_cosine_sim)
        self.metric = "dot" if use_cosine_sim else "l2"  # on unit inputs, the largest x.c: the library's ranking
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = channel_last, accept_image_fmap, accept_3d_fmap
        self.commitment_weight = float(commitment_weight)
        self.has_commitment_loss = commitment_weight > 0
        self.orthogonal_reg_weight = float(orthogonal_reg_weight)
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.stochastic_sample_codes = bool(stochastic_sample_codes)
        self.sample_codebook_temp = float(sample_codebook_temp)
        self.straight_through = bool(straight_through)
        self.rotation_trick = rotation_trick
        self.learnable_codebook = learnable_codebook
        self.sync_update_v = float(sync_update_v)
        self.sync_update_codebook = bool(sync_update_codebook)
        self.sync_codebook = sync_codebook
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.route_gradients_to_input = route_gradients_to_input
        self.freeze_codebook = freeze_codebook
        self.kmeans_init = kmeans_init

        # created in vector-quantize-pytorch's order, so that a seeded construction draws the same weights
        codebook_input_dim = codebook_dim * heads
        self.has_projections = codebook_input_dim != dim
        if self.has_projections:
            linear = nn.Linear(dim, codebook_input_dim)
            self.project_in = (
                nn.Sequential(linear, nn.LayerNorm(codebook_input_dim)) if layernorm_after_project_in else linear
            )
            self.project_out = nn.Linear(codebook_input_dim, dim)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

        self._codebook = VQCodebook(
            codebook_dim,
            codebook_size,
            heads if self.separate_codebook_per_head else 1,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            sync_kmeans=sync_kmeans,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            reset_cluster_size=reset_cluster_size,
            learnable=self.has_codebook_orthogonal_loss or learnable_codebook,
            ema_update=ema_update,
            use_cosine_sim=self.use_cosine_sim,
            affine_param=affine_param,
            sync_affine_param=sync_affine_param,
            affine_param_batch_decay=affine_param_batch_decay,
            affine_param_codebook_decay=affine_param_codebook_decay,
            backend=backend,
        )
        self.in_place_codebook_optimizer = None
        if in_place_codebook_optimizer is not None:
            self.in_place_codebook_optimizer = in_place_codebook_optimizer(self._codebook.parameters())
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update

    # ----------------------------------------------------------------------------------------------------------
    # vector-quantize-pytorch's public attributes
    # ----------------------------------------------------------------------------------------------------------
    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> Tensor:
        """The codes: ``[K, codebook_dim]``, or ``[heads, K, codebook_dim]`` with separate codebooks (a view)."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        with torch.no_grad():
            self._codebook.embed.copy_(codes if self.separate_codebook_per_head else codes.unsqueeze(0))

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes of ``indices`` (as returned by forward: ``[b, ...]``, ``[b, ..., heads]`` with heads) ->
        ``[b, ..., heads * codebook_dim]``, features moved to axis 1 for channel-first layouts (before
        ``project_out``). Shared-codebook heads are concatenated too (vector-quantize-pytorch leaves them as a
        separate ``[..., heads, codebook_dim]`` axis there)."""
        return self._channel_first(self._codes_last(indices))

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """``project_out`` of :meth:`get_codes_from_indices` (applied on the features, whatever the layout)."""
        return self._channel_first(self.project_out(self._codes_last(indices)))

    def _codes_last(self, indices: Tensor) -> Tensor:
        cb = self.codebook
        if not self.separate_codebook_per_head:
            codes = cb[indices]
            return codes.flatten(-2) if self.heads > 1 else codes
        heads = torch.arange(cb.shape[0], device=indices.device)
        return cb[heads, indices].flatten(-2)  # [b, ..., heads, D] -> [b, ..., heads * D]

    def _channel_first(self, t: Tensor) -> Tensor:
        if not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap:
            return t.movedim(-1, 1)
        return t

    def update_in_place_optimizer(self) -> None:
        """One step of the in-place codebook optimiser (call it yourself with
        ``manual_in_place_optimizer_update=True``); under a process group the gradients are averaged first."""
        opt = self.in_place_codebook_optimizer
        if opt is None:
            return
        if vq_dist.enabled(self.sync_codebook):
            world = torch.distributed.get_world_size()
            for p in self._codebook.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        opt.zero_grad()

    # ----------------------------------------------------------------------------------------------------------
    # layouts
    # ----------------------------------------------------------------------------------------------------------
    def _rows_in(self, x: Tensor) -> tuple[Tensor, _Layout]:
        """``x`` as ``[b, n, dim]`` (a view where the layout allows) and how to lay the output out again."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got {x.dtype}")
        if self.accept_image_fmap or self.accept_3d_fmap:
            rank = 4 if self.accept_image_fmap else 5
            if x.dim() != rank:
                flag = "accept_image_fmap" if self.accept_image_fmap else "accept_3d_fmap"
                raise ValueError(f"with {flag}=True, x must have rank {rank} [b, dim, ...]; got {tuple(x.shape)}")
            xs, layout = x.flatten(2).transpose(1, 2), _Layout("fmap", tuple(x.shape[2:]))
        elif x.dim() == 2:
            xs, layout = x.unsqueeze(1), _Layout("one", ())
        elif x.dim() == 3:
            if self.channel_last:
                xs, layout = x, _Layout("seq", (x.shape[1],))
            else:
                xs, layout = x.transpose(1, 2), _Layout("seq_cf", (x.shape[2],))
        else:
            raise ValueError(f"x must be [b, n, dim], [b, dim, n] or [b, dim]; got shape {tuple(x.shape)}")
        if xs.shape[-1] != self.dim:
            raise ValueError(f"x has {xs.shape[-1]} features; the layer expects dim = {self.dim}")
        return xs, layout

    @staticmethod
    def _out(q: Tensor, layout: _Layout) -> Tensor:
        """``q [b, n, dim]`` back to the input's layout."""
        if layout.kind == "one":
            return q[:, 0]
        if layout.kind == "seq_cf":
            return q.transpose(1, 2)
        if layout.kind == "fmap":
            return q.transpose(1, 2).reshape(q.shape[0], q.shape[2], *layout.spatial)
        return q

    @staticmethod
    def _indices_out(ind: Tensor, layout: _Layout) -> Tensor:
        """``ind [b, n(, heads)]`` to the input's layout of positions."""
        if layout.kind == "one":
            return ind[:, 0]
        if layout.kind == "fmap":
            return ind.reshape(ind.shape[0], *layout.spatial, *ind.shape[2:])
        return ind

    def _mask(self, mask: Tensor | None, lens: Tensor | None, layout: _Layout, xs: Tensor) -> Tensor | None:
        """The padding mask ``[b, n]`` (bool, True = real position) on ``xs``' device, from ``mask`` or ``lens``."""
        b, n = xs.shape[0], xs.shape[1]
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        if mask is None and lens is None:
            return None
        if layout.kind in ("one", "fmap"):
            raise ValueError("mask / lens apply to sequences [b, n, dim] (or [b, dim, n]), not to one token or fmaps")
        if lens is not None:
            mask = torch.arange(n, device=xs.device) < lens.to(xs.device).reshape(-1, 1)
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
            raise ValueError(
                f"mask must be a bool tensor of shape (b, n) = {(b, n)}; got {mask.dtype} {tuple(mask.shape)}"
            )
        return mask.to(xs.device)

    def _heads_in(self, h: Tensor) -> Tensor:
        """``[b, n, heads * D]`` -> the rows of the search ``[G, N, D]``: one codebook, rows in (b, n, head) order
        (a view); separate codebooks, head g's rows at ``[g]`` (a transposed view, not copied)."""
        d = self.codebook_dim
        if self.separate_codebook_per_head:
            return h.reshape(-1, self.heads, d).transpose(0, 1)
        return h.reshape(1, -1, d)

    def _heads_out(self, t: Tensor, b: int, n: int) -> Tensor:
        """Inverse of :meth:`_heads_in` -> ``[b, n, heads * D]``."""
        if self.separate_codebook_per_head:
            t = t.transpose(0, 1)
        return t.reshape(b, n, self.heads * self.codebook_dim)

    def _row_mask(self, mask: Tensor | None) -> Tensor | None:
        """The mask of the search rows (``[N]``, the same for every group)."""
        if mask is None:
            return None
        if self.separate_codebook_per_head or self.heads == 1:
            return mask.reshape(-1)
        return mask.unsqueeze(-1).expand(*mask.shape, self.heads).reshape(-1)

    def _library_rows(self, rows: Tensor, mask: Tensor | None, b: int, n: int) -> Tensor:
        """The rows in vector-quantize-pytorch's order, padding removed (what its random draws index): heads of
        one codebook (b, head, n), else (b, n) per group. Built only for the k-means init and the expiry."""
        if not self.separate_codebook_per_head and self.heads > 1:
            rows = rows.view(b, n, self.heads, -1).transpose(1, 2).reshape(1, b * self.heads * n, -1)
            if mask is not None:
                mask = mask.unsqueeze(1).expand(b, self.heads, n)
        return rows if mask is None else rows[:, mask.reshape(-1)]

    # ----------------------------------------------------------------------------------------------------------
    # the search
    # ----------------------------------------------------------------------------------------------------------
    def _search(self, rows: Tensor, embed: Tensor, stochastic: bool, temperature: float) -> tuple[Tensor, Tensor]:
        """Codes ``[G, N]`` and ``z_q [G, N, D]`` (differentiable w.r.t. ``embed [G, K, D]``) of ``rows [G, N, D]``."""
        g, k = embed.shape[0], embed.shape[1]
        if stochastic:
            metric = "cosine" if self.use_cosine_sim else "l2"
            r, e = (rows[0], embed[0]) if g == 1 else (rows, embed)
            codes = sample_codes(r, e.detach(), temperature, metric, backend=self.backend).view(g, -1)
            offsets = (torch.arange(g, device=codes.device) * k).unsqueeze(1)
            z_q = gather_codes(embed.reshape(g * k, -1), (codes + offsets).reshape(-1)).view(g, codes.shape[1], -1)
            return codes, z_q
        if g == 1:  # one codebook: the 2-D op (every backend runs it)
            q = ops.quantize(rows[0], embed[0], metric=self.metric, backend=self.backend)
            return q.codes.unsqueeze(0), q.z_q.unsqueeze(0)
        q = ops.quantize(rows, embed, metric=self.metric, backend=self.backend)
        return q.codes, q.z_q

    # ----------------------------------------------------------------------------------------------------------
    # the non-gradient updates (eager: under torch.compile each is one graph break, paid only when it runs)
    # ----------------------------------------------------------------------------------------------------------
    @torch.compiler.disable
    def _kmeans_init(self, rows: Tensor, mask: Tensor | None, b: int, n: int) -> None:
        # one-off and on every rank together, in training or eval (vector-quantize-pytorch initialises on the first
        # forward whatever the mode: the codes are zeros before)
        self._codebook.kmeans_init_(self._library_rows(rows, mask, b, n), vq_dist.enabled(self.sync_codebook))

    def _affine_moments(self, rows: Tensor, row_mask: Tensor | None) -> tuple[Tensor, ...]:
        kept = rows if row_mask is None else rows[:, row_mask]
        if self.training:
            return self._fold_affine_moments(kept)
        return self._codebook.affine_moments(kept, False)  # eval: no update, traceable

    @torch.compiler.disable
    def _fold_affine_moments(self, rows: Tensor) -> tuple[Tensor, ...]:
        return self._codebook.affine_moments(rows, True)

    @torch.compiler.disable
    def _update(
        self,
        rows: Tensor,
        codes: Tensor,
        mask: Tensor | None,
        row_mask: Tensor | None,
        bn: tuple[int, int],
        ema_update: bool,
        sync: bool,
        moments: tuple[Tensor, ...] | None,
    ) -> None:
        """The EMA step (and the codes' update when ``ema_update``), then the expiry of codes that fell below the
        threshold (vector-quantize-pytorch's order)."""
        kept_rows, kept_codes = (rows, codes) if row_mask is None else (rows[:, row_mask], codes[:, row_mask])
        self._codebook.update_(kept_rows, kept_codes, ema_update, sync, moments)
        if self._codebook.has_expired(sync):
            self._codebook.expire_(self._library_rows(rows, mask, *bn), sync)

    @torch.compiler.disable
    def _in_place_step(self, rows: Tensor, z_q: Tensor, row_mask: Tensor | None) -> Tensor:
        """Huh et al. 2023's alternating step as vector-quantize-pytorch does it: one optimiser step on
        ``mean((q - sg(x))^2)`` (padding excluded) before the codes are searched again."""
        if not z_q.requires_grad:
            raise RuntimeError(
                "in_place_codebook_optimizer needs a codebook that learns by gradient (learnable_codebook=True or "
                "orthogonal_reg_weight > 0)"
            )
        acc = torch.promote_types(z_q.dtype, torch.float32)
        q, r = (z_q, rows) if row_mask is None else (z_q[:, row_mask], rows[:, row_mask])
        loss = F.mse_loss(q.to(acc), r.to(acc))
        loss.backward()
        if not self.manual_in_place_optimizer_update:
            self.update_in_place_optimizer()
        return loss.detach()

    # ----------------------------------------------------------------------------------------------------------
    # forward
    # ----------------------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        indices: Tensor | None = None,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        topk: int | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Callable | None = None,
        ema_update_weight: Tensor | None = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
    ):
        """Quantise ``x`` -> ``(quantized, indices, loss)`` (``+ LossBreakdown`` with ``return_loss_breakdown``).

        ``mask [b, n]`` (bool, True = real position) or ``lens [b]``: padded positions do not enter the k-means
        init, the affine moments, the EMA, the expiry or the losses; their ``quantized`` is zero (or the input with
        ``return_zeros_for_masked_padding=False``) and their index -1. ``sample_codebook_temp``,
        ``freeze_codebook`` (no codebook update, no codebook gradient from the loss) and ``ema_update`` override the
        layer's settings for this call.
        """
        for name, bad in (
            ("indices", indices is not None),
            ("topk", topk is not None),
            ("codebook_transform_fn", codebook_transform_fn is not None),
            ("ema_update_weight", ema_update_weight is not None),
            ("accum_ema_update", bool(accum_ema_update)),
        ):
            if bad:
                raise ValueError(f"forward's {name}= is not supported by vqkernels.nn.VectorQuantize")
        freeze = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        ema_now = self.ema_update if ema_update is None else bool(ema_update)
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else float(sample_codebook_temp)

        xs, layout = self._rows_in(x)
        b, n = xs.shape[0], xs.shape[1]
        mask = self._mask(mask, lens, layout, xs)
        if not self.enabled:
            return self._identity(x, b, n, layout, return_loss_breakdown)
        training = self.training
        cb = self._codebook

        rows = self._heads_in(self.project_in(xs))  # [G, N, D]
        if self.use_cosine_sim:
            rows = F.normalize(rows, dim=-1, eps=NORM_EPS)
        rows_d = rows.detach()
        row_mask = self._row_mask(mask)
        if cb.kmeans_pending:
            self._kmeans_init(rows_d, mask, b, n)
        moments = self._affine_moments(rows_d, row_mask) if cb.affine_param else None
        stochastic = training and self.stochastic_sample_codes and temperature > 0
        if training and self.straight_through and temperature > 0 and rows.requires_grad:
            if not (x.requires_grad and self.route_gradients_to_input):
                raise ValueError(
                    "straight_through=True with an input that does not require grad (or route_gradients_to_input="
                    "False): vector-quantize-pytorch then routes a Gumbel-softmax gradient (an N x K softmax) into "
                    "project_in; vqkernels.nn.VectorQuantize does not support that case"
                )
        codes, z_q = self._search(rows_d, cb.search_codebook(rows.dtype, moments), stochastic, temperature)

        update = training and not freeze
        sync = update and vq_dist.enabled(self.sync_codebook)
        if update and (ema_now or cb.threshold_ema_dead_code > 0):
            self._update(rows_d, codes, mask, row_mask, (b, n), ema_now, sync, moments)

        zero = torch.zeros((), device=rows.device)
        inplace_loss = zero
        if update and self.in_place_codebook_optimizer is not None and torch.is_grad_enabled():
            inplace_loss = self._in_place_step(rows_d, z_q, row_mask)
            # searched again with the stepped codes (the affine moments fold this batch in again, as the library)
            moments = self._affine_moments(rows_d, row_mask) if cb.affine_param else None
            codes, z_q = self._search(rows_d, cb.search_codebook(rows.dtype, moments), stochastic, temperature)

        out = self._estimate(x, rows, z_q) if training else z_q

        commit = ortho = loss = zero
        terms = []
        if training and self.has_commitment_loss:
            commit = self._commitment(rows, z_q, row_mask, freeze)
            terms.append(commit * self.commitment_weight)
        if training and self.has_codebook_orthogonal_loss:
            ortho = self._orthogonal(codes)
            terms.append(ortho * self.orthogonal_reg_weight)
        if terms:
            loss = sum(terms[1:], terms[0])
        elif training:  # as the library: a training loss requires grad even when no term contributes
            loss = _zero_requiring_grad(rows.device)

        quantized = self.project_out(self._heads_out(out, b, n))
        ind = codes.transpose(0, 1) if self.separate_codebook_per_head else codes.view(-1, self.heads)
        ind = ind.reshape(b, n, self.heads) if self.heads > 1 else ind.reshape(b, n)
        if mask is not None:
            other = torch.zeros_like(xs) if self.return_zeros_for_masked_padding else xs
            quantized = torch.where(mask.unsqueeze(-1), quantized, other)
            ind = torch.where(mask.view(b, n, *([1] * (ind.dim() - 2))), ind, -1)
        quantized, ind = self._out(quantized, layout), self._indices_out(ind, layout)
        if not return_loss_breakdown:
            return quantized, ind, loss
        return quantized, ind, loss, LossBreakdown(commit, zero, ortho, inplace_loss)

    def _estimate(self, x: Tensor, rows: Tensor, z_q: Tensor) -> Tensor:
        """The training output (value ``z_q``) and its gradients (class docstring)."""
        v = self.sync_update_v
        if x.requires_grad and self.route_gradients_to_input:
            nu = v if self.sync_update_codebook else 0.0
            if not self.sync_update_codebook:
                rows = _scale_grad(rows, 1.0 + v)
            estimator = rotation_trick if self.rotation_trick else straight_through
            # nu = 0: no gradient path to the code (detached, so that autograd does not carry zeros there)
            return estimator(rows, z_q if nu else z_q.detach(), nu)
        return _scale_grad(z_q, 1.0 + v)  # the code as is (its gradient reaches a learnable codebook)

    def _commitment(self, rows: Tensor, z_q: Tensor, row_mask: Tensor | None, freeze: bool) -> Tensor:
        """``mean((x - q)^2)`` over the real positions, fp32 (fp64 for fp64 inputs); ``q`` detached unless the
        codebook is learnable and not frozen."""
        q = z_q if self.learnable_codebook and not freeze else z_q.detach()
        if row_mask is not None:
            rows, q = rows[:, row_mask], q[:, row_mask]
        acc = torch.promote_types(rows.dtype, torch.float32)
        return F.mse_loss(q.to(acc), rows.to(acc))

    def _orthogonal(self, codes: Tensor) -> Tensor:
        # a snapshot: the next training forward's EMA writes the codes in place (through .data, as the library,
        # unseen by autograd), and this loss's backward needs them as they are now
        embed = self._codebook.embed.clone()
        if self.orthogonal_reg_active_codes_only:
            embed = embed[:, torch.unique(codes)]
        k = embed.shape[1]
        if self.orthogonal_reg_max_codes is not None and k > self.orthogonal_reg_max_codes:
            embed = embed[:, torch.randperm(k, device=embed.device)[: self.orthogonal_reg_max_codes]]
        return orthogonal_loss(embed)

    def _identity(self, x: Tensor, b: int, n: int, layout: _Layout, breakdown: bool):
        """Disabled (vqkernels.nn.no_vq): the input as is, every index -1, zero losses."""
        shape = (b, n, self.heads) if self.heads > 1 else (b, n)
        ind = self._indices_out(torch.full(shape, -1, dtype=torch.int64, device=x.device), layout)
        zero = torch.zeros((), device=x.device)
        if breakdown:
            return x, ind, zero, LossBreakdown(zero, zero, zero, zero)
        return x, ind, zero

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, heads={self.heads}, "
            f"separate_codebook_per_head={self.separate_codebook_per_head}, codebook_dim={self.codebook_dim}, "
            f"ema_update={self.ema_update}, rotation_trick={self.rotation_trick}, cosine={self.use_cosine_sim}, "
            f"enabled={self.enabled}"
        )

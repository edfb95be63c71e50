"""Functional pieces of CVQ anchor replacement (METHODS §3).

From "Online Clustered Codebook" (Zheng & Vedaldi, ICCV 2023), re-derived from the paper, not from its code:

- §3.2 running average: a usage EMA ``h`` per code (:func:`update_usage_ema`), a per-code decay ``alpha``
  that is ~1 for unused codes and ~0 for codes used at the uniform rate (:func:`anchor_alpha`), and the
  running update ``c_k <- (1 - alpha_k) c_k + alpha_k a_k`` towards an anchor ``a_k``
  (:func:`apply_anchor_update`).
- §3.2 anchor sampling: "closest" (:func:`closest_anchors`), "random" (:func:`update_feature_pool`,
  :func:`random_anchors`) and "probrandom" (:func:`sample_anchor_rows`, :func:`probrandom_anchors`).
- §3.3 contrastive loss (:func:`contrastive_loss`).

Nothing here holds an N x K matrix: the closest anchor is the swapped-role search
``nearest_code(codebook, x)`` (METHODS §1); sampling and the contrastive loss work on bounded
``codes x rows`` blocks of at most ``chunk_elems`` elements (the contrastive loss needs every row of a code
at once, so its blocks hold ``max(N, chunk_elems)`` elements at most).

Every function except :func:`contrastive_loss` runs under ``torch.no_grad()``. Arithmetic accumulates in fp32
(fp64 when an input is fp64).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import ops
from ..ops import COS_EPS, check_matrix, gumbel_noise, nearest_code

__all__ = [
    "update_usage_ema",
    "anchor_alpha",
    "closest_anchors",
    "sample_anchor_rows",
    "probrandom_anchors",
    "update_feature_pool",
    "random_anchors",
    "apply_anchor_update",
    "contrastive_loss",
    "gumbel_noise",
]

# ---------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------
def _check_decay(decay) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
        raise ValueError(f"decay must be a number in (0, 1); got {decay!r}")
    return float(decay)


def _check_vector(t, name: str, length: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = "[K]" if length is None else f"[K] = [{length}]"
        raise ValueError(f"{name} must have shape {want}; got {tuple(t.shape)}")


def _check_pair(x, codebook, metric) -> None:
    """x ``[N, D]`` and codebook ``[K >= 1, D]`` (dtypes may differ): floating, same D and device; a known
    metric."""
    ops.check_pair(x, codebook, metric, same_dtype=False)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")


def _check_chunk(chunk_elems) -> int:
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
        raise ValueError(f"chunk_elems must be a positive int; got {chunk_elems!r}")
    return chunk_elems


def _acc(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any input is fp64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _rng_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Random draws happen on the generator's device (the default generator of ``device`` when None)."""
    return generator.device if generator is not None else device


# ---------------------------------------------------------------------------------------------------------------
# §3.2 running average: usage EMA, per-code decay, update
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def update_usage_ema(h: Tensor, counts: Tensor, num_rows: int, decay: float) -> None:
    """In place ``h <- decay * h + (1 - decay) * counts / num_rows`` (CVQ §3.2; METHODS §3.1).

    Args:
        h: float ``[K]`` usage EMA (fp32 buffer ``embed_prob``), updated in place.
        counts: ``[K]`` rows that chose each code in this batch (int or float).
        num_rows: N, the number of rows behind ``counts`` (> 0).
        decay: gamma in (0, 1), e.g. 0.99.
    """
    _check_vector(h, "h")
    if not h.is_floating_point():
        raise TypeError(f"h must be a floating-point tensor; got {h.dtype}")
    _check_vector(counts, "counts", h.shape[0])
    if counts.device != h.device:
        raise ValueError(f"h and counts must be on the same device; got {h.device} and {counts.device}")
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
        raise ValueError(f"num_rows must be a positive int; got {num_rows!r}")
    decay = _check_decay(decay)
    p = counts.to(_acc(h.dtype)) / num_rows
    h.copy_(h.to(p.dtype) * decay + p * (1.0 - decay))


@torch.no_grad()
def anchor_alpha(h: Tensor, decay: float) -> Tensor:
    """Per-code decay ``alpha_k = exp(-h_k * K * 10 / (1 - decay) - 1e-3)`` (CVQ §3.2; METHODS §3.2).

    ``h`` float ``[K]``; returns ``[K]`` in ``h``'s dtype. Never-used codes (h = 0) get ``exp(-1e-3)`` ~ 1
    (moved onto their anchor), codes used at the uniform rate (h = 1/K) get ``exp(-10 / (1 - decay))`` ~ 0
    (kept).
    """
    _check_vector(h, "h")
    if not h.is_floating_point():
        raise TypeError(f"h must be a floating-point tensor; got {h.dtype}")
    decay = _check_decay(decay)
    k = h.shape[0]
    a = h.to(_acc(h.dtype)) * (-(k * 10.0) / (1.0 - decay)) - 1e-3
    return a.exp().to(h.dtype)


@torch.no_grad()
def apply_anchor_update(codebook: Tensor, anchors: Tensor, alpha: Tensor) -> None:
    """In place ``c_k <- (1 - alpha_k) c_k + alpha_k a_k`` (CVQ §3.2; METHODS §3.4), computed in fp32 (fp64).

    Args:
        codebook: ``[K, D]`` codes (e.g. the embedding weight), updated in place.
        anchors: ``[K, D]`` one anchor per code (any float dtype).
        alpha: ``[K]`` per-code decay from :func:`anchor_alpha`.
    """
    check_matrix(codebook, "codebook")
    check_matrix(anchors, "anchors")
    if anchors.shape != codebook.shape:
        raise ValueError(f"anchors must have the codebook's shape {tuple(codebook.shape)}; got "
                         f"{tuple(anchors.shape)}")
    _check_vector(alpha, "alpha", codebook.shape[0])
    for t, name in ((anchors, "anchors"), (alpha, "alpha")):
        if t.device != codebook.device:
            raise ValueError(f"{name} must be on the codebook's device {codebook.device}; got {t.device}")
    acc = _acc(codebook.dtype, anchors.dtype, alpha.dtype)
    a = alpha.to(acc)[:, None]
    codebook.copy_(codebook.to(acc) * (1.0 - a) + anchors.to(acc) * a)


# ---------------------------------------------------------------------------------------------------------------
# §3.2 anchors: "closest"
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def closest_anchors(x: Tensor, codebook: Tensor, metric: str = "l2", backend: str = "auto", *,
                    exact: bool = False) -> Tensor:
    """For each code, the batch row nearest to it (CVQ §3.2 "closest" anchor), ``[K, D]`` in ``x``'s dtype.

    The swapped-role search ``nearest_code(codebook, x)`` (METHODS §1): no N x K matrix and no sort. Ties go
    to the lowest row index. ``exact=True`` makes the choice equal the fp64 brute-force argmin (see
    :func:`vqkernels.nearest_code`). ``x`` ``[N >= 1, D]``, ``codebook`` ``[K, D]``.
    """
    _check_pair(x, codebook, metric)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one row to pick anchors from; got N = 0")
    dt = torch.promote_types(x.dtype, codebook.dtype)
    rows, _ = nearest_code(codebook.to(dt), x.to(dt), metric=metric, exact=exact, backend=backend)
    return x.index_select(0, rows)


# ---------------------------------------------------------------------------------------------------------------
# §3.2 anchors: "probrandom" (Gumbel-max sampling, METHODS §1)
# ---------------------------------------------------------------------------------------------------------------
def _prepare_rows(x: Tensor, metric: str, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """x in ``acc`` (unit rows for cosine) and, for l2, its squared norms."""
    xa = x.to(acc)
    if metric == "cosine":
        return xa / xa.norm(dim=1, keepdim=True).clamp_min(COS_EPS), None
    if metric == "l2":
        return xa, (xa * xa).sum(1)
    return xa, None


def _similarity_block(c: Tensor, xa: Tensor, xsq: Tensor | None, metric: str) -> Tensor:
    """``s(x_i, c_k)`` ``[k, r]`` for a block (codes major): ``-d`` of METHODS §1 for l2 (``d`` clamped at 0),
    ``cos`` for cosine, ``x . c`` for dot. ``c`` ``[k, D]``; ``xa``, ``xsq`` from :func:`_prepare_rows`."""
    dot = c @ xa.T
    if metric == "l2":
        return (2.0 * dot - (c * c).sum(1)[:, None] - xsq[None, :]).clamp_max(0.0)
    if metric == "cosine":  # xa holds unit rows
        return dot / c.norm(dim=1).clamp_min(COS_EPS)[:, None]
    return dot


@torch.no_grad()
def sample_anchor_rows(x: Tensor, codebook: Tensor, metric: str = "l2",
                       generator: torch.Generator | None = None, chunk_elems: int = 1 << 22,
                       backend: str = "auto") -> Tensor:
    """Per code ``k`` a row index ``i ~ softmax_i(-d(x_i, c_k))`` (CVQ §3.2 "probrandom").

    :func:`vqkernels.sample_code` (Gumbel-max in the search's epilogue) with a seed of two 32-bit draws from
    ``generator`` (the default CPU generator when None). ``x`` and ``codebook`` may differ in dtype: both are
    taken in the wider one (fp32, fp64 if either is fp64). ``chunk_elems`` is accepted for compatibility: the op
    bounds its own blocks, and the samples never depended on it.

    Args:
        x: ``[N >= 1, D]`` batch rows.
        codebook: ``[K, D]`` codes.
    Returns:
        int64 ``[K]`` row indices into ``x``.
    """
    _check_pair(x, codebook, metric)
    _check_generator(generator)
    _check_chunk(chunk_elems)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one row to sample anchors from; got N = 0")
    acc = _acc(x.dtype, codebook.dtype)
    return ops.sample_code(x.to(acc), codebook.to(acc), metric=metric, seed=ops.draw_seed(generator),
                           backend=backend)


@torch.no_grad()
def probrandom_anchors(x: Tensor, codebook: Tensor, metric: str = "l2",
                       generator: torch.Generator | None = None, backend: str = "auto") -> Tensor:
    """``x[sample_anchor_rows(x, codebook, metric, generator)]``: a sampled batch row per code, ``[K, D]``."""
    return x.index_select(0, sample_anchor_rows(x, codebook, metric, generator, backend=backend))


# ---------------------------------------------------------------------------------------------------------------
# §3.2 anchors: "random" (a pool of recent batch rows)
# ---------------------------------------------------------------------------------------------------------------
def _check_pool(pool, filled) -> None:
    check_matrix(pool, "pool")
    if pool.shape[0] == 0:
        raise ValueError("pool must hold at least one row; got K = 0")
    if not isinstance(filled, Tensor):
        raise TypeError(f"filled must be a torch.Tensor; got {type(filled).__name__}")
    if filled.dim() != 0 or filled.dtype != torch.int64:
        raise ValueError(f"filled must be a 0-dim int64 tensor; got shape {tuple(filled.shape)}, "
                         f"{filled.dtype}")
    if filled.device != pool.device:
        raise ValueError(f"pool and filled must be on the same device; got {pool.device} and {filled.device}")


@torch.no_grad()
def update_feature_pool(pool: Tensor, filled: Tensor, x: Tensor,
                        generator: torch.Generator | None = None) -> None:
    """Write the batch rows ``x`` ``[N, D]`` into the pool ``[K, D]`` of recent rows (CVQ §3.2 "random").

    Policy: the pool is a ring buffer holding the most recent rows, in random order.

    - ``N >= K``: the pool becomes K distinct batch rows drawn uniformly without replacement (random order);
      ``filled += K``.
    - ``N < K``: the batch rows, shuffled, are written to slots ``filled, filled + 1, ... (mod K)``
      (overwriting the oldest rows once the pool is full); ``filled += N``.

    ``filled`` (0-dim int64 buffer) counts rows written so far; while ``filled < K`` the real rows are exactly
    slots ``[0, filled)``, and the pool is full once ``filled >= K``. Rows are cast to the pool's dtype.
    ``N = 0`` is a no-op. No host-device synchronisation.
    """
    _check_pool(pool, filled)
    check_matrix(x, "x")
    _check_generator(generator)
    if x.shape[1] != pool.shape[1]:
        raise ValueError(f"x and pool must have the same D; got x {tuple(x.shape)} and pool "
                         f"{tuple(pool.shape)}")
    if x.device != pool.device:
        raise ValueError(f"x and pool must be on the same device; got {x.device} and {pool.device}")
    n, k = x.shape[0], pool.shape[0]
    if n == 0:
        return
    perm = torch.randperm(n, generator=generator, device=_rng_device(generator, x.device)).to(x.device)
    if n >= k:
        pool.copy_(x.index_select(0, perm[:k]))
        filled.add_(k)
    else:
        slots = (filled + torch.arange(n, device=pool.device)) % k
        pool.index_copy_(0, slots, x.index_select(0, perm).to(pool.dtype))
        filled.add_(n)


@torch.no_grad()
def random_anchors(pool: Tensor, filled: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A "random" anchor per code from the pool (CVQ §3.2), ``[K, D]`` (a new tensor).

    Full pool (``filled >= K``): row k for code k (the pool is already in random order, see
    :func:`update_feature_pool`). Not yet full: each code gets a row drawn uniformly from the ``filled`` real
    rows (slots ``[0, filled)``). An empty pool (``filled == 0``) is a ValueError. Reads ``filled`` on the
    host.
    """
    _check_pool(pool, filled)
    _check_generator(generator)
    n, k = int(filled), pool.shape[0]
    if n <= 0:
        raise ValueError("the feature pool is empty (filled = 0); call update_feature_pool first")
    if n >= k:
        return pool.clone()
    idx = torch.randint(0, n, (k,), generator=generator, device=_rng_device(generator, pool.device))
    return pool.index_select(0, idx.to(pool.device))


# ---------------------------------------------------------------------------------------------------------------
# §3.3 contrastive loss
# ---------------------------------------------------------------------------------------------------------------
def _contrastive_block(xa: Tensor, xsq: Tensor | None, c: Tensor, metric: str, tau: float, num_pos: int,
                       num_neg: int) -> Tensor:
    """Sum over the codes of block ``c`` ``[k, D]`` of the cross-entropy of ``[pos, negs] / tau`` (target 0).
    """
    s = _similarity_block(c, xa, xsq, metric)  # [k, N]
    pos = s.topk(num_pos, dim=1, sorted=False).values.mean(1, keepdim=True)  # [k, 1]
    if num_neg > 0:
        neg = s.topk(num_neg, dim=1, largest=False, sorted=False).values  # [k, M]
        logits = torch.cat([pos, neg], 1) / tau  # [k, 1 + M]
    else:
        logits = pos / tau
    return (torch.logsumexp(logits, 1) - logits[:, 0]).sum()


def _contrastive_sum(xa, xsq, cb, metric, tau, chunk_elems, grad_out: Tensor | None = None):
    """Forward (``grad_out`` None): summed loss. Backward: gradient w.r.t. ``cb`` of ``grad_out * sum``."""
    n, k = xa.shape[0], cb.shape[0]
    num_pos, num_neg = max(1, n // k), n // 2
    kb = min(k, max(1, chunk_elems // n))
    if grad_out is None:
        total = torch.zeros((), dtype=xa.dtype, device=xa.device)
        for k0 in range(0, k, kb):
            total += _contrastive_block(xa, xsq, cb[k0:k0 + kb], metric, tau, num_pos, num_neg)
        return total
    grad = torch.empty_like(cb)
    for k0 in range(0, k, kb):  # recompute block by block: only one block's graph is alive at a time
        with torch.enable_grad():
            c = cb[k0:k0 + kb].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(_contrastive_block(xa, xsq, c, metric, tau, num_pos, num_neg), c)
        grad[k0:k0 + kb] = g * grad_out
    return grad


class _ContrastiveLoss(torch.autograd.Function):
    """Mean over codes of the per-code contrastive cross-entropy; x is a constant. Forward and backward both
    walk the codes in blocks (backward recomputes each block), so neither holds N x K nor an N x K autograd
    graph.

    The backward uses a private copy of the codebook (``[K, D]``, cheap) taken in the forward: the layers
    update their codes in place after the forward (anchor update, METHODS §3.4), and the gradient must be the
    one at the values the loss saw."""

    @staticmethod
    def forward(ctx, codebook: Tensor, x: Tensor, metric: str, tau: float, chunk_elems: int) -> Tensor:
        acc = _acc(x.dtype, codebook.dtype)
        ca = codebook.detach().to(acc, copy=True)
        ctx.save_for_backward(ca, x)
        ctx.metric, ctx.tau, ctx.chunk_elems, ctx.cb_dtype = metric, tau, chunk_elems, codebook.dtype
        if x.shape[0] == 0:
            return torch.zeros((), dtype=acc, device=codebook.device)
        xa, xsq = _prepare_rows(x, metric, acc)
        total = _contrastive_sum(xa, xsq, ca, metric, tau, chunk_elems)
        return total / codebook.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        ca, x = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if x.shape[0] == 0:
            return torch.zeros_like(ca, dtype=ctx.cb_dtype), None, None, None, None
        xa, xsq = _prepare_rows(x, ctx.metric, ca.dtype)
        g = _contrastive_sum(xa, xsq, ca, ctx.metric, ctx.tau, ctx.chunk_elems,
                             grad_out=grad_out.to(ca.dtype) / ca.shape[0])
        return g.to(ctx.cb_dtype), None, None, None, None


def contrastive_loss(x: Tensor, codebook: Tensor, metric: str = "l2", tau: float = 0.07,
                     chunk_elems: int = 1 << 22) -> Tensor:
    """CVQ's contrastive term (CVQ §3.3; METHODS §3.5), a scalar (fp32; fp64 if an input is fp64).

    Similarity ``s(x_i, c_k) = -d(x_i, c_k)`` of METHODS §1 (``cos`` for cosine, ``x . c`` for dot). Per code
    k: positive = mean of its top ``max(1, N // K)`` similarities over the batch, negatives = its ``N // 2``
    lowest; the loss is the cross-entropy of ``[pos, negs] / tau`` with target 0, averaged over the K codes.

    The gradient reaches the codebook only (``x`` is detached). Computed in blocks of codes of about
    ``chunk_elems`` similarities (at least one code, i.e. N values); the backward recomputes block by block.
    ``x`` ``[N, D]`` (N = 0 gives 0), ``codebook`` ``[K, D]``.
    """
    _check_pair(x, codebook, metric)
    chunk_elems = _check_chunk(chunk_elems)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not float(tau) > 0.0:
        raise ValueError(f"tau must be a positive number; got {tau!r}")
    return _ContrastiveLoss.apply(codebook, x.detach(), metric, float(tau), chunk_elems)

"""The maths of CVQ anchor replacement (README "Method" §3), as functions on tensors.

From "Online Clustered Codebook" (Zheng & Vedaldi, ICCV 2023), re-derived from the paper, not from its code:

- §3.2 running average: a usage EMA ``h`` per code (:func:`update_usage_ema`), a per-code decay ``alpha``
  that is ~1 for unused codes and ~0 for codes used at the uniform rate (:func:`anchor_alpha`), and the
  running update ``c_k <- (1 - alpha_k) c_k + alpha_k a_k`` towards an anchor ``a_k``
  (:func:`apply_anchor_update`).
- §3.2 anchor sampling: "closest" (:func:`closest_anchors`), "random" (:func:`update_feature_pool`,
  :func:`random_anchors`) and "probrandom" (:func:`sample_anchor_rows`, :func:`probrandom_anchors`).
- §3.3 contrastive loss (:func:`contrastive_loss`, in :mod:`.contrastive`).

Nothing here holds an N x K matrix: the closest anchor is the swapped-role search ``nearest_code(codebook, x)``
and the probrandom draw is :func:`vqkernels.sample_code` (Gumbel-max in the search's epilogue; README
"Method" §1). :mod:`.anchors` applies these to a layer's buffers.

Every function here runs under ``torch.no_grad()``. Arithmetic accumulates in fp32 (fp64 when an input is fp64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..ops import check_matrix, gumbel_noise, nearest_code
from .contrastive import contrastive_loss

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
def _check_decay(decay: object) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
        raise ValueError(f"decay must be a number in (0, 1); got {decay!r}")
    return float(decay)


def _check_vector(t: object, name: str, length: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = "[K]" if length is None else f"[K] = [{length}]"
        raise ValueError(f"{name} must have shape {want}; got {tuple(t.shape)}")


def _check_pair(x: object, codebook: object, metric: str) -> None:
    """x ``[N, D]`` and codebook ``[K >= 1, D]`` (dtypes may differ): floating, same D and device; a known
    metric."""
    ops.check_pair(x, codebook, metric, same_dtype=False, batched=False)


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")


def _check_chunk(chunk_elems: object) -> int:
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
    """In place ``h <- decay * h + (1 - decay) * counts / num_rows`` (CVQ §3.2; README "Method" §3.1).

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
    """Per-code decay ``alpha_k = exp(-h_k * K * 10 / (1 - decay) - 1e-3)`` (CVQ §3.2; README "Method" §3.2).

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
    """In place ``c_k <- (1 - alpha_k) c_k + alpha_k a_k`` (CVQ §3.2; README "Method" §3.4), computed in fp32 (fp64).

    Args:
        codebook: ``[K, D]`` codes (e.g. the embedding weight), updated in place.
        anchors: ``[K, D]`` one anchor per code (any float dtype).
        alpha: ``[K]`` per-code decay from :func:`anchor_alpha`.
    """
    check_matrix(codebook, "codebook")
    check_matrix(anchors, "anchors")
    if anchors.shape != codebook.shape:
        raise ValueError(f"anchors must have the codebook's shape {tuple(codebook.shape)}; got {tuple(anchors.shape)}")
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
def closest_anchors(
    x: Tensor, codebook: Tensor, metric: str = "l2", backend: str = "auto", *, exact: bool = False
) -> Tensor:
    """For each code, the batch row nearest to it (CVQ §3.2 "closest" anchor), ``[K, D]`` in ``x``'s dtype.

    The swapped-role search ``nearest_code(codebook, x)`` (README "Method" §1): no N x K matrix and no sort. Ties go
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
# §3.2 anchors: "probrandom" (vqkernels.sample_code: Gumbel-max in the search's epilogue)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_anchor_rows(
    x: Tensor,
    codebook: Tensor,
    metric: str = "l2",
    generator: torch.Generator | None = None,
    chunk_elems: int = 1 << 22,
    backend: str = "auto",
) -> Tensor:
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
    return ops.sample_code(x.to(acc), codebook.to(acc), metric=metric, seed=ops.draw_seed(generator), backend=backend)


@torch.no_grad()
def probrandom_anchors(
    x: Tensor, codebook: Tensor, metric: str = "l2", generator: torch.Generator | None = None, backend: str = "auto"
) -> Tensor:
    """``x[sample_anchor_rows(x, codebook, metric, generator)]``: a sampled batch row per code, ``[K, D]``."""
    return x.index_select(0, sample_anchor_rows(x, codebook, metric, generator, backend=backend))


# ---------------------------------------------------------------------------------------------------------------
# §3.2 anchors: "random" (a pool of recent batch rows)
# ---------------------------------------------------------------------------------------------------------------
def _check_pool(pool: object, filled: object) -> None:
    check_matrix(pool, "pool")
    if pool.shape[0] == 0:
        raise ValueError("pool must hold at least one row; got K = 0")
    if not isinstance(filled, Tensor):
        raise TypeError(f"filled must be a torch.Tensor; got {type(filled).__name__}")
    if filled.dim() != 0 or filled.dtype != torch.int64:
        raise ValueError(f"filled must be a 0-dim int64 tensor; got shape {tuple(filled.shape)}, {filled.dtype}")
    if filled.device != pool.device:
        raise ValueError(f"pool and filled must be on the same device; got {pool.device} and {filled.device}")


@torch.no_grad()
def update_feature_pool(pool: Tensor, filled: Tensor, x: Tensor, generator: torch.Generator | None = None) -> None:
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
        raise ValueError(f"x and pool must have the same D; got x {tuple(x.shape)} and pool {tuple(pool.shape)}")
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

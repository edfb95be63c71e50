"""CVQ-VAE's contrastive term (Zheng & Vedaldi 2023, §3.3; README "Method" §3.5), computed in blocks of codes.

Per code k, over the batch rows: positive = mean of its top ``max(1, N // K)`` similarities, negatives = its
``N // 2`` lowest; the loss is the cross-entropy of ``[pos, negs] / tau`` with target 0, averaged over the codes.
The similarity is ``-d(x_i, c_k)`` (:func:`vqkernels.ops.distances`; for cosine that is ``cos - 1``, and the
cross-entropy does not change when every logit moves by the same constant). The gradient reaches the codebook
only. Neither pass holds N x K or its autograd graph: both walk the codes in blocks of about ``chunk_elems``
similarities (at least one code, i.e. N values), the backward recomputing block by block.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops import check_pair, distances

__all__ = ["contrastive_loss"]


def _block_loss(x: Tensor, c: Tensor, metric: str, tau: float, num_pos: int, num_neg: int) -> Tensor:
    """Sum over the codes of block ``c`` ``[k, D]`` of the cross-entropy of ``[pos, negs] / tau`` (target 0)."""
    s = distances(c, x, metric).neg_()  # [k, N]
    pos = s.topk(num_pos, dim=1, sorted=False).values.mean(1, keepdim=True)  # [k, 1]
    if num_neg > 0:
        neg = s.topk(num_neg, dim=1, largest=False, sorted=False).values  # [k, M]
        logits = torch.cat([pos, neg], 1) / tau  # [k, 1 + M]
    else:
        logits = pos / tau
    return (torch.logsumexp(logits, 1) - logits[:, 0]).sum()


def _blocked(
    x: Tensor, cb: Tensor, metric: str, tau: float, chunk_elems: int, grad_out: Tensor | None = None
) -> Tensor:
    """Forward (``grad_out`` None): the summed loss. Backward: the gradient w.r.t. ``cb`` of ``grad_out * sum``."""
    n, k = x.shape[0], cb.shape[0]
    num_pos, num_neg = max(1, n // k), n // 2
    kb = min(k, max(1, chunk_elems // n))
    if grad_out is None:
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        for k0 in range(0, k, kb):
            total += _block_loss(x, cb[k0 : k0 + kb], metric, tau, num_pos, num_neg)
        return total
    grad = torch.empty_like(cb)
    for k0 in range(0, k, kb):  # recompute block by block: only one block's graph is alive at a time
        with torch.enable_grad():
            c = cb[k0 : k0 + kb].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(_block_loss(x, c, metric, tau, num_pos, num_neg), c)
        grad[k0 : k0 + kb] = g * grad_out
    return grad


class _ContrastiveLoss(torch.autograd.Function):
    """Mean over codes of the per-code contrastive cross-entropy; x is a constant.

    The backward uses a private copy of the codebook (``[K, D]``, cheap) taken in the forward: the layers update
    their codes in place after the forward (anchor update, README "Method" §3.4), and the gradient must be the one
    at the values the loss saw."""

    @staticmethod
    def forward(ctx, codebook: Tensor, x: Tensor, metric: str, tau: float, chunk_elems: int) -> Tensor:
        acc = torch.float64 if torch.float64 in (x.dtype, codebook.dtype) else torch.float32
        ca, xa = codebook.detach().to(acc, copy=True), x.to(acc)
        ctx.save_for_backward(ca, xa)
        ctx.metric, ctx.tau, ctx.chunk_elems, ctx.cb_dtype = metric, tau, chunk_elems, codebook.dtype
        if x.shape[0] == 0:
            return torch.zeros((), dtype=acc, device=codebook.device)
        return _blocked(xa, ca, metric, tau, chunk_elems) / codebook.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        ca, xa = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if xa.shape[0] == 0:
            return torch.zeros_like(ca, dtype=ctx.cb_dtype), None, None, None, None
        g = _blocked(xa, ca, ctx.metric, ctx.tau, ctx.chunk_elems, grad_out=grad_out.to(ca.dtype) / ca.shape[0])
        return g.to(ctx.cb_dtype), None, None, None, None


def contrastive_loss(
    x: Tensor, codebook: Tensor, metric: str = "l2", tau: float = 0.07, chunk_elems: int = 1 << 22
) -> Tensor:
    """CVQ's contrastive term (module docstring), a scalar (fp32; fp64 if an input is fp64).

    Args:
        x: ``[N, D]`` batch rows (detached; N = 0 gives 0).
        codebook: ``[K, D]`` codes (the gradient goes here).
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``.
        tau: temperature (> 0).
        chunk_elems: similarities per block.
    """
    check_pair(x, codebook, metric, same_dtype=False, batched=False)
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
        raise ValueError(f"chunk_elems must be a positive int; got {chunk_elems!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not float(tau) > 0.0:
        raise ValueError(f"tau must be a positive number; got {tau!r}")
    return _ContrastiveLoss.apply(codebook, x.detach(), metric, float(tau), chunk_elems)

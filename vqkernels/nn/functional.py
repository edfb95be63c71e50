"""Small differentiable building blocks of the layers that route every per-code reduction through the ops."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import code_stats


class _GatherCodes(torch.autograd.Function):
    """``codebook[codes]`` whose backward is :func:`vqkernels.code_stats` of the incoming gradient."""

    @staticmethod
    def forward(ctx, codebook: Tensor, codes: Tensor) -> Tensor:
        ctx.save_for_backward(codes)
        ctx.num_codes = codebook.shape[0]
        return codebook.index_select(0, codes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (codes,) = ctx.saved_tensors
        sums, _ = code_stats(grad.contiguous(), codes, ctx.num_codes)
        return sums.to(grad.dtype), None


def gather_codes(codebook: Tensor, codes: Tensor) -> Tensor:
    """Rows of ``codebook [K, D]`` at ``codes`` (int64 ``[N]``) -> ``[N, D]``; the gradient w.r.t. the codebook is
    the per-code sum of the incoming gradient (computed by the ``code_stats`` op)."""
    return _GatherCodes.apply(codebook, codes)


def perplexity(counts: Tensor) -> Tensor:
    """``exp(-sum_k p_k log p_k)`` with ``p = counts / counts.sum()`` (README "Method" §5); 0-dim fp32."""
    p = counts.to(torch.float32) / counts.sum().clamp_min(1).to(torch.float32)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


class _StraightThrough(torch.autograd.Function):
    """Forward: ``z_q`` (exactly, as a new tensor); backward: ``g`` to ``x`` and ``nu * g`` to ``z_q``."""

    @staticmethod
    def forward(ctx, x: Tensor, z_q: Tensor, nu: float) -> Tensor:
        ctx.nu, ctx.x_dtype, ctx.q_dtype = nu, x.dtype, z_q.dtype
        return z_q.to(torch.promote_types(x.dtype, z_q.dtype), copy=True)

    @staticmethod
    def backward(ctx, g: Tensor):
        gx = g.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gq = (ctx.nu * g).to(ctx.q_dtype) if ctx.needs_input_grad[1] and ctx.nu != 0.0 else None
        return gx, gq, None


def straight_through(x: Tensor, z_q: Tensor, nu: float = 0.0) -> Tensor:
    """``x + sg(z_q - x) + nu * z_q - sg(nu * z_q)``: forward value ``z_q`` (exactly: the expression's rounding is
    skipped); the gradient to ``x`` is the identity and the codebook also receives ``nu`` x the downstream
    gradient (Huh et al. 2023, §4.2 synchronised update). ``x``, ``z_q``: ``[N, D]``; one autograd node."""
    return _StraightThrough.apply(x, z_q, float(nu))


class _VQLoss(torch.autograd.Function):
    """``w_x mean((x - sg(z_q))^2) + w_q mean((sg(x) - z_q)^2)`` in one node: both terms have the value
    ``mean((x - z_q)^2)``, so the forward is one difference and one norm, and the backward recomputes the
    difference (nothing N x D is saved beyond the inputs)."""

    @staticmethod
    def forward(ctx, x: Tensor, z_q: Tensor, w_x: float, w_q: float) -> Tensor:
        acc = torch.promote_types(torch.promote_types(x.dtype, z_q.dtype), torch.float32)
        ctx.save_for_backward(x, z_q)
        ctx.w, ctx.acc = (w_x, w_q), acc
        sq = (x.to(acc) - z_q.to(acc)).square_()  # in place: one N x D temporary
        # torch.sum's cascade summation keeps the fp32 mean accurate for large N*D (vector_norm loses ~1e-4)
        return (w_x + w_q) * sq.sum() / max(sq.numel(), 1)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, z_q = ctx.saved_tensors
        w_x, w_q = ctx.w
        want_x = ctx.needs_input_grad[0] and w_x != 0.0
        want_q = ctx.needs_input_grad[1] and w_q != 0.0
        if not (want_x or want_q):
            return None, None, None, None
        diff = x.to(ctx.acc) - z_q.to(ctx.acc)
        scale = 2.0 * g.to(ctx.acc) / max(diff.numel(), 1)
        gx = (diff * (scale * w_x)).to(x.dtype) if want_x else None
        gq = (diff * (-scale * w_q)).to(z_q.dtype) if want_q else None
        return gx, gq, None, None


def convex_vq_loss(x: Tensor, z_q: Tensor, beta: float) -> Tensor:
    """vqtorch's loss ``(1 - beta) mean((x - sg(z_q))^2) + beta mean((sg(x) - z_q)^2)`` (README "Method" §2.1), a
    scalar in fp32 (fp64 for fp64 inputs). ``x``, ``z_q``: ``[N, D]``."""
    return _VQLoss.apply(x, z_q, 1.0 - float(beta), float(beta))


def vqvae_loss(x: Tensor, z_q: Tensor, beta: float) -> Tensor:
    """The VQ-VAE loss ``beta mean((sg(z_q) - x)^2) + mean((z_q - sg(x))^2)`` (van den Oord et al. 2017, eq. 3;
    CVQ-VAE's convention: ``beta`` weighs the commitment term), fp32 (fp64 for fp64 inputs)."""
    return _VQLoss.apply(x, z_q, float(beta), 1.0)

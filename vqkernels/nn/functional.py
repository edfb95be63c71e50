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


def upcast(t: Tensor) -> Tensor:
    """``t`` in fp32, or fp64 when it is fp64: the precision of losses and statistics."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def perplexity(counts: Tensor) -> Tensor:
    """``exp(-sum_k p_k log p_k)`` with ``p = counts / counts.sum()`` (METHODS §5); 0-dim fp32."""
    p = counts.to(torch.float32) / counts.sum().clamp_min(1).to(torch.float32)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


def straight_through(x: Tensor, z_q: Tensor, nu: float = 0.0) -> Tensor:
    """``x + sg(z_q - x) + nu * z_q - sg(nu * z_q)``: forward value ``z_q``; the gradient to ``x`` is the
    identity and the codebook also receives ``nu`` x the downstream gradient (Huh et al. 2023, §4.2 synchronised
    update)."""
    out = x + (z_q - x).detach()
    if nu != 0.0:
        out = out + nu * z_q - (nu * z_q).detach()
    return out


def convex_vq_loss(x: Tensor, z_q: Tensor, beta: float) -> Tensor:
    """vqtorch's loss ``(1 - beta) mean((x - sg(z_q))^2) + beta mean((sg(x) - z_q)^2)`` (METHODS §2.1), in fp32
    (fp64 for fp64 inputs)."""
    x32, q32 = upcast(x), upcast(z_q)
    return (1.0 - beta) * ((x32 - q32.detach()) ** 2).mean() + beta * ((x32.detach() - q32) ** 2).mean()

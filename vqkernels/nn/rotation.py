"""The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick", §4.2): a
gradient estimator through the quantiser that carries the angle and the norm ratio between the input and its code.

Forward, the output is the code ``q`` itself. Backward, the code is seen as ``q = s R e`` with ``e`` the input,
``s = |q| / |e|`` and ``R`` the rotation taking ``e/|e|`` to ``q/|q|`` (both treated as constants), so the input
receives ``s R^T g`` instead of the straight-through ``g``. With ``u = e/|e|``, ``q^ = q/|q|`` and
``w = (u + q^)/|u + q^|`` the rotation is the Householder form ``R = I - 2 w w^T + 2 q^ u^T`` (§4.2), applied in
O(D) per row: ``R^T g = g - 2 w (w.g) + 2 u (q^.g)``, a combination of ``g``, ``e`` and ``q`` with per-row
coefficients (:func:`rotate_gradient`). Nothing N x D is built beyond the two inputs the backward needs (``e`` and
``q``) and the gradient itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

# floor of the norms (as vector-quantize-pytorch's safe division): a zero input or code gives a zero gradient
# instead of a NaN
NORM_EPS = 1e-6


class _RotationTrick(torch.autograd.Function):
    """Forward: ``z_q`` (exactly, as a new tensor); backward: ``s R^T g`` to ``x`` and ``nu * g`` to ``z_q``."""

    @staticmethod
    def forward(ctx, x: Tensor, z_q: Tensor, nu: float) -> Tensor:
        ctx.nu, ctx.x_dtype, ctx.q_dtype = nu, x.dtype, z_q.dtype
        ctx.save_for_backward(x, z_q)
        return z_q.to(torch.promote_types(x.dtype, z_q.dtype), copy=True)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, z_q = ctx.saved_tensors
        gx = gq = None
        if ctx.needs_input_grad[0]:
            gx = rotate_gradient(x, z_q, g).to(ctx.x_dtype)
        if ctx.needs_input_grad[1] and ctx.nu != 0.0:
            gq = (ctx.nu * g).to(ctx.q_dtype)
        return gx, gq, None


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``[..., D] x [..., D] -> [..., 1]``: a batched 1 x D by D x 1 product, which holds no N x D temporary (and on
    CPU is about 3x faster than ``(a * b).sum(-1)``, whose reduction over a short last axis is slow)."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)


def rotate_gradient(x: Tensor, z_q: Tensor, g: Tensor) -> Tensor:
    """``s R^T g`` row by row (module docstring): ``x``, ``z_q``, ``g`` ``[..., D]`` -> ``[..., D]`` in fp32 (fp64
    for fp64 inputs).

    Nothing N x D is formed but the result: with ``u = e/|e|``, ``q^ = q/|q|`` (norms floored at ``NORM_EPS``) and
    ``w = (u + q^) / max(|u + q^|, eps)``, ``R^T g = g - 2 w (w.g) + 2 u (q^.g) = g + alpha e + beta q`` with the
    per-row scalars ``t = (u.g + q^.g) / max(|u + q^|^2, eps^2)``, ``alpha = 2 (q^.g - t) / |e|``,
    ``beta = -2 t / |q|``; ``|u + q^|^2 = |u|^2 + |q^|^2 + 2 u.q^``. So the backward is five row dot products and
    one fused pass ``s g + s alpha e + s beta q`` (the explicit form holds ~15 N x D temporaries).
    """
    acc = torch.promote_types(torch.promote_types(x.dtype, z_q.dtype), torch.float32)
    e, q, ga = x.to(acc), z_q.to(acc), g.to(acc)
    ee, qq = _row_dot(e, e), _row_dot(q, q)
    eg, qg, eq = _row_dot(e, ga), _row_dot(q, ga), _row_dot(e, q)
    en = ee.sqrt().clamp_min(NORM_EPS)
    qn = qq.sqrt().clamp_min(NORM_EPS)
    ug, qhg = eg / en, qg / qn  # u.g, q^.g
    sum_sq = ee / (en * en) + qq / (qn * qn) + 2.0 * eq / (en * qn)  # |u + q^|^2
    t = (ug + qhg) / sum_sq.clamp_min(NORM_EPS * NORM_EPS)
    s = qq.sqrt() / en
    out = ga * s
    out.addcmul_(e, s * 2.0 * (qhg - t) / en)
    out.addcmul_(q, s * -2.0 * t / qn)
    return out


def rotation_trick(x: Tensor, z_q: Tensor, nu: float = 0.0) -> Tensor:
    """The rotation-trick estimator: value ``z_q``, gradient ``s R^T g`` to ``x`` (module docstring) and, for the
    synchronised update (Huh et al. 2023, §4.2), ``nu * g`` to ``z_q``. ``x``, ``z_q``: ``[..., D]``; one autograd
    node."""
    return _RotationTrick.apply(x, z_q, float(nu))

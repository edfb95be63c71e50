"""Orthogonal regularisation of a codebook (Shin et al. 2021, "Translation-equivariant Image Quantizer for
Bi-directional Image-Text Generation", eq. 2), without the K x K similarity matrix.

``L = sum_h sum_{i,j} cos(c_hi, c_hj)^2 / (H K^2) - 1/K``. With the unit codes of head h as the rows of
``U_h [K, D]``, ``sum_{i,j} (u_i . u_j)^2 = |U_h U_h^T|_F^2 = |U_h^T U_h|_F^2``: the D x D Gram matrix gives the
same sum in O(K D^2) time and O(D^2) memory, so a codebook of a million codes costs no K x K (or K x chunk)
tensor. When K < D the K x K form is the smaller one and is used instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-6


def orthogonal_loss(codebook: Tensor) -> Tensor:
    """The loss above for ``codebook [K, D]`` or ``[H, K, D]`` (H heads averaged); differentiable, fp32 (fp64 for
    fp64 codes)."""
    cb = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    if cb.dim() != 3:
        raise ValueError(f"codebook must be [K, D] or [H, K, D]; got shape {tuple(codebook.shape)}")
    h, k, d = cb.shape
    if k == 0:
        raise ValueError("codebook must hold at least one code; got K = 0")
    acc = torch.promote_types(cb.dtype, torch.float32)
    u = F.normalize(cb.to(acc), dim=-1, eps=NORM_EPS)
    gram = u @ u.transpose(1, 2) if k < d else u.transpose(1, 2) @ u  # [H, min(K, D), min(K, D)]
    return gram.square().sum() / (h * k * k) - 1.0 / k

"""Input and codebook normalisations (README "Method" §2.7), applied to vectors with the feature axis last."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_NORMS = (None, "none", "l2", "l2c", "bn", "gn", "in")
CODEBOOK_NORMS = (None, "none", "l2", "l2c")
L2C_MAX_NORM = 10.0


def l2c(x: Tensor, max_norm: float = L2C_MAX_NORM) -> Tensor:
    """Clamp every vector's norm at ``max_norm`` (vectors shorter than that are unchanged)."""
    n = x.norm(dim=-1, keepdim=True)
    return x * (max_norm / n.clamp_min(max_norm))


class VectorNorm(nn.Module):
    """Normalises ``[..., D]`` vectors: ``"l2"`` unit norm, ``"l2c"`` norm clamped at 10, ``"bn"`` BatchNorm over all
    vectors, ``"gn"`` GroupNorm of each vector's features, ``"in"`` InstanceNorm over each sample's positions
    (needs an input of rank >= 3: ``[B, positions..., D]``)."""

    def __init__(self, kind: str | None, feature_size: int):
        super().__init__()
        if kind not in INPUT_NORMS:
            raise ValueError(f"norm must be one of {INPUT_NORMS}; got {kind!r}")
        self.kind = None if kind == "none" else kind
        if self.kind == "bn":
            self.bn = nn.BatchNorm1d(feature_size)
        elif self.kind == "gn":
            self.gn = nn.GroupNorm(math.gcd(32, feature_size), feature_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind is None:
            return x
        if self.kind == "l2":
            return F.normalize(x, dim=-1)
        if self.kind == "l2c":
            return l2c(x)
        if self.kind == "bn":
            return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        if self.kind == "gn":
            return self.gn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        if x.dim() < 3:
            raise ValueError("norm='in' normalises over positions and needs an input of rank >= 3")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        mean = flat.mean(1, keepdim=True)
        var = flat.var(1, unbiased=False, keepdim=True)
        return ((flat - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def codebook_norm(codebook: Tensor, kind: str | None) -> Tensor:
    """Apply a codebook normalisation (``None``, ``"l2"`` or ``"l2c"``) to ``[K, D]`` codes."""
    if kind in (None, "none"):
        return codebook
    if kind == "l2":
        return F.normalize(codebook, dim=-1)
    if kind == "l2c":
        return l2c(codebook)
    raise ValueError(f"cb_norm must be one of {CODEBOOK_NORMS}; got {kind!r}")

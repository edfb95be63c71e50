"""Drop-in VQ layers built on the fused ops: vqtorch-compatible ``VectorQuant``, ``GroupVectorQuant``,
``ResidualVectorQuant``, CVQ-VAE-compatible ``VectorQuantiser`` (README "Method" §2, §3) and
vector-quantize-pytorch-compatible ``VectorQuantize`` (README "vector-quantize-pytorch drop-in")."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .base import VQBase
from .group import GroupVectorQuant
from .quantiser import VectorQuantiser
from .residual import ResidualVectorQuant
from .vector_quant import VectorQuant
from .vector_quantize import LossBreakdown, VectorQuantize

__all__ = [
    "VQBase",
    "VectorQuant",
    "GroupVectorQuant",
    "ResidualVectorQuant",
    "VectorQuantiser",
    "VectorQuantize",
    "LossBreakdown",
    "no_vq",
]


@contextmanager
def no_vq(module: nn.Module):
    """Disable quantisation in every VQ layer of ``module`` (they become the identity) inside the block.

    Example:
        >>> with no_vq(model):
        ...     y = model(x)  # no quantisation anywhere in model
    """
    layers = [m for m in module.modules() if isinstance(m, (VQBase, VectorQuantize))]
    saved = [m.__dict__.get("enabled") for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield module
    finally:
        for m, s in zip(layers, saved):
            if s is None:
                del m.enabled
            else:
                m.enabled = s

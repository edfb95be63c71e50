"""vqkernels: fused vector-quantisation kernels for PyTorch.

The hot path of a VQ layer (distances to every code, argmin, gather, usage counts) in kernels that never write
the N x K distance matrix, and drop-in VQ layers on top of them. See README.md; ``python -m vqkernels.info`` lists
the backends available here.

- ops: :func:`nearest_code`, :func:`quantize`, :func:`code_stats`, :func:`sample_code` (:mod:`vqkernels.ops`);
- layers: :class:`VectorQuant`, :class:`GroupVectorQuant`, :class:`ResidualVectorQuant`,
  :class:`VectorQuantiser`, :class:`VectorQuantize`, :func:`no_vq` (the same objects as in :mod:`vqkernels.nn`).
"""

from ._version import __version__
from .nn import GroupVectorQuant, ResidualVectorQuant, VectorQuant, VectorQuantiser, VectorQuantize, no_vq
from .ops import METRICS, Quantized, code_stats, nearest_code, quantize, sample_code

__all__ = [
    "METRICS",
    "Quantized",
    "code_stats",
    "nearest_code",
    "quantize",
    "sample_code",
    "VectorQuant",
    "GroupVectorQuant",
    "ResidualVectorQuant",
    "VectorQuantiser",
    "VectorQuantize",
    "no_vq",
    "__version__",
]

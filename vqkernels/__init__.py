"""vqkernels: fused vector-quantisation kernels for PyTorch.

The hot path of a VQ layer (distances to every code, argmin, gather, usage counts) in kernels that never write
the N x K distance matrix. See README.md; ``python -m vqkernels.info`` lists the backends available here.
"""

from .ops import METRICS, Quantized, code_stats, nearest_code, quantize

__version__ = "0.1.0"

__all__ = ["METRICS", "Quantized", "code_stats", "nearest_code", "quantize", "__version__"]

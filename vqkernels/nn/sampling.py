"""Stochastic code sampling with a temperature, on the sampling op (Gumbel-max; no N x K logits or one-hot).

For every row ``x_i`` a code is drawn with ``P(k | x_i) ~ exp(-d(x_i, c_k) / T)``: :func:`vqkernels.sample_code`
draws, per code, a row with ``P ~ exp(-d)``, so with the roles swapped (the codes as the rows to draw from, the
inputs as the "codes") and both sides scaled by ``1/sqrt(T)`` it draws per input a code with the tempered law:

- ``"l2"``: ``d = |x - c|^2 / T`` (the squared distance; vector-quantize-pytorch's logits are the unsquared
  distance ``-|x - c| / T``, which a search op cannot add without a square root per pair: same argmax at T -> 0,
  a sharper law for far codes);
- ``"cosine"``: ``d = -cos(x, c) / T`` on unit vectors (the ``"dot"`` op metric): vector-quantize-pytorch's law.

``T <= 0`` is the plain nearest-code search.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .. import ops

NORM_EPS = 1e-6


def sample_codes(
    x: Tensor, codebook: Tensor, temperature: float, metric: str = "l2", seed: int | None = None, backend: str = "auto"
) -> Tensor:
    """Codes drawn for ``x [N, D]`` (or batched ``[G, N, D]``) from ``codebook [K, D]`` (``[G, K, D]``) with the law
    above -> int64 ``[N]`` (``[G, N]``). ``metric``: "l2" or "cosine"."""
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine'; got {metric!r}")
    if temperature <= 0:
        return ops.nearest_code(x, codebook, metric=metric, backend=backend)[0]
    scale = 1.0 / math.sqrt(temperature)
    if metric == "cosine":
        u = F.normalize(x, dim=-1, eps=NORM_EPS) * scale
        c = F.normalize(codebook, dim=-1, eps=NORM_EPS) * scale
        return ops.sample_code(c, u, metric="dot", seed=seed, backend=backend)
    return ops.sample_code(codebook * scale, x * scale, metric="l2", seed=seed, backend=backend)

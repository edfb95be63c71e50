"""Affine re-parameterisation of the codebook (Huh et al. 2023, §4.1; README "Method" §2.3).

Codes are split into ``groups`` contiguous blocks of K/G codes; code k of block g is used as
``c_hat_k = A_g * c_k + bias_g``. Learned mode: ``A = 1 + lr_scale * scale``, ``bias = lr_scale * bias_param`` with
both parameters initialised to 0 (so the layer starts as the identity and ``lr_scale`` scales their gradients).
Running mode: ``A = sqrt(var_x / (var_c + 1e-8))``, ``bias = mean_x - A * mean_c`` from running averages
(momentum 0.1) of the per-dimension moments of the inputs and of each code block. As in vqtorch, the first update
copies the batch moments instead of blending them into the (0, 1) initial values, and the buffers carry vqtorch's
names (``running_ze_mean``, ``running_ze_var``, ``running_c_mean``, ``running_c_var``,
``running_statistics_initialized``) so its checkpoints load.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

AFFINE_MODES = ("learned", "running")


class AffineTransform(nn.Module):
    """Group affine transform of a ``[K, D]`` codebook; ``scale``/``bias`` (learned) are ``[G, D]``."""

    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        groups: int = 1,
        lr_scale: float = 1.0,
        mode: str = "learned",
        momentum: float = 0.1,
    ):
        super().__init__()
        if mode not in AFFINE_MODES:
            raise ValueError(f"affine_mode must be one of {AFFINE_MODES}; got {mode!r}")
        if not isinstance(groups, int) or groups < 1 or num_codes % groups != 0:
            raise ValueError(f"affine_groups must be a positive divisor of num_codes = {num_codes}; got {groups!r}")
        self.groups, self.mode, self.lr_scale, self.momentum = groups, mode, float(lr_scale), momentum
        if mode == "learned":
            self.scale = nn.Parameter(torch.zeros(groups, feature_size))
            self.bias = nn.Parameter(torch.zeros(groups, feature_size))
        else:
            self.register_buffer("running_statistics_initialized", torch.zeros(1))
            # input moments are shared by all groups; kept [G, D] (equal rows) for vqtorch's checkpoint layout
            self.register_buffer("running_ze_mean", torch.zeros(groups, feature_size))
            self.register_buffer("running_ze_var", torch.ones(groups, feature_size))
            self.register_buffer("running_c_mean", torch.zeros(groups, feature_size))
            self.register_buffer("running_c_var", torch.ones(groups, feature_size))

    def get_affine_params(self) -> tuple[Tensor, Tensor]:
        """``(A, bias)``, each ``[G, D]``."""
        if self.mode == "learned":
            return 1.0 + self.lr_scale * self.scale, self.lr_scale * self.bias
        a = torch.sqrt(self.running_ze_var / (self.running_c_var + 1e-8))
        return a, self.running_ze_mean - a * self.running_c_mean

    def forward(self, codebook: Tensor) -> Tensor:
        """``[K, D]`` raw codes -> ``[K, D]`` effective codes."""
        a, b = self.get_affine_params()
        k, d = codebook.shape
        blocks = codebook.view(self.groups, k // self.groups, d)
        return (blocks * a[:, None, :].to(codebook.dtype) + b[:, None, :].to(codebook.dtype)).view(k, d)

    @torch.no_grad()
    def inverse(self, vectors: Tensor, codes: Tensor, num_codes: int) -> Tensor:
        """Raw codes whose effective value is ``vectors [M, D]`` for code indices ``codes [M]``."""
        a, b = self.get_affine_params()
        g = codes // (num_codes // self.groups)
        return (vectors - b[g].to(vectors.dtype)) / a[g].to(vectors.dtype)

    @torch.no_grad()
    def update_running_statistics(
        self, x: Tensor, codebook: Tensor, moments: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """Running mode only: fold the moments of ``x [N, D]`` (or the given ``(mean, var)`` of the rows, e.g.
        summed over ranks) and of each block of ``codebook [K, D]`` in."""
        if self.mode != "running" or (moments is None and x.shape[0] == 0):
            return
        # moments in the buffers' dtype (fp32 unless the module was converted), never in a low-precision input's
        x32 = x.to(self.running_ze_mean.dtype)
        blocks = codebook.to(self.running_c_mean.dtype).view(self.groups, -1, codebook.shape[1])
        xm, xv = (x32.mean(0), x32.var(0, unbiased=False)) if moments is None else moments
        new = (
            xm.to(x32.dtype).expand_as(self.running_ze_mean),
            xv.to(x32.dtype).expand_as(self.running_ze_var),
            blocks.mean(1),
            blocks.var(1, unbiased=False),
        )
        bufs = (self.running_ze_mean, self.running_ze_var, self.running_c_mean, self.running_c_var)
        m = self.momentum if bool(self.running_statistics_initialized.item()) else 1.0
        for buf, value in zip(bufs, new):
            buf.lerp_(value, m)  # r <- m new + (1 - m) r
        self.running_statistics_initialized.fill_(1)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, mode={self.mode}, lr_scale={self.lr_scale}"

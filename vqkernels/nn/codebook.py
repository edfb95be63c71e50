"""The codebook of a VQ layer and its effective form (README "Method" §2.3, §2.7).

The raw codes live in an ``nn.Embedding`` named as in the original libraries (``codebook`` for vqtorch,
``embedding`` for CVQ-VAE) so their checkpoints load. The search uses the *effective* codebook
``C_hat = affine(cb_norm(C))``: a codebook normalisation (:mod:`.norms`) and the group affine transform of Huh et
al. 2023, §4.1 (:mod:`.affine`), learned or from running statistics. This module owns both, the inverse that
writes a vector as an effective code, and the running-statistics update with its distributed sync (the input
moments summed over ranks, README "Method" §4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed as vq_dist
from . import ema_update as ema_layer
from .affine import AffineTransform
from .norms import CODEBOOK_NORMS, codebook_norm


class CodebookMixin:
    """The codebook half of :class:`vqkernels.nn.base.VQBase` (mixed into an ``nn.Module``)."""

    _codebook_attr = "codebook"  # name of the nn.Embedding holding the raw codes

    def _init_codebook(
        self,
        num_codes: int,
        code_dim: int,
        cb_norm: str | None,
        affine_lr: float,
        affine_groups: int,
        affine_mode: str | None,
        codebook_init: str,
    ) -> None:
        """Create the raw codes (N(0, 1), or CVQ-VAE's U(-1/K, 1/K) for ``codebook_init="uniform"``) and the
        affine transform (``affine_mode`` "learned" by default when ``affine_lr > 0``, or "running")."""
        if cb_norm not in CODEBOOK_NORMS:
            raise ValueError(f"cb_norm must be one of {CODEBOOK_NORMS}; got {cb_norm!r}")
        if affine_lr < 0:
            raise ValueError(f"affine_lr must be >= 0; got {affine_lr}")
        self.codebook_norm = cb_norm
        emb = nn.Embedding(num_codes, code_dim)
        if codebook_init == "uniform":
            nn.init.uniform_(emb.weight, -1.0 / num_codes, 1.0 / num_codes)
        setattr(self, self._codebook_attr, emb)
        if affine_mode is None and affine_lr > 0:
            affine_mode = "learned"
        if affine_mode is not None:
            self.affine_transform = AffineTransform(
                code_dim, num_codes, affine_groups, lr_scale=affine_lr if affine_lr > 0 else 1.0, mode=affine_mode
            )
        elif not isinstance(affine_groups, int) or affine_groups < 1 or num_codes % affine_groups:
            raise ValueError(f"affine_groups must be a positive divisor of num_codes = {num_codes}")

    @property
    def codebook_weight(self) -> nn.Parameter:
        """The raw codes ``[K, D']`` (the ``nn.Embedding`` weight)."""
        return getattr(self, self._codebook_attr).weight

    def _has_transform(self) -> bool:
        return hasattr(self, "affine_transform") or self.codebook_norm not in (None, "none")

    def _running_affine(self) -> bool:
        return hasattr(self, "affine_transform") and self.affine_transform.mode == "running"

    def _codebook_params(self, include_affine: bool = True) -> list[nn.Parameter]:
        """The raw codes and, with ``include_affine``, the learned affine parameters (what the in-place optimiser
        of the alternating optimisation steps)."""
        params = [self.codebook_weight]
        if include_affine and hasattr(self, "affine_transform") and self.affine_transform.mode == "learned":
            params += [self.affine_transform.scale, self.affine_transform.bias]
        return params

    def effective_codebook(self) -> Tensor:
        """``C_hat = affine(cb_norm(C))`` ``[K, D']``, differentiable w.r.t. the codebook and affine parameters."""
        w = self.codebook_weight
        saved_for_backward = self._has_transform() or getattr(self, "orthogonal_reg_weight", 0.0) > 0
        if self.training and w.requires_grad and saved_for_backward and self._updates_after_forward():
            # The transform (and the orthogonal term's normalisation) save their input for backward; the in-place
            # updates after the forward must not change what backward sees, so they work on a copy (one K x D'
            # copy per step).
            w = w.clone()
        c = codebook_norm(w, self.codebook_norm)
        if hasattr(self, "affine_transform"):
            c = self.affine_transform(c)
        return c

    @torch.no_grad()
    def get_codebook(self) -> Tensor:
        """The effective codebook ``C_hat`` ``[K, D']`` (no grad)."""
        return self.effective_codebook().detach().clone()

    def get_codebook_affine_params(self) -> tuple[Tensor, Tensor] | None:
        """``(A, bias)`` of the affine transform (``[G, D']`` each), or None when it is off."""
        if hasattr(self, "affine_transform"):
            return self.affine_transform.get_affine_params()
        return None

    @torch.no_grad()
    def _write_effective(self, codes: Tensor, vectors: Tensor, reseed: bool = True) -> None:
        """Set raw codes so that their *effective* value (after affine) equals ``vectors [M, D']``.

        With ``cb_norm`` the raw code is written as the inverse-affine vector; its effective value is then that
        vector after the codebook normalisation. With ``ema_update`` on (and ``reseed``: every writer but the EMA
        itself), the EMA sums of the written codes are re-seeded so that the next EMA step starts from them.
        """
        raw = vectors.to(self.codebook_weight.dtype)
        if hasattr(self, "affine_transform"):
            acc = torch.promote_types(raw.dtype, torch.float32)  # (fp64 codes stay fp64)
            raw = self.affine_transform.inverse(raw.to(acc), codes, self.num_codes).to(raw.dtype)
        self.codebook_weight.index_copy_(0, codes, raw)
        if reseed:
            ema_layer.reseed(self, codes)

    @torch.compiler.disable
    @torch.no_grad()
    def _update_running_affine(self, rows: Tensor) -> None:
        """Running-statistics affine mode, training only: fold the moments of ``rows`` and of the codes in; with a
        process group, the input moments are summed over ranks first (sum, sum of squares, count)."""
        if not (self.training and self._running_affine()):
            return
        raw = codebook_norm(self.codebook_weight, self.codebook_norm)
        moments = None
        if self._sync_active():
            acc = torch.promote_types(rows.dtype, torch.float32)
            r = rows.to(acc)
            n = torch.tensor([float(rows.shape[0])], dtype=acc, device=rows.device)
            tot = vq_dist.all_reduce_sum(torch.cat([r.sum(0), (r * r).sum(0), n]))
            d = rows.shape[1]
            count = float(tot[-1])
            if count == 0:
                return
            mean = tot[:d] / count
            moments = (mean, (tot[d : 2 * d] / count - mean * mean).clamp_min(0))
        self.affine_transform.update_running_statistics(rows, raw, moments)

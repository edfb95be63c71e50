"""The correctness oracle: an fp64 brute force and the precision rule, used by the test suite and by the
benchmark's correctness column alike (README "Method" §1.2).

- Fast path (``exact=False``): with ``d*`` the fp64 minimum distance of a row and ``d_sel`` the fp64 distance of
  the chosen code, ``max(d_sel - d*)`` over the checked rows may not exceed twice the worst regret of the
  same-precision (same dtype) PyTorch search plus a floor of ``1e-3`` of the largest rounding scale; the returned
  distance must lie within the row's rounding scale ``EXACT_SAFETY (D + 4) u s(x)`` of the fp64 distance of the
  chosen code. Index mismatches are thus allowed on near-ties only.
- Exact mode: the codes must equal the fp64 argmin (``sum (x - c)^2`` for l2, ties to the lowest index) and the
  distances the fp64 minimum up to one rounding to the output dtype.

Everything runs on the CPU in fp64, in blocks of at most ``CHUNK_ELEMS`` rows x K elements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .numerics import CHUNK_ELEMS, EXACT_SAFETY, acc_dtype, distances, key_terms, unit_roundoff

REGRET_FLOOR = 1e-3  # of the largest rounding scale of the checked rows
CHECK_ROWS = 512  # rows checked by default (a fixed random sample when there are more)


def brute_distances(x: Tensor, cb: Tensor, metric: str, direct: bool = False) -> Tensor:
    """fp64 distance matrix ``[N, K]`` from the values as stored (:func:`vqkernels.numerics.distances` on fp64
    copies; small N: callers chunk). ``direct=True`` evaluates l2 as ``sum((x - c)^2)`` (exact mode's formula:
    exact ties stay exact); otherwise the fp64 expansion, whose error (~1e-16 relative) is far below any
    low-precision effect under test."""
    return distances(x.to(torch.float64), cb.to(torch.float64), metric, direct=direct)


def same_precision_codes(x: Tensor, cb: Tensor, metric: str) -> Tensor:
    """What a plain PyTorch search in the inputs' own dtype picks: the precision rule's yardstick, as
    flash-attention judges attention against the same-dtype PyTorch computation. The argmin of the keys
    ``w (x @ cb.T) + o`` (:func:`vqkernels.numerics.key_terms`) with the matmul and the terms in ``x.dtype``: fp32
    for fp32 inputs; for bf16 / fp16 torch's matmul accumulates in fp32 and rounds the result to the dtype."""
    w, o, _ = key_terms(cb, metric)
    return torch.addcmul(o.to(x.dtype), x @ cb.T, w.to(x.dtype)).argmin(1)


def rounding_scale(x: Tensor, cb: Tensor, metric: str, u: float | None = None) -> Tensor:
    """Per-row size ``[N]`` (fp64) of the rounding error of a key or distance accumulated with unit roundoff ``u``
    (default: that of the inputs' accumulation dtype): the exact-mode factor ``EXACT_SAFETY (D + 4) u`` times
    ``(|x| + cmax)^2`` (l2), 1 (cosine) or ``|x| cmax`` (dot)."""
    d = x.shape[1]
    u = unit_roundoff(acc_dtype(x.dtype)) if u is None else u
    xn = x.to(torch.float64).norm(dim=1)
    cmax = cb.to(torch.float64).norm(dim=1).max()
    if metric == "l2":
        s = (xn + cmax) ** 2
    elif metric == "cosine":
        s = torch.ones_like(xn)
    else:
        s = xn * cmax
    return EXACT_SAFETY * (d + 4) * u * s


@dataclass
class Verdict:
    """The oracle's judgement: ``ok``, the reasons when not, and the numbers behind it."""

    ok: bool
    reasons: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return "PASS" if self.ok else "FAIL(" + "; ".join(self.reasons) + ")"


def sample_rows(n: int, max_rows: int = CHECK_ROWS) -> Tensor:
    """All rows, or ``max_rows`` of them drawn with a fixed seed (CPU int64)."""
    if n <= max_rows:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(1))[:max_rows]


def judge_search(
    x: Tensor, cb: Tensor, metric: str, codes: Tensor, dist: Tensor | None, exact: bool, max_rows: int = CHECK_ROWS
) -> Verdict:
    """The precision rule (or exactness) and the distance accuracy of a search result on up to ``max_rows``
    rows against all K codes (module docstring). Any device; the check runs on the CPU (only the sampled rows
    leave the device).

    ``dist=None`` judges the codes alone: the precision rule (or exactness) without the distance check, for a
    search that returns no distances (a whole layer's training step, a third-party quantiser).
    """
    n = x.shape[0]
    reasons = []
    if codes.shape != (n,) or codes.dtype != torch.int64:
        return Verdict(False, [f"codes {tuple(codes.shape)} {codes.dtype}, want ({n},) int64"])
    if dist is not None and (dist.shape != (n,) or dist.dtype != acc_dtype(x.dtype)):
        return Verdict(False, [f"dist {tuple(dist.shape)} {dist.dtype}, want ({n},) {acc_dtype(x.dtype)}"])
    if n == 0:
        return Verdict(True)
    if bool((codes < 0).any()) or bool((codes >= cb.shape[0]).any()):
        return Verdict(False, ["code out of range"])
    rows = sample_rows(n, max_rows)
    take = rows.to(x.device)
    xs, cs = x[take].cpu(), codes[take].cpu()
    ds = None if dist is None else dist[take].cpu()
    cb = cb.cpu()
    cb64 = cb.to(torch.float64)  # converted once, not per block (the conversion inside brute_distances is a no-op)
    chosen, best, best_i, yard = [], [], [], []
    step = max(1, CHUNK_ELEMS // cb.shape[0])
    for r0 in range(0, xs.shape[0], step):
        xc = xs[r0 : r0 + step]
        d64 = brute_distances(xc, cb64, metric, direct=exact)
        v, i = d64.min(1)
        best.append(v)
        best_i.append(i)
        chosen.append(d64.gather(1, cs[r0 : r0 + step, None]).squeeze(1))
        if not exact:
            yard.append(d64.gather(1, same_precision_codes(xc, cb, metric)[:, None]).squeeze(1))
    d_star, i_star, d_sel = torch.cat(best), torch.cat(best_i), torch.cat(chosen)
    details = {"rows": int(rows.numel())}
    if exact:
        wrong = int((cs != i_star).sum())
        details["wrong_codes"] = wrong
        if wrong:
            reasons.append(f"exact mode differs from the fp64 argmin on {wrong} rows")
        if ds is None:
            return Verdict(not reasons, reasons, details)
        # fp32 output: one rounding of the fp64 value; fp64 output: the summation order may differ from ours
        rtol = max(2 * unit_roundoff(ds.dtype), EXACT_SAFETY * (x.shape[1] + 4) * 2.0**-53)
        atol = float(rounding_scale(xs, cb, metric, u=2.0**-53).max())
        err = (ds.to(torch.float64) - d_star).abs()
        if not bool((err <= atol + rtol * d_star.abs()).all()):
            reasons.append(f"dist off the fp64 minimum by up to {float(err.max()):.3g}")
        return Verdict(not reasons, reasons, details)
    regret = d_sel - d_star
    ref_regret = torch.cat(yard) - d_star
    scale = rounding_scale(xs, cb, metric)
    allowed = 2 * float(ref_regret.max()) + REGRET_FLOOR * float(scale.max())
    details.update(max_regret=float(regret.max()), allowed_regret=allowed)
    if float(regret.max()) > allowed:
        reasons.append(f"worst regret {float(regret.max()):.3g} > allowed {allowed:.3g}")
    if ds is None:
        return Verdict(not reasons, reasons, details)
    err = (ds.to(torch.float64) - d_sel).abs()
    worst = float((err / scale).max())
    details["worst_dist_err_over_scale"] = worst
    if worst > 1:
        reasons.append(f"dist error {worst:.3g}x the rounding scale")
    return Verdict(not reasons, reasons, details)


def assert_search(
    x: Tensor, cb: Tensor, metric: str, codes: Tensor, dist: Tensor | None, exact: bool, max_rows: int = CHECK_ROWS
) -> None:
    """:func:`judge_search` as an assertion (for tests)."""
    v = judge_search(x, cb, metric, codes, dist, exact, max_rows)
    assert v.ok, str(v)

"""The correctness column of the benchmarks: structural checks of a result, then the oracle of
:mod:`vqkernels.testing` (fp64 brute force and the precision rule, README "Method" §1) on sampled rows.

Nothing here computes a distance: the numbers in a row's ``check`` are the oracle's ``details`` (``rows``,
``max_regret``, ``allowed_regret``, ``worst_dist_err_over_scale``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import Quantized
from ..testing import Verdict, judge_search

CHECK_ROWS = 2048
"""Rows the benchmarks check against all K codes (a fixed random sample when there are more; the oracle's own
default is smaller, for tests)."""


def structure_errors(x: Tensor, codebook: Tensor, q: Quantized) -> list[str]:
    """Shape / dtype / range / consistency problems of a :class:`~vqkernels.ops.Quantized` result (empty when
    fine): codes ``[N]`` int64 in ``[0, K)`` (the oracle checks them too; here they guard what follows), and what
    the search oracle does not judge: ``counts == bincount(codes)``, ``z_q == C[codes]`` in the codebook's dtype."""
    n, k = x.shape[0], codebook.shape[0]
    if q.codes.shape != (n,) or q.codes.dtype != torch.int64:
        return [f"codes {tuple(q.codes.shape)} {q.codes.dtype}"]
    if n and (int(q.codes.min()) < 0 or int(q.codes.max()) >= k):
        return ["codes out of range"]
    errors = []
    if q.counts.shape != (k,) or int(q.counts.sum()) != n:
        errors.append("counts.sum() != N")
    elif not torch.equal(q.counts, torch.bincount(q.codes, minlength=k)):
        errors.append("counts != bincount(codes)")
    if q.z_q.dtype != codebook.dtype or not torch.equal(q.z_q, codebook[q.codes]):
        errors.append("z_q != C[codes]")
    return errors


def check_quantized(x: Tensor, codebook: Tensor, metric: str, q: Quantized, max_rows: int = CHECK_ROWS) -> Verdict:
    """The verdict on a ``quantize`` result (fast path): :func:`structure_errors`, then, when the structure is
    sound, :func:`vqkernels.testing.judge_search` of ``(q.codes, q.dist)`` on up to ``max_rows`` rows."""
    errors = structure_errors(x, codebook, q)
    if errors:
        return Verdict(False, errors)
    return judge_search(x, codebook, metric, q.codes, q.dist, exact=False, max_rows=max_rows)


def check_codes(x: Tensor, codebook: Tensor, metric: str, codes: Tensor, max_rows: int = CHECK_ROWS) -> Verdict:
    """The verdict on codes alone (a layer step, a third-party quantiser): the precision rule of
    :func:`vqkernels.testing.judge_search` without the distance check. Codes of any integer dtype are judged
    as int64 (the dtype of a third-party index is not under test here)."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex:
        return Verdict(False, [f"codes {tuple(codes.shape)} {codes.dtype}"])
    return judge_search(x.detach(), codebook.detach(), metric, codes.long(), None, exact=False, max_rows=max_rows)

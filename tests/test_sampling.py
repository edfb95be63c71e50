"""Gumbel-max sampling (CVQ-VAE's "probrandom" anchors, Zheng & Vedaldi 2023 §3.2) on every backend and device:
the samples follow ``softmax_i(-d(x_i, c_k))``, a seed gives the same samples on every backend (one counter-based
noise stream), and a draw is reproducible."""

import pytest
import torch
from helpers import BACKEND_DEVICES, METRICS, brute_distances

from vqkernels.nn import cvq


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_same_seed_same_samples_as_the_reference(bd, metric):
    backend, dev = bd
    g = _gen(4)
    x, cb = torch.randn(300, 8, generator=g), torch.randn(40, 8, generator=g)
    got = cvq.sample_anchor_rows(x.to(dev), cb.to(dev), metric, generator=_gen(5), backend=backend)
    ref = cvq.sample_anchor_rows(x, cb, metric, generator=_gen(5), backend="torch")
    assert got.dtype == torch.int64 and got.shape == (40,) and got.device.type == dev
    assert (got.cpu() == ref).float().mean() >= 0.97  # rounding may flip an exact near-tie, nothing more
    again = cvq.sample_anchor_rows(x.to(dev), cb.to(dev), metric, generator=_gen(5), backend=backend)
    assert torch.equal(got, again)
    other = cvq.sample_anchor_rows(x.to(dev), cb.to(dev), metric, generator=_gen(6), backend=backend)
    assert not torch.equal(got, other)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_samples_follow_softmax(bd, metric):
    """One code, 5 rows: the sampled row frequencies match softmax_i(-d(x_i, c)) (chi-square, p = 0.001)."""
    backend, dev = bd
    x = torch.tensor([[0.0, 1.0], [0.4, 0.9], [1.0, 0.2], [-0.5, 0.5], [0.7, -0.7]])
    c = torch.tensor([[0.3, 0.8]])
    p = torch.softmax(-brute_distances(c, x, metric)[0], 0)
    draws = 2000
    cb = c.expand(draws, 2).contiguous()  # 2000 copies of the code: independent noise per code index
    rows = cvq.sample_anchor_rows(x.to(dev), cb.to(dev), metric, generator=_gen(11), backend=backend)
    hits = torch.bincount(rows.cpu(), minlength=5).double()
    chi2 = float(((hits - draws * p) ** 2 / (draws * p)).sum())
    assert chi2 < 18.47, (hits, draws * p)  # 4 degrees of freedom


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_one_row_and_fp64(bd):
    backend, dev = bd
    x = torch.randn(1, 3, dtype=torch.float64)
    cb = torch.randn(7, 3, dtype=torch.float64)
    rows = cvq.sample_anchor_rows(x.to(dev), cb.to(dev), "l2", generator=_gen(1), backend=backend)
    assert torch.equal(rows.cpu(), torch.zeros(7, dtype=torch.int64))

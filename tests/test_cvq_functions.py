"""CVQ anchor-replacement functions (README "Method" §3; Zheng & Vedaldi 2023) against hand formulas in fp64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_backends
from scipy.stats import chisquare

from vqkernels.nn import cvq
from vqkernels.numerics import COS_EPS

METRICS = ("l2", "cosine", "dot")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute64(x: torch.Tensor, cb: torch.Tensor, metric: str) -> torch.Tensor:
    """fp64 distance matrix ``[N, K]`` of README "Method" §1, element by element (no BLAS: equal inputs tie)."""
    x64, c64 = x.double()[:, None, :], cb.double()[None, :, :]
    if metric == "l2":
        return ((x64 - c64) ** 2).sum(-1)
    dot = (x64 * c64).sum(-1)
    if metric == "dot":
        return -dot
    xn = (x64 * x64).sum(-1).sqrt().clamp_min(COS_EPS)
    cn = (c64 * c64).sum(-1).sqrt().clamp_min(COS_EPS)
    return 1 - dot / (xn * cn)


# ---------------------------------------------------------------------------------------------------------------
# usage EMA and per-code decay
# ---------------------------------------------------------------------------------------------------------------
def test_update_usage_ema_matches_formula():
    k, decay = 7, 0.9
    h = torch.zeros(k)
    h64 = torch.zeros(k, dtype=torch.float64)
    g = gen(0)
    for n in (5, 40, 1, 13):
        codes = torch.randint(0, k, (n,), generator=g)
        counts = torch.bincount(codes, minlength=k)
        cvq.update_usage_ema(h, counts, n, decay)
        h64 = decay * h64 + (1 - decay) * counts.double() / n
        assert h.dtype == torch.float32
        torch.testing.assert_close(h.double(), h64, rtol=1e-6, atol=1e-7)
    # h stays a distribution (up to the (1 - decay^t) mass not yet filled in)
    assert h.sum().item() == pytest.approx(1 - decay**4, rel=1e-5)


def test_anchor_alpha_matches_formula_and_limits():
    k = 16
    for decay in (0.5, 0.9, 0.99):
        h = torch.rand(k, generator=gen(1)) / k
        alpha = cvq.anchor_alpha(h, decay)
        want = torch.exp(-h.double() * k * 10 / (1 - decay) - 1e-3)
        assert alpha.dtype == torch.float32 and alpha.shape == (k,)
        torch.testing.assert_close(alpha.double(), want, rtol=1e-5, atol=1e-30)
        # never-used codes: alpha ~ 1 (they are moved onto their anchor)
        torch.testing.assert_close(
            cvq.anchor_alpha(torch.zeros(k), decay), torch.full((k,), math.exp(-1e-3)), rtol=1e-6, atol=0
        )
        # codes used at the uniform rate: alpha = exp(-10 / (1 - decay)) ~ 0 (kept)
        uni = cvq.anchor_alpha(torch.full((k,), 1.0 / k), decay).double()
        want_uni = torch.full((k,), math.exp(-10 / (1 - decay) - 1e-3), dtype=torch.float64)
        torch.testing.assert_close(uni, want_uni, rtol=1e-5, atol=1e-38)
        assert bool((uni < 1e-8).all())


def test_apply_anchor_update_matches_formula():
    g = gen(2)
    cb = torch.randn(6, 3, generator=g)
    anchors = torch.randn(6, 3, generator=g)
    alpha = torch.rand(6, generator=g)
    want = (1 - alpha.double()[:, None]) * cb.double() + alpha.double()[:, None] * anchors.double()
    cvq.apply_anchor_update(cb, anchors, alpha)
    torch.testing.assert_close(cb.double(), want, rtol=1e-6, atol=1e-7)
    # works on a Parameter that requires grad (in place, no autograd history)
    p = torch.nn.Parameter(torch.zeros(6, 3))
    cvq.apply_anchor_update(p, anchors, torch.ones(6))
    assert torch.equal(p.data, anchors) and p.grad_fn is None


def test_validation_errors():
    h, counts = torch.zeros(4), torch.ones(4, dtype=torch.int64)
    for bad in (0.0, 1.0, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="decay"):
            cvq.update_usage_ema(h, counts, 4, bad)
        with pytest.raises(ValueError, match="decay"):
            cvq.anchor_alpha(h, bad)
    with pytest.raises(ValueError, match="counts"):
        cvq.update_usage_ema(h, torch.ones(5), 4, 0.9)
    with pytest.raises(ValueError, match="num_rows"):
        cvq.update_usage_ema(h, counts, 0, 0.9)
    with pytest.raises(TypeError, match="h must"):
        cvq.update_usage_ema(torch.zeros(4, dtype=torch.int64), counts, 4, 0.9)
    x, cb = torch.randn(5, 3), torch.randn(4, 3)
    for fn in (cvq.closest_anchors, cvq.sample_anchor_rows, cvq.contrastive_loss):
        with pytest.raises(ValueError, match="metric"):
            fn(x, cb, "manhattan")
        with pytest.raises(ValueError, match="same D"):
            fn(x, torch.randn(4, 2), "l2")
        with pytest.raises(ValueError, match="codebook"):
            fn(x, torch.randn(4), "l2")
        with pytest.raises(TypeError, match="x must"):
            fn(x.numpy(), cb, "l2")
    with pytest.raises(ValueError, match="N = 0"):
        cvq.sample_anchor_rows(x[:0], cb)
    with pytest.raises(ValueError, match="N = 0"):
        cvq.closest_anchors(x[:0], cb)
    with pytest.raises(ValueError, match="chunk_elems"):
        cvq.sample_anchor_rows(x, cb, chunk_elems=0)
    with pytest.raises(ValueError, match="tau"):
        cvq.contrastive_loss(x, cb, tau=0.0)
    with pytest.raises(TypeError, match="generator"):
        cvq.sample_anchor_rows(x, cb, generator=0)
    with pytest.raises(ValueError, match="alpha"):
        cvq.apply_anchor_update(cb.clone(), cb, torch.ones(3))
    with pytest.raises(ValueError, match="filled"):
        cvq.update_feature_pool(torch.zeros(4, 3), torch.zeros(1, dtype=torch.int64), x)
    with pytest.raises(ValueError, match="same D"):
        cvq.update_feature_pool(torch.zeros(4, 3), torch.zeros((), dtype=torch.int64), torch.randn(5, 2))


# ---------------------------------------------------------------------------------------------------------------
# "closest" anchors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_closest_anchors_equal_fp64_brute_force(backend, metric, dtype):
    g = gen(3)
    x = torch.randn(70, 8, generator=g, dtype=torch.float64).to(dtype)
    cb = torch.randn(12, 8, generator=g, dtype=torch.float64).to(dtype)
    want = brute64(x, cb, metric).argmin(0)
    for exact in (False, True):
        a = cvq.closest_anchors(x, cb, metric, backend=backend, exact=exact)
        assert a.shape == (12, 8) and a.dtype == dtype
        assert torch.equal(a, x[want])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_closest_anchors_ties_go_to_lowest_row(backend, metric, dtype):
    """Rows are signed permutations of (1, 2, 2, 0, 0, 0): all of norm 3, so every metric ranks them by the
    (exact, small-integer) dot product and ties between *different* rows abound (so a wrong tie-break changes
    the anchor's value); codes are small integers (one is zero: every row ties)."""
    g = gen(4)
    base = torch.tensor([1.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    perm = torch.argsort(torch.rand(200, 6, generator=g), dim=1)
    sign = torch.randint(0, 2, (200, 6), generator=g) * 2.0 - 1.0
    x = (base[perm] * sign).to(dtype)
    cb = torch.randint(-2, 3, (15, 6), generator=g).to(dtype)
    cb[3] = 0
    d = brute64(x, cb, metric)
    want = d.argmin(0)  # first minimum: the lowest row index
    ties = (d == d.min(0).values).sum(0)
    assert int((ties > 1).sum()) >= 10, "the construction should make most codes' nearest row a tie"
    for exact in (False, True):
        a = cvq.closest_anchors(x, cb, metric, backend=backend, exact=exact)
        assert torch.equal(a, x[want])


def test_closest_anchors_mixed_dtypes():
    g = gen(4)
    x, cb = torch.randn(30, 4, generator=g), torch.randn(5, 4, generator=g, dtype=torch.float64)
    a = cvq.closest_anchors(x.to(torch.bfloat16), cb, "l2")
    assert a.dtype == torch.bfloat16 and a.shape == (5, 4)
    assert torch.equal(a, x.to(torch.bfloat16)[brute64(x.to(torch.bfloat16), cb, "l2").argmin(0)])


# ---------------------------------------------------------------------------------------------------------------
# "probrandom" anchors: Gumbel-max sampling
# ---------------------------------------------------------------------------------------------------------------
def softmax_probs(x, cb, metric) -> torch.Tensor:
    """``[K, N]``: P(row i | code k) = softmax_i(-d) (softmax_i(cos) for cosine; the 1 of 1 - cos cancels)."""
    return torch.softmax(-brute64(x, cb, metric).T, dim=1)


@pytest.mark.parametrize("metric", METRICS)
def test_sample_anchor_rows_follow_softmax(metric):
    n, k, draws = 6, 3, 20000
    g = gen(5)
    x = 0.6 * torch.randn(n, 2, generator=g)
    cb = 0.6 * torch.randn(k, 2, generator=g)
    p = softmax_probs(x, cb, metric)
    assert float(p.min()) * draws > 20  # every cell has a usable expected count
    # K * draws codes (each code repeated): one call draws `draws` independent samples per code
    rep = cb.repeat(draws, 1)
    rows = cvq.sample_anchor_rows(x, rep, metric, generator=gen(6)).view(draws, k)
    for j in range(k):
        obs = torch.bincount(rows[:, j], minlength=n).double()
        assert chisquare(obs.numpy(), (p[j] * draws).numpy()).pvalue > 1e-3
    # repeated calls with one generator are independent draws of the same distribution
    g = gen(7)
    calls = 3000
    got = torch.cat([cvq.sample_anchor_rows(x, cb[:1], metric, generator=g) for _ in range(calls)])
    obs = torch.bincount(got, minlength=n).double()
    assert chisquare(obs.numpy(), (p[0] * calls).numpy()).pvalue > 1e-3


def test_sample_anchor_rows_reproducible_and_chunk_invariant():
    g = gen(8)
    x, cb = torch.randn(97, 5, generator=g), torch.randn(23, 5, generator=g)
    for metric in METRICS:
        ref = cvq.sample_anchor_rows(x, cb, metric, generator=gen(9))
        assert ref.dtype == torch.int64 and ref.shape == (23,)
        assert bool(((ref >= 0) & (ref < 97)).all())
        assert torch.equal(ref, cvq.sample_anchor_rows(x, cb, metric, generator=gen(9)))
        # the noise of (i, k) does not depend on the blocking: any chunk size gives the same samples
        for chunk in (5, 96, 300, 97 * 23 - 1):
            got = cvq.sample_anchor_rows(x, cb, metric, generator=gen(9), chunk_elems=chunk)
            assert torch.equal(ref, got)
        # a different seed gives different samples (23 codes over 97 rows: equal by chance ~never)
        assert not torch.equal(ref, cvq.sample_anchor_rows(x, cb, metric, generator=gen(10)))
        # fp64 inputs draw the same noise: same samples (no near-ties here)
        assert torch.equal(ref, cvq.sample_anchor_rows(x.double(), cb.double(), metric, generator=gen(9)))
    # the default generator follows torch.manual_seed
    torch.manual_seed(11)
    a = cvq.sample_anchor_rows(x, cb)
    torch.manual_seed(11)
    assert torch.equal(a, cvq.sample_anchor_rows(x, cb))


def test_gumbel_noise_is_gumbel_and_keyed_on_indices():
    rows, codes = torch.arange(500), torch.arange(400)
    g = cvq.gumbel_noise((12345, 678), rows, codes, torch.float64)
    assert g.shape == (400, 500) and bool(torch.isfinite(g).all())
    u = torch.exp(-torch.exp(-g)).flatten()  # Gumbel CDF: uniform on (0, 1)
    obs = torch.histc(u, bins=200, min=0, max=1).double()
    assert chisquare(obs.numpy()).pvalue > 1e-3
    assert g.mean().item() == pytest.approx(0.5772156649, abs=0.01)
    assert g.var().item() == pytest.approx(math.pi**2 / 6, rel=0.02)
    # a sub-block is the same values: the noise is a function of (seed, k, i) only
    sub = cvq.gumbel_noise((12345, 678), rows[100:130], codes[7:9], torch.float64)
    assert torch.equal(sub, g[7:9, 100:130])
    # fp32 noise is the fp64 noise rounded
    torch.testing.assert_close(cvq.gumbel_noise((12345, 678), rows, codes).double(), g, rtol=1e-5, atol=1e-5)


def test_probrandom_anchors_are_the_sampled_rows():
    g = gen(12)
    x, cb = torch.randn(40, 3, generator=g), torch.randn(9, 3, generator=g)
    idx = cvq.sample_anchor_rows(x, cb, "cosine", generator=gen(13))
    assert torch.equal(cvq.probrandom_anchors(x, cb, "cosine", generator=gen(13)), x[idx])


# ---------------------------------------------------------------------------------------------------------------
# "random" anchors: the feature pool
# ---------------------------------------------------------------------------------------------------------------
def rows_in(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row of ``a``, whether it equals some row of ``b``."""
    return (a[:, None, :] == b[None, :, :]).all(-1).any(1)


def test_feature_pool_small_batches_ring_buffer():
    k, d = 8, 3
    pool, filled = torch.zeros(k, d), torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match="empty"):
        cvq.random_anchors(pool, filled)
    g = gen(14)
    b1 = torch.randn(3, d, generator=g)
    cvq.update_feature_pool(pool, filled, b1, generator=g)
    assert filled.item() == 3
    # slots 0..2 hold the batch rows (shuffled); the rest is untouched
    assert bool(rows_in(pool[:3], b1).all()) and bool(rows_in(b1, pool[:3]).all())
    assert torch.equal(pool[3:], torch.zeros(k - 3, d))
    # not full: every anchor is one of the real rows (never an unfilled slot)
    for s in range(5):
        a = cvq.random_anchors(pool, filled, generator=gen(s))
        assert a.shape == (k, d) and bool(rows_in(a, b1).all())
    # all real rows get used across codes
    a = cvq.random_anchors(pool, filled, generator=gen(15))
    assert bool(rows_in(b1, a).all())
    b2 = torch.randn(4, d, generator=g)
    cvq.update_feature_pool(pool, filled, b2, generator=g)
    assert filled.item() == 7
    assert bool(rows_in(pool[3:7], b2).all()) and torch.equal(pool[7], torch.zeros(d))
    assert bool(rows_in(cvq.random_anchors(pool, filled, generator=g), torch.cat([b1, b2])).all())
    # wrap around: slots 7, 0, 1, 2 take the next 4 rows (the oldest, b1, is overwritten); full from here on
    b3 = torch.randn(4, d, generator=g)
    cvq.update_feature_pool(pool, filled, b3, generator=g)
    assert filled.item() == 11
    assert bool(rows_in(pool[[7, 0, 1, 2]], b3).all()) and bool(rows_in(pool[3:7], b2).all())
    # full pool: row k for code k, as a new tensor
    a = cvq.random_anchors(pool, filled)
    assert torch.equal(a, pool) and a.data_ptr() != pool.data_ptr()


def test_feature_pool_large_batch_and_dtypes():
    k, d = 5, 4
    pool, filled = torch.zeros(k, d), torch.zeros((), dtype=torch.int64)
    x = torch.randn(50, d, generator=gen(16)).to(torch.bfloat16)
    cvq.update_feature_pool(pool, filled, x, generator=gen(17))
    assert filled.item() == k and pool.dtype == torch.float32
    # K distinct batch rows, cast to the pool's dtype
    assert bool(rows_in(pool, x.float()).all())
    assert len({tuple(r) for r in pool.tolist()}) == k
    # reproducible for a seeded generator; a different seed picks differently
    pool2, filled2 = torch.zeros(k, d), torch.zeros((), dtype=torch.int64)
    cvq.update_feature_pool(pool2, filled2, x, generator=gen(17))
    assert torch.equal(pool, pool2)
    cvq.update_feature_pool(pool2, filled2, x, generator=gen(18))
    assert not torch.equal(pool, pool2) and filled2.item() == 2 * k
    # N = 0 is a no-op
    cvq.update_feature_pool(pool, filled, x[:0])
    assert filled.item() == k
    # over many updates every batch row is picked about equally often
    hits = torch.zeros(50)
    g = gen(19)
    xs = torch.arange(50.0)[:, None].expand(50, d)
    for _ in range(400):
        cvq.update_feature_pool(pool, filled, xs, generator=g)
        hits += torch.bincount(pool[:, 0].long(), minlength=50)
    assert chisquare(hits.numpy()).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# contrastive loss
# ---------------------------------------------------------------------------------------------------------------
def naive_contrastive(x, cb, metric, tau=0.07):
    """The N x K formulation: sort every code's similarities over the batch."""
    x64, c64 = x.detach().double(), cb
    if metric == "l2":
        s = -((x64 * x64).sum(1, keepdim=True) - 2 * x64 @ c64.T + (c64 * c64).sum(1)).clamp_min(0)
    elif metric == "cosine":
        xn = x64.norm(dim=1, keepdim=True).clamp_min(COS_EPS)
        s = (x64 @ c64.T) / (xn * c64.norm(dim=1).clamp_min(COS_EPS))
    else:
        s = x64 @ c64.T
    n, k = s.shape
    srt = s.sort(dim=0).values  # ascending over the batch, per code
    pos = srt[n - max(1, n // k) :].mean(0, keepdim=True)
    neg = srt[: n // 2]
    logits = torch.cat([pos, neg]).T / tau  # [K, 1 + N//2]
    return F.cross_entropy(logits, torch.zeros(k, dtype=torch.long))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k", [(10, 3), (33, 7), (16, 16), (3, 5), (1, 4), (2, 1), (40, 2)])
def test_contrastive_loss_matches_naive(metric, n, k):
    g = gen(20 + n + k)
    scale = 0.3 if metric != "cosine" else 1.0  # keep l2/dot logits in a range where the loss is not ~0
    x = (scale * torch.randn(n, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    cb0 = scale * torch.randn(k, 4, generator=g, dtype=torch.float64)
    cb_ref = cb0.clone().requires_grad_(True)
    want = naive_contrastive(x, cb_ref, metric)
    want.backward()
    for chunk in (1 << 22, 1, n, 2 * n + 1):
        cb = cb0.clone().requires_grad_(True)
        loss = cvq.contrastive_loss(x, cb, metric, chunk_elems=chunk)
        assert loss.dim() == 0 and loss.dtype == torch.float64
        torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
        loss.backward()
        torch.testing.assert_close(cb.grad, cb_ref.grad, rtol=1e-8, atol=1e-12)
        assert x.grad is None  # the gradient reaches the codebook only
    if n // 2 == 0:
        assert want.item() == 0.0  # a single logit: cross-entropy 0


def test_contrastive_loss_fp32_tau_and_empty():
    g = gen(30)
    x = torch.randn(50, 6, generator=g)
    cb = torch.randn(9, 6, generator=g, requires_grad=True)
    for metric in ("cosine", "l2"):
        for tau in (0.07, 1.0):
            cb.grad = None
            loss = cvq.contrastive_loss(x, cb, metric, tau=tau, chunk_elems=100)
            assert loss.dtype == torch.float32
            cb64 = cb.detach().double().requires_grad_(True)
            want = naive_contrastive(x, cb64, metric, tau)
            want.backward()
            torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-4, atol=1e-4)
            loss.backward()
            torch.testing.assert_close(cb.grad.double(), cb64.grad, rtol=1e-3, atol=1e-4)
    # a non-leaf codebook (e.g. after an affine transform): the gradient flows through it
    w = torch.randn(9, 6, generator=g, requires_grad=True)
    (cvq.contrastive_loss(x, 2.0 * w + 1.0, "cosine")).backward()
    assert w.grad is not None and bool(torch.isfinite(w.grad).all()) and w.grad.abs().sum() > 0
    # no rows: zero loss, zero gradient
    cb.grad = None
    loss = cvq.contrastive_loss(x[:0], cb, "cosine")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(cb.grad, torch.zeros_like(cb))


def test_contrastive_loss_gradient_survives_in_place_codebook_update():
    """The layers move their codes onto the anchors in place between forward and backward: the gradient is the
    one at the values the loss saw."""
    g = gen(31)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    cb = torch.nn.Parameter(torch.randn(6, 5, generator=g, dtype=torch.float64))
    ref = cb.detach().clone().requires_grad_(True)
    naive_contrastive(x, ref, "cosine").backward()
    loss = cvq.contrastive_loss(x, cb, "cosine", chunk_elems=64)
    with torch.no_grad():
        cvq.apply_anchor_update(cb, cvq.closest_anchors(x, cb, "cosine"), torch.ones(6))
    loss.backward()
    torch.testing.assert_close(cb.grad, ref.grad, rtol=1e-8, atol=1e-12)

"""The codebook rules every layer shares: the rotation trick, orthogonal regularisation, the EMA update with
Laplace smoothing and dead-code expiry, and tempered code sampling, each against its formula in fp64."""

import pytest
import torch
import torch.nn.functional as F

from vqkernels.nn import ema
from vqkernels.nn.orthogonal import orthogonal_loss
from vqkernels.nn.rotation import rotation_trick
from vqkernels.nn.sampling import sample_codes


def _rotation_matrix(e, q):
    """The rotation of Fifty et al. 2024 (§4.2) built explicitly in fp64: R e/|e| = q/|q|."""
    u, qh = e / e.norm(), q / q.norm()
    w = (u + qh) / (u + qh).norm()
    eye = torch.eye(e.shape[0], dtype=torch.float64)
    return eye - 2 * torch.outer(w, w) + 2 * torch.outer(qh, u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotation_trick_value_and_gradient(dtype):
    torch.manual_seed(0)
    x = torch.randn(40, 12, dtype=dtype, requires_grad=True)
    q = torch.randn(40, 12, dtype=dtype)
    g = torch.randn(40, 12, dtype=dtype)
    out = rotation_trick(x, q)
    assert torch.equal(out, q)  # the forward value is the code itself
    out.backward(g)
    e64, q64, g64 = x.detach().double(), q.double(), g.double()
    want = torch.stack(
        [(q64[i].norm() / e64[i].norm()) * _rotation_matrix(e64[i], q64[i]).T @ g64[i] for i in range(40)]
    )
    # R maps the input's direction onto the code's, so the rotated input times s is the code
    r0 = _rotation_matrix(e64[0], q64[0])
    assert torch.allclose((q64[0].norm() / e64[0].norm()) * r0 @ e64[0], q64[0], atol=1e-10)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert torch.allclose(x.grad.double(), want, atol=tol * want.abs().max(), rtol=0)


def test_rotation_trick_nu_and_degenerate_rows():
    x = torch.zeros(3, 4, requires_grad=True)
    q = torch.randn(3, 4, requires_grad=True)
    rotation_trick(x, q, nu=0.5).sum().backward()
    assert torch.isfinite(x.grad).all()  # a zero input gets a finite (zero-scale) gradient, not a NaN
    assert torch.equal(q.grad, torch.full_like(q, 0.5))  # the synchronised update's nu * g


@pytest.mark.parametrize("shape", [(1, 300, 16), (3, 40, 8), (2, 5, 32), (7, 8)])
def test_orthogonal_loss_equals_the_k_by_k_form(shape):
    torch.manual_seed(1)
    cb = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    c3 = cb if cb.dim() == 3 else cb[None]
    u = F.normalize(c3, dim=-1)
    h, k = c3.shape[:2]
    want = (u @ u.transpose(1, 2)).square().sum() / (h * k * k) - 1.0 / k
    got = orthogonal_loss(cb)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    (gw,) = torch.autograd.grad(want, cb)
    (gg,) = torch.autograd.grad(orthogonal_loss(cb), cb)
    assert torch.allclose(gg, gw, rtol=1e-10, atol=1e-14)
    # orthonormal codes have zero loss
    q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0][:8]
    assert abs(float(orthogonal_loss(q))) < 1e-12
    with pytest.raises(ValueError, match="codebook must"):
        orthogonal_loss(torch.randn(4))


def test_ema_step_and_laplace_smoothing():
    torch.manual_seed(2)
    g, k, d, n = 2, 6, 3, 40
    rows = torch.randn(g, n, d)
    codes = torch.randint(0, k - 1, (g, n))  # code k-1 unused
    sums, counts = ema.batch_stats(rows, codes, k, sync=False, backend="torch")
    onehot = F.one_hot(codes, k).double()
    assert torch.allclose(sums.double(), torch.einsum("gnk,gnd->gkd", onehot, rows.double()), atol=1e-5)
    assert torch.equal(counts, onehot.sum(1).float())
    cs, avg = torch.ones(g, k), torch.randn(g, k, d)
    cs0, avg0 = cs.clone(), avg.clone()
    ema.ema_step_(cs, avg, counts, sums, decay=0.8)
    assert torch.allclose(cs, 0.8 * cs0 + 0.2 * counts)
    assert torch.allclose(avg, 0.8 * avg0 + 0.2 * sums, atol=1e-6)
    eps = 1e-5
    embed = ema.smoothed_codebook(cs, avg, eps)
    tot = cs.sum(-1, keepdim=True)
    want = avg / ((cs + eps) / (tot + k * eps) * tot)[..., None]
    assert torch.allclose(embed, want, rtol=1e-6)
    unit = ema.smoothed_codebook(cs, avg, eps, normalize=True)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(g, k), atol=1e-6)
    # a code with zero EMA size still gets a finite code (the smoothing's point)
    cs[0, 0] = 0.0
    assert torch.isfinite(ema.smoothed_codebook(cs, avg, eps)).all()


def test_expire_codes_replaces_only_the_dead():
    torch.manual_seed(3)
    g, k, d = 2, 5, 4
    embed, avg = torch.randn(g, k, d), torch.randn(g, k, d)
    cs = torch.tensor([[0.5, 3.0, 1.9, 5.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    rows = torch.randn(g, 10, d)
    before = embed.clone()
    n = ema.expire_codes_(embed, cs, avg, rows, threshold=2.0, reset=2.0)
    assert n == 2
    for kk in (0, 2):  # dead: now a batch row of group 0, size reset, sum = row * reset
        assert any(torch.equal(embed[0, kk], r) for r in rows[0])
        assert cs[0, kk] == 2.0 and torch.allclose(avg[0, kk], embed[0, kk] * 2.0)
    assert not torch.equal(embed[0, 0], embed[0, 2])  # without replacement
    assert torch.equal(embed[0, [1, 3, 4]], before[0, [1, 3, 4]]) and torch.equal(embed[1], before[1])
    # more dead codes than rows: as many codes as rows are replaced, all by distinct rows
    cs2 = torch.zeros(1, k)
    e2 = torch.randn(1, k, d)
    assert ema.expire_codes_(e2, cs2, torch.randn(1, k, d), torch.randn(1, 3, d), 1.0, 1.0) == 3


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_sample_codes_follows_the_tempered_law(metric):
    torch.manual_seed(4)
    c = torch.randn(5, 3)
    x0 = torch.randn(1, 3)
    t = 0.7
    n = 40000
    codes = sample_codes(x0.expand(n, 3).contiguous(), c, t, metric, seed=11, backend="torch")
    freq = torch.bincount(codes, minlength=5).double() / n
    if metric == "l2":
        logits = -((x0.double() - c.double()) ** 2).sum(1) / t
    else:
        logits = F.cosine_similarity(x0.double(), c.double()) / t
    p = torch.softmax(logits, 0)
    # 5 sigma of a binomial frequency
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)
    # T <= 0 is the nearest-code search
    x = torch.randn(50, 3)
    nearest = torch.cdist(x, c).argmin(1) if metric == "l2" else (F.normalize(x) @ F.normalize(c).T).argmax(1)
    assert torch.equal(sample_codes(x, c, 0.0, metric, backend="torch"), nearest)
    with pytest.raises(ValueError, match="metric"):
        sample_codes(x, c, 1.0, "dot")

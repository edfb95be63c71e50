"""VectorQuant / GroupVectorQuant / ResidualVectorQuant: the formulas of README "Method" §2 are the oracle (fp64)."""

import pytest
import torch
from helpers import brute_distances

from vqkernels.nn import GroupVectorQuant, ResidualVectorQuant, VectorQuant, no_vq


def _layer(**kw):
    torch.manual_seed(0)
    kw.setdefault("dim", -1)
    return VectorQuant(kw.pop("feature_size", 6), kw.pop("num_codes", 10), **kw).double()


def _x(n=40, d=6, seed=1):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _nearest(x, cb):
    return brute_distances(x, cb, "l2", direct=True).argmin(1)


# ---------------------------------------------------------------------------------------------------------------
# loss, straight-through, gradients
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.95, 1.0])
def test_convex_loss_value_and_outputs(beta):
    vq, x = _layer(beta=beta), _x()
    z_q, out = vq(x)
    cb = vq.codebook.weight.detach()
    codes = _nearest(x, cb)
    mse = ((x - cb[codes]) ** 2).mean()
    torch.testing.assert_close(out["loss"].double(), (1 - beta) * mse + beta * mse, rtol=1e-6, atol=0)
    assert torch.equal(out["q"].squeeze(-1), codes)
    torch.testing.assert_close(z_q, cb[codes])
    torch.testing.assert_close(out["d"].squeeze(-1), (x - cb[codes]).norm(dim=1))
    p = torch.bincount(codes, minlength=10).double() / len(codes)
    ppl = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    torch.testing.assert_close(out["perplexity"].double(), ppl, rtol=1e-5, atol=0)
    assert out["z"].shape == (40, 1, 6) and out["z_q"].shape == (40, 1, 6) and out["q"].shape == (40, 1)


@pytest.mark.parametrize("nu", [0.0, 0.5, 2.0])
def test_straight_through_gradients(nu):
    beta = 0.8
    vq, x = _layer(beta=beta, sync_nu=nu), _x().requires_grad_(True)
    z_q, out = vq(x)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward(retain_graph=True)
    codes = out["q"].squeeze(-1)
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)  # the encoder gets the identity
    expect = torch.zeros(10, 6, dtype=torch.float64).index_add_(0, codes, g)
    got = vq.codebook.weight.grad
    if nu == 0.0:
        assert got is None or torch.equal(got, torch.zeros_like(got))  # no path from z_q to the codebook
    else:
        torch.testing.assert_close(got, nu * expect)  # nu x downstream
    vq.codebook.weight.grad = None
    x.grad = None
    out["loss"].backward()
    cb = vq.codebook.weight.detach()
    n, d = x.shape
    diff = cb[codes] - x.detach()
    cb_grad = torch.zeros(10, 6, dtype=torch.float64).index_add_(0, codes, 2 * beta * diff / (n * d))
    torch.testing.assert_close(vq.codebook.weight.grad, cb_grad)
    torch.testing.assert_close(x.grad, -2 * (1 - beta) * diff / (n * d))


# ---------------------------------------------------------------------------------------------------------------
# affine re-parameterisation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2, 5])
def test_affine_forward_and_gradient_scaling(groups):
    lr = 3.0
    vq, x = _layer(affine_lr=lr, affine_groups=groups, beta=0.7), _x()
    with torch.no_grad():
        vq.affine_transform.scale.normal_()
        vq.affine_transform.bias.normal_()
    s, b = vq.affine_transform.scale.detach().clone(), vq.affine_transform.bias.detach().clone()
    c = vq.codebook.weight.detach().clone()
    grp = torch.arange(10) // (10 // groups)  # contiguous blocks of K/G codes
    eff = (1 + lr * s[grp]) * c + lr * b[grp]
    torch.testing.assert_close(vq.get_codebook(), eff)
    a_, b_ = vq.get_codebook_affine_params()
    torch.testing.assert_close(a_, 1 + lr * s)
    _, out = vq(x)
    assert torch.equal(out["q"].squeeze(-1), _nearest(x, eff))
    out["loss"].backward()
    # hand-written fp64 replica: d loss / d s = lr * d loss / d A
    s2, b2, c2 = s.clone().requires_grad_(), b.clone().requires_grad_(), c.clone().requires_grad_()
    codes = out["q"].squeeze(-1)
    zq = ((1 + lr * s2[grp]) * c2 + lr * b2[grp])[codes]
    ((0.7 * (zq - x) ** 2).mean()).backward()
    torch.testing.assert_close(vq.affine_transform.scale.grad, s2.grad)
    torch.testing.assert_close(vq.affine_transform.bias.grad, b2.grad)
    torch.testing.assert_close(vq.codebook.weight.grad, c2.grad)


def test_running_statistics_affine():
    vq = _layer(affine_mode="running", affine_groups=2)
    xs = [_x(seed=s) * 3 + 1 for s in (1, 2)]
    at = vq.affine_transform
    vq.train()
    blocks = vq.codebook.weight.detach().clone().view(2, 5, 6)
    c_mean, c_var = blocks.mean(1), blocks.var(1, unbiased=False)
    x_mean, x_var = xs[0].mean(0), xs[0].var(0, unbiased=False)  # the first update copies the batch moments
    for step, x in enumerate(xs):
        _, out = vq(x)
        if step == 1:  # then r <- 0.1 new + 0.9 r
            x_mean, x_var = 0.1 * x.mean(0) + 0.9 * x_mean, 0.1 * x.var(0, unbiased=False) + 0.9 * x_var
        torch.testing.assert_close(at.running_ze_mean.double(), x_mean.expand(2, 6), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(at.running_ze_var.double(), x_var.expand(2, 6), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(at.running_c_mean.double(), c_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(at.running_c_var.double(), c_var, rtol=1e-5, atol=1e-6)
        a = torch.sqrt(x_var / (c_var + 1e-8))
        eff = (blocks * a[:, None] + (x_mean - a * c_mean)[:, None]).view(10, 6)
        torch.testing.assert_close(vq.get_codebook().double(), eff, rtol=1e-5, atol=1e-6)
        assert torch.equal(out["q"].squeeze(-1), _nearest(x, vq.get_codebook()))  # the search used the new stats
    keys = {"affine_transform.running_ze_mean", "affine_transform.running_statistics_initialized"}
    assert keys <= set(vq.state_dict())
    vq.eval()
    before = at.running_ze_mean.clone()
    vq(xs[0])
    assert torch.equal(before, at.running_ze_mean)


def test_affine_groups_must_divide_codes():
    with pytest.raises(ValueError, match="affine_groups"):
        VectorQuant(6, 10, affine_lr=1.0, affine_groups=3)


# ---------------------------------------------------------------------------------------------------------------
# alternating optimisation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine,step_affine", [(False, False), (True, False), (True, True)])
def test_alternating_optimiser_step(affine, step_affine):
    """One SGD step on mean((C_hat[codes] - x)^2) of the codebook only (vqtorch's recipe) or, with
    inplace_optimizer_affine=True, of the codebook and the learned affine parameters; the rest stays put, and the
    task's gradients are left as they were."""
    lr = 0.5
    kw = dict(affine_lr=2.0, inplace_optimizer_affine=step_affine) if affine else {}
    vq = _layer(beta=1.0, inplace_optimizer=lambda p: torch.optim.SGD(p, lr=lr), **kw)
    x = _x()
    names = ["codebook.weight"] + (["affine_transform.scale", "affine_transform.bias"] if affine else [])
    if affine:
        with torch.no_grad():
            vq.affine_transform.scale.normal_(std=0.1)
            vq.affine_transform.bias.normal_(std=0.1)
        vq.affine_transform.bias.grad = torch.ones_like(vq.affine_transform.bias)  # a task gradient, kept as is
    stepped = [p for g in vq.inplace_codebook_optimizer.param_groups for p in g["params"]]
    assert stepped == (
        [vq.codebook.weight] + ([vq.affine_transform.scale, vq.affine_transform.bias] if step_affine else [])
    )
    before = {n: p.detach().clone() for n, p in vq.named_parameters()}
    codes = _nearest(x, vq.get_codebook())
    # fp64 replica of one SGD step on mean((C_hat[codes] - x)^2)
    params = [before[n].clone().requires_grad_() for n in names]
    c = params[0]
    eff = c if not affine else (1 + 2.0 * params[1]) * c + 2.0 * params[2]
    ((eff[codes] - x) ** 2).mean().backward()
    _, out = vq(x)
    after = dict(vq.named_parameters())
    for n, p in zip(names, params):
        if n == "codebook.weight" or step_affine:
            torch.testing.assert_close(after[n].detach(), p.detach() - lr * p.grad, msg=n)
            assert not torch.equal(after[n].detach(), before[n]), n
        else:
            assert torch.equal(after[n].detach(), before[n]), n  # not stepped
    assert vq.codebook.weight.grad is None
    if affine:
        assert torch.equal(vq.affine_transform.bias.grad, torch.ones_like(vq.affine_transform.bias))
        assert vq.affine_transform.scale.grad is None
    torch.testing.assert_close(out["z_q"].squeeze(-2), vq.get_codebook()[codes])  # re-gathered after the step
    # skipped under no_grad and in eval
    before = vq.codebook.weight.detach().clone()
    with torch.no_grad():
        vq(x)
    vq.eval()
    vq(x)
    assert torch.equal(before, vq.codebook.weight)


def test_inplace_optimizer_affine_needs_an_optimiser():
    with pytest.raises(ValueError, match="inplace_optimizer_affine"):
        VectorQuant(6, 10, beta=1.0, inplace_optimizer_affine=True)
    with pytest.raises(ValueError, match="inplace_optimizer_affine"):
        VectorQuant(6, 10, beta=1.0, inplace_optimizer=torch.optim.SGD, inplace_optimizer_affine=1)


def test_alternating_optimiser_needs_beta_one():
    with pytest.raises(ValueError, match="beta = 1.0"):
        VectorQuant(6, 10, beta=0.9, inplace_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


# ---------------------------------------------------------------------------------------------------------------
# k-means init and dead-code replacement
# ---------------------------------------------------------------------------------------------------------------
def test_kmeans_init_before_first_search():
    sk = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 8, generator=g) * 5
    x = (centres[torch.randint(0, 12, (1500,), generator=g)] + torch.randn(1500, 8, generator=g)).double()
    vq = _layer(feature_size=8, num_codes=12, kmeans_init=True)
    assert vq.data_initialized.item() == 0
    with torch.no_grad():
        _, out = vq(x)
    assert vq.data_initialized.item() == 1
    cb = vq.codebook.weight.detach()
    ours = brute_distances(x, cb, "l2").min(1).values.sum().item()
    ref = sk.KMeans(12, n_init=1, random_state=0).fit(x.numpy()).inertia_
    assert ours <= 1.1 * ref, (ours, ref)
    assert torch.equal(out["q"].squeeze(-1), _nearest(x, cb))  # the search already used the fitted codes
    snapshot = cb.clone()
    vq(x)
    assert torch.equal(snapshot, vq.codebook.weight.detach())  # only once


def test_kmeans_init_more_codes_than_rows():
    vq = _layer(feature_size=4, num_codes=64, kmeans_init=True)
    x = _x(20, 4)
    vq(x)
    cb = vq.codebook.weight.detach()
    assert torch.isfinite(cb).all()
    assert torch.unique(cb, dim=0).shape[0] == 64


@pytest.mark.parametrize("affine", [False, True])
def test_lru_replacement(affine):
    kw = dict(affine_lr=1.0) if affine else {}
    vq = _layer(num_codes=8, replace_freq=2, **kw)
    if affine:
        with torch.no_grad():
            vq.affine_transform.scale.normal_(std=0.3)
            vq.affine_transform.bias.normal_(std=0.3)
    with torch.no_grad():
        vq.codebook.weight[0] = 0.0
        vq.codebook.weight[1:] = 100.0  # far away: never used
    eff = vq.get_codebook()
    x = eff[0] + 0.01 * _x(30)
    vq(x)
    assert vq.lru_counters.tolist() == [2] + [1] * 7
    vq(x)
    # codes 1..7 reached 0: replaced by perturbed batch vectors (effective codes) and their counters reset
    assert vq.lru_counters.tolist() == [2] * 8
    new = vq.get_codebook()
    d = brute_distances(new[1:], x, "l2", direct=True).min(1).values.sqrt()
    assert (d <= 0.01 * x.norm(dim=1).max() * 6).all(), d
    torch.testing.assert_close(new[0], eff[0])


# ---------------------------------------------------------------------------------------------------------------
# shapes, dims, modes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,dim",
    [((30, 6), 1), ((30, 6), -1), ((4, 6, 9), 1), ((2, 6, 3, 5), 1), ((2, 3, 4, 5, 6), -1), ((2, 3, 6, 4, 5), 2)],
)
def test_any_rank_and_feature_axis(shape, dim):
    vq = _layer(dim=dim)
    z = torch.randn(shape, dtype=torch.float64)
    z_q, out = vq(z)
    assert z_q.shape == z.shape
    rows = z.movedim(dim, -1).reshape(-1, 6)
    codes = _nearest(rows, vq.codebook.weight.detach())
    lead = z.movedim(dim, -1).shape[:-1]
    assert out["q"].shape == (*lead, 1)
    assert torch.equal(out["q"].reshape(-1), codes)
    torch.testing.assert_close(z_q.movedim(dim, -1).reshape(-1, 6), vq.codebook.weight.detach()[codes])


def test_eval_mode_changes_nothing():
    vq = _layer(replace_freq=1, anchor="closest", affine_mode="running", kmeans_init=True)
    x = _x()
    vq(x)  # initialise in training
    vq.eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    a, oa = vq(x)
    b, ob = vq(x)
    assert torch.equal(a, b) and torch.equal(oa["q"], ob["q"])
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_state_dict_round_trip_and_vqtorch_names():
    kw = dict(replace_freq=3, anchor="random", kmeans_init=True, affine_lr=1.0)
    vq = _layer(**kw)
    for i in range(3):
        vq(_x(seed=i))
    keys = set(vq.state_dict())
    assert {
        "codebook.weight",
        "affine_transform.scale",
        "affine_transform.bias",
        "data_initialized",
        "lru_counters",
        "embed_prob",
        "feature_pool",
        "pool_filled",
    } <= keys
    other = _layer(**kw)
    other.load_state_dict(vq.state_dict())
    for k, v in vq.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    vq.eval()
    other.eval()
    assert torch.equal(vq(_x(seed=9))[0], other(_x(seed=9))[0])


def test_cosine_metric_searches_by_angle():
    vq, x = _layer(metric="cosine"), _x()
    _, out = vq(x)
    cb = vq.codebook.weight.detach()
    assert torch.equal(out["q"].squeeze(-1), brute_distances(x, cb, "cosine").argmin(1))


def test_autocast_bf16_on_cpu():
    torch.manual_seed(0)
    enc = torch.nn.Linear(8, 6)
    vq = VectorQuant(6, 16, dim=-1)
    x = torch.randn(50, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = enc(x)
        assert h.dtype == torch.bfloat16
        z_q, out = vq(h)
    assert z_q.dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    (z_q.float().sum() + out["loss"]).backward()
    assert enc.weight.grad is not None and vq.codebook.weight.grad is not None
    cb = vq.codebook.weight.detach().bfloat16()
    rows = h.detach()
    d64 = brute_distances(rows, cb, "l2")
    chosen = d64.gather(1, out["q"].view(-1, 1)).squeeze(1)
    assert (chosen - d64.min(1).values).max() < 1e-2 * d64.min(1).values.mean()


def test_no_vq_disables_every_layer():
    model = torch.nn.Sequential(_layer(), torch.nn.Identity(), _layer())
    x = _x()
    with no_vq(model):
        y = model[0](x)[0]
        assert torch.equal(y, x)
    assert not torch.equal(model[0](x)[0], x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=1.5), "beta"),
        (dict(norm="batch"), "norm"),
        (dict(cb_norm="bn"), "cb_norm"),
        (dict(metric="manhattan"), "metric"),
        (dict(replace_freq=-1), "replace_freq"),
        (dict(anchor="nearest"), "anchor"),
        (dict(anchor="closest", anchor_decay=1.0), "anchor_decay"),
        (dict(affine_lr=-1.0), "affine_lr"),
        (dict(affine_mode="ema"), "affine_mode"),
        (dict(kmeans_iters=-2), "kmeans_iters"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuant(6, 10, **kwargs)
    with pytest.raises(ValueError, match="num_codes"):
        VectorQuant(6, 0)


def test_bad_forward_input():
    vq = _layer()
    with pytest.raises(ValueError, match="features"):
        vq(torch.randn(5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank"):
        vq(torch.randn(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        vq(torch.ones(5, 6, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------------
# group and residual
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [True, False])
def test_group_vector_quant(share):
    torch.manual_seed(0)
    vq = GroupVectorQuant(12, 8, groups=4, share=share, dim=-1, backend="auto").double()
    x = _x(25, 12)
    z_q, out = vq(x)
    cb = vq.codebook.weight.detach()
    assert cb.shape == (8, 3) and out["q"].shape == (25, 4)
    for g in range(4):
        lo, hi = (0, 8) if share else (2 * g, 2 * g + 2)
        expect = _nearest(x[:, 3 * g : 3 * g + 3], cb[lo:hi]) + lo
        assert torch.equal(out["q"][:, g], expect)
        torch.testing.assert_close(z_q[:, 3 * g : 3 * g + 3], cb[expect])
    with pytest.raises(ValueError, match="divisible"):
        GroupVectorQuant(12, 10, groups=4, share=False)
    with pytest.raises(ValueError, match="groups"):
        GroupVectorQuant(12, 8, groups=5)


@pytest.mark.parametrize("share", [True, False])
def test_residual_vector_quant(share):
    torch.manual_seed(0)
    vq = ResidualVectorQuant(5, 12, groups=3, share=share, dim=-1).double()
    x = _x(30, 5)
    z_q, out = vq(x)
    cb = vq.codebook.weight.detach()
    r, total = x.clone(), torch.zeros_like(x)
    for i in range(3):
        lo, hi = (0, 12) if share else (4 * i, 4 * i + 4)
        codes = _nearest(r, cb[lo:hi]) + lo
        assert torch.equal(out["q"][:, i], codes)
        total += cb[codes]
        r = r - cb[codes]
    torch.testing.assert_close(z_q, total)
    assert out["q"].shape == (30, 3)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_loss_and_straight_through_functions(beta):
    """The fused autograd nodes against the stop-gradient expressions they replace (values and gradients)."""
    from vqkernels.nn.functional import convex_vq_loss, straight_through, vqvae_loss

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    refs = {
        convex_vq_loss: lambda: (1 - beta) * ((x - q.detach()) ** 2).mean() + beta * ((x.detach() - q) ** 2).mean(),
        vqvae_loss: lambda: beta * ((q.detach() - x) ** 2).mean() + ((q - x.detach()) ** 2).mean(),
    }
    for fn, ref in refs.items():
        got, want = fn(x, q, beta), ref()
        torch.testing.assert_close(got, want)
        for a, b in zip(
            torch.autograd.grad(got, (x, q), allow_unused=True, materialize_grads=True),
            torch.autograd.grad(want, (x, q), allow_unused=True, materialize_grads=True),
        ):
            torch.testing.assert_close(a, b)
    out = straight_through(x, q, 2.0)
    assert torch.equal(out, q)
    g = torch.randn(5, 3, dtype=torch.float64)
    gx, gq = torch.autograd.grad(out, (x, q), g)
    assert torch.equal(gx, g) and torch.equal(gq, 2.0 * g)


def test_fp32_loss_is_accurate_for_large_batches():
    from vqkernels.nn.functional import convex_vq_loss

    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(65536, 64, generator=g), torch.randn(65536, 64, generator=g)
    want = ((x.double() - q.double()) ** 2).mean()
    torch.testing.assert_close(convex_vq_loss(x, q, 0.95).double(), want, rtol=1e-6, atol=0)

"""CVQ anchor replacement on the layers and the CVQ-VAE drop-in ``VectorQuantiser`` (README "Method" §3).

The oracle is the formula of README "Method" §3, evaluated by hand in fp64 on the codebook as it was before the step.
"""

import pytest
import torch
from helpers import brute_distances

from vqkernels.nn import GroupVectorQuant, VectorQuant, VectorQuantiser

GAMMA = 0.99


def _x(n, d, seed=1):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _alpha(counts, n, k, h0=None, gamma=GAMMA):
    """``h`` after one EMA step from ``h0`` and the per-code decay alpha (README "Method" §3.1-3.2), fp64."""
    h0 = torch.zeros(k, dtype=torch.float64) if h0 is None else h0
    h = gamma * h0 + (1 - gamma) * counts.double() / n
    return h, torch.exp(-h * k * 10 / (1 - gamma) - 1e-3)


def _counts(codes, k):
    return torch.bincount(codes, minlength=k)


# ---------------------------------------------------------------------------------------------------------------
# anchors on VectorQuant
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_closest_anchor_update(metric):
    torch.manual_seed(0)
    k, n = 12, 50
    vq = VectorQuant(5, k, dim=-1, anchor="closest", metric=metric).double()
    x = _x(n, 5)
    c0 = vq.codebook.weight.detach().clone()
    _, out = vq(x)
    codes = out["q"].squeeze(-1)
    assert torch.equal(codes, brute_distances(x, c0, metric).argmin(1))
    h, alpha = _alpha(_counts(codes, k), n, k)
    torch.testing.assert_close(vq.embed_prob.double(), h, rtol=1e-6, atol=1e-9)
    nearest_row = brute_distances(c0, x, metric).argmin(1)  # fp64 brute force: nearest input per code
    expect = (1 - alpha[:, None]) * c0 + alpha[:, None] * x[nearest_row]
    torch.testing.assert_close(vq.codebook.weight.detach(), expect, rtol=1e-6, atol=1e-9)
    unused = _counts(codes, k) == 0
    assert (alpha[unused] > 0.99).all() and (alpha[~unused] < 0.1).all()


def test_random_anchor_update_uses_the_pool():
    torch.manual_seed(0)
    k, n = 8, 30
    vq = VectorQuant(4, k, dim=-1, anchor="random").double()
    x = _x(n, 4)
    c0 = vq.codebook.weight.detach().clone()
    _, out = vq(x)
    codes = out["q"].squeeze(-1)
    assert int(vq.pool_filled) == k
    pool = vq.feature_pool.double()
    # the pool holds K distinct batch rows (N >= K)
    match = brute_distances(pool, x, "l2") < 1e-20
    assert (match.sum(1) == 1).all() and match.any(0).sum() == k
    _, alpha = _alpha(_counts(codes, k), n, k)
    expect = (1 - alpha[:, None]) * c0 + alpha[:, None] * pool
    torch.testing.assert_close(vq.codebook.weight.detach(), expect, rtol=1e-6, atol=1e-9)


def test_probrandom_anchor_moves_dead_codes_onto_batch_rows():
    torch.manual_seed(0)
    k, n = 16, 40
    vq = VectorQuant(3, k, dim=-1, anchor="probrandom").double()
    x = _x(n, 3)
    c0 = vq.codebook.weight.detach().clone()
    _, out = vq(x)
    _, alpha = _alpha(_counts(out["q"].squeeze(-1), k), n, k)
    c1 = vq.codebook.weight.detach()
    anchors = (c1 - (1 - alpha[:, None]) * c0) / alpha[:, None]  # solve the update for the anchor
    # every anchor is one of the batch rows (checked where alpha is large enough for the solve to be accurate)
    big = alpha > 0.01
    assert big.sum() >= 4
    assert (brute_distances(anchors[big], x, "l2", direct=True).min(1).values < 1e-12).all()


def test_probrandom_layer_frequencies_follow_softmax():
    """A single code and 4 rows: the anchor row is drawn with P(i) = softmax_i(-||x_i - c||^2)."""
    x = torch.tensor([[0.0], [0.5], [1.0], [1.5]], dtype=torch.float64)
    c = torch.tensor([[0.25]], dtype=torch.float64)
    p = torch.softmax(-((x - c) ** 2).squeeze(1), 0)
    hits = torch.zeros(4)
    trials = 3000
    torch.manual_seed(123)
    vq = VectorQuant(1, 1, dim=-1, anchor="probrandom").double()
    _, alpha = _alpha(torch.tensor([4]), 4, 1)  # one code, always used: alpha is tiny but known
    for _ in range(trials):
        with torch.no_grad():
            vq.codebook.weight.copy_(c)
            vq.embed_prob.zero_()
        vq(x)
        anchor = (vq.codebook.weight.detach() - (1 - alpha) * c) / alpha  # solve the update for the anchor
        hits[(x - anchor).abs().squeeze(1).argmin()] += 1
    expected = p * trials
    chi2 = float(((hits.double() - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_first_batch_updates_only_once():
    torch.manual_seed(0)
    vq = VectorQuant(4, 8, dim=-1, anchor="closest", first_batch=True).double()
    vq(_x(30, 4, seed=1))
    c1 = vq.codebook.weight.detach().clone()
    h1 = vq.embed_prob.clone()
    _, out = vq(_x(30, 4, seed=2))
    assert torch.equal(vq.codebook.weight.detach(), c1)  # no second anchor update
    h2, _ = _alpha(_counts(out["q"].squeeze(-1), 8), 30, 8, h0=h1.double())
    torch.testing.assert_close(vq.embed_prob.double(), h2)  # the usage EMA still runs


def test_anchor_update_writes_effective_codes_with_affine():
    torch.manual_seed(0)
    vq = VectorQuant(4, 8, dim=-1, anchor="closest", affine_lr=2.0).double()
    with torch.no_grad():
        vq.affine_transform.scale.normal_()
        vq.affine_transform.bias.normal_()
    x = _x(40, 4)
    e0 = vq.get_codebook()
    _, out = vq(x)
    _, alpha = _alpha(_counts(out["q"].squeeze(-1), 8), 40, 8)
    nearest_row = brute_distances(e0, x, "l2").argmin(1)
    expect = (1 - alpha[:, None]) * e0 + alpha[:, None] * x[nearest_row]
    torch.testing.assert_close(vq.get_codebook(), expect, rtol=1e-6, atol=1e-9)


def test_anchors_in_eval_mode_and_empty_batch_do_nothing():
    torch.manual_seed(0)
    vq = VectorQuant(4, 8, dim=-1, anchor="random").double()
    vq(_x(0, 4))
    assert int(vq.pool_filled) == 0 and torch.equal(vq.embed_prob, torch.zeros(8))
    vq.eval()
    c = vq.codebook.weight.detach().clone()
    vq(_x(20, 4))
    assert torch.equal(vq.codebook.weight.detach(), c) and int(vq.pool_filled) == 0


def test_group_vector_quant_separate_blocks_get_their_own_anchors():
    torch.manual_seed(0)
    g, k, n = 2, 8, 30
    vq = GroupVectorQuant(6, k, groups=g, share=False, dim=-1, anchor="closest").double()
    x = _x(n, 6)
    c0 = vq.codebook.weight.detach().clone()
    _, out = vq(x)
    codes = out["q"]  # [N, G], offset by g K/G
    h, alpha = _alpha(_counts(codes.reshape(-1), k), n * g, k)  # p_k over all G N assignments
    torch.testing.assert_close(vq.embed_prob.double(), h, rtol=1e-6, atol=1e-9)
    expect = torch.empty_like(c0)
    for i in range(g):
        rows, block = x[:, 3 * i : 3 * i + 3], c0[4 * i : 4 * i + 4]
        near = brute_distances(block, rows, "l2").argmin(1)
        a = alpha[4 * i : 4 * i + 4, None]
        expect[4 * i : 4 * i + 4] = (1 - a) * block + a * rows[near]
    torch.testing.assert_close(vq.codebook.weight.detach(), expect, rtol=1e-6, atol=1e-9)


def test_contrastive_term_only_in_training():
    from vqkernels.nn.cvq import contrastive_loss

    torch.manual_seed(0)
    a = VectorQuant(4, 8, dim=-1, metric="cosine", contrastive=True).double()
    b = VectorQuant(4, 8, dim=-1, metric="cosine").double()
    b.load_state_dict(a.state_dict())
    x = _x(30, 4)
    la, lb = a(x)[1]["loss"], b(x)[1]["loss"]
    expect = contrastive_loss(x, a.codebook.weight.detach(), "cosine")
    assert float(expect) > 1e-6
    torch.testing.assert_close(la - lb, expect, rtol=1e-9, atol=0)
    la.backward()
    assert a.codebook.weight.grad is not None
    a.eval()
    b.eval()
    assert torch.equal(a(x)[1]["loss"].detach(), b(x)[1]["loss"].detach())


# ---------------------------------------------------------------------------------------------------------------
# VectorQuantiser (CVQ-VAE drop-in)
# ---------------------------------------------------------------------------------------------------------------
def test_quantiser_init_and_state_dict_keys():
    k = 64
    vq = VectorQuantiser(k, 8, beta=0.25)
    w = vq.embedding.weight.detach()
    assert w.abs().max() <= 1.0 / k and w.std() > 0.2 / k  # U(-1/K, 1/K)
    keys = set(vq.state_dict())
    assert {"embedding.weight", "embed_prob"} <= keys
    # a CVQ-VAE checkpoint holds exactly these two keys: it loads strictly
    ckpt = {"embedding.weight": torch.randn(k, 8), "embed_prob": torch.rand(k)}
    vq.load_state_dict(ckpt)
    assert torch.equal(vq.embedding.weight.detach(), ckpt["embedding.weight"])
    assert torch.equal(vq.embed_prob, ckpt["embed_prob"])


@pytest.mark.parametrize("distance", ["cos", "l2"])
@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_quantiser_loss_outputs_and_gradients(distance, beta):
    torch.manual_seed(0)
    k, d = 10, 4
    vq = VectorQuantiser(k, d, beta=beta, distance=distance, anchor="closest").double()
    with torch.no_grad():
        vq.embedding.weight.normal_()
    z = torch.randn(2, d, 3, 5, dtype=torch.float64, requires_grad=True)
    c0 = vq.embedding.weight.detach().clone()
    z_q, loss, (ppl, enc, idx) = vq(z)
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, d)
    n = rows.shape[0]
    codes = brute_distances(rows, c0, "cosine" if distance == "cos" else "l2").argmin(1)
    assert torch.equal(idx, codes) and enc is None
    q = c0[codes]  # z_q uses the raw codes, also for distance="cos"
    torch.testing.assert_close(z_q.detach(), q.view(2, 3, 5, d).permute(0, 3, 1, 2))
    mse = ((q - rows) ** 2).mean()
    torch.testing.assert_close(loss, beta * mse + mse)  # VQ-VAE convention: beta weighs the commitment term
    p = _counts(codes, k).double() / n
    torch.testing.assert_close(ppl.double(), torch.exp(-(p[p > 0] * p[p > 0].log()).sum()), rtol=1e-6, atol=0)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, g, rtol=0, atol=0)  # plain STE
    z.grad = None
    loss.backward()
    gx = 2 * beta * (rows - q) / (n * d)
    torch.testing.assert_close(z.grad, gx.view(2, 3, 5, d).permute(0, 3, 1, 2))
    gc = torch.zeros(k, d, dtype=torch.float64).index_add_(0, codes, 2 * (q - rows) / (n * d))
    torch.testing.assert_close(vq.embedding.weight.grad, gc)


def test_quantiser_encodings_on_request_and_eval():
    torch.manual_seed(0)
    vq = VectorQuantiser(12, 4, beta=0.25, return_encodings=True)
    z = torch.randn(2, 4, 3, 3)
    _, _, (_, enc, idx) = vq(z)
    assert enc.shape == (18, 12) and torch.equal(enc.argmax(1), idx) and torch.equal(enc.sum(1), torch.ones(18))
    vq.eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(z)
    for key, v in vq.state_dict().items():
        assert torch.equal(v, state[key]), key


def test_quantiser_anchor_update_matches_cvq_formula():
    torch.manual_seed(0)
    k, d = 16, 4
    vq = VectorQuantiser(k, d, beta=0.25, distance="cos", anchor="closest").double()
    z = torch.randn(2, d, 4, 4, dtype=torch.float64)
    c0 = vq.embedding.weight.detach().clone()
    _, _, (_, _, idx) = vq(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, d)
    _, alpha = _alpha(_counts(idx, k), rows.shape[0], k)
    near = brute_distances(c0, rows, "cosine").argmin(1)
    expect = (1 - alpha[:, None]) * c0 + alpha[:, None] * rows[near]
    torch.testing.assert_close(vq.embedding.weight.detach(), expect, rtol=1e-6, atol=1e-9)


def test_quantiser_random_pool_round_trip():
    torch.manual_seed(0)
    a = VectorQuantiser(8, 4, beta=0.25, anchor="random")
    for s in range(3):
        a(torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(s)))
    b = VectorQuantiser(8, 4, beta=0.25, anchor="random")
    b.load_state_dict(a.state_dict())
    for key in ("feature_pool", "pool_filled", "embed_prob", "embedding.weight", "anchor_initialized"):
        assert torch.equal(a.state_dict()[key], b.state_dict()[key]), key
    assert int(b.pool_filled) == 12


def test_quantiser_bad_arguments():
    with pytest.raises(ValueError, match="distance"):
        VectorQuantiser(8, 4, beta=0.25, distance="l1")
    with pytest.raises(ValueError, match="anchor"):
        VectorQuantiser(8, 4, beta=0.25, anchor="nearest")
    with pytest.raises(ValueError, match="beta"):
        VectorQuantiser(8, 4, beta=-0.1)
    vq = VectorQuantiser(8, 4, beta=0.25)
    with pytest.raises(ValueError, match="features"):
        vq(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="temp"):
        vq(torch.randn(2, 4, 3, 3), temp=0.5)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints of the original libraries
# ---------------------------------------------------------------------------------------------------------------
def test_vqtorch_checkpoint_with_lru_counts_loads():
    vq = VectorQuant(4, 8, dim=-1, replace_freq=5, kmeans_init=True)
    ckpt = {
        "codebook.weight": torch.randn(8, 4),
        "data_initialized": torch.ones(1),
        "_counts": torch.tensor([5.0, 4, 3, 2, 1, 5, 5, 5]),
    }  # vqtorch's float LRU counters
    vq.load_state_dict(ckpt)
    assert torch.equal(vq.lru_counters, torch.tensor([5, 4, 3, 2, 1, 5, 5, 5]))
    assert torch.equal(vq.codebook.weight.detach(), ckpt["codebook.weight"]) and bool(vq.data_initialized)

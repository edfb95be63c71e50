"""The codebook-rule options on every layer (README "Method" §2.9-§2.13), each against its formula in fp64: the EMA
update (buffers and codebook after a few steps against a hand loop of one-hot sums), expiry by EMA cluster size, the
rotation trick, stochastic code sampling, the orthogonal term, the low-dimensional codebook projection; the batched
search of GroupVectorQuant(share=False) against one search per group; bad option values."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import RULES_OFF, brute_distances

from vqkernels import ops
from vqkernels.nn import GroupVectorQuant, ResidualVectorQuant, VectorQuant, VectorQuantiser
from vqkernels.nn.base import _orthogonal_loss_of_subsets

D, K, G = 6, 8, 2  # features, codes, groups / stages

# every layer, on tiny shapes, in fp64; ``blocks``: code blocks searched separately
LAYERS = {
    "vq": (lambda **kw: VectorQuant(D, K, dim=-1, **kw), 1),
    "group-shared": (lambda **kw: GroupVectorQuant(D, K, groups=G, share=True, dim=-1, **kw), 1),
    "group-separate": (lambda **kw: GroupVectorQuant(D, K, groups=G, share=False, dim=-1, **kw), G),
    "residual": (lambda **kw: ResidualVectorQuant(D, K, groups=G, share=False, dim=-1, **kw), G),
    "cvq": (lambda **kw: VectorQuantiser(K, D, distance="l2", anchor=None, **kw), 1),
}


def _make(name, seed=0, **kw):
    torch.manual_seed(seed)
    return LAYERS[name][0](**kw).double()


def _x(name, n=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name == "cvq":  # NCHW
        return torch.randn(2, D, 3, n // 6, dtype=torch.float64, generator=g)
    return torch.randn(n, D, dtype=torch.float64, generator=g)


def _run(layer, x):
    """``(z_q, loss, codes)`` of any layer; codes ``[N, S]`` (S sub-vectors or stages; 1 for plain layers)."""
    out = layer(x)
    if isinstance(layer, VectorQuantiser):
        return out[0], out[1], out[2][2][:, None]
    return out[0], out[1]["loss"], out[1]["q"].reshape(-1, out[1]["q"].shape[-1])


def _rows(name, x):
    """The rows ``[N, D]`` of an input (NCHW for the CVQ layer)."""
    return x.movedim(1, -1).reshape(-1, D) if name == "cvq" else x


def _nearest(rows, cb, metric="l2"):
    return brute_distances(rows, cb, metric, direct=True).argmin(1)


def _hand_search(name, cb, x):
    """fp64 search by hand with the effective codes ``cb [K, D']``: per block, the rows that searched it and their
    block-local codes, and the layer's code output ``[N, S]``."""
    rows = _rows(name, x)
    if name in ("vq", "cvq"):
        codes = _nearest(rows, cb)
        return [(rows, codes)], codes[:, None]
    if name == "group-shared":
        sub = rows.reshape(-1, D // G)
        codes = _nearest(sub, cb)
        return [(sub, codes)], codes.view(-1, G)
    kb = K // G
    blocks, out, r = [], [], rows
    for g in range(G):
        block = cb[g * kb : (g + 1) * kb]
        if name == "group-separate":
            r = rows[:, g * (D // G) : (g + 1) * (D // G)]
        codes = _nearest(r, block)
        blocks.append((r, codes))
        out.append(codes + g * kb)
        if name == "residual":
            r = r - block[codes]
    return blocks, torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------------------------
# EMA update
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYERS))
def test_ema_update_follows_the_hand_loop(name):
    """N <- gamma N + (1 - gamma) n, m <- gamma m + (1 - gamma) s from one-hot sums, codebook = m / N~ with
    Laplace smoothing per block, for three steps; every search uses the codebook the EMA wrote."""
    gamma, eps = 0.9, 0.05
    layer = _make(name, ema_update=True, decay=gamma, eps=eps)
    blocks = LAYERS[name][1]
    cb = layer.get_codebook().double()
    kb = K // blocks
    # the start: as if every code had held one row equal to itself
    assert torch.equal(layer.cluster_size, torch.ones(K, dtype=torch.float64))
    torch.testing.assert_close(layer.embed_avg, cb)
    # from a state whose blocks differ in total size (so smoothing per block and over all codes differ)
    g = torch.Generator().manual_seed(7)
    size = (0.5 + torch.rand(blocks, kb, generator=g, dtype=torch.float64)) * (1 + 9 * torch.arange(blocks))[:, None]
    avg = torch.randn(blocks, kb, cb.shape[1], generator=g, dtype=torch.float64)
    layer.cluster_size.copy_(size.view(-1))
    layer.embed_avg.copy_(avg.view(K, -1))
    for step in range(3):
        x = _x(name, seed=10 + step)
        per_block, want = _hand_search(name, cb, x)
        _, _, codes = _run(layer, x)
        assert torch.equal(codes, want), step
        for b, (rows, c) in enumerate(per_block):
            onehot = F.one_hot(c, kb).double()
            size[b] = gamma * size[b] + (1 - gamma) * onehot.sum(0)
            avg[b] = gamma * avg[b] + (1 - gamma) * onehot.T @ rows
        n = size.sum(1, keepdim=True)
        cb = (avg / ((size + eps) / (n + kb * eps) * n)[..., None]).reshape(K, -1)
        torch.testing.assert_close(layer.cluster_size.view(blocks, kb), size, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(layer.embed_avg.view(blocks, kb, -1), avg, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.get_codebook(), cb, rtol=1e-6, atol=1e-7)
    state = layer.state_dict()
    layer.eval()  # no update in eval
    layer(_x(name, seed=99))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", ["vq", "cvq"])
def test_ema_loss_is_the_commitment_term_and_the_codebook_takes_no_gradient(name):
    beta = 0.7
    layer = _make(name, ema_update=True, beta=beta)
    x = _x(name).requires_grad_(True)
    cb = layer.get_codebook()
    z_q, loss, codes = _run(layer, x)
    rows = _rows(name, x.detach())
    diff = rows - cb[codes[:, 0]]
    # vqtorch's beta weighs the codebook term, dropped under EMA; CVQ-VAE's beta weighs the commitment term
    weight = 1 - beta if name == "vq" else beta
    torch.testing.assert_close(loss, weight * (diff**2).mean())
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(_rows(name, grad), weight * 2 * diff / diff.numel())
    assert not layer.codebook_weight.requires_grad
    (z_q.sum() + loss).backward()
    assert layer.codebook_weight.grad is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sync_nu=0.5), "sync_nu"),
        (dict(beta=1.0, inplace_optimizer=lambda p: torch.optim.SGD(p, lr=1.0)), "inplace_optimizer"),
        (dict(orthogonal_reg_weight=0.1), "orthogonal_reg_weight"),
        (dict(contrastive=True), "contrastive"),
        (dict(affine_lr=2.0), "affine_lr"),
    ],
)
def test_ema_refuses_rules_that_train_the_codebook_by_gradient(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuant(D, K, ema_update=True, **kwargs)
    VectorQuant(D, K, ema_update=True, affine_mode="running")  # running statistics need no gradient


def _smoothed(layer):
    """``m_k / N~_k`` of the layer's EMA buffers (one block), fp64."""
    size = layer.cluster_size.double()
    n = size.sum()
    return layer.embed_avg.double() / ((size + layer.ema_eps) / (n + K * layer.ema_eps) * n)[:, None]


def test_other_writers_reseed_the_ema():
    """k-means init, LRU replacement and CVQ anchors write codes; the EMA sums follow them (m_k = c_k N~_k), so
    after every step the smoothed EMA codebook is the codebook, and the next EMA step starts from what they wrote
    instead of reverting it."""
    torch.manual_seed(0)
    layer = VectorQuant(D, K, dim=-1, ema_update=True, kmeans_init=True, kmeans_iters=2, replace_freq=1)
    layer = layer.double()
    start = layer.get_codebook()
    for step in range(3):
        x = _x("vq", seed=step) + (100.0 if step == 1 else 0.0)  # step 1: the data moves far away
        layer(x)
        torch.testing.assert_close(_smoothed(layer), layer.get_codebook())
        if step == 0:  # k-means moved every code
            assert (layer.get_codebook() - start).norm(dim=1).min() > 1e-3
        if step == 1:  # codes left unused died and became perturbed far rows
            near = brute_distances(layer.get_codebook(), x, "l2").min(1).values.sqrt() < 0.5 * 100
            assert near.sum() >= K - 1
    torch.manual_seed(0)
    anchored = VectorQuant(D, K, dim=-1, ema_update=True, anchor="closest").double()
    for step in range(2):
        anchored(_x("vq", seed=step) + 3.0)
        torch.testing.assert_close(_smoothed(anchored), anchored.get_codebook())


# ---------------------------------------------------------------------------------------------------------------
# expiry by EMA cluster size
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vq", "group-separate", "residual", "cvq"])
@pytest.mark.parametrize("ema_on", [False, True])
def test_expiry_replaces_codes_below_the_threshold_by_rows_of_their_block(name, ema_on):
    """Codes nothing chose decay to N = gamma < t and become distinct rows that searched their block, with N = t and
    m = t v; the others follow the EMA (with ema_update) or stay as they were (statistics tracked only)."""
    gamma, t = 0.9, 0.95
    layer = _make(name, ema_update=ema_on, decay=gamma, threshold_ema_dead_code=t)
    blocks = LAYERS[name][1]
    kb = K // blocks
    with torch.no_grad():  # block b: code 0 of the block near the data, the others far away (never chosen)
        w = layer.codebook_weight
        w.fill_(50.0)
        w[torch.arange(blocks) * kb] = 0.0
    layer.cluster_size.fill_(1.0)
    layer.embed_avg.copy_(layer.get_codebook())
    cb0 = layer.get_codebook()
    x = _x(name) * 0.1
    per_block, _ = _hand_search(name, cb0, x)
    _run(layer, x)
    cb = layer.get_codebook()
    for b, (rows, codes) in enumerate(per_block):
        assert torch.equal(codes, torch.zeros_like(codes))
        lo = b * kb
        expect_kept = (1 - gamma) * len(codes) + gamma
        torch.testing.assert_close(layer.cluster_size[lo].double(), torch.tensor(expect_kept, dtype=torch.float64))
        kept_code = cb0[lo]  # tracking only: the gradient (none here) moves the codes
        if ema_on:  # the EMA's mean, smoothed over the block before the expiry: N~ = (N + eps)/(n + K_b eps) n
            n = expect_kept + gamma * (kb - 1)
            kept_code = (1 - gamma) * rows.sum(0) / ((expect_kept + 1e-5) / (n + kb * 1e-5) * n)
        torch.testing.assert_close(cb[lo], kept_code, rtol=1e-5, atol=1e-6)
        new = cb[lo + 1 : lo + kb]
        assert torch.equal(layer.cluster_size[lo + 1 : lo + kb], torch.full((kb - 1,), t, dtype=torch.float64))
        torch.testing.assert_close(layer.embed_avg[lo + 1 : lo + kb], new * t)
        match = (new[:, None, :] == rows[None]).all(-1)  # each replaced code is one of the block's rows
        assert match.any(1).all(), b
        assert len({int(i) for i in match.float().argmax(1)}) == kb - 1  # distinct rows


def test_expiry_writes_effective_codes_with_running_affine():
    layer = VectorQuant(D, K, dim=-1, affine_mode="running", threshold_ema_dead_code=0.95, decay=0.9).double()
    x = _x("vq")
    with torch.no_grad():
        layer.codebook_weight[1:] = 1e3
    layer(x)
    cb = layer.get_codebook()
    replaced = layer.cluster_size == 0.95
    assert replaced.sum() >= 1
    for k in torch.nonzero(replaced).squeeze(1):
        assert brute_distances(cb[k : k + 1], x, "l2").min() < 1e-12  # (through the inverse affine)


# ---------------------------------------------------------------------------------------------------------------
# rotation trick
# ---------------------------------------------------------------------------------------------------------------
def _rotated(e, q, g):
    """``s R^T g`` row by row with the rotation built as a matrix (Fifty et al. 2024, §4.2), fp64."""
    out = torch.empty_like(g)
    for i in range(e.shape[0]):
        u, qh = e[i] / e[i].norm(), q[i] / q[i].norm()
        w = (u + qh) / (u + qh).norm()
        r = torch.eye(e.shape[1], dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(qh, u)
        out[i] = (q[i].norm() / e[i].norm()) * r.T @ g[i]
    return out


@pytest.mark.parametrize("name", list(LAYERS))
def test_rotation_trick_gradient_reaches_the_input(name):
    nu = 0.0 if name == "cvq" else 0.4
    layer = _make(name, rotation_trick=True, **({} if name == "cvq" else dict(sync_nu=nu)))
    x = _x(name).requires_grad_(True)
    cb = layer.get_codebook()
    z_q, _, codes = _run(layer, x)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    rows, gr, xg = _rows(name, x.detach()), _rows(name, g), _rows(name, x.grad)
    if name == "residual":  # the input is rotated onto the sum of the stages' codes
        q = cb[codes].sum(1)
        e, gg, got = rows, gr, xg
    else:
        s = D // codes.shape[1]
        q = cb[codes].reshape(-1, s)
        e, gg, got = rows.reshape(-1, s), gr.reshape(-1, s), xg.reshape(-1, s)
    torch.testing.assert_close(_rows(name, z_q.detach()).reshape(q.shape[0], -1), q)  # the value is the code
    torch.testing.assert_close(got, _rotated(e, q, gg))
    assert not torch.allclose(got, gg)  # not the straight-through gradient
    if nu:  # the synchronised update: nu x the downstream gradient to the codes
        flat_codes = codes.reshape(-1)
        gq = gg if name != "residual" else gg[:, None, :].expand(-1, G, -1).reshape(-1, D)
        expect = torch.zeros_like(cb).index_add_(0, flat_codes, nu * gq.reshape(flat_codes.shape[0], -1))
        torch.testing.assert_close(layer.codebook_weight.grad, expect)


# ---------------------------------------------------------------------------------------------------------------
# stochastic code sampling
# ---------------------------------------------------------------------------------------------------------------
def _law(x, block, t):
    """``P(k | x) = softmax_k(-|x - c_k|^2 / T)`` over the codes of ``block``, fp64."""
    return torch.softmax(-((x - block) ** 2).sum(-1) / t, -1)


@pytest.mark.parametrize("name", list(LAYERS))
def test_sampling_follows_the_tempered_law_in_training_only(name):
    """Many copies of one input: the frequencies of the drawn codes (per sub-vector; jointly over the stages of the
    residual layer, stage 2 quantising what stage 1's draw left) within 5 sigma of the tempered law."""
    t, n = 0.6, 12000
    layer = _make(name, stochastic_sample_codes=True, sample_codebook_temp=t)
    with torch.no_grad():  # codes close enough that every one has a fair share of the law
        layer.codebook_weight.mul_(0.3)
    cb = layer.get_codebook()
    x0 = torch.randn(1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.3
    x = x0.expand(n, D).contiguous()
    if name == "cvq":
        x = x.T.reshape(1, D, n, 1)
    torch.manual_seed(5)
    z_q, _, codes = _run(layer, x)
    kb = K // G
    if name == "residual":  # joint law of (k1, k2): P(k1) P(k2 | x - c_k1)
        p1 = _law(x0[0], cb[:kb], t)
        p2 = _law((x0[0] - cb[:kb])[:, None, :], cb[kb:][None], t)
        p = (p1[:, None] * p2).reshape(-1)
        cells = [(codes[:, 0] * kb + codes[:, 1] - kb, p)]
    elif name.startswith("group"):
        sub = D // G
        blocks = [cb[g * kb : (g + 1) * kb] if name == "group-separate" else cb for g in range(G)]
        offsets = [g * kb if name == "group-separate" else 0 for g in range(G)]
        cells = [(codes[:, g] - offsets[g], _law(x0[0, g * sub : (g + 1) * sub], blocks[g], t)) for g in range(G)]
    else:
        cells = [(codes[:, 0], _law(x0[0], cb, t))]
    for drawn, p in cells:
        freq = torch.bincount(drawn, minlength=p.numel()).double() / n
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)
    # the outputs follow the drawn codes
    want = cb[codes].sum(1) if name == "residual" else cb[codes].reshape(n, -1)
    torch.testing.assert_close(_rows(name, z_q.detach()).reshape(n, -1), want)
    layer.eval()
    _, _, codes = _run(layer, x)
    _, want = _hand_search(name, cb, x)
    assert torch.equal(codes, want)  # eval: the nearest code


# ---------------------------------------------------------------------------------------------------------------
# orthogonal regularisation
# ---------------------------------------------------------------------------------------------------------------
def _orthogonal_by_hand(codes):
    """Shin et al. 2021 eq. 2 with the K x K matrix, fp64: sum cos^2 / K^2 - 1/K."""
    u = F.normalize(codes, dim=-1)
    k = codes.shape[0]
    return (u @ u.T).square().sum() / k**2 - 1.0 / k


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("active_only", [False, True])
def test_orthogonal_term_value_and_gradient(name, active_only):
    w = 0.3
    plain = _make(name)
    layer = _make(name, orthogonal_reg_weight=w, orthogonal_reg_active_codes_only=active_only)
    with torch.no_grad():  # the last code is never chosen
        for m in (plain, layer):
            m.codebook_weight[-1] = 100.0
    x = _x(name)
    _, base, _ = _run(plain, x)
    cb = layer.get_codebook()
    _, loss, codes = _run(layer, x)
    blocks = LAYERS[name][1]
    kb = K // blocks
    used = torch.zeros(K, dtype=torch.bool)
    used[codes.reshape(-1)] = True
    terms = []
    for b in range(blocks):
        keep = used[b * kb : (b + 1) * kb] if active_only else torch.ones(kb, dtype=torch.bool)
        terms.append(_orthogonal_by_hand(cb[b * kb : (b + 1) * kb][keep]))
    torch.testing.assert_close(loss - base, w * torch.stack(terms).mean())
    loss.backward()
    g = layer.codebook_weight.grad  # the VQ loss gives unused codes no gradient; the orthogonal term may
    assert not used[-1]
    assert torch.equal(g[-1], torch.zeros_like(g[-1])) == active_only
    layer.eval()
    plain.eval()
    torch.testing.assert_close(_run(layer, x)[1], _run(plain, x)[1])  # a training loss only


def test_orthogonal_term_on_at_most_max_codes():
    """With orthogonal_reg_max_codes = m < K the term is the loss of m of the codes, a uniform subset: its value is
    that of one of the C(K, m) subsets, a different one from draw to draw."""
    m = 3
    layer = _make("vq", orthogonal_reg_weight=1.0, orthogonal_reg_max_codes=m)
    plain = _make("vq")
    x = _x("vq")
    cb = layer.get_codebook()
    values = torch.stack([_orthogonal_by_hand(cb[list(s)]) for s in itertools.combinations(range(K), m)])
    picked = set()
    for seed in range(4):
        torch.manual_seed(seed)
        term = _run(layer, x)[1] - _run(plain, x)[1]
        assert (values - term).abs().min() < 1e-12, term
        picked.add(int((values - term).abs().argmin()))
    assert len(picked) > 1  # a random subset, not a fixed one
    heads = torch.randn(2, 5, 3, dtype=torch.float64)
    keep = torch.tensor([[True, False, True, True, False], [False] * 5])
    want = (_orthogonal_by_hand(heads[0][keep[0]]) + 0.0) / 2  # an empty subset counts as 0
    torch.testing.assert_close(_orthogonal_loss_of_subsets(heads, keep), want)


@pytest.mark.parametrize("writer", [dict(replace_freq=1), dict(anchor="probrandom"), dict(threshold_ema_dead_code=1.0)])
def test_orthogonal_term_backpropagates_past_the_updates_after_the_forward(writer):
    """The updates after the forward write the codes in place before the backward: the term's gradient is that of
    the codes the forward saw."""
    layer = _make("vq", orthogonal_reg_weight=1.0, **writer)
    plain = _make("vq", orthogonal_reg_weight=1.0)
    x = _x("vq") * 0.01  # most codes unused: the writers move them
    cb = plain.get_codebook()
    _run(plain, x)[1].backward()
    _run(layer, x)[1].backward()
    assert not torch.equal(layer.get_codebook(), cb)
    torch.testing.assert_close(layer.codebook_weight.grad, plain.codebook_weight.grad)


# ---------------------------------------------------------------------------------------------------------------
# low-dimensional codebook
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYERS))
def test_codebook_dim_projects_in_and_out(name):
    cd = 2
    layer = _make(name, codebook_dim=cd)
    s = G if name.startswith("group") else 1
    assert layer.codebook_weight.shape == (K, cd)
    assert layer.project_in.weight.shape == (s * cd, D) and layer.project_out.weight.shape == (D, s * cd)
    x = _x(name).requires_grad_(True)
    cb = layer.get_codebook()
    z_q, loss, codes = _run(layer, x)
    assert z_q.shape == x.shape
    low = layer.project_in(_rows(name, x.detach()))  # the search runs in the low-dimensional space
    lows = low.reshape(-1, cd)
    if name == "residual":
        total, r = 0, low
        for g in range(G):
            total = total + cb[codes[:, g]]
            assert torch.equal(codes[:, g] - g * (K // G), _nearest(r, cb[g * (K // G) : (g + 1) * (K // G)]))
            r = low - total
        q = total
    else:
        block = K // G if name == "group-separate" else K
        offs = torch.arange(codes.shape[1]) * (block if name == "group-separate" else 0)
        local = (codes - offs).reshape(-1)
        want = torch.stack(
            [_nearest(lows[i :: codes.shape[1]], cb[o : o + block]) for i, o in enumerate(offs.tolist())], 1
        ).reshape(-1)
        assert torch.equal(local, want)
        q = cb[codes.reshape(-1)].reshape(low.shape)
    torch.testing.assert_close(_rows(name, z_q.detach()), layer.project_out(q).detach())
    (z_q.square().sum() + loss).backward()
    for p in (layer.project_in.weight, layer.project_out.weight, layer.codebook_weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    if name != "cvq":
        assert layer(x)[1]["z"].shape[-1] == cd
    with pytest.raises(ValueError, match="codebook_dim"):
        LAYERS[name][0](codebook_dim=0)


def test_codebook_dim_equal_to_the_size_adds_nothing():
    assert not hasattr(VectorQuant(D, K, codebook_dim=D), "project_in")
    assert not hasattr(GroupVectorQuant(D, K, groups=G, codebook_dim=D // G), "project_in")
    # with a projection the features need not divide by the groups
    assert GroupVectorQuant(7, K, groups=G, codebook_dim=3, dim=-1)(torch.randn(5, 7))[0].shape == (5, 7)


# ---------------------------------------------------------------------------------------------------------------
# GroupVectorQuant(share=False): one batched search
# ---------------------------------------------------------------------------------------------------------------
def test_group_separate_is_one_batched_search_equal_to_one_search_per_group(monkeypatch):
    """Codes, z_q, loss and gradients against one search per group computed here in fp64, with affine and the
    synchronised update on; the batched op is called once, on a view of the input (no copy)."""
    beta, nu, lr = 0.7, 0.3, 2.0
    layer = _make("group-separate", beta=beta, sync_nu=nu, affine_lr=lr, affine_groups=G)
    with torch.no_grad():
        layer.affine_transform.scale.normal_(std=0.2)
        layer.affine_transform.bias.normal_(std=0.2)
    calls = []
    original = ops.quantize

    def spy(x, codebook, **kw):
        calls.append(x)
        return original(x, codebook, **kw)

    monkeypatch.setattr("vqkernels.nn.base.ops.quantize", spy)
    x = _x("group-separate").requires_grad_(True)
    z_q, out = layer(x)
    assert len(calls) == 1 and calls[0].shape == (G, 30, D // G)
    assert calls[0].data_ptr() == x.data_ptr() and not calls[0].is_contiguous()
    g_out = torch.randn_like(z_q)
    (out["loss"] + (z_q * g_out).sum()).backward()
    # the reference: group g against its block of the effective codes
    c = layer.codebook_weight.detach().clone().requires_grad_(True)
    s = layer.affine_transform.scale.detach().clone().requires_grad_(True)
    b = layer.affine_transform.bias.detach().clone().requires_grad_(True)
    kb, sub = K // G, D // G
    grp = torch.arange(K) // kb
    eff = (1 + lr * s[grp]) * c + lr * b[grp]
    xr = x.detach().clone().requires_grad_(True)
    codes, zq = [], []
    for g in range(G):
        rows = xr[:, g * sub : (g + 1) * sub]
        block = eff[g * kb : (g + 1) * kb]
        cg = _nearest(rows.detach(), block.detach())
        codes.append(cg + g * kb)
        zq.append(block[cg])
    zq = torch.stack(zq, 1)
    xg = xr.view(-1, G, sub)
    loss = (1 - beta) * ((xg - zq.detach()) ** 2).mean() + beta * ((xg.detach() - zq) ** 2).mean()
    st = xg + (zq - xg).detach() + nu * zq - (nu * zq).detach()
    (loss + (st.reshape(x.shape) * g_out).sum()).backward()
    assert torch.equal(out["q"], torch.stack(codes, 1))
    torch.testing.assert_close(out["z_q"], zq.detach())
    torch.testing.assert_close(out["loss"], loss.detach())
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.codebook_weight.grad, c.grad)
    torch.testing.assert_close(layer.affine_transform.scale.grad, s.grad)
    torch.testing.assert_close(layer.affine_transform.bias.grad, b.grad)


@pytest.mark.parametrize("opts", [dict(), dict(beta=1.0, inplace_optimizer="sgd-momentum")])
def test_group_separate_batched_equals_the_per_group_loop(opts):
    """The batched path (torch backend) and the per-group loop (the cpu backend, until its kernels take the batched
    form) give the same codes, outputs, gradients and, with the alternating optimiser (one step per group, momentum
    carried between them), the same codebook after two steps."""
    if opts.get("inplace_optimizer"):
        opts = dict(opts, inplace_optimizer=lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9))
    results = []
    for backend in ("torch", "cpu"):
        torch.manual_seed(0)
        layer = GroupVectorQuant(D, K, groups=G, share=False, dim=-1, backend=backend, **opts).double()
        grads = []
        for step in range(2):
            x = _x("group-separate", seed=step).requires_grad_(True)
            z_q, out = layer(x)
            (out["loss"] + z_q.square().sum()).backward()
            grads.append(x.grad)
        results.append((out["q"], z_q.detach(), out["loss"].detach(), grads, layer.codebook_weight.detach().clone()))
    for a, b in zip(*results):
        if isinstance(a, list):
            for u, v in zip(a, b):
                torch.testing.assert_close(u, v)
        elif a.dtype == torch.int64:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# bad option values
# ---------------------------------------------------------------------------------------------------------------
BAD = [
    (dict(ema_update=1), "ema_update"),
    (dict(decay=1.0), "decay"),
    (dict(decay=-0.1), "decay"),
    (dict(decay="0.9"), "decay"),
    (dict(eps=0.0), "eps"),
    (dict(threshold_ema_dead_code=-1), "threshold_ema_dead_code"),
    (dict(threshold_ema_dead_code=float("nan")), "threshold_ema_dead_code"),
    (dict(rotation_trick="yes"), "rotation_trick"),
    (dict(stochastic_sample_codes=None), "stochastic_sample_codes"),
    (dict(sample_codebook_temp=-0.5), "sample_codebook_temp"),
    (dict(orthogonal_reg_weight=-1.0), "orthogonal_reg_weight"),
    (dict(orthogonal_reg_active_codes_only=0), "orthogonal_reg_active_codes_only"),
    (dict(orthogonal_reg_max_codes=0), "orthogonal_reg_max_codes"),
    (dict(orthogonal_reg_max_codes=2.5), "orthogonal_reg_max_codes"),
    (dict(codebook_dim=-2), "codebook_dim"),
    (dict(codebook_dim=True), "codebook_dim"),
]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("kwargs,match", BAD, ids=[f"{m}-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_option_values_name_the_argument(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LAYERS[name][0](**kwargs)


@pytest.mark.parametrize("name", list(LAYERS))
def test_options_off_change_nothing(name):
    """Every option at its default, given explicitly: the same state_dict, outputs and gradients as without."""
    a, b = _make(name), _make(name, **RULES_OFF)
    assert list(a.state_dict()) == list(b.state_dict())
    x = _x(name)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    za, la, _ = _run(a, xa)
    zb, lb, _ = _run(b, xb)
    (la + za.sum()).backward()
    (lb + zb.sum()).backward()
    assert torch.equal(za, zb) and torch.equal(la, lb) and torch.equal(xa.grad, xb.grad)
    assert torch.equal(a.codebook_weight.grad, b.codebook_weight.grad)

"""The layers under torch.compile and autocast (README "Method" §4): forward + backward compiles with fullgraph=True
when the non-gradient updates are off, and with graph breaks only at those updates otherwise; autocast runs the
search in the low precision and keeps the losses in fp32."""

import pytest
import torch

import vqkernels
from vqkernels.nn import GroupVectorQuant, ResidualVectorQuant, VectorQuant, VectorQuantiser

LAYERS = {
    "vq-affine-sync": lambda: VectorQuant(8, 32, dim=-1, sync_nu=0.5, affine_lr=2.0),
    "vq-cosine-norms": lambda: VectorQuant(8, 32, dim=1, metric="cosine", norm="l2", cb_norm="l2"),
    "group-shared": lambda: GroupVectorQuant(8, 32, groups=2, share=True, dim=-1),
    "group-separate": lambda: GroupVectorQuant(8, 32, groups=2, share=False, dim=-1),
    "residual": lambda: ResidualVectorQuant(8, 32, groups=2, dim=-1),
    "cvq-eval": lambda: VectorQuantiser(32, 8, beta=0.25).eval(),
    # the gradient-side codebook rules trace with the rest (no data-dependent shapes, no eager update)
    "vq-rules": lambda: VectorQuant(
        8,
        32,
        dim=-1,
        rotation_trick=True,
        sync_nu=0.3,
        orthogonal_reg_weight=0.1,
        orthogonal_reg_active_codes_only=True,
        codebook_dim=4,
    ),
    "group-separate-rules": lambda: GroupVectorQuant(
        8, 32, groups=2, share=False, dim=-1, rotation_trick=True, orthogonal_reg_weight=0.1, codebook_dim=3
    ),
    "residual-rules": lambda: ResidualVectorQuant(
        8, 32, groups=2, share=False, dim=-1, rotation_trick=True, orthogonal_reg_weight=0.1, codebook_dim=4
    ),
    "cvq-rules": lambda: VectorQuantiser(
        32, 8, anchor=None, rotation_trick=True, orthogonal_reg_weight=0.1, codebook_dim=4
    ),
}


def _loss(layer, x):
    out = layer(x)
    z_q, extra = out[0], out[1]
    loss = extra["loss"] if isinstance(extra, dict) else extra
    return (z_q * torch.linspace(-1, 1, z_q.numel()).view_as(z_q)).sum() + loss


def _input(name):
    g = torch.Generator().manual_seed(0)
    if name in ("vq-cosine-norms", "cvq-eval", "cvq-rules"):
        return torch.randn(4, 8, 3, 3, generator=g)
    return torch.randn(64, 8, generator=g)


@pytest.mark.parametrize("name", list(LAYERS))
def test_fullgraph_forward_backward_matches_eager(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = LAYERS[name]()
    torch.manual_seed(0)
    compiled = LAYERS[name]()
    x = _input(name)
    le = _loss(eager, x)
    lc = torch.compile(lambda x: _loss(compiled, x), fullgraph=True)(x)
    le.backward()
    lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        if pe.grad is not None or pc.grad is not None:
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_updates_break_the_graph_only_at_the_updates():
    """k-means init, LRU and CVQ anchors on: the compiled step equals the eager one, and every graph break is one of
    the eager update methods."""

    def make():
        torch.manual_seed(0)
        return VectorQuant(8, 16, dim=-1, kmeans_init=True, kmeans_iters=2, replace_freq=2, anchor="closest")

    eager, compiled = make(), make()
    step = torch.compile(lambda x: _loss(compiled, x))
    for i in range(3):
        x = torch.randn(40, 8, generator=torch.Generator().manual_seed(i))
        torch.manual_seed(10 + i)
        _loss(eager, x).backward()
        torch.manual_seed(10 + i)
        step(x).backward()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda x: _loss(make(), x))(torch.randn(40, 8))
    assert explain.graph_break_count >= 1
    for reason in explain.break_reasons:  # each break is a call into an eager (compiler.disable) update
        assert "disable" in reason.reason, reason


@pytest.mark.parametrize("kind", ["vq", "group-separate"])
def test_ema_expiry_and_sampling_break_the_graph_only_at_the_updates(kind):
    """EMA update, expiry by EMA size and stochastic sampling on: the compiled steps equal the eager ones (the same
    draws: the seed comes from torch's generator in both), and every graph break is an eager (compiler.disable)
    call: the update after the forward and the draw of the codes."""
    opts = dict(
        ema_update=True, decay=0.9, threshold_ema_dead_code=1.0, stochastic_sample_codes=True, sample_codebook_temp=0.5
    )

    def make():
        torch.manual_seed(0)
        if kind == "vq":
            return VectorQuant(8, 16, dim=-1, **opts)
        return GroupVectorQuant(8, 16, groups=2, share=False, dim=-1, **opts)

    eager, compiled = make(), make()
    step = torch.compile(lambda x: _loss(compiled, x))
    for i in range(3):
        x = torch.randn(40, 8, generator=torch.Generator().manual_seed(i))
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)  # (the codebook takes no gradient)
        torch.manual_seed(10 + i)
        _loss(eager, xe).backward()
        torch.manual_seed(10 + i)
        step(xc).backward()
        torch.testing.assert_close(xc.grad, xe.grad)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch._dynamo.reset()
    fresh = make()
    explain = torch._dynamo.explain(lambda x: _loss(fresh, x))(torch.randn(40, 8))
    assert explain.graph_break_count >= 2
    for reason in explain.break_reasons:
        assert "disable" in reason.reason, reason


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_searches_in_low_precision_and_keeps_losses_fp32(dtype, monkeypatch):
    seen = []
    original = vqkernels.ops.quantize

    def spy(x, codebook, **kw):
        seen.append((x.dtype, codebook.dtype))
        return original(x, codebook, **kw)

    monkeypatch.setattr("vqkernels.nn.base.ops.quantize", spy)
    torch.manual_seed(0)
    enc = torch.nn.Linear(8, 8)
    vq = VectorQuant(8, 32, dim=-1, affine_lr=1.0)
    with torch.autocast("cpu", dtype=dtype):
        z_q, out = vq(enc(torch.randn(50, 8)))
    assert seen and all(s == (dtype, dtype) for s in seen)
    assert out["loss"].dtype == torch.float32 and z_q.dtype == dtype
    (z_q.float().sum() + out["loss"]).backward()
    assert vq.codebook.weight.grad.dtype == torch.float32 and enc.weight.grad is not None

"""sample_code: Gumbel-max sampling (CVQ-VAE's "probrandom" anchors, Zheng & Vedaldi 2023 §3.2) on every backend
and device. The draws follow ``P(i) ~ exp(-d(x_i, c_k))``, a seed gives the same draws on every backend (one
counter-based noise stream, :func:`vqkernels.numerics.gumbel_noise`), the kernels' argmin of ``d - g`` equals an
fp64 brute force over that noise, and the op passes opcheck and compiles."""

import pytest
import torch
from helpers import (
    BACKEND_DEVICES,
    METRICS,
    brute_distances,
    make_inputs,
    op_of,
    opcheck_utils,
    skip_compile_if_interpreted,
)

import vqkernels as vq
from vqkernels.numerics import gumbel_noise, seed_to_schema, split_seed

SEEDS = [0, 1, 0xFFFFFFFF, 0xFFFFFFFF << 32, (1 << 64) - 1]  # ints a compiler could specialise, and the extremes


def _brute_sample(x: torch.Tensor, cb: torch.Tensor, metric: str, seed: int) -> torch.Tensor:
    """fp64 ``argmin_i (d(x_i, c_k) - g(seed, k, i))`` over the whole grid (small inputs only)."""
    d = brute_distances(cb.cpu(), x.cpu(), metric)  # [K, N], codes major
    noise = gumbel_noise(split_seed(seed), torch.arange(x.shape[0]), torch.arange(cb.shape[0]), torch.float64)
    return (d - noise).argmin(1)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_equals_the_fp64_brute_force_over_the_same_noise(bd, metric, dtype):
    backend, dev = bd
    x, cb = make_inputs(301, 37, 9, dtype, seed=4, device=dev)
    for seed in SEEDS:
        got = vq.sample_code(x, cb, metric=metric, seed=seed, backend=backend)
        assert got.dtype == torch.int64 and got.shape == (37,) and got.device.type == dev
        want = _brute_sample(x, cb, metric, seed)
        assert (got.cpu() == want).float().mean() >= 0.97, (seed, got, want)  # rounding may flip a near-tie


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_same_seed_same_draws_as_the_reference(bd, metric):
    backend, dev = bd
    x, cb = make_inputs(1000, 300, 16, torch.float32, seed=5, device=dev)
    got = vq.sample_code(x, cb, metric=metric, seed=123, backend=backend)
    ref = vq.sample_code(x.cpu(), cb.cpu(), metric=metric, seed=123, backend="torch")
    assert (got.cpu() == ref).float().mean() >= 0.97
    assert torch.equal(got, vq.sample_code(x, cb, metric=metric, seed=123, backend=backend))  # reproducible
    assert not torch.equal(got, vq.sample_code(x, cb, metric=metric, seed=124, backend=backend))


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_draws_follow_the_softmax(bd, metric):
    """One code, 5 rows: the row frequencies over 3000 copies of the code (independent noise per code index) match
    ``softmax_i(-d(x_i, c))`` (chi-square, 4 degrees of freedom, p = 0.001)."""
    backend, dev = bd
    x = torch.tensor([[0.0, 1.0], [0.4, 0.9], [1.0, 0.2], [-0.5, 0.5], [0.7, -0.7]])
    c = torch.tensor([[0.3, 0.8]])
    p = torch.softmax(-brute_distances(c, x, metric)[0], 0)
    draws = 3000
    rows = vq.sample_code(x.to(dev), c.expand(draws, 2).contiguous().to(dev), metric=metric, seed=11, backend=backend)
    hits = torch.bincount(rows.cpu(), minlength=5).double()
    chi2 = float(((hits - draws * p) ** 2 / (draws * p)).sum())
    assert chi2 < 18.47, (hits, draws * p)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_one_row_one_code_and_non_contiguous_inputs(bd):
    backend, dev = bd
    x, cb = make_inputs(1, 7, 3, torch.float64, device=dev)
    assert torch.equal(vq.sample_code(x, cb, seed=1, backend=backend).cpu(), torch.zeros(7, dtype=torch.int64))
    x, cb = make_inputs(400, 1, 5, torch.float32, device=dev)
    assert int(vq.sample_code(x, cb, seed=2, backend=backend)) == int(_brute_sample(x, cb, "l2", 2))
    # column-major codebook, rows of a wider tensor: the same draws as contiguous copies
    wide = torch.randn(500, 20, generator=torch.Generator().manual_seed(3)).to(dev)
    xs, cbs = wide[:, 3:11], wide[:60, 2:10].T.contiguous().T
    got = vq.sample_code(xs, cbs, metric="cosine", seed=9, backend=backend)
    assert torch.equal(got, vq.sample_code(xs.contiguous(), cbs.contiguous(), metric="cosine", seed=9, backend=backend))


def test_seed_none_draws_from_the_default_generator():
    x, cb = make_inputs(200, 30, 4, torch.float32)
    torch.manual_seed(7)
    a = vq.sample_code(x, cb)
    torch.manual_seed(7)
    assert torch.equal(a, vq.sample_code(x, cb))


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_opcheck(bd):
    backend, dev = bd
    x, cb = make_inputs(33, 20, 9, torch.float32, device=dev)
    for metric in METRICS:
        for seed in (0, (1 << 64) - 1):
            torch.library.opcheck(
                op_of(backend, "sample_code"), (x, cb, metric, seed_to_schema(seed)), test_utils=opcheck_utils(backend)
            )


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_torch_compile_fullgraph(bd):
    backend, dev = bd
    skip_compile_if_interpreted(backend)
    torch._dynamo.reset()
    x, cb = make_inputs(300, 40, 8, torch.float32, device=dev)

    def f(x, cb):
        return vq.sample_code(x, cb, metric="l2", seed=5, backend=backend)

    assert torch.equal(torch.compile(f, fullgraph=True)(x, cb), f(x, cb))

"""The C++/CUDA backend (csrc/cuda): the foundation checks on a GPU, split-K, exact mode, collapse, opcheck,
compile, and agreement with the independently written Triton backend. Skipped without a GPU and a CUDA build
of the extension (`make test` still compiles every .cu file with nvcc: the `cuda-check` target).
"""

import pytest
import torch
from helpers import METRICS, brute_distances, check_search, make_inputs

import vqkernels as vq
from vqkernels.dispatch import BACKENDS

_why = BACKENDS["cuda"].why_not()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=f"cuda backend: {_why}")]

SHAPES = [(1, 1, 1), (7, 3, 64), (1000, 5000, 64), (4099, 1000, 257), (1, 100_000, 20), (300, 1000, 70)]
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _inputs(n, k, d, dtype, seed=0):
    x, cb = make_inputs(n, k, d, dtype, seed=seed)
    return x.cuda(), cb.cuda()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_matches_fp64(shape, dtype, metric):
    x, cb = _inputs(*shape, dtype)
    q = vq.quantize(x, cb, metric=metric, backend="cuda")
    check_search(x.cpu(), cb.cpu(), metric, q.codes.cpu(), q.dist.cpu(), exact=False)
    assert torch.equal(q.z_q, cb[q.codes]) and torch.equal(q.counts, torch.bincount(q.codes, minlength=shape[1]))
    codes, dist = vq.nearest_code(x, cb, metric=metric, exact=True, backend="cuda")
    check_search(x.cpu(), cb.cpu(), metric, codes.cpu(), dist.cpu(), exact=True)


@pytest.mark.parametrize("metric", METRICS)
def test_split_k_equals_single_pass(metric, monkeypatch):
    x, cb = _inputs(50, 3000, 24, torch.float32)
    monkeypatch.setenv("VQK_CUDA_SPLIT", "1")
    one = vq.quantize(x, cb, metric=metric, backend="cuda")
    monkeypatch.setenv("VQK_CUDA_SPLIT", "7")
    many = vq.quantize(x, cb, metric=metric, backend="cuda")
    assert torch.equal(one.codes, many.codes) and torch.equal(one.dist, many.dist)


def test_ties_and_exact_near_ties():
    cb = torch.zeros(300, 4, device="cuda")
    codes, _ = vq.nearest_code(torch.randn(20, 4, device="cuda"), cb, backend="cuda")
    assert bool((codes == 0).all())
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 16, generator=g, dtype=torch.float64)
    cbn = torch.cat([base + 1e-7 * torch.randn(6, 16, generator=g, dtype=torch.float64),
                     torch.randn(200, 16, generator=g, dtype=torch.float64)]).float()
    x = (base + 1e-3 * torch.randn(40, 16, generator=g, dtype=torch.float64)).float()
    codes, _ = vq.nearest_code(x.cuda(), cbn.cuda(), exact=True, backend="cuda")
    assert torch.equal(codes.cpu(), brute_distances(x, cbn, "l2", direct=True).argmin(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_code_stats_uniform_and_collapse(dtype):
    x = torch.randn(5000, 33, dtype=torch.float64).to(dtype)
    for codes in (torch.randint(0, 100, (5000,)), torch.full((5000,), 42)):
        sums, counts = vq.code_stats(x.cuda(), codes.cuda(), 100, backend="cuda")
        ref_s, ref_c = vq.code_stats(x, codes, 100, backend="torch")
        assert torch.equal(counts.cpu(), ref_c)
        torch.testing.assert_close(sums.cpu().double(), ref_s.double(), rtol=1e-5, atol=1e-3)


def test_agrees_with_triton():
    if BACKENDS["triton"].why_not() is not None:
        pytest.skip("triton backend unavailable")
    x, cb = _inputs(20000, 4096, 64, torch.bfloat16)
    a = vq.nearest_code(x, cb, exact=True, backend="cuda")
    b = vq.nearest_code(x, cb, exact=True, backend="triton")
    assert torch.equal(a[0], b[0])  # exact mode: both must equal the fp64 argmin


def test_opcheck_and_compile():
    from vqkernels.ops import _OPS

    x, cb = _inputs(33, 70, 9, torch.float32)
    torch.library.opcheck(_OPS["cuda"][0], (x, cb, "l2", False))
    torch.library.opcheck(_OPS["cuda"][1], (x, cb, "cosine", False))
    torch.library.opcheck(_OPS["cuda"][2], (x, torch.randint(0, 9, (33,), device="cuda"), 9))
    torch._dynamo.reset()
    f = torch.compile(lambda x, cb: vq.quantize(x, cb, backend="cuda").z_q.sum(), fullgraph=True)
    torch.testing.assert_close(f(x, cb), vq.quantize(x, cb, backend="cuda").z_q.sum())

"""code_stats: per-code sums and counts against an fp64 index_add."""

import pytest
import torch
from helpers import BACKEND_DEVICES, DTYPES, op_of, opcheck_utils, skip_compile_if_interpreted

import vqkernels as vq


def _expected(x, codes, k):
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, codes, x.double())
    return sums, torch.bincount(codes, minlength=k)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", ["uniform", "zipf", "collapse", "few_rows"])
@pytest.mark.parametrize(
    "shape", [(0, 5, 3), (1, 1, 1), (4099, 1000, 64), (1000, 5000, 257), (7, 3, 3)], ids=lambda s: "x".join(map(str, s))
)
def test_matches_fp64(shape, dist, dtype, bd):
    backend, dev = bd
    n, k, d = shape
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, d, generator=g).to(dtype)
    if dist == "uniform":
        codes = torch.randint(0, k, (n,), generator=g)
    elif dist == "zipf":
        p = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
        codes = torch.multinomial(p, n, replacement=True, generator=g) if n else torch.zeros(0, dtype=torch.int64)
    elif dist == "collapse":
        codes = torch.full((n,), k - 1, dtype=torch.int64)
    else:
        codes = torch.randint(0, min(k, 3), (n,), generator=g)
    sums, counts = vq.code_stats(x.to(dev), codes.to(dev), k, backend=backend)
    assert sums.device.type == counts.device.type == dev
    sums, counts = sums.cpu(), counts.cpu()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert sums.dtype == acc and sums.shape == (k, d) and counts.dtype == torch.int64
    e_sums, e_counts = _expected(x, codes, k)
    assert torch.equal(counts, e_counts)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(sums.double(), e_sums, rtol=tol, atol=tol * max(1, n) ** 0.5 * 4)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_non_contiguous(bd):
    backend, dev = bd
    full = torch.randn(64, 500)
    codes = torch.randint(0, 7, (64,))
    x = full[:, ::5]
    sums, counts = vq.code_stats(full.to(dev)[:, ::5], codes.to(dev), 7, backend=backend)
    sums, counts = sums.cpu(), counts.cpu()
    e_sums, e_counts = _expected(x, codes, 7)
    torch.testing.assert_close(sums.double(), e_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, e_counts)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", [-1, 7, 1000])
def test_out_of_range_codes(bd, bad):
    backend, dev = bd
    x = torch.randn(10, 3, device=dev)
    codes = torch.zeros(10, dtype=torch.int64)
    codes[4] = bad
    with pytest.raises(ValueError, match="codes"):
        vq.code_stats(x, codes.to(dev), 7, backend=backend)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_opcheck(bd):
    backend, dev = bd

    x = torch.randn(50, 6, device=dev)
    codes = torch.randint(0, 9, (50,), device=dev)
    torch.library.opcheck(op_of(backend, "code_stats"), (x, codes, 9), test_utils=opcheck_utils(backend))
    torch.library.opcheck(op_of(backend, "code_stats"), (x[:0], codes[:0], 9), test_utils=opcheck_utils(backend))


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_torch_compile_fullgraph(bd):
    backend, dev = bd
    skip_compile_if_interpreted(backend)
    torch._dynamo.reset()
    x = torch.randn(100, 4, device=dev)
    codes = torch.randint(0, 5, (100,), device=dev)
    f = torch.compile(lambda x, c: vq.code_stats(x + 1, c, 5, backend=backend), fullgraph=True)
    s1, c1 = f(x, codes)
    s2, c2 = vq.code_stats(x + 1, codes, 5, backend=backend)
    torch.testing.assert_close(s1, s2)
    assert torch.equal(c1, c2)

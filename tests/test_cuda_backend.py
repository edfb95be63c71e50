"""What is specific to the C++/CUDA backend (csrc/cuda): split-K and its clamp, the aligned (cp.async) and plain
load paths, and agreement with the independently written Triton backend. The backend-generic suites
(test_nearest_code.py, test_quantize.py, test_code_stats.py, test_validation.py, test_sample_code.py) run it on CUDA
tensors with every other case. Skipped without a GPU and a CUDA build of the extension (`make test` still compiles
every .cu file with nvcc, and `make cuda-ext-check` builds and loads the extension against a CUDA torch).
"""

import pytest
import torch
from helpers import METRICS, brute_distances, check_search, make_inputs

import vqkernels as vq
from vqkernels.dispatch import BACKENDS

_why = BACKENDS["cuda"].why_not("cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=f"cuda backend: {_why}")]

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _inputs(n, k, d, dtype, seed=0):
    x, cb = make_inputs(n, k, d, dtype, seed=seed)
    return x.cuda(), cb.cuda()


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
    cbn = torch.cat(
        [
            base + 1e-7 * torch.randn(6, 16, generator=g, dtype=torch.float64),
            torch.randn(200, 16, generator=g, dtype=torch.float64),
        ]
    ).float()
    x = (base + 1e-3 * torch.randn(40, 16, generator=g, dtype=torch.float64)).float()
    codes, _ = vq.nearest_code(x.cuda(), cbn.cuda(), exact=True, backend="cuda")
    assert torch.equal(codes.cpu(), brute_distances(x, cbn, "l2", direct=True).argmin(1))


def test_agrees_with_triton():
    if BACKENDS["triton"].why_not("cuda") is not None:
        pytest.skip("triton backend unavailable")
    x, cb = _inputs(20000, 4096, 64, torch.bfloat16)
    a = vq.nearest_code(x, cb, exact=True, backend="cuda")
    b = vq.nearest_code(x, cb, exact=True, backend="triton")
    assert torch.equal(a[0], b[0])  # exact mode: both must equal the fp64 argmin


@pytest.mark.parametrize("splits", ["100000", "70000"])
def test_split_count_is_clamped_to_the_grid_limit(splits, monkeypatch):
    """VQK_CUDA_SPLIT past 65535 (grid.y's limit) or past the number of code blocks is clamped, not launched."""
    x, cb = _inputs(3, 5000, 16, torch.float32)
    monkeypatch.setenv("VQK_CUDA_SPLIT", splits)
    codes, dist = vq.nearest_code(x, cb, backend="cuda")
    check_search(x.cpu(), cb.cpu(), "l2", codes.cpu(), dist.cpu(), exact=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aligned_and_unaligned_rows(dtype):
    """The cp.async path (16-byte aligned rows) and the plain-load path (rows of a wider tensor, odd offsets) give
    the same codes."""
    x, cb = _inputs(700, 900, 64, dtype)
    wide = torch.cat([x, x], 1)[:, 1:65]
    a = vq.quantize(x, cb, backend="cuda")
    b = vq.quantize(wide, cb, backend="cuda")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.z_q, b.z_q) and torch.equal(a.counts, b.counts)
    check_search(x.cpu(), cb.cpu(), "l2", a.codes.cpu(), a.dist.cpu(), exact=False)

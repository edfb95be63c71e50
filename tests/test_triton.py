"""Triton backend specifics: split-K, exact mode's candidate list and re-scan, odd shapes, sample_code's kernel,
code_stats under collapse, and (on a GPU) bf16 tensor cores and torch.compile.

Without a GPU the kernels run on CPU tensors in triton's interpreter (conftest.py sets TRITON_INTERPRET=1); the
backend-generic suites (test_nearest_code.py, test_quantize.py, test_code_stats.py) run the rest of the matrix.
"""

import pytest
import torch
from helpers import METRICS, brute_distances, check_search, make_inputs, op_of

import vqkernels as vq
from vqkernels.dispatch import BACKENDS
from vqkernels.numerics import gumbel_noise, join_seed, seed_to_schema
from vqkernels.testing import same_precision_codes

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_why = BACKENDS["triton"].why_not(DEV)
pytestmark = pytest.mark.skipif(_why is not None, reason=f"triton backend: {_why}")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(n, k, d, dtype=torch.float32, seed=0):
    x, cb = make_inputs(n, k, d, dtype, seed=seed)
    return x.to(DEV), cb.to(DEV)


@pytest.fixture
def splits_used(monkeypatch):
    """The split counts the launcher ran with (it may clamp what VQK_TRITON_SPLIT asks for)."""
    from vqkernels.triton import ops

    seen = []
    original = ops._search_partials

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[2])
        return out

    monkeypatch.setattr(ops, "_search_partials", spy)
    return seen


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exact", [False, True])
def test_split_k_equals_single_pass(metric, exact, monkeypatch, splits_used):
    x, cb = _inputs(50, 6000, 24)
    monkeypatch.setenv("VQK_TRITON_SPLIT", "1")
    one = vq.quantize(x, cb, metric=metric, exact=exact, backend="triton")
    for splits in ("3", "16"):
        monkeypatch.setenv("VQK_TRITON_SPLIT", splits)
        many = vq.quantize(x, cb, metric=metric, exact=exact, backend="triton")
        assert torch.equal(one.codes, many.codes) and torch.equal(one.dist, many.dist)
        assert torch.equal(one.counts, many.counts) and torch.equal(one.z_q, many.z_q)
    assert splits_used[0] == 1 and min(splits_used[1:]) >= 3, splits_used


def test_split_k_ties_go_to_the_lowest_index(monkeypatch, splits_used):
    cb = torch.zeros(3000, 4, device=DEV)  # every code is the same: code 0 must win in every split layout
    x = torch.randn(20, 4, device=DEV)
    for splits in ("1", "2", "5"):
        monkeypatch.setenv("VQK_TRITON_SPLIT", splits)
        for exact in (False, True):
            codes, _ = vq.nearest_code(x, cb, exact=exact, backend="triton")
            assert bool((codes == 0).all())
    assert max(splits_used) >= 2, splits_used


def test_one_row_and_a_codebook_not_a_power_of_two():
    x, cb = _inputs(1, 100_000, 20)
    codes, dist = vq.nearest_code(x, cb, backend="triton")
    check_search(x.cpu(), cb.cpu(), "l2", codes.cpu(), dist.cpu(), exact=False)


@pytest.mark.parametrize("candidates", ["1", "2", "4"])
@pytest.mark.parametrize("metric", METRICS)
def test_exact_mode_candidates_and_full_rescan(candidates, metric, monkeypatch):
    """Codes 1e-7 apart (below fp32 resolution): with few candidates kept, rows overflow into the fp64 re-scan."""
    monkeypatch.setenv("VQK_TRITON_EXACT_CANDIDATES", candidates)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 16, generator=g, dtype=torch.float64)
    cb = torch.cat(
        [
            base + 1e-7 * torch.randn(6, 16, generator=g, dtype=torch.float64),
            torch.randn(200, 16, generator=g, dtype=torch.float64),
        ]
    )
    cb = cb[torch.randperm(cb.shape[0], generator=g)].float()
    x = (base + 1e-3 * torch.randn(40, 16, generator=g, dtype=torch.float64)).float()
    codes, dist = vq.nearest_code(x.to(DEV), cb.to(DEV), metric=metric, exact=True, backend="triton")
    d64 = brute_distances(x, cb, metric, direct=True)
    assert torch.equal(codes.cpu(), d64.argmin(1))
    torch.testing.assert_close(dist.cpu().double(), d64.min(1).values, rtol=1e-6, atol=1e-7)


def test_code_stats_full_collapse_and_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(3000, 40, dtype=torch.float64).to(dtype)
        codes = torch.full((3000,), 7, dtype=torch.int64)
        sums, counts = vq.code_stats(x.to(DEV), codes.to(DEV), 9, backend="triton")
        assert counts.cpu().tolist() == [0] * 7 + [3000, 0]
        torch.testing.assert_close(sums.cpu()[7].double(), x.double().sum(0), rtol=1e-5, atol=1e-4)
        assert bool((sums.cpu()[torch.arange(9) != 7] == 0).all())


# ---------------------------------------------------------------------------------------------------------------
# sample_code (Gumbel-max in the search epilogue)
# ---------------------------------------------------------------------------------------------------------------
def test_sampling_split_k_is_chunk_invariant(monkeypatch, splits_used):
    x, cb = _inputs(5000, 12, 6, seed=6)  # the input rows are the streamed side of the sampling search
    monkeypatch.setenv("VQK_TRITON_SPLIT", "1")
    one = vq.sample_code(x, cb, seed=1, backend="triton")
    monkeypatch.setenv("VQK_TRITON_SPLIT", "4")
    four = vq.sample_code(x, cb, seed=1, backend="triton")
    assert torch.equal(one, four)
    assert splits_used[0] == 1 and splits_used[1] >= 2, splits_used


@pytest.mark.parametrize("seed", [0, 1, 0xFFFFFFFF])
@pytest.mark.parametrize("metric", METRICS)
def test_sampling_kernel_seeds_equal_to_one_and_extremes(seed, metric):
    """The kernel's argmin of d - g equals the brute force over the reference noise for seeds 0, 1 (an int that
    compiled triton would specialise into a constant) and 2^32 - 1."""
    x, cb = _inputs(60, 9, 5, seed=7)
    got = op_of("triton", "sample_code")(x, cb, metric, seed_to_schema(join_seed(seed, seed))).cpu()
    d = brute_distances(cb.cpu(), x.cpu(), metric)  # [K, N], codes major
    noise = gumbel_noise((seed, seed), torch.arange(60), torch.arange(9), torch.float64)
    want = (d - noise).argmin(1)
    assert (got == want).float().mean() >= 0.9, (got, want)  # fp32 rounding may flip a near-tie


# ---------------------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_gpu_tensor_cores_precision_rule(dtype, metric):
    x, cb = _inputs(4099, 5000, 72, dtype)
    q = vq.quantize(x, cb, metric=metric, backend="triton")
    check_search(x.cpu(), cb.cpu(), metric, q.codes.cpu(), q.dist.cpu(), exact=False)
    assert torch.equal(q.counts, torch.bincount(q.codes, minlength=5000)) and torch.equal(q.z_q, cb[q.codes])
    e = vq.quantize(x, cb, metric=metric, exact=True, backend="triton")
    check_search(x.cpu(), cb.cpu(), metric, e.codes.cpu(), e.dist.cpu(), exact=True)


@gpu
@pytest.mark.gpu
def test_gpu_compile_fullgraph_with_backward():
    torch._dynamo.reset()
    x, cb = _inputs(2000, 300, 64, torch.bfloat16)

    def f(x, cb):
        q = vq.quantize(x, cb, backend="triton")
        return ((q.z_q.float() - x.float()) ** 2).mean(), q.counts

    cb1, cb2 = cb.clone().requires_grad_(True), cb.clone().requires_grad_(True)
    l1, c1 = torch.compile(f, fullgraph=True)(x, cb1)
    l2, c2 = f(x, cb2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    assert torch.equal(c1, c2)
    torch.testing.assert_close(cb1.grad.float(), cb2.grad.float(), rtol=1e-2, atol=1e-3)


@gpu
@pytest.mark.gpu
def test_gpu_large_codebook_memory():
    """1M codes: extra memory stays far below N x K (64 GiB of fp32 here), and the codes obey the precision rule."""
    x, cb = _inputs(65536, 1 << 20, 64, torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    codes, dist = vq.nearest_code(x, cb, backend="triton")
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 1 << 30, f"{extra / 2**20:.0f} MiB"
    assert codes.shape == (65536,) and int(codes.min()) >= 0 and int(codes.max()) < cb.shape[0]
    rows = torch.randperm(65536, device="cuda")[:64]
    d64 = brute_distances(x[rows], cb, "l2")  # on the GPU: 64 x 1M fp64
    regret = d64.gather(1, codes[rows, None]).squeeze(1) - d64.min(1).values
    ref = same_precision_codes(x[rows], cb, "l2")
    ref_regret = d64.gather(1, ref[:, None]).squeeze(1) - d64.min(1).values
    assert float(regret.max()) <= 2 * float(ref_regret.max()) + 1e-3


def test_launcher_guards_and_twin_choice():
    """Rows and codes beyond the kernels' int32 indices are refused by name; the aligned twin is taken only when
    every int is a multiple of 16 and every pointer 16-byte aligned."""
    from vqkernels.triton import ops

    with pytest.raises(ValueError, match="fewer than 2\\^31"):
        ops._check_extent(2**31, 5)
    with pytest.raises(ValueError, match="fewer than 2\\^31"):
        ops._check_extent(5, 2**31 - 1)
    x = torch.zeros(4, 32)
    assert ops._aligned((32, 32), (x,))
    assert not ops._aligned((33, 32), (x,))
    assert not ops._aligned((32,), (torch.zeros(4, 40)[:, 1:33],))  # a view 4 bytes past an aligned start

"""Triton backend specifics: split-K, exact mode's candidate list and re-scan, odd shapes, sample_code's kernel,
code_stats under collapse, the batched form (a leading group axis in one launch per kernel), and (on a GPU) bf16
tensor cores and torch.compile.

Without a GPU the kernels run on CPU tensors in triton's interpreter (conftest.py sets TRITON_INTERPRET=1); the
backend-generic suites (test_nearest_code.py, test_quantize.py, test_code_stats.py) run the rest of the matrix.
"""

import pytest
import torch
from helpers import DTYPES, METRICS, brute_distances, check_search, make_inputs, op_of, opcheck_utils

import vqkernels as vq
from vqkernels import reference
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
# The batched form: x [G, N, D], codebook [G, K, D], group g against its own codebook, one launch per kernel.
# Under the interpreter every launch costs a fixed ~0.1 s whatever the shape: few launches, small shapes.
# ---------------------------------------------------------------------------------------------------------------
def _heads(n, g, d, dtype=torch.float32, seed=0):
    """``[G, N, D]`` as the layers split heads: a transposed view of ``[N, G, D]`` (group stride D, row stride
    G D), not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g, d, generator=gen, dtype=torch.float64).to(dtype).to(DEV)
    return x.transpose(0, 1)


def _codebooks(g, k, d, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(g, k, d, generator=gen, dtype=torch.float64).to(dtype).to(DEV)


def _check_groups(x, cb, metric, q, exact):
    """Every group of a batched quantize against its own codebook: the oracle (exact: the fp64 argmin), z_q and
    the histogram from that codebook, and the codes of the per-group reference."""
    g, n, d = x.shape
    k = cb.shape[1]
    assert q.codes.shape == (g, n) and q.z_q.shape == (g, n, d) and q.dist.shape == (g, n) and q.counts.shape == (g, k)
    assert q.z_q.dtype == cb.dtype and q.codes.dtype == q.counts.dtype == torch.int64
    for i in range(g):
        check_search(x[i].cpu(), cb[i].cpu(), metric, q.codes[i].cpu(), q.dist[i].cpu(), exact=exact)
        assert torch.equal(q.z_q[i], cb[i][q.codes[i]])
        assert torch.equal(q.counts[i], torch.bincount(q.codes[i], minlength=k))
    ref = reference.quantize(x.cpu(), cb.cpu(), metric, exact)[0]
    assert (q.codes.cpu() != ref).float().mean() <= (0 if exact else 0.05)  # fast mode: near-ties may differ


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_batched_quantize_is_the_per_group_search(metric, dtype):
    """Head-split rows (read in place, D = 20: no aligned tile) against per-group codebooks, every metric and
    dtype; exact mode once per dtype (each metric's re-score: the re-scan test below)."""
    g, n, k, d = 3, 30, 40, 20
    x, cb = _heads(n, g, d, dtype), _codebooks(g, k, d, dtype)
    assert not x.is_contiguous()
    _check_groups(x, cb, metric, vq.quantize(x, cb, metric=metric, backend="triton"), exact=False)
    if metric == METRICS[DTYPES.index(dtype) % len(METRICS)]:
        _check_groups(x, cb, metric, vq.quantize(x, cb, metric=metric, exact=True, backend="triton"), exact=True)


def test_batched_launch_equals_the_2d_op_per_group():
    """One batched launch reproduces the 2-D op on each group bit for bit (fast and exact), and one group is the
    2-D form (all four ops)."""
    x, cb = _heads(33, 2, 16, seed=2), _codebooks(2, 50, 16, seed=3)
    for metric, exact in (("cosine", False), ("l2", True)):
        q = vq.quantize(x, cb, metric=metric, exact=exact, backend="triton")
        for i in range(2):
            q2 = vq.quantize(x[i], cb[i], metric=metric, exact=exact, backend="triton")
            for a, b in zip(q, q2):
                assert torch.equal(a[i], b)
    x1, cb1 = x[1:], cb[1:]  # G = 1
    for a, b in zip(
        vq.nearest_code(x1, cb1, metric="dot", exact=True, backend="triton"),
        vq.nearest_code(x1[0], cb1[0], metric="dot", exact=True, backend="triton"),
    ):
        assert torch.equal(a, b[None])
    assert torch.equal(
        vq.sample_code(x1, cb1, seed=5, backend="triton"), vq.sample_code(x1[0], cb1[0], seed=5, backend="triton")[None]
    )
    codes = torch.randint(0, 50, (1, 33), generator=torch.Generator().manual_seed(4)).to(DEV)
    for a, b in zip(
        vq.code_stats(x1, codes, 50, backend="triton"), vq.code_stats(x1[0], codes[0], 50, backend="triton")
    ):
        assert torch.equal(a, b[None])


def test_batched_groups_search_only_their_own_codebook():
    """Group g's rows sit next to codebook g's codes, far from every other group's: any read of another group's
    codebook, key terms or rows shows as a wrong code."""
    g, n, k, d = 4, 30, 17, 8
    gen = torch.Generator().manual_seed(2)
    centres = 100.0 * torch.arange(g, dtype=torch.float64)[:, None, None]  # group g lives around 100 g
    cb = (centres + torch.randn(g, k, d, generator=gen, dtype=torch.float64)).float()
    pick = torch.randint(0, k, (g, n), generator=gen)
    x = cb.gather(1, pick[..., None].expand(g, n, d)) + 1e-3 * torch.randn(g, n, d, generator=gen).float()
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # head-split layout
    for exact in (False, True):
        q = vq.quantize(x.to(DEV), cb.to(DEV), exact=exact, backend="triton")
        assert torch.equal(q.codes.cpu(), pick)
        assert torch.equal(q.counts.cpu(), torch.stack([torch.bincount(p, minlength=k) for p in pick]))


def test_batched_ties_go_to_the_lowest_index_within_the_group(monkeypatch, splits_used):
    """Every group's codebook repeats its own 3 codes over two code blocks (the interpreter's block is 1024 codes)
    and, with 2 splits, over two splits: each row gets the lowest index of its nearest pattern, below 3."""
    g, n, k, d = 3, 16, 1032, 4
    base = _codebooks(g, 3, d, seed=5)
    cb = base.repeat(1, k // 3, 1)
    x = _heads(n, g, d, seed=6)
    want = torch.stack([brute_distances(x[i].cpu(), base[i].cpu(), "l2", direct=True).argmin(1) for i in range(g)])
    for splits, exact in (("1", False), ("2", False), ("2", True)):
        monkeypatch.setenv("VQK_TRITON_SPLIT", splits)
        codes, _ = vq.nearest_code(x, cb, exact=exact, backend="triton")
        assert torch.equal(codes.cpu(), want), (splits, exact)
    assert splits_used == [1, 2, 2], splits_used


def test_batched_split_k_equals_single_pass(monkeypatch, splits_used):
    g, n, k, d = 2, 20, 1100, 12
    x, cb = _heads(n, g, d, seed=7), _codebooks(g, k, d, seed=8)
    for metric, exact in (("l2", False), ("cosine", True)):
        monkeypatch.setenv("VQK_TRITON_SPLIT", "1")
        one = vq.quantize(x, cb, metric=metric, exact=exact, backend="triton")
        monkeypatch.setenv("VQK_TRITON_SPLIT", "2")
        two = vq.quantize(x, cb, metric=metric, exact=exact, backend="triton")
        for a, b in zip(one, two):
            assert torch.equal(a, b)
    assert splits_used == [1, 2, 1, 2], splits_used


@pytest.mark.parametrize("metric", METRICS)
def test_batched_exact_mode_and_rescan_equal_the_fp64_brute_force(metric, monkeypatch):
    """Each group holds 6 codes 1e-7 apart (below fp32 resolution) at its own places, its rows near them: with one
    candidate kept every row of every group overflows into the fp64 re-scan, which must read its own group."""
    monkeypatch.setenv("VQK_TRITON_EXACT_CANDIDATES", "1")
    g, n, k, d = 3, 6, 150, 16
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(g, 1, d, generator=gen, dtype=torch.float64)
    cb = torch.randn(g, k, d, generator=gen, dtype=torch.float64)
    for i in range(g):
        near = torch.randperm(k, generator=gen)[:6]
        cb[i, near] = base[i] + 1e-7 * torch.randn(6, d, generator=gen, dtype=torch.float64)
    x = (base + 1e-3 * torch.randn(g, n, d, generator=gen, dtype=torch.float64)).float()
    x = x.transpose(0, 1).contiguous().transpose(0, 1)
    cb = cb.float()
    codes, dist = vq.nearest_code(x.to(DEV), cb.to(DEV), metric=metric, exact=True, backend="triton")
    for i in range(g):
        d64 = brute_distances(x[i], cb[i], metric, direct=True)
        assert torch.equal(codes[i].cpu(), d64.argmin(1))
        torch.testing.assert_close(dist[i].cpu().double(), d64.min(1).values, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_batched_code_stats_equals_the_per_group_reference(dtype):
    g, n, k, d = 3, 300, 11, 24
    x = _heads(n, g, d, dtype, seed=10)
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(0, k, (n, g), generator=gen).T.to(DEV)  # a non-contiguous [G, N] view
    codes[1] = 4  # full collapse in one group
    sums, counts = vq.code_stats(x, codes, k, backend="triton")
    want_sums, want_counts = reference.code_stats(x.cpu(), codes.cpu(), k)
    assert sums.shape == (g, k, d) and counts.shape == (g, k)
    assert torch.equal(counts.cpu(), want_counts) and counts[1, 4] == n
    torch.testing.assert_close(sums.cpu(), want_sums, rtol=1e-5, atol=1e-4)


def test_code_stats_reads_strided_codes():
    """A strided codes view (2-D here) is read by its strides, not as if contiguous."""
    x = _inputs(40, 1, 8, seed=25)[0]
    codes = (torch.arange(80) % 5)[::2].to(DEV)
    assert not codes.is_contiguous()
    sums, counts = vq.code_stats(x, codes, 5, backend="triton")
    want_sums, want_counts = reference.code_stats(x.cpu(), codes.cpu().contiguous(), 5)
    assert torch.equal(counts.cpu(), want_counts)
    torch.testing.assert_close(sums.cpu(), want_sums)


@pytest.mark.parametrize("metric", METRICS)
def test_batched_sampling_keys_group_g_code_k_as_g_k_plus_k(metric):
    """Group g's draws equal the fp64 brute force over the noise of codes ``g K + k`` (rows by their index within
    the group), hence the reference's per-group ``code_offset``; group 2 is not keyed as group 0 is; in fp64 the
    draws are the reference's, draw for draw."""
    g, n, k, d = 3, 80, 9, 5
    x, cb = _heads(n, g, d, seed=12), _codebooks(g, k, d, seed=13)
    seed = join_seed(7, 0xFFFFFFFF)
    got = vq.sample_code(x, cb, metric=metric, seed=seed, backend="triton").cpu()
    assert got.shape == (g, k) and got.dtype == torch.int64
    for i in range(g):
        dd = brute_distances(cb[i].cpu(), x[i].cpu(), metric)  # [K, N]
        noise = gumbel_noise((7, 0xFFFFFFFF), torch.arange(n), torch.arange(i * k, (i + 1) * k), torch.float64)
        assert (got[i] == (dd - noise).argmin(1)).float().mean() >= 0.85, i  # fp32 rounding may flip a near-tie
    if metric == "l2":
        unkeyed = op_of("triton", "sample_code")(x[2], cb[2], metric, seed_to_schema(seed)).cpu()  # as group 0
        assert (unkeyed != got[2]).sum() >= 3
        x64, cb64 = x.double(), cb.double()
        got64 = vq.sample_code(x64, cb64, metric=metric, seed=seed, backend="triton").cpu()
        assert torch.equal(got64, vq.sample_code(x64.cpu(), cb64.cpu(), metric=metric, seed=seed, backend="torch"))


def test_batched_sampling_split_k_is_chunk_invariant(monkeypatch, splits_used):
    x, cb = _heads(1100, 2, 6, seed=14), _codebooks(2, 7, 6, seed=15)  # rows are the streamed side: 2 blocks
    monkeypatch.setenv("VQK_TRITON_SPLIT", "1")
    one = vq.sample_code(x, cb, seed=3, backend="triton")
    monkeypatch.setenv("VQK_TRITON_SPLIT", "2")
    two = vq.sample_code(x, cb, seed=3, backend="triton")
    assert torch.equal(one, two)
    assert splits_used == [1, 2], splits_used


def test_batched_views_are_read_in_place():
    """A head split keeps its storage and strides into the launch (no copy); only a feature axis that is not
    unit-stride is made contiguous; one group passes group stride 0 (the 2-D variants). Results do not depend
    on the layout."""
    from vqkernels.triton import ops

    x = _heads(10, 3, 16)
    x3, gs = ops._groups(x)
    assert x3.data_ptr() == x.data_ptr() and x3.stride() == (16, 48, 1) and gs == 16
    assert ops._groups(x[0])[1] == 0 and ops._groups(x[:1])[1] == 0
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # features strided
    assert ops._groups(xt)[0].stride(2) == 1
    cb = _codebooks(3, 40, 16)
    cb_view = torch.cat([cb, cb], dim=2)[:, :, 16:]  # rows of a wider tensor (row stride 32)
    a = vq.quantize(x, cb_view, backend="triton")
    b = vq.quantize(x.contiguous(), cb.contiguous(), backend="triton")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_batched_more_groups_than_one_launch_holds(monkeypatch):
    """Past MAX_GROUPS (grid axis 2) the launchers split the batch; each chunk reads its own groups and keys its
    noise from its first group's index on (a chunk of one group included)."""
    from vqkernels.triton import ops

    x, cb = _heads(12, 3, 8, seed=16), _codebooks(3, 10, 8, seed=17)
    codes = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(18)).to(DEV)
    whole = (
        vq.quantize(x, cb, exact=True, backend="triton"),
        vq.sample_code(x, cb, seed=9, backend="triton"),
        vq.code_stats(x, codes, 10, backend="triton"),
    )
    monkeypatch.setattr(ops, "MAX_GROUPS", 2)  # chunks of 2 and 1 groups
    chunked = (
        vq.quantize(x, cb, exact=True, backend="triton"),
        vq.sample_code(x, cb, seed=9, backend="triton"),
        vq.code_stats(x, codes, 10, backend="triton"),
    )
    for a, b in zip(whole[0] + (whole[1],) + whole[2], chunked[0] + (chunked[1],) + chunked[2]):
        assert torch.equal(a, b)


def test_batched_empty_groups_and_rows():
    d, k = 6, 5
    for g, n in ((0, 4), (0, 0), (3, 0)):
        x, cb = torch.zeros(g, n, d, device=DEV), torch.randn(g, k, d, device=DEV)
        q = vq.quantize(x, cb, exact=True, backend="triton")
        assert q.codes.shape == (g, n) and q.z_q.shape == (g, n, d) and q.dist.shape == (g, n)
        assert q.counts.shape == (g, k) and not bool(q.counts.any())
        codes, dist = vq.nearest_code(x, cb, backend="triton")
        assert codes.shape == (g, n) and dist.shape == (g, n)
        sums, counts = vq.code_stats(x, torch.zeros(g, n, dtype=torch.int64, device=DEV), k, backend="triton")
        assert sums.shape == (g, k, d) and counts.shape == (g, k) and not bool(sums.any()) and not bool(counts.any())
    sample = op_of("triton", "sample_code")
    assert sample(torch.zeros(0, 4, d, device=DEV), torch.zeros(0, k, d, device=DEV), "l2", 0).shape == (0, k)
    with pytest.raises(ValueError, match="at least one row"):
        sample(torch.zeros(2, 0, d, device=DEV), torch.zeros(2, k, d, device=DEV), "l2", 0)


def test_batched_backward_is_the_per_group_code_stats():
    x, cb = _heads(25, 2, 8, seed=19), _codebooks(2, 6, 8, seed=20).requires_grad_(True)
    w = torch.randn(2, 25, 8, generator=torch.Generator().manual_seed(21)).to(DEV)
    q = vq.quantize(x, cb, backend="triton")
    (q.z_q * w).sum().backward()
    want = torch.stack([torch.zeros(6, 8, device=DEV).index_add_(0, q.codes[i], w[i]) for i in range(2)])
    torch.testing.assert_close(cb.grad, want)


def test_batched_opcheck():
    x, cb = _heads(13, 3, 9, seed=22), _codebooks(3, 10, 9, seed=23)
    utils = opcheck_utils("triton")
    torch.library.opcheck(op_of("triton", "nearest_code"), (x, cb, "cosine", True), test_utils=utils)
    torch.library.opcheck(op_of("triton", "sample_code"), (x, cb, "l2", seed_to_schema(3)), test_utils=utils)
    # with a grad-requiring codebook (see test_quantize.py's opcheck for why AOT is left out here)
    torch.library.opcheck(
        op_of("triton", "quantize"),
        (x, cb.clone().requires_grad_(True), "dot", False),
        test_utils=opcheck_utils("triton", ("test_schema", "test_autograd_registration", "test_faketensor")),
    )
    codes = torch.randint(0, 10, (3, 13), generator=torch.Generator().manual_seed(24)).to(DEV)
    torch.library.opcheck(op_of("triton", "code_stats"), (x, codes, 10), test_utils=utils)
    torch.library.opcheck(op_of("triton", "quantize"), (x[:, :0], cb, "l2", False), test_utils=utils)
    torch.library.opcheck(op_of("triton", "code_stats"), (x[:0], codes[:0], 10), test_utils=utils)


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

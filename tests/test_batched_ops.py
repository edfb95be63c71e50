"""The batched form of the four ops (README "Method" §1.6): ``x [G, N, D]`` against ``codebook [G, K, D]``, group g
searching only its own codebook, on every backend that has it, against the per-group 2-D reference and the fp64
oracle: precision rule and exact mode per group, ties to the lowest index within a group, every metric and dtype,
the layers' head-split view and a sliced codebook read in place, G = 1 equal to the 2-D op, G = 0 and N = 0,
``sample_code``'s keying of group g's code k as code ``g * K + k``, ``quantize``'s gradient, opcheck and
``torch.compile``."""

import pytest
import torch
from helpers import (
    BACKEND_DEVICES,
    DTYPES,
    METRICS,
    backend_devices,
    brute_distances,
    check_search,
    op_of,
    opcheck_utils,
    skip_compile_if_interpreted,
)

import vqkernels as vq
from vqkernels import reference
from vqkernels.numerics import gumbel_noise, seed_to_schema, split_seed

BATCHED_BACKENDS = BACKEND_DEVICES
HAS_CPU_OP = ("cpu", "cpu") in backend_devices()

# (G, N, K, D): one row against many codes (few-rows kernels, code splits), many rows (tiles, partial blocks), odd D
SHAPES = [(3, 2, 3000, 16), (3, 100, 900, 33), (2, 700, 64, 8)]


def _head_split(n: int, g: int, d: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    """``x [G, N, D]`` as the layers split heads: ``x.view(N, G, D).transpose(0, 1)`` (row stride G * D, group
    stride D), not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(n, g * d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return flat.view(n, g, d).transpose(0, 1)


def _codebooks(g: int, k: int, d: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    """``[G, K, D]`` with a different scale per group (so that a group searched against another's codebook, or with
    another's norms, answers differently)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 2.0 ** torch.arange(g, dtype=torch.float64)[:, None, None]
    return (torch.randn(g, k, d, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _inputs(shape, dtype, seed=0, device="cpu"):
    g, n, k, d = shape
    return _head_split(n, g, d, dtype, seed, device), _codebooks(g, k, d, dtype, seed + 1, device)


def _per_group(fn, x, cb, **kw):
    """``fn`` (a 2-D op) on each group, stacked: the batched op's definition."""
    outs = [fn(x[i], cb[i], **kw) for i in range(x.shape[0])]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs)
    return tuple(torch.stack(parts) for parts in zip(*outs))


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_search_per_group_against_the_oracle(dtype, metric, exact, bd):
    """Each group's codes and distances pass the oracle against its own codebook (precision rule; fp64 argmin in
    exact mode); quantize's gather and histogram are per group; shapes and dtypes are the batched contract's."""
    backend, dev = bd
    for shape in SHAPES:
        g, n, k, d = shape
        x, cb = _inputs(shape, dtype, seed=n, device=dev)
        codes, dist = vq.nearest_code(x, cb, metric=metric, exact=exact, backend=backend)
        assert codes.shape == dist.shape == (g, n) and codes.dtype == torch.int64
        assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        for i in range(g):
            check_search(x[i], cb[i], metric, codes[i], dist[i], exact)
        q = vq.quantize(x, cb, metric=metric, exact=exact, backend=backend)
        assert q.z_q.shape == (g, n, d) and q.z_q.dtype == dtype and q.counts.shape == (g, k)
        assert torch.equal(q.codes, codes) and torch.equal(q.dist, dist)
        for i in range(g):
            assert torch.equal(q.z_q[i], cb[i][codes[i]])
            assert torch.equal(q.counts[i].cpu(), torch.bincount(codes[i].cpu(), minlength=k))


@pytest.mark.skipif(not HAS_CPU_OP, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_batched_equals_its_2d_op_per_group(dtype):
    """The C++ CPU op's tile kernels sum a dot product in one order whatever the block's shape (so the answer does
    not depend on the thread count either): one batched call gives bitwise what 2-D calls on each group give. In
    exact mode always (fp64 re-scores); in the fast path except on ATen's bf16 brgemm (tests/test_cpu_kernels.py),
    which this CPU may pick for bf16."""
    from vqkernels import _ext

    for shape in SHAPES:
        x, cb = _inputs(shape, dtype, seed=3)
        fixed_order = dtype != torch.bfloat16 or not _ext.cpu_plan("bf16", shape[1])["tile"].startswith("brgemm")
        for metric in METRICS:
            for exact in (False, True) if fixed_order else (True,):
                got = vq.quantize(x, cb, metric=metric, exact=exact, backend="cpu")
                want = _per_group(vq.quantize, x, cb, metric=metric, exact=exact, backend="cpu")
                for a, b in zip(got, want):
                    assert torch.equal(a, b), (shape, metric, exact)


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_lowest_index_within_a_group(dtype, metric, exact, bd):
    """Small-integer data (exact in every dtype, and so are the keys): every group's codebook holds each of its codes
    again at a later index (code j ties with j + K/2), the groups' codebooks differ, and every backend must return
    each group's fp64 argmin with the lowest tied index, in [0, K)."""
    backend, dev = bd
    gen = torch.Generator().manual_seed(11)
    g, n, half = 3, 200, 700
    base = torch.randint(-3, 4, (g, half, 6), generator=gen).double()
    cb = torch.cat([base, base], 1)
    x = torch.randint(-3, 4, (n, g * 6), generator=gen).double().view(n, g, 6).transpose(0, 1)
    codes, _ = vq.nearest_code(
        x.to(device=dev, dtype=dtype), cb.to(device=dev, dtype=dtype), metric=metric, exact=exact, backend=backend
    )
    for i in range(g):
        want = brute_distances(x[i], cb[i], metric, direct=True).argmin(1)  # the first minimum: the lowest index
        assert torch.equal(codes[i].cpu(), want), i


def _dot_near_ties(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows orthogonal to a long vector v (|v| = 1000) against codes v + w_j, w_j tiny: each dot product sums terms of
    |x| |v| size to a result near 0, so fp32 rounds it by far more than the codes' gaps, and a code's key is mostly
    rounding. The key itself is small, so only the code-norm term of the bound (README "Method" §1.3) covers that
    error. Returns fp64 ``x [200, 32]``, ``cb [500, 32]``."""
    gen = torch.Generator().manual_seed(seed)
    d = 32
    x0 = torch.randn(d, generator=gen, dtype=torch.float64)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    v -= (v @ x0) / (x0 @ x0) * x0
    v *= 1000 / v.norm()
    cb = v + 5e-5 * torch.randn(500, d, generator=gen, dtype=torch.float64)
    x = x0 + 1e-2 * torch.randn(200, d, generator=gen, dtype=torch.float64)
    x -= (x @ v)[:, None] / (v @ v) * v
    return x, cb


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_exact_mode_bound_is_per_group(metric, bd):
    """Group 1 is the near-tie case above; group 0 the same scaled by 1e-4, whose largest code norm (0.1) gives a
    bound far too small for group 1. Exact mode must return each group's fp64 argmin, which for group 1 takes its
    own codebook's norm in the bound: the fast path (and a bound from group 0's norm) gets dozens of rows wrong."""
    backend, dev = bd
    x1, cb1 = _dot_near_ties()
    x = torch.stack([x1 * 1e-4, x1]).float().to(dev)
    cb = torch.stack([cb1 * 1e-4, cb1]).float().to(dev)
    codes, dist = vq.nearest_code(x, cb, metric=metric, exact=True, backend=backend)
    for i in range(2):
        check_search(x[i], cb[i], metric, codes[i], dist[i], exact=True)
    if metric == "dot":
        # the case is hard: an fp32 search alone is fooled (the reference's: the triton interpreter's numpy
        # products may round differently from a GPU's)
        fast, _ = vq.nearest_code(x.cpu(), cb.cpu(), metric=metric, backend="torch")
        truth = brute_distances(x[1].cpu(), cb[1].cpu(), metric, direct=True).argmin(1)
        assert int((fast[1] != truth).sum()) >= 10


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
def test_views_are_read_as_they_are(bd):
    """The head split (row stride G * D, group stride D), a codebook sliced out of a wider one (row stride > D,
    every other group) and one with non-unit stride along D: the same answers as contiguous copies, for every op."""
    backend, dev = bd
    g, n, k, d = 3, 150, 80, 12
    x = _head_split(n, g, d, torch.float32, seed=1, device=dev)
    wide = torch.randn(2 * g, k, d + 7, generator=torch.Generator().manual_seed(2)).to(dev)
    views = [wide[::2, :, 3 : 3 + d], wide[1::2, :, :d].transpose(1, 2).contiguous().transpose(1, 2)]
    assert not x.is_contiguous() and not any(v.is_contiguous() for v in views)
    for cb in views:
        assert cb.shape == (g, k, d)
        xc, cbc = x.contiguous(), cb.contiguous()
        for metric in METRICS:
            got = vq.quantize(x, cb, metric=metric, backend=backend)
            for a, b in zip(got, vq.quantize(xc, cbc, metric=metric, backend=backend)):
                assert torch.equal(a, b), metric
            s = vq.sample_code(x, cb, metric=metric, seed=3, backend=backend)
            assert torch.equal(s, vq.sample_code(xc, cbc, metric=metric, seed=3, backend=backend))
        codes = vq.nearest_code(xc, cbc, backend=backend)[0]
        for a, b in zip(vq.code_stats(x, codes, k, backend=backend), vq.code_stats(xc, codes, k, backend=backend)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not HAS_CPU_OP, reason="C++ extension not built")
def test_cpu_reads_views_in_place():
    """The C++ CPU op copies neither the head-split x nor a row-strided codebook: no copy runs inside the op."""
    x = _head_split(500, 4, 16, torch.float32, seed=5)
    cb = torch.randn(4, 300, 24)[..., 2:18]
    codes = torch.ops.vqkernels.nearest_code(x, cb, "l2", False)[0]
    calls = {
        "nearest_code": lambda: torch.ops.vqkernels.nearest_code(x, cb, "cosine", True),
        "quantize": lambda: torch.ops.vqkernels.quantize(x, cb, "l2", False),
        "sample_code": lambda: torch.ops.vqkernels.sample_code(x, cb, "dot", 1),
        "code_stats": lambda: torch.ops.vqkernels.code_stats(x, codes, 300),
    }
    for name, call in calls.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
        ran = {e.name for e in prof.events()}
        assert f"vqkernels::{name}" in ran, ran  # the profiler saw the op itself
        copies = ran & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}
        assert not copies, (name, copies)


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
def test_one_group_equals_the_2d_op(bd):
    backend, dev = bd
    x, cb = _inputs((1, 300, 200, 24), torch.float32, seed=6, device=dev)
    for metric in METRICS:
        for exact in (False, True):
            got = vq.quantize(x, cb, metric=metric, exact=exact, backend=backend)
            want = vq.quantize(x[0], cb[0], metric=metric, exact=exact, backend=backend)
            for a, b in zip(got, want):
                assert torch.equal(a[0], b), (metric, exact)
        s = vq.sample_code(x, cb, metric=metric, seed=7, backend=backend)
        assert torch.equal(s[0], vq.sample_code(x[0], cb[0], metric=metric, seed=7, backend=backend))
    codes = vq.nearest_code(x, cb, backend=backend)[0]
    for a, b in zip(vq.code_stats(x, codes, 200, backend=backend), vq.code_stats(x[0], codes[0], 200, backend=backend)):
        assert torch.equal(a[0], b)


# the Triton launchers' chunking is tested on a small MAX_GROUPS in test_triton (65545 groups are 65545 Python-level
# programs under the interpreter); here it runs on a GPU only
@pytest.mark.parametrize(
    "bd", [p for p in BATCHED_BACKENDS if p.values[0][0] != "torch" and p.values[0] != ("triton", "cpu")]
)
def test_more_groups_than_one_launch_holds(bd):
    """65545 tiny groups: more than a CUDA grid axis holds (65535), so the CUDA kernels take two launches; on the
    CPU, as many (group, block) tasks. Exact codes, per-group histograms and sums, and sample's noise keyed by the
    group (the reference's loop over groups would take minutes: fp64 brute force in one batched expression)."""
    backend, dev = bd
    g, n, k, d = 65545, 2, 3, 4
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(g, n, d, generator=gen, dtype=torch.float64)
    cb = torch.randn(g, k, d, generator=gen, dtype=torch.float64)
    want = ((x[:, :, None, :] - cb[:, None, :, :]) ** 2).sum(-1).argmin(-1)  # [G, N]
    q = vq.quantize(x.float().to(dev), cb.float().to(dev), exact=True, backend=backend)
    assert torch.equal(q.codes.cpu(), want)
    counts = torch.zeros(g, k, dtype=torch.int64).scatter_add_(1, want, torch.ones_like(want))
    assert torch.equal(q.counts.cpu(), counts)
    sums, counts2 = vq.code_stats(x.float().to(dev), q.codes, k, backend=backend)
    want_sums = torch.zeros(g, k, d, dtype=torch.float64).scatter_add_(1, want[..., None].expand(g, n, d), x)
    torch.testing.assert_close(sums.cpu().double(), want_sums, rtol=1e-6, atol=1e-6)
    assert torch.equal(counts2.cpu(), counts)
    s = vq.sample_code(x.float().to(dev), cb.float().to(dev), seed=23, backend=backend).cpu()
    for i in (0, 1, 65534, 65535, g - 1):  # both sides of the launch boundary
        ref = reference.sample(x[i].float(), cb[i].float(), "l2", seed_to_schema(23), code_offset=i * k)
        assert torch.equal(s[i], ref), i


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_no_groups_and_no_rows(dtype, bd):
    backend, dev = bd
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for g, n in ((0, 5), (0, 0), (3, 0)):
        x = torch.randn(g, n, 4, dtype=dtype, device=dev)
        cb = torch.randn(g, 6, 4, dtype=dtype, device=dev)
        for exact in (False, True):
            q = vq.quantize(x, cb, exact=exact, backend=backend)
            assert q.codes.shape == q.dist.shape == (g, n) and q.z_q.shape == (g, n, 4) and q.counts.shape == (g, 6)
            assert q.codes.dtype == q.counts.dtype == torch.int64 and q.dist.dtype == acc and q.z_q.dtype == dtype
            assert not q.counts.any()
            codes, dist = vq.nearest_code(x, cb, exact=exact, backend=backend)
            assert codes.shape == dist.shape == (g, n)
        sums, counts = vq.code_stats(x, torch.zeros(g, n, dtype=torch.int64, device=dev), 6, backend=backend)
        assert sums.shape == (g, 6, 4) and sums.dtype == acc and counts.shape == (g, 6)
        assert not sums.any() and not counts.any()
        if n == 0:
            with pytest.raises(ValueError, match="at least one row"):
                vq.sample_code(x, cb, seed=1, backend=backend)
        else:
            s = vq.sample_code(x, cb, seed=1, backend=backend)
            assert s.shape == (0, 6) and s.dtype == torch.int64


def _brute_sample(x: torch.Tensor, cb: torch.Tensor, metric: str, seed: int, code_offset: int) -> torch.Tensor:
    """fp64 ``argmin_i (d(x_i, c_k) - g(seed, code_offset + k, i))`` over the whole grid (small inputs)."""
    d = brute_distances(cb.cpu(), x.cpu(), metric)  # [K, N]
    k = cb.shape[0]
    codes = torch.arange(code_offset, code_offset + k)
    return (d - gumbel_noise(split_seed(seed), torch.arange(x.shape[0]), codes, torch.float64)).argmin(1)


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_sample_keys_group_g_code_k_as_g_times_k_plus_k(dtype, metric, bd):
    """Group g draws for its code k with the noise of code ``g * K + k`` (rows keyed by their index in the group):
    the fp64 brute force over that noise, and the reference's 2-D sample with ``code_offset = g * K``."""
    backend, dev = bd
    g, n, k = 3, 301, 37
    x, cb = _head_split(n, g, 9, dtype, seed=4, device=dev), _codebooks(g, k, 9, dtype, seed=5, device=dev)
    for seed in (0, (1 << 64) - 1):
        got = vq.sample_code(x, cb, metric=metric, seed=seed, backend=backend)
        assert got.shape == (g, k) and got.dtype == torch.int64 and got.device.type == dev
        for i in range(g):
            want = _brute_sample(x[i], cb[i], metric, seed, i * k)
            assert (got[i].cpu() == want).float().mean() >= 0.97, (seed, i)  # rounding may flip a near-tie
            ref = reference.sample(x[i].cpu(), cb[i].cpu(), metric, seed_to_schema(seed), code_offset=i * k)
            assert (got[i].cpu() == ref).float().mean() >= 0.97, (seed, i)


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
def test_sample_groups_draw_independent_noise(bd):
    """The same rows and codes in every group: the groups' draws still differ (each group's codes have their own
    noise), and each equals the 2-D draw of its code indices."""
    backend, dev = bd
    x1 = torch.randn(400, 8, generator=torch.Generator().manual_seed(8)).to(dev)
    c1 = torch.randn(50, 8, generator=torch.Generator().manual_seed(9)).to(dev)
    x, cb = x1.expand(4, 400, 8), c1.expand(4, 50, 8)  # group stride 0: one tensor seen four times
    got = vq.sample_code(x, cb, metric="cosine", seed=21, backend=backend)
    assert all(not torch.equal(got[0], got[i]) for i in range(1, 4))
    # the draws of codes 50 .. 99 of a 2-D call are group 1's (bitwise on the CPU op, whose dot products do not
    # depend on the tiling; a GPU GEMM may round a near-tie differently at another shape)
    two_d = vq.sample_code(x1, c1.repeat(2, 1), metric="cosine", seed=21, backend=backend)
    for i in range(2):
        same = (got[i] == two_d[50 * i : 50 * (i + 1)]).float().mean()
        assert same == 1 if backend == "cpu" else same >= 0.97, i


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", ["uniform", "collapse"])
def test_code_stats_per_group(dist, dtype, bd):
    backend, dev = bd
    g, n, k, d = 3, 700, 50, 9
    x = _head_split(n, g, d, dtype, seed=12, device=dev)
    gen = torch.Generator().manual_seed(13)
    if dist == "uniform":
        codes = torch.randint(0, k, (g, n), generator=gen)
    else:  # every row of every group on one code, a different one per group
        codes = torch.tensor([k - 1, 0, k // 2])[:, None].expand(g, n).contiguous()
    sums, counts = vq.code_stats(x, codes.to(dev), k, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert sums.shape == (g, k, d) and sums.dtype == acc and counts.shape == (g, k) and counts.dtype == torch.int64
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for i in range(g):
        want = torch.zeros(k, d, dtype=torch.float64).index_add_(0, codes[i], x[i].cpu().double())
        torch.testing.assert_close(sums[i].cpu().double(), want, rtol=tol, atol=tol * n**0.5 * 4)
        assert torch.equal(counts[i].cpu(), torch.bincount(codes[i], minlength=k))


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
def test_code_stats_checks_every_groups_codes(bd):
    backend, dev = bd
    x = torch.randn(3, 10, 4, device=dev)
    codes = torch.zeros(3, 10, dtype=torch.int64)
    codes[2, 7] = 6  # K = 6: only group 2's row 7 is out of range
    with pytest.raises(ValueError, match="codes must lie in"):
        vq.code_stats(x, codes.to(dev), 6, backend=backend)


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
def test_quantize_gradient_is_per_group_code_stats(bd):
    """z_q of group g is codebook[g][codes[g]]: the codebook's gradient is each group's code_stats of the incoming
    gradient (and matches the reference backend's)."""
    backend, dev = bd
    g, n, k, d = 3, 400, 30, 8
    x = _head_split(n, g, d, torch.float32, seed=14, device=dev)
    cb = _codebooks(g, k, d, torch.float32, seed=15, device=dev).requires_grad_(True)
    q = vq.quantize(x, cb, backend=backend)
    w = torch.randn(g, n, d, generator=torch.Generator().manual_seed(16)).to(dev)
    (q.z_q * w).sum().backward()
    for i in range(g):
        want = torch.zeros(k, d, dtype=torch.float64).index_add_(0, q.codes[i].cpu(), w[i].double().cpu())
        torch.testing.assert_close(cb.grad[i].double().cpu(), want, rtol=1e-5, atol=1e-5)
    cb_ref = cb.detach().cpu().clone().requires_grad_(True)
    q_ref = vq.quantize(x.cpu(), cb_ref, backend="torch")
    (q_ref.z_q * w.cpu()).sum().backward()
    assert torch.equal(q_ref.codes, q.codes.cpu())
    torch.testing.assert_close(cb.grad.cpu(), cb_ref.grad, rtol=1e-5, atol=1e-5)
    assert not q.dist.requires_grad and not q.codes.requires_grad and not q.counts.requires_grad


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
def test_opcheck_batched(bd):
    backend, dev = bd
    x = _head_split(33, 3, 9, torch.float32, seed=17, device=dev)
    cb = _codebooks(3, 20, 9, torch.float32, seed=18, device=dev)
    utils = opcheck_utils(backend)
    for metric in METRICS:
        for exact in (False, True):
            torch.library.opcheck(op_of(backend, "nearest_code"), (x, cb, metric, exact), test_utils=utils)
        torch.library.opcheck(op_of(backend, "quantize"), (x, cb, metric, False), test_utils=utils)
        torch.library.opcheck(op_of(backend, "sample_code"), (x, cb, metric, seed_to_schema(5)), test_utils=utils)
    codes = torch.randint(0, 20, (3, 33), generator=torch.Generator().manual_seed(19)).to(dev)
    torch.library.opcheck(op_of(backend, "code_stats"), (x, codes, 20), test_utils=utils)
    torch.library.opcheck(op_of(backend, "quantize"), (x[:, :0], cb, "dot", True), test_utils=utils)
    torch.library.opcheck(op_of(backend, "quantize"), (x[:0], cb[:0], "l2", False), test_utils=utils)
    torch.library.opcheck(op_of(backend, "code_stats"), (x[:0], codes[:0], 20), test_utils=utils)


@pytest.mark.parametrize("bd", BATCHED_BACKENDS)
def test_torch_compile_fullgraph_batched_quantize(bd):
    backend, dev = bd
    skip_compile_if_interpreted(backend)
    torch._dynamo.reset()
    x = _head_split(200, 4, 8, torch.float32, seed=20, device=dev)
    cb = _codebooks(4, 30, 8, torch.float32, seed=21, device=dev)

    def f(x, cb):
        q = vq.quantize(x, cb, metric="cosine", backend=backend)
        return ((q.z_q - x) ** 2).mean(), q.codes, q.counts

    cb1, cb2 = cb.clone().requires_grad_(True), cb.clone().requires_grad_(True)
    loss1, codes1, counts1 = torch.compile(f, fullgraph=True)(x, cb1)
    loss2, codes2, counts2 = f(x, cb2)
    loss1.backward()
    loss2.backward()
    assert codes1.shape == (4, 200) and counts1.shape == (4, 30)
    assert torch.equal(codes1, codes2) and torch.equal(counts1, counts2)
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(cb1.grad, cb2.grad)


@pytest.mark.skipif(not HAS_CPU_OP, reason="C++ extension not built")
def test_cpp_ops_check_batched_arguments():
    """The C++ ops check the batched form themselves (called directly, past vqkernels.ops): errors name the
    argument."""
    ops = torch.ops.vqkernels
    x, cb = torch.randn(2, 5, 4), torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="must both be 2-D or both batched 3-D"):
        ops.nearest_code(x, cb[0], "l2", False)
    with pytest.raises(ValueError, match="same number of groups G"):
        ops.quantize(x, torch.randn(3, 6, 4), "l2", False)
    with pytest.raises(ValueError, match="codebook must be a 2-D tensor .* or a batched 3-D"):
        ops.sample_code(x, cb[None], "l2", 0)
    with pytest.raises(ValueError, match="at least one code"):
        ops.nearest_code(x, cb[:, :0], "l2", False)
    with pytest.raises(ValueError, match="at least one row"):
        ops.sample_code(x[:, :0], cb, "l2", 0)
    with pytest.raises(ValueError, match=r"codes must have shape \[G, N\]"):
        ops.code_stats(x, torch.zeros(5, dtype=torch.int64), 6)
    codes = torch.zeros(2, 5, dtype=torch.int64)
    codes[1, 2] = 6
    with pytest.raises(ValueError, match=r"codes\[1, 2\] = 6"):
        ops.code_stats(x, codes, 6)


@pytest.mark.skipif(not HAS_CPU_OP, reason="C++ extension not built")
def test_cpu_batched_does_not_depend_on_the_thread_count():
    """The task grid (block size, code splits, which task computes the key terms) follows the thread count and the
    groups; the answer must not."""
    old = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for shape in ((3, 1, 20000, 16), (5, 40, 3000, 24), (2, 300, 500, 24)):
                x, cb = _inputs(shape, torch.float32, seed=shape[1])
                for exact in (False, True):
                    q = vq.quantize(x, cb, metric="cosine", exact=exact, backend="cpu")
                    s = vq.sample_code(x, cb, metric="l2", seed=4, backend="cpu")
                    runs.setdefault((shape, exact), []).append((*q, s))
    finally:
        torch.set_num_threads(old)
    for key, outs in runs.items():
        for out in outs[1:]:
            for a, b in zip(out, outs[0]):
                assert torch.equal(a, b), key

"""nearest_code: every CPU backend against the fp64 brute force (METHODS §1)."""

import pytest
import torch
from helpers import (
    DTYPES,
    METRICS,
    brute_distances,
    check_search,
    cpu_backends,
    make_inputs,
    opcheck_utils,
    skip_compile_if_interpreted,
)

import vqkernels as vq

# Every N in {0, 1, 7, 1000, 4099}, K in {1, 3, 1000, 5000} and D in {1, 3, 64, 257} appears; the large
# combinations are spread out so the fp64 brute force stays cheap.
SHAPES = [
    (0, 3, 3), (1, 1, 1), (1, 5000, 257), (7, 3, 64), (7, 1000, 1), (1000, 1, 257), (1000, 1000, 3),
    (1000, 5000, 64), (4099, 3, 1), (4099, 1000, 257), (4099, 5000, 64),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_brute_force(shape, dtype, metric, backend):
    x, cb = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    codes, dist = vq.nearest_code(x, cb, metric=metric, backend=backend)
    check_search(x, cb, metric, codes, dist, exact=False)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_mode_matches_fp64(dtype, metric, backend):
    x, cb = make_inputs(700, 1000, 64, dtype=dtype, seed=3)
    codes, dist = vq.nearest_code(x, cb, metric=metric, exact=True, backend=backend)
    check_search(x, cb, metric, codes, dist, exact=True)


def _near_tie_case(dtype, n_close: int, seed: int = 0):
    """A large common offset (cancellation in |c|^2 - 2x.c) and codes that differ by a few ulps."""
    g = torch.Generator().manual_seed(seed)
    d, k = 48, 600
    base = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.05 + 30.0
    x = base[torch.randint(0, k, (300,), generator=g)] + 1e-4 * torch.randn(300, d, generator=g, dtype=torch.float64)
    # groups of n_close near-identical codes, spread over different code tiles
    for j in range(n_close):
        base[100 + 60 * (j + 1)] = base[100] + (j + 1) * 2e-6 * torch.randn(d, generator=g, dtype=torch.float64)
    x[:40] = base[100] + 1e-6 * torch.randn(40, d, generator=g, dtype=torch.float64)
    return x.to(dtype), base.to(dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n_close", [1, 3, 8])  # 8 > candidates kept: exercises the full re-scan
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_exact_mode_adversarial_near_ties(dtype, n_close, metric, backend):
    x, cb = _near_tie_case(dtype, n_close)
    codes, dist = vq.nearest_code(x, cb, metric=metric, exact=True, backend=backend)
    check_search(x, cb, metric, codes, dist, exact=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fast_path_is_fooled_where_exact_is_not(backend):
    """The near-tie case really is hard: fp32 fast search disagrees with fp64 somewhere, exact does not."""
    x, cb = _near_tie_case(torch.float32, 8)
    fast, _ = vq.nearest_code(x, cb, backend=backend)
    exact, _ = vq.nearest_code(x, cb, exact=True, backend=backend)
    truth = brute_distances(x, cb, "l2", direct=True).argmin(1)
    assert not torch.equal(fast, truth)
    assert torch.equal(exact, truth)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exact", [False, True])
def test_exact_ties_go_to_lowest_index(backend, metric, exact):
    x, cb = make_inputs(64, 2000, 40, torch.float32, seed=5)
    for dup in (700, 1500, 1999):  # duplicates in later code tiles
        cb[dup] = cb[5]
    cb[900] = cb[1200] = cb[1800]
    x[:32] = cb[5] + 1e-3 * x[:32]
    x[32:] = cb[1800] + 1e-3 * x[32:]
    codes, _ = vq.nearest_code(x, cb, metric=metric, exact=exact, backend=backend)
    assert (codes[:32] == 5).all(), codes[:32]
    assert (codes[32:] == 900).all(), codes[32:]


@pytest.mark.parametrize("backend", cpu_backends())
def test_identical_codebook_picks_code_zero(backend):
    x, _ = make_inputs(100, 1, 16, torch.float32)
    cb = torch.ones(777, 16)
    for metric in METRICS:
        codes, _ = vq.nearest_code(x, cb, metric=metric, backend=backend)
        assert (codes == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_inputs(backend):
    x, cb = make_inputs(300, 200, 32, torch.float32)
    xs = torch.stack([x, -x], 2)[..., 0]  # strided view of x
    cbt = cb.T.contiguous().T  # column-major
    assert not xs.is_contiguous() and not cbt.is_contiguous()
    a = vq.nearest_code(xs, cbt, backend=backend)
    b = vq.nearest_code(x, cb, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", cpu_backends())
def test_backends_agree_on_codes(backend):
    x, cb = make_inputs(2000, 3000, 64, torch.float32, seed=9)
    ours, _ = vq.nearest_code(x, cb, backend=backend)
    ref, _ = vq.nearest_code(x, cb, backend="torch")
    assert (ours != ref).float().mean() < 1e-3  # only near-ties may differ


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    from vqkernels.ops import _OPS

    op = _OPS[backend][0]
    x, cb = make_inputs(33, 70, 9, torch.float32)
    for metric in METRICS:
        for exact in (False, True):
            torch.library.opcheck(op, (x, cb, metric, exact), test_utils=opcheck_utils(backend))
    torch.library.opcheck(op, (x[:0], cb, "l2", False), test_utils=opcheck_utils(backend))


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph(backend):
    skip_compile_if_interpreted(backend)
    torch._dynamo.reset()
    x, cb = make_inputs(100, 50, 8, torch.float32)

    @torch.compile(fullgraph=True)
    def f(x, cb):
        codes, dist = vq.nearest_code(x * 2, cb, metric="l2", backend=backend)
        return codes, dist.sum()

    codes, s = f(x, cb)
    ref_codes, ref_dist = vq.nearest_code(x * 2, cb, backend=backend)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(s, ref_dist.sum())


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("tile_env", [{}, {"VQK_CPU_BN": "40", "VQK_CPU_BM": "13"}, {"VQK_CPU_BF16_BRGEMM": "1"}],
                         ids=["default", "small-tiles", "brgemm"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exact", [False, True])
def test_cpu_bf16_tile_paths(tile_env, metric, exact, monkeypatch):
    """The bf16 micro-kernel (packed 32-code panels, 12-row micro-tiles, padded odd D) and ATen's brgemm path, on
    shapes that leave partial panels, partial micro-tiles and several code blocks."""
    for name, value in tile_env.items():
        monkeypatch.setenv(name, value)
    for n, k, d in [(37, 77, 5), (300, 1000, 64), (25, 33, 1)]:
        x, cb = make_inputs(n, k, d, torch.bfloat16, seed=n)
        codes, dist = vq.nearest_code(x, cb, metric=metric, exact=exact, backend="cpu")
        check_search(x, cb, metric, codes, dist, exact)
        q = vq.quantize(x, cb, metric=metric, exact=exact, backend="cpu")
        assert torch.equal(q.codes, codes) and torch.equal(q.counts, torch.bincount(codes, minlength=k))

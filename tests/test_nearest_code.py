"""nearest_code: every backend on every device against the fp64 brute force."""

import pytest
import torch
from helpers import (
    BACKEND_DEVICES,
    DTYPES,
    METRICS,
    backend_devices,
    brute_distances,
    check_search,
    make_inputs,
    op_of,
    opcheck_utils,
    skip_compile_if_interpreted,
)

import vqkernels as vq

# Every N in {0, 1, 7, 1000, 4099}, K in {1, 3, 1000, 5000} and D in {1, 3, 64, 257} appears; the large
# combinations are spread out so the fp64 brute force stays cheap.
SHAPES = [
    (0, 3, 3),
    (1, 1, 1),
    (1, 5000, 257),
    (7, 3, 64),
    (7, 1000, 1),
    (1000, 1, 257),
    (1000, 1000, 3),
    (1000, 5000, 64),
    (4099, 3, 1),
    (4099, 1000, 257),
    (4099, 5000, 64),
]


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_brute_force(shape, dtype, metric, bd):
    backend, dev = bd
    x, cb = make_inputs(*shape, dtype=dtype, seed=sum(shape), device=dev)
    codes, dist = vq.nearest_code(x, cb, metric=metric, backend=backend)
    assert codes.device == x.device and dist.device == x.device
    check_search(x, cb, metric, codes, dist, exact=False)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_mode_matches_fp64(dtype, metric, bd):
    backend, dev = bd
    x, cb = make_inputs(700, 1000, 64, dtype=dtype, seed=3, device=dev)
    codes, dist = vq.nearest_code(x, cb, metric=metric, exact=True, backend=backend)
    check_search(x, cb, metric, codes, dist, exact=True)


def _near_tie_case(dtype, n_close: int, seed: int = 0, device: str = "cpu"):
    """A large common offset (cancellation in |c|^2 - 2x.c) and codes that differ by a few ulps."""
    g = torch.Generator().manual_seed(seed)
    d, k = 48, 600
    base = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.05 + 30.0
    x = base[torch.randint(0, k, (300,), generator=g)] + 1e-4 * torch.randn(300, d, generator=g, dtype=torch.float64)
    # groups of n_close near-identical codes, spread over different code tiles
    for j in range(n_close):
        base[100 + 60 * (j + 1)] = base[100] + (j + 1) * 2e-6 * torch.randn(d, generator=g, dtype=torch.float64)
    x[:40] = base[100] + 1e-6 * torch.randn(40, d, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), base.to(device=device, dtype=dtype)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n_close", [1, 3, 8])  # 8 > candidates kept: exercises the full re-scan
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_exact_mode_adversarial_near_ties(dtype, n_close, metric, bd):
    backend, dev = bd
    x, cb = _near_tie_case(dtype, n_close, device=dev)
    codes, dist = vq.nearest_code(x, cb, metric=metric, exact=True, backend=backend)
    check_search(x, cb, metric, codes, dist, exact=True)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_fast_path_is_fooled_where_exact_is_not(bd):
    """The near-tie case really is hard: fp32 fast search disagrees with fp64 somewhere, exact does not."""
    backend, dev = bd
    x, cb = _near_tie_case(torch.float32, 8, device=dev)
    fast, _ = vq.nearest_code(x, cb, backend=backend)
    exact, _ = vq.nearest_code(x, cb, exact=True, backend=backend)
    truth = brute_distances(x.cpu(), cb.cpu(), "l2", direct=True).argmin(1)
    assert not torch.equal(fast.cpu(), truth)
    assert torch.equal(exact.cpu(), truth)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exact", [False, True])
def test_exact_ties_go_to_lowest_index(bd, metric, exact):
    backend, dev = bd
    x, cb = make_inputs(64, 2000, 40, torch.float32, seed=5)
    for dup in (700, 1500, 1999):  # duplicates in later code tiles
        cb[dup] = cb[5]
    cb[900] = cb[1200] = cb[1800]
    x[:32] = cb[5] + 1e-3 * x[:32]
    x[32:] = cb[1800] + 1e-3 * x[32:]
    codes, _ = vq.nearest_code(x.to(dev), cb.to(dev), metric=metric, exact=exact, backend=backend)
    codes = codes.cpu()
    assert (codes[:32] == 5).all(), codes[:32]
    assert (codes[32:] == 900).all(), codes[32:]


def _integer_case(metric: str, seed: int = 0):
    """Small-integer rows and codes (exact in every dtype, and so are their dot products and squared norms), with
    duplicate codes and, for cosine, codes scaled by powers of two: exact ties between *different* codes abound.
    Returns fp64 ``x [1000, 8]``, ``cb [300, 8]``."""
    g = torch.Generator().manual_seed(seed)
    cb = torch.randint(-3, 4, (300, 8), generator=g).double()
    cb[200:250] = cb[torch.randperm(200, generator=g)[:50]]  # duplicates of earlier codes, at later indices
    if metric == "cosine":
        cb[250:300] = cb[torch.randperm(250, generator=g)[:50]] * 2.0 ** torch.randint(1, 4, (50, 1), generator=g)
        cb[cb.abs().sum(1) == 0] = 1.0  # no zero code (its cosine is a constant)
    x = torch.randint(-3, 4, (1000, 8), generator=g).double()
    return x, cb


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_integer_data_ties_go_to_lowest_index(dtype, exact, metric, bd):
    """Integer-valued data: the keys of tied codes are exactly equal in every precision (the code-norm term is a
    sum of squares, not a rounded norm squared), so every backend must return exactly the fp64 argmin with its
    lowest-index tie rule, in fast mode too."""
    backend, dev = bd
    x64, cb64 = _integer_case(metric)
    d64 = brute_distances(x64, cb64, metric, direct=True)
    # ties in exact arithmetic (cosine's fp64 values of tied codes may differ in the last bit)
    tied = (d64 - d64.min(1, keepdim=True).values).abs() <= 1e-12
    want = tied.double().argmax(1)  # the lowest tied index
    ties = tied.sum(1)
    assert int((ties > 1).sum()) > 200, "the construction must make many rows' nearest code a tie"
    codes, dist = vq.nearest_code(
        x64.to(device=dev, dtype=dtype), cb64.to(device=dev, dtype=dtype), metric=metric, exact=exact, backend=backend
    )
    wrong = (codes.cpu() != want).sum().item()
    assert wrong == 0, f"{wrong} of 1000 rows broke a tie (or missed the minimum)"
    if metric != "cosine":  # integer distances: exact in every accumulation
        assert torch.equal(dist.cpu().double(), d64.min(1).values)


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_identical_codebook_picks_code_zero(bd):
    backend, dev = bd
    x, _ = make_inputs(100, 1, 16, torch.float32, device=dev)
    cb = torch.ones(777, 16, device=dev)
    for metric in METRICS:
        codes, _ = vq.nearest_code(x, cb, metric=metric, backend=backend)
        assert (codes == 0).all()


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_non_contiguous_inputs(bd):
    backend, dev = bd
    x, cb = make_inputs(300, 200, 32, torch.float32, device=dev)
    xs = torch.stack([x, -x], 2)[..., 0]  # strided view of x
    cbt = cb.T.contiguous().T  # column-major
    xo = torch.cat([x, x], 1)[:, 3:35]  # rows of a wider tensor: row stride 64, start not 16-byte aligned
    assert not xs.is_contiguous() and not cbt.is_contiguous() and not xo.is_contiguous()
    b = vq.nearest_code(x, cb, backend=backend)
    for xv, cv in ((xs, cbt), (xo, cb), (x[::2], cb[1::2])):
        a = vq.nearest_code(xv, cv, backend=backend)
        want = vq.nearest_code(xv.contiguous(), cv.contiguous(), backend=backend)
        assert torch.equal(a[0], want[0]) and torch.equal(a[1], want[1])
    a = vq.nearest_code(xs, cbt, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_backends_agree_on_codes(bd):
    backend, dev = bd
    x, cb = make_inputs(2000, 3000, 64, torch.float32, seed=9, device=dev)
    ours, _ = vq.nearest_code(x, cb, backend=backend)
    ref, _ = vq.nearest_code(x.cpu(), cb.cpu(), backend="torch")
    assert (ours.cpu() != ref).float().mean() < 1e-3  # only near-ties may differ


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_opcheck(bd):
    backend, dev = bd

    op = op_of(backend, "nearest_code")
    x, cb = make_inputs(33, 70, 9, torch.float32, device=dev)
    for metric in METRICS:
        for exact in (False, True):
            torch.library.opcheck(op, (x, cb, metric, exact), test_utils=opcheck_utils(backend))
    torch.library.opcheck(op, (x[:0], cb, "l2", False), test_utils=opcheck_utils(backend))


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_torch_compile_fullgraph(bd):
    backend, dev = bd
    skip_compile_if_interpreted(backend)
    torch._dynamo.reset()
    x, cb = make_inputs(100, 50, 8, torch.float32, device=dev)

    @torch.compile(fullgraph=True)
    def f(x, cb):
        codes, dist = vq.nearest_code(x * 2, cb, metric="l2", backend=backend)
        return codes, dist.sum()

    codes, s = f(x, cb)
    ref_codes, ref_dist = vq.nearest_code(x * 2, cb, backend=backend)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(s, ref_dist.sum())


@pytest.mark.skipif(("cpu", "cpu") not in backend_devices(), reason="the C++ extension is not built")
@pytest.mark.parametrize(
    "tile_env",
    [{}, {"VQK_CPU_BN": "40", "VQK_CPU_BM": "13"}, {"VQK_CPU_BF16_BRGEMM": "1"}],
    ids=["default", "small-tiles", "brgemm"],
)
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

"""k-means++ seeding and Lloyd k-means on the fused ops (README "Method" §2.5): quality against scikit-learn,
fixed-point properties against an fp64 brute force, K > N, empty clusters, determinism and argument checks."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import brute_distances, cpu_backends

from vqkernels.nn.kmeans import KMeansResult, kmeans, kmeans_plusplus

BACKENDS = cpu_backends()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(n: int, d: int, centers: int, seed: int = 0, spread: float = 6.0, dtype=torch.float64):
    g = _gen(seed)
    c = torch.randn(centers, d, generator=g, dtype=torch.float64) * spread
    x = c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype)


def _distinct(c: torch.Tensor) -> bool:
    return torch.unique(c.float(), dim=0).shape[0] == c.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# quality: inertia within 10% of scikit-learn's KMeans (k-means++ init), best of 3 seeds on both sides
# ---------------------------------------------------------------------------------------------------------------
def _dataset(name: str):
    if name == "blobs-8d-16c":
        from sklearn.datasets import make_blobs

        return make_blobs(2000, 8, centers=16, random_state=0)[0], 16
    if name == "blobs-16d-40c":
        from sklearn.datasets import make_blobs

        return make_blobs(3000, 16, centers=40, cluster_std=2.0, random_state=3)[0], 64
    return torch.randn(2000, 8, generator=_gen(1), dtype=torch.float64).numpy(), 16  # "gaussian"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["blobs-8d-16c", "gaussian", "blobs-16d-40c"])
def test_inertia_close_to_sklearn(name, backend):
    sk = pytest.importorskip("sklearn.cluster")
    X, k = _dataset(name)
    x = torch.tensor(X, dtype=torch.float32)
    ours = min(kmeans(x, k, generator=_gen(s), backend=backend).inertia for s in range(3))
    ref = sk.KMeans(k, init="k-means++", n_init=3, random_state=0).fit(X.astype("float32")).inertia_
    print(f"{name} K={k} {backend}: ours {ours:.6g} sklearn {ref:.6g} ratio {ours / ref:.4f}")
    assert ours <= 1.10 * ref, (ours, ref)


# ---------------------------------------------------------------------------------------------------------------
# fixed point: centroids = means of their rows, codes = nearest, inertia = sum of squared distances (fp64 brute)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converged_centroids_are_means(backend, dtype):
    x = _blobs(300, 4, 6, seed=2, dtype=dtype)
    res = kmeans(x, 6, iters=100, tol=0.0, generator=_gen(3), backend=backend)
    assert isinstance(res, KMeansResult) and res.iterations < 100  # converged: assignment stopped changing
    assert res.centroids.shape == (6, 4) and res.centroids.dtype == dtype
    assert res.codes.shape == (300,) and res.codes.dtype == torch.int64
    assert isinstance(res.inertia, float) and isinstance(res.iterations, int)
    x64, c64 = x.double(), res.centroids.double()
    d = brute_distances(x, res.centroids, "l2", direct=True)
    assert torch.equal(res.codes, d.argmin(1))
    counts = torch.bincount(res.codes, minlength=6)
    assert bool((counts > 0).all())
    means = torch.zeros(6, 4, dtype=torch.float64).index_add_(0, res.codes, x64) / counts[:, None]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c64, means, **tol)
    ref = ((x64 - c64[res.codes]) ** 2).sum().item()
    assert res.inertia == pytest.approx(ref, rel=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spherical_kmeans(backend):
    x = _blobs(400, 6, 5, seed=4, dtype=torch.float32) * torch.rand(400, 1, generator=_gen(5)).add(0.5)
    res = kmeans(x, 5, metric="cosine", iters=100, tol=0.0, generator=_gen(0), backend=backend)
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(5), rtol=0, atol=1e-5)
    u = x.double() / x.double().norm(dim=1, keepdim=True)
    d = brute_distances(x, res.centroids, "cosine")
    assert torch.equal(res.codes, d.argmin(1))
    sums = torch.zeros(5, 6, dtype=torch.float64).index_add_(0, res.codes, u)
    expect = sums / sums.norm(dim=1, keepdim=True)
    torch.testing.assert_close(res.centroids.double(), expect, rtol=1e-5, atol=1e-5)
    assert res.inertia == pytest.approx(d.min(1).values.sum().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# K >= N, tiny sizes, duplicates / empty clusters
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_codes_than_rows(backend, dtype):
    x = torch.randn(10, 6, generator=_gen(0)).to(dtype)
    res = kmeans(x, 50, generator=_gen(1), backend=backend)
    c = res.centroids
    assert c.shape == (50, 6) and c.dtype == dtype and bool(torch.isfinite(c).all())
    assert _distinct(c)
    d = brute_distances(c, x, "l2", direct=True).min(1).values.sqrt()  # each centroid's nearest data point
    std = x.double().std(0, unbiased=False)
    assert d.max() <= 0.05 * std.norm(), d.max()  # within the 1e-3-scale jitter (2 ulp for bf16)
    assert res.inertia == 0.0 and res.iterations == 0  # every row has an exact copy among the centroids
    seeds = kmeans_plusplus(x, 50, generator=_gen(1), backend=backend)
    assert seeds.shape == (50, 6) and _distinct(seeds)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_sizes(backend):
    x = torch.randn(7, 3, generator=_gen(0))
    one = kmeans(x, 1, generator=_gen(0), backend=backend)  # K == 1: the mean
    torch.testing.assert_close(one.centroids[0], x.mean(0))
    assert bool((one.codes == 0).all())
    same = kmeans(x, 7, generator=_gen(0), backend=backend)  # N == K: the rows themselves
    assert torch.equal(torch.sort(same.centroids[same.codes], 0).values, torch.sort(x, 0).values)
    assert torch.equal(same.centroids[same.codes], x) and same.inertia == 0.0
    row = x[:1]
    r1 = kmeans(row, 1, generator=_gen(0), backend=backend)  # N == 1
    assert torch.equal(r1.centroids, row) and r1.inertia == 0.0
    r3 = kmeans(row, 3, generator=_gen(0), backend=backend)
    assert _distinct(r3.centroids) and bool(torch.isfinite(r3.centroids).all())
    zeros = kmeans(torch.zeros(1, 4), 3, generator=_gen(0), backend=backend)  # no scale in the data at all
    assert _distinct(zeros.centroids)
    r0 = kmeans(x, 3, iters=0, generator=_gen(0), backend=backend)  # seeding only
    assert r0.iterations == 0 and _distinct(r0.centroids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("others", [4, 0])
def test_duplicates_and_empty_clusters(backend, others, monkeypatch):
    """100 copies of 3 points (+ a few others); with others=0 there are fewer distinct rows than K, so seeds
    repeat, clusters go empty and are re-seeded, and the last centroids are separated by jitter."""
    import vqkernels.nn.kmeans as km

    empties = []

    def spy(*args, **kwargs):
        sums, counts = code_stats(*args, **kwargs)
        empties.append(int((counts == 0).sum()))
        return sums, counts

    code_stats = km.code_stats
    monkeypatch.setattr(km, "code_stats", spy)
    g = _gen(7)
    base = torch.randn(3, 5, generator=g) * 4
    x = torch.cat([base.repeat(100, 1), torch.randn(others, 5, generator=g) * 4])
    x = x[torch.randperm(x.shape[0], generator=g)]
    res = kmeans(x, 5, generator=_gen(0), backend=backend)
    if others == 0:
        assert max(empties) > 0  # the re-seeding path ran
    assert bool(torch.isfinite(res.centroids).all()) and _distinct(res.centroids)
    assert res.codes.shape == (x.shape[0],) and bool((res.codes < 5).all())
    if others == 0:
        assert res.inertia < 1e-6  # every distinct point holds a centroid of its own
    # each of the 3 heavy points is a centroid (up to the pull of an outlier that joined its cluster: 1/101)
    assert brute_distances(base, res.centroids, "l2", direct=True).min(1).values.max() < 0.1


# ---------------------------------------------------------------------------------------------------------------
# seeding, determinism, dtypes, progress
# ---------------------------------------------------------------------------------------------------------------
def test_kmeans_plusplus_seeds():
    x = _blobs(500, 4, 2, seed=1, spread=50.0, dtype=torch.float32)
    for s in range(5):
        seeds = kmeans_plusplus(x, 2, generator=_gen(s))
        assert bool((brute_distances(seeds, x, "l2", direct=True).min(1).values == 0).all())  # rows of x
        # D² sampling puts the second seed in the other, far-away blob
        assert (seeds[0] - seeds[1]).norm() > 20
    plain = kmeans_plusplus(x, 8, generator=_gen(0), local_trials=1)
    assert plain.shape == (8, 4) and _distinct(plain)
    cos = kmeans_plusplus(x, 8, metric="cosine", generator=_gen(0))
    assert cos.shape == (8, 4) and _distinct(cos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_for_a_seeded_generator(backend):
    x = _blobs(600, 8, 10, seed=5, dtype=torch.float32)
    a = kmeans(x, 12, generator=_gen(11), backend=backend)
    b = kmeans(x, 12, generator=_gen(11), backend=backend)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.codes, b.codes)
    assert a.inertia == b.inertia and a.iterations == b.iterations
    assert torch.equal(kmeans_plusplus(x, 12, generator=_gen(11)), kmeans_plusplus(x, 12, generator=_gen(11)))
    assert not torch.equal(kmeans_plusplus(x, 12, generator=_gen(11)), kmeans_plusplus(x, 12, generator=_gen(12)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_input(backend):
    x32 = _blobs(500, 8, 6, seed=6, dtype=torch.float32)
    x = x32.bfloat16()
    res = kmeans(x, 6, generator=_gen(0), backend=backend)
    assert res.centroids.dtype == torch.bfloat16 and _distinct(res.centroids)
    d = brute_distances(x, res.centroids, "l2", direct=True)  # codes and inertia refer to the bf16 centroids
    assert torch.equal(res.codes, d.argmin(1))
    assert res.inertia == pytest.approx(d.min(1).values.sum().item(), rel=1e-5)
    ref = kmeans(x32, 6, generator=_gen(0), backend=backend).inertia
    assert res.inertia <= 1.1 * ref


def test_progress_bar(monkeypatch, capsys):
    x = _blobs(200, 4, 3, dtype=torch.float32)
    ref = kmeans(x, 3, generator=_gen(0))
    pytest.importorskip("tqdm")
    with_bar = kmeans(x, 3, generator=_gen(0), progress=True)
    assert torch.equal(ref.centroids, with_bar.centroids)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm missing: still runs, no bar
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert torch.equal(kmeans(x, 3, generator=_gen(0), progress=True).centroids, ref.centroids)


# ---------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(x=[[1.0, 2.0]]), TypeError, "x"),
        (dict(x=torch.randn(5)), ValueError, "x"),
        (dict(x=torch.randn(2, 3, 4)), ValueError, "x"),
        (dict(x=torch.ones(5, 3, dtype=torch.int64)), TypeError, "x"),
        (dict(x=torch.randn(0, 3)), ValueError, "x"),
        (dict(x=torch.tensor([[1.0, float("nan")]])), ValueError, "x"),
        (dict(num_codes=0), ValueError, "num_codes"),
        (dict(num_codes=-3), ValueError, "num_codes"),
        (dict(num_codes=2.5), TypeError, "num_codes"),
        (dict(num_codes=True), TypeError, "num_codes"),
        (dict(metric="dot"), ValueError, "metric"),
        (dict(generator=0), TypeError, "generator"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(iters=-1), ValueError, "iters"),
        (dict(iters=2.0), ValueError, "iters"),
        (dict(tol=-1e-3), ValueError, "tol"),
        (dict(tol=float("nan")), ValueError, "tol"),
        (dict(progress="yes"), TypeError, "progress"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    args = dict(x=torch.randn(20, 3), num_codes=4)
    args.update(kwargs)
    x, k = args.pop("x"), args.pop("num_codes")
    with pytest.raises(exc, match=name):
        kmeans(x, k, **args)
    pp = {a: v for a, v in args.items() if a in ("metric", "generator", "backend")}
    if len(pp) == len(args):  # the checks kmeans_plusplus shares
        with pytest.raises(exc, match=name):
            kmeans_plusplus(x, k, **pp)
    with pytest.raises(ValueError, match="local_trials"):
        kmeans_plusplus(torch.randn(20, 3), 4, local_trials=0)

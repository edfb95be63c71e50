"""The C++ CPU op's kernel choice (csrc/cpu/cpu_features.h): every tile kernel and epilogue this CPU can run,
forced one by one through VQK_CPU_TILE / VQK_CPU_EPILOGUE, against the fp64 oracle, in the 2-D and the batched form;
the automatic choice for CPUs this one is not (AMX, AVX2-only, aarch64, none of them); few rows against many codes
(the code splits and their merge); and bad overrides."""

import os

import pytest
import torch
from helpers import METRICS, backend_devices, brute_distances, check_search, make_inputs

import vqkernels as vq
from vqkernels import _ext

pytestmark = pytest.mark.skipif(("cpu", "cpu") not in backend_devices(), reason="C++ extension not built")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# a block of many rows (GEMM tile kernels), of few (the GEMV kernel, code splits) and a single row (whose epilogue
# folds codes, not rows, into its lanes)
ROWS = {"many": (700, 900, 33), "few": (3, 5000, 40), "one": (1, 3000, 40)}


def _variants():
    out = []
    for dt in DTYPES:
        for regime, shape in ROWS.items():
            for v in _ext.cpu_variants(dt, shape[0]):
                out.append(pytest.param(dt, shape, v, id=f"{dt}-{regime}-{v['tile']}-{v['epilogue']}"))
    return out


@pytest.fixture
def forced(monkeypatch):
    def force(v):
        for k, val in v["env"].items():
            monkeypatch.setenv(k, val)

    return force


@pytest.mark.parametrize("dt, shape, variant", _variants())
def test_every_variant_matches_the_oracle(dt, shape, variant, forced):
    forced(variant)
    assert _ext.cpu_plan(dt, shape[0]) == {"tile": variant["tile"], "epilogue": variant["epilogue"]}
    x, cb = make_inputs(*shape, DTYPES[dt], seed=7)
    for metric in METRICS:
        for exact in (False, True):
            q = vq.quantize(x, cb, metric=metric, exact=exact, backend="cpu")
            check_search(x, cb, metric, q.codes, q.dist, exact)
            assert torch.equal(q.z_q, cb[q.codes])
            assert torch.equal(q.counts, torch.bincount(q.codes, minlength=cb.shape[0]))


def _integer_ties(n: int, k: int):
    """Small-integer rows and codes with duplicates of every code at later indices: exact ties between different
    codes, spread over tiles and (with few rows) code splits."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (k // 4, 6), generator=g).double()
    cb = torch.cat([base, base, base, base])  # code j ties with j + k/4, j + k/2, j + 3k/4
    x = torch.randint(-3, 4, (n, 6), generator=g).double()
    return x, cb


@pytest.mark.parametrize("dt, shape, variant", _variants())
def test_every_variant_sends_ties_to_the_lowest_index(dt, shape, variant, forced):
    forced(variant)
    x, cb = _integer_ties(shape[0], 4 * 4096)
    for metric in ("l2", "dot"):
        for exact in (False, True):
            codes, _ = vq.nearest_code(x.to(DTYPES[dt]), cb.to(DTYPES[dt]), metric=metric, exact=exact, backend="cpu")
            d64 = brute_distances(x, cb, metric, direct=True)
            assert torch.equal(codes, d64.argmin(1)), (metric, exact)


def _head_split_groups(n: int, k: int, d: int, dtype: torch.dtype, groups: int = 3):
    """Batched inputs as the layers make them (README "Method" §1.6): ``x [G, N, D]`` the head split
    ``view(N, G, D).transpose(0, 1)`` of one tensor, ``codebook [G, K, D]`` a different codebook per group."""
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, groups * d, generator=g, dtype=torch.float64).to(dtype).view(n, groups, d).transpose(0, 1)
    cb = torch.randn(groups, k, d, generator=g, dtype=torch.float64).to(dtype)
    return x, cb


@pytest.mark.parametrize("dt, shape, variant", _variants())
def test_every_variant_runs_the_batched_form_per_group(dt, shape, variant, forced):
    """The batched form runs the same tile kernel and epilogue as a 2-D call on one group (the choice follows a
    group's rows): under every variant, one call on 3 groups passes the oracle (one group per metric and mode, in
    turn), gathers and counts per group, and equals the 2-D calls on
    each group: bitwise in exact mode (fp64 re-scores), and in the fast path wherever the tile kernel sums a dot
    product in one order whatever the block's shape (a batched block may hold more rows than a 2-D call's). Not so:
    at::mm for fp64 and ATen's bf16 brgemm without AMX, whose last bit follows the block's shape."""
    forced(variant)
    x, cb = _head_split_groups(*shape, DTYPES[dt])
    fixed_order = dt != "fp64" and not (dt == "bf16" and variant["tile"] == "brgemm")
    for m, metric in enumerate(METRICS):
        for exact in (False, True):
            q = vq.quantize(x, cb, metric=metric, exact=exact, backend="cpu")
            judged = (m + exact) % x.shape[0]  # the oracle on one group per call (the groups take turns)
            check_search(x[judged], cb[judged], metric, q.codes[judged], q.dist[judged], exact)
            for g in range(x.shape[0]):
                assert torch.equal(q.z_q[g], cb[g][q.codes[g]])
                assert torch.equal(q.counts[g], torch.bincount(q.codes[g], minlength=cb.shape[1]))
                if exact or fixed_order:
                    one = vq.quantize(x[g], cb[g], metric=metric, exact=exact, backend="cpu")
                    assert all(torch.equal(a[g], b) for a, b in zip(q, one)), (metric, exact, g)


@pytest.mark.parametrize("dt, shape, variant", _variants())
def test_every_variant_sends_batched_ties_to_the_lowest_index(dt, shape, variant, forced):
    forced(variant)
    groups = [_integer_ties(shape[0], 4 * 1024) for _ in range(2)]
    groups[1] = (groups[1][0], -groups[1][1])  # another codebook for group 1 (ties all the same)
    x = torch.stack([g[0] for g in groups]).to(DTYPES[dt])
    cb = torch.stack([g[1] for g in groups]).to(DTYPES[dt])
    for metric in ("l2", "dot"):
        for exact in (False, True):
            codes, _ = vq.nearest_code(x, cb, metric=metric, exact=exact, backend="cpu")
            for g, (xg, cg) in enumerate(groups):
                assert torch.equal(codes[g], brute_distances(xg, cg, metric, direct=True).argmin(1)), (metric, exact, g)


@pytest.mark.parametrize("n", [1, 2, 17])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_few_rows_against_many_codes(n, dt):
    """Few row blocks: the codes are split between threads and merged; exact mode's top lists merge too."""
    x, cb = make_inputs(n, 150_000, 16, DTYPES[dt], seed=n)
    cb[123_456] = x[0]  # row 0's exact match far into the codebook (a late split)
    for metric in METRICS:
        for exact in (False, True):
            q = vq.quantize(x, cb, metric=metric, exact=exact, backend="cpu")
            check_search(x, cb, metric, q.codes, q.dist, exact)
            assert torch.equal(q.counts, torch.bincount(q.codes, minlength=cb.shape[0]))
    assert int(vq.nearest_code(x, cb, backend="cpu")[0][0]) == 123_456


def test_row_strided_codebook_is_read_in_place():
    """Rows of a wider tensor (unit stride along D): the same answer as a contiguous copy, without making one."""
    wide = torch.randn(3000, 48, generator=torch.Generator().manual_seed(1))
    cb = wide[:, 5:37]
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(2))
    for n in (1, 50):
        a = vq.quantize(x[:n], cb, backend="cpu")
        b = vq.quantize(x[:n], cb.contiguous(), backend="cpu")
        assert torch.equal(a.codes, b.codes) and torch.equal(a.z_q, b.z_q)


@pytest.mark.parametrize(
    "dtype, features, rows, want",
    [
        # bf16: AMX tiles through ATen's brgemm where the CPU has them, else our AVX512-BF16 kernel, else brgemm
        ("bf16", "avx2,avx512,avx512bf16,amx_bf16", 256, "brgemm+amx,avx512"),
        ("bf16", "avx2,avx512,avx512bf16", 256, "avx512bf16,avx512"),
        ("bf16", "avx2", 256, "brgemm,avx2"),
        ("bf16", "", 256, "brgemm,scalar"),
        ("fp16", "avx2,avx512,avx512bf16,amx_bf16,amx_fp16", 256, "brgemm+amx,avx512"),
        ("fp16", "avx2,avx512,avx512bf16,amx_bf16", 256, "brgemm,avx512"),
        ("fp32", "avx2,avx512,amx_bf16", 256, "brgemm,avx512"),
        # fp32 of 256 rows or more: the bf16 prefilter on AMX tiles, else on vdpbf16ps, where there is AVX512-BF16
        ("fp32", "avx2,avx512,avx512bf16,amx_bf16", 256, "brgemm+amx+rescore,avx512"),
        ("fp32", "avx2,avx512,avx512bf16", 256, "avx512bf16+rescore,avx512"),
        ("fp32", "avx2,avx512,avx512bf16", 255, "brgemm,avx512"),
        ("fp32", "neon", 256, "brgemm,neon"),
        ("fp64", "avx2,avx512", 256, "mm,scalar"),
        # few rows: the GEMV kernel on vector CPUs, whatever the bf16 tiles
        ("bf16", "avx2,avx512,avx512bf16,amx_bf16", 8, "gemv-avx512bf16,avx512"),
        ("bf16", "avx2,avx512", 1, "gemv,avx512"),
        ("fp16", "avx2,avx512,avx512bf16", 1, "gemv,avx512"),
        ("fp32", "avx2", 1, "gemv,avx2"),
        ("fp32", "", 1, "brgemm,scalar"),
        ("fp64", "avx2,avx512", 1, "mm,scalar"),
    ],
)
def test_automatic_choice_per_cpu_class(dtype, features, rows, want):
    assert _ext.C.cpu_choose(dtype, features, rows) == want


def test_overrides_and_their_errors(monkeypatch):
    features = _ext.cpu_features()
    assert _ext.C.cpu_choose("bf16", "avx2,avx512,avx512bf16", 256, "brgemm") == "brgemm,avx512"
    assert _ext.C.cpu_choose("fp32", "avx2,avx512", 256, None, "scalar") == "brgemm,scalar"
    with pytest.raises(RuntimeError, match="no AVX512-BF16"):
        _ext.C.cpu_choose("bf16", "avx2", 256, "avx512bf16")
    # the GEMV's vdpbf16ps form: bf16 only (other dtypes keep the GEMV kernel they have), and only with AVX512-BF16
    assert _ext.C.cpu_choose("bf16", "avx2,avx512,avx512bf16", 3, "gemv") == "gemv,avx512"
    assert _ext.C.cpu_choose("fp32", "avx2,avx512,avx512bf16", 3, "gemv-avx512bf16") == "gemv,avx512"
    with pytest.raises(RuntimeError, match="gemv-avx512bf16 but this CPU has no AVX512-BF16"):
        _ext.C.cpu_choose("bf16", "avx2,avx512", 3, "gemv-avx512bf16")
    # the fp32 prefilter: on either bf16 tile kernel (rounding needs AVX512-BF16); other dtypes take the tile below
    assert _ext.C.cpu_choose("fp32", "avx2,avx512,avx512bf16", 20, "brgemm+rescore") == "brgemm+rescore,avx512"
    assert _ext.C.cpu_choose("bf16", "avx2,avx512,avx512bf16", 300, "brgemm+rescore") == "brgemm,avx512"
    assert _ext.C.cpu_choose("bf16", "avx2,avx512,avx512bf16", 300, "avx512bf16+rescore") == "avx512bf16,avx512"
    with pytest.raises(RuntimeError, match="avx512bf16\\+rescore but this CPU has no AVX512-BF16"):
        _ext.C.cpu_choose("fp32", "avx2,avx512,amx_bf16", 300, "avx512bf16+rescore")
    with pytest.raises(RuntimeError, match="cannot run it"):
        _ext.C.cpu_choose("fp32", "avx2", 256, None, "avx512")
    with pytest.raises(ValueError, match="VQK_CPU_TILE must be"):
        _ext.C.cpu_choose("fp32", "avx2", 256, "amx_magic")
    with pytest.raises(ValueError, match="unknown CPU feature"):
        _ext.C.cpu_choose("fp32", "sse9", 256)
    # through the op: a bad value, or a kernel this CPU lacks, is a ValueError naming the variable
    x, cb = make_inputs(10, 20, 8, torch.float32)
    monkeypatch.setenv("VQK_CPU_EPILOGUE", "sse")
    with pytest.raises(ValueError, match="VQK_CPU_EPILOGUE must be"):
        vq.nearest_code(x, cb, backend="cpu")
    monkeypatch.setenv("VQK_CPU_EPILOGUE", "avx512" if "avx512" not in features else "neon")
    with pytest.raises(ValueError, match="VQK_CPU_EPILOGUE=.* cannot run it"):
        vq.nearest_code(x, cb, backend="cpu")
    monkeypatch.delenv("VQK_CPU_EPILOGUE")
    # the older name of the bf16 override still works
    monkeypatch.setenv("VQK_CPU_BF16_BRGEMM", "1")
    assert _ext.cpu_plan("bf16")["tile"].startswith("brgemm")


def test_info_reports_the_choice():
    from vqkernels import info

    data = info.collect()
    assert data["cpu_features"] == _ext.cpu_features()
    for dt in DTYPES:
        p = data["cpu_plans"][dt]
        assert {"tile": p["tile"], "epilogue": p["epilogue"]} == _ext.cpu_plan(dt)
        assert {k: p["few_rows"][k] for k in ("tile", "epilogue")} == _ext.cpu_plan(dt, 1)
    assert os.environ.get("VQK_CPU_TILE") is None  # nothing leaked from the tests above


@pytest.mark.parametrize("bn", [None, "50"])
@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
def test_results_do_not_depend_on_the_thread_count(dt, bn, monkeypatch):
    """Row blocks, code splits and which task computes the key terms all follow the thread count; the answer must
    not (a layer under DDP with one thread per rank must agree with a run on more threads). fp64 is left out: its
    tiles are at::mm's, whose BLAS sums a dot product in an order that depends on the tile's shape (its last bit
    may differ). bn = "50": tiles of 50 codes (not a multiple of the GEMV's 4-code steps), so that the few-row
    searches split the codes 4, 8 or 12 ways."""
    if bn is not None:
        monkeypatch.setenv("VQK_CPU_BN", bn)
    old = torch.get_num_threads()
    outs = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for n in (1, 9, 16, 40, 300):
                x, cb = make_inputs(n, 3000, 24, DTYPES[dt], seed=n)
                for exact in (False, True):
                    q = vq.quantize(x, cb, metric="cosine", exact=exact, backend="cpu")
                    outs.setdefault((n, exact), []).append((q.codes, q.dist, q.counts))
    finally:
        torch.set_num_threads(old)
    for key, runs in outs.items():
        for codes, dist, counts in runs[1:]:
            assert torch.equal(codes, runs[0][0]) and torch.equal(dist, runs[0][1]), key
            assert torch.equal(counts, runs[0][2]), key


# ---- fp32 through the bf16 prefilter (csrc/cpu/search.cpp, search_fp32_via_bf16) ------------------------------
PREFILTER = ("avx512bf16+rescore", "brgemm+amx+rescore")
needs_prefilter = pytest.mark.skipif(
    _ext.cpu_plan("fp32", 300)["tile"] not in PREFILTER, reason="the CPU has no AVX512-BF16"
)


@needs_prefilter
@pytest.mark.parametrize("metric", METRICS)
def test_fp32_prefilter_returns_the_fp64_answer(metric):
    """Every candidate of the prefilter is re-scored in fp64, so on each row its top-4 settles, fast mode returns
    the fp64 argmin and its fp64 distance (rounded to fp32 once); the rows it cannot settle take the fp32 search.
    On Gaussian data nearly every row settles: the distances then match fp64 to the last bit or one ulp, which the
    fp32 search's distances (|x|^2 + key, rounded several times) do not."""
    x, cb = make_inputs(600, 5000, 64, torch.float32, seed=11)
    assert _ext.cpu_plan("fp32", 600)["tile"] in PREFILTER
    q = vq.quantize(x, cb, metric=metric, backend="cpu")
    check_search(x, cb, metric, q.codes, q.dist, exact=False, max_rows=600)
    best, arg = brute_distances(x, cb, metric, direct=True).min(1)
    settled = (q.codes == arg) & ((q.dist.double() - best).abs() <= best.abs() * 2.0**-23)
    assert settled.float().mean() > 0.9, settled.float().mean()
    fp32 = vq.quantize(x, cb, metric=metric, backend="torch")
    assert ((fp32.dist.double() - best).abs() <= best.abs() * 2.0**-23).float().mean() < settled.float().mean()


@needs_prefilter
@pytest.mark.parametrize("tile", ["avx512bf16+rescore", "brgemm+rescore"])
@pytest.mark.parametrize("metric", METRICS)
def test_fp32_prefilter_falls_back_where_its_bound_is_loose(metric, tile, monkeypatch):
    """Far from the origin (|x| |c| much larger than the gaps between distances) the bf16 rounding swamps the gaps
    and the top-4 settles few rows: the rest go to the fp32 search. Norms outside 2^+-30 skip the prefilter
    (vdpbf16ps flushes denormals). Every answer must still pass the oracle, in both modes, on either bf16 tile."""
    monkeypatch.setenv("VQK_CPU_TILE", tile)
    x, cb = make_inputs(400, 3000, 32, torch.float64, seed=5)
    far_x, far_cb = (x * 0.01 + 20).float(), (cb * 0.01 + 20).float()
    for xs, cs in ((far_x, far_cb), (x.float() * 1e-12, cb.float() * 1e-12), (x.float() * 1e12, cb.float() * 1e12)):
        for exact in (False, True):
            q = vq.quantize(xs, cs, metric=metric, exact=exact, backend="cpu")
            check_search(xs, cs, metric, q.codes, q.dist, exact)
            assert torch.equal(q.z_q, cs[q.codes])
            assert torch.equal(q.counts, torch.bincount(q.codes, minlength=cs.shape[0]))


@needs_prefilter
def test_fp32_prefilter_reports_non_finite_values():
    x, cb = make_inputs(300, 500, 16, torch.float32, seed=2)
    bad = x.clone()
    bad[7, 3] = float("nan")
    with pytest.raises(ValueError, match="x contains non-finite"):
        vq.quantize(bad, cb, backend="cpu")
    bad = cb.clone()
    bad[11, 0] = float("inf")
    with pytest.raises(ValueError, match="codebook contains non-finite"):
        vq.quantize(x, bad, backend="cpu")


@needs_prefilter
@pytest.mark.parametrize("tile", ["avx512bf16+rescore", "brgemm+rescore"])
def test_fp32_prefilter_does_not_depend_on_the_thread_count(tile, monkeypatch):
    """Which rows the prefilter settles depends on the last bits of its keys: its row blocks keep one shape on any
    thread count (oneDNN may choose its brgemm kernel by the tile's shape), so codes and distances do not change."""
    monkeypatch.setenv("VQK_CPU_TILE", tile)
    x, cb = make_inputs(600, 3000, 40, torch.float32, seed=4)
    far_x, far_cb = x + 3, cb + 3  # about a third of the rows settle, the rest are searched again in fp32
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append([vq.nearest_code(a, b, metric="l2", backend="cpu") for a, b in ((x, cb), (far_x, far_cb))])
    finally:
        torch.set_num_threads(old)
    for run in runs[1:]:
        for (codes, dist), (codes0, dist0) in zip(run, runs[0]):
            assert torch.equal(codes, codes0) and torch.equal(dist, dist0)

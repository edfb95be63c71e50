"""Bad input gets a clear ValueError/TypeError naming the argument; backend selection explains itself."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import BACKEND_DEVICES, backend_devices

import vqkernels as vq
from vqkernels import dispatch

X = torch.randn(10, 4)
CB = torch.randn(6, 4)

SEARCH_CASES = [
    ("x 1-D", dict(x=torch.randn(4)), ValueError, "x must be a 2-D"),
    ("x 4-D", dict(x=torch.randn(2, 2, 3, 4)), ValueError, "x must be a 2-D"),
    ("x 3-D, codebook 2-D", dict(x=torch.randn(2, 3, 4)), ValueError, "both batched 3-D"),
    ("codebook 3-D, x 2-D", dict(codebook=torch.randn(2, 6, 4)), ValueError, "both batched 3-D"),
    (
        "batched G mismatch",
        dict(x=torch.randn(2, 3, 4), codebook=torch.randn(3, 6, 4)),
        ValueError,
        "same number of groups",
    ),
    ("batched empty codebook", dict(x=torch.randn(2, 3, 4), codebook=torch.randn(2, 0, 4)), ValueError, "one code"),
    ("codebook 1-D", dict(codebook=torch.randn(4)), ValueError, "codebook must be a 2-D"),
    ("D mismatch", dict(codebook=torch.randn(6, 5)), ValueError, "same D"),
    ("empty codebook", dict(codebook=torch.randn(0, 4)), ValueError, "at least one code"),
    ("integer x", dict(x=torch.ones(10, 4, dtype=torch.int64)), TypeError, "x must be float"),
    ("integer codebook", dict(codebook=torch.ones(6, 4, dtype=torch.int32)), TypeError, "codebook must be float"),
    ("mixed dtypes", dict(x=torch.randn(10, 4, dtype=torch.float64)), TypeError, "same dtype"),
    ("device mismatch", dict(codebook=torch.randn(6, 4, device="meta")), ValueError, "same device"),
    ("nan codebook", dict(codebook=torch.tensor([[float("nan")] * 4] * 6)), ValueError, "codebook contains non-finite"),
    (
        "inf codebook",
        dict(codebook=CB.clone().index_fill_(0, torch.tensor([3]), float("inf"))),
        ValueError,
        "codebook contains non-finite",
    ),
    ("nan x", dict(x=X.clone().index_fill_(0, torch.tensor([7]), float("nan"))), ValueError, "x contains non-finite"),
    ("bad metric", dict(metric="euclid"), ValueError, "metric must be"),
    ("non-bool exact", dict(exact=1), TypeError, "exact must be a bool"),
    ("not a tensor", dict(x=[[1.0] * 4]), TypeError, "x must be a torch.Tensor"),
]


def _on(dev, v):
    """A case's tensors on the device under test (the device-mismatch cases keep their meta tensor)."""
    return v.to(dev) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v


def _sample(x, codebook, *, metric, exact, backend):
    """sample_code with the search ops' signature (it has a seed where they have ``exact``)."""
    if exact is not False:
        pytest.skip("sample_code has no exact argument")
    return vq.sample_code(x, codebook, metric=metric, seed=0, backend=backend)


@pytest.mark.parametrize("fn", [vq.nearest_code, vq.quantize, _sample], ids=["nearest_code", "quantize", "sample"])
@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("case", SEARCH_CASES, ids=[c[0] for c in SEARCH_CASES])
def test_bad_search_input(case, bd, fn):
    backend, dev = bd
    _, override, exc, msg = case
    args = {k: _on(dev, v) for k, v in (dict(x=X, codebook=CB, metric="l2", exact=False) | override).items()}
    with pytest.raises(exc, match=msg):
        fn(args["x"], args["codebook"], metric=args["metric"], exact=args["exact"], backend=backend)


SAMPLE_CASES = [
    ("no rows", dict(x=X[:0]), ValueError, "at least one row"),
    ("negative seed", dict(seed=-1), ValueError, "seed must be"),
    ("seed too large", dict(seed=1 << 64), ValueError, "seed must be"),
    ("float seed", dict(seed=1.0), ValueError, "seed must be"),
]


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("case", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_bad_sample_input(case, bd):
    backend, dev = bd
    _, override, exc, msg = case
    args = {k: _on(dev, v) for k, v in (dict(x=X, codebook=CB, seed=3) | override).items()}
    with pytest.raises(exc, match=msg):
        vq.sample_code(args["x"], args["codebook"], seed=args["seed"], backend=backend)


CODE_STATS_CASES = [
    ("codes int32", dict(codes=torch.zeros(10, dtype=torch.int32)), TypeError, "codes must be int64"),
    ("codes wrong length", dict(codes=torch.zeros(9, dtype=torch.int64)), ValueError, "codes must have shape"),
    ("codes 2-D", dict(codes=torch.zeros(10, 1, dtype=torch.int64)), ValueError, "codes must have shape"),
    (
        "batched codes 1-D",
        dict(x=torch.randn(2, 10, 4), codes=torch.zeros(10, dtype=torch.int64)),
        ValueError,
        "codes must have shape",
    ),
    ("num_codes 0", dict(num_codes=0), ValueError, "num_codes"),
    ("num_codes float", dict(num_codes=3.0), ValueError, "num_codes"),
    ("x integer", dict(x=torch.ones(10, 4, dtype=torch.int64)), TypeError, "x must be float"),
    ("codes out of range", dict(codes=torch.full((10,), 6)), ValueError, "codes must lie in"),
    ("negative code", dict(codes=torch.full((10,), -1)), ValueError, "codes must lie in"),
    ("device mismatch", dict(codes=torch.zeros(10, dtype=torch.int64, device="meta")), ValueError, "same device"),
]


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
@pytest.mark.parametrize("case", CODE_STATS_CASES, ids=[c[0] for c in CODE_STATS_CASES])
def test_bad_code_stats_input(case, bd):
    backend, dev = bd
    _, override, exc, msg = case
    args = {
        k: _on(dev, v) for k, v in (dict(x=X, codes=torch.zeros(10, dtype=torch.int64), num_codes=6) | override).items()
    }
    with pytest.raises(exc, match=msg):
        vq.code_stats(args["x"], args["codes"], args["num_codes"], backend=backend)


@pytest.mark.skipif(("cpu", "cpu") not in backend_devices(), reason="C++ extension not built")
def test_cpp_ops_check_their_arguments_too():
    ops = torch.ops.vqkernels
    with pytest.raises(ValueError, match="same D"):
        ops.nearest_code(X, torch.randn(6, 5), "l2", False)
    with pytest.raises(TypeError, match="same dtype"):
        ops.quantize(X, CB.double(), "l2", False)
    with pytest.raises(ValueError, match="metric must be"):
        ops.quantize(X, CB, "manhattan", False)
    with pytest.raises(ValueError, match="at least one code"):
        ops.nearest_code(X, CB[:0], "l2", False)
    with pytest.raises(ValueError, match="codes must lie in"):
        ops.code_stats(X, torch.full((10,), 9), 6)
    with pytest.raises(ValueError, match="at least one row"):
        ops.sample_code(X[:0], CB, "l2", 0)
    with pytest.raises(ValueError, match="x contains non-finite"):
        ops.sample_code(X.clone().fill_(float("nan")), CB, "l2", 0)


def test_unknown_and_wrong_device_backend():
    with pytest.raises(ValueError, match="backend must be"):
        vq.nearest_code(X, CB, backend="tpu")
    with pytest.raises(ValueError, match="runs on cpu"):
        dispatch.select("cpu", torch.device("cuda"))
    assert "runs on cpu tensors, not cuda" in dispatch.BACKENDS["cpu"].why_not("cuda")


def test_unavailable_backend_says_why(monkeypatch):
    fake = dispatch.Backend(
        "cpu", ("cpu",), "", "", checks_finite=True, build_why_not=lambda: "it was not compiled (test)"
    )
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", fake)
    with pytest.raises(RuntimeError, match="it was not compiled"):
        vq.nearest_code(X, CB, backend="cpu")
    assert dispatch.select("auto", torch.device("cpu")) == "torch"


def test_import_without_extension_falls_back_to_reference():
    code = (
        "import sys; sys.modules['vqkernels._C'] = None\n"
        "import torch, vqkernels as vq\n"
        "from vqkernels import _ext, dispatch\n"
        "assert not _ext.available() and 'vqkernels._C' in _ext.load_error, _ext.load_error\n"
        "x, cb = torch.randn(50, 8), torch.randn(20, 8)\n"
        "codes, _ = vq.nearest_code(x, cb)\n"
        "assert torch.equal(codes, torch.cdist(x.double(), cb.double()).argmin(1))\n"
        "try:\n"
        "    vq.nearest_code(x, cb, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'not built' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_info_lists_every_backend(capsys):
    from vqkernels import info

    info.main([])
    out = capsys.readouterr().out
    for name, b in dispatch.BACKENDS.items():
        assert f"  {name} " in out and f"vqkernels::<op>{b.suffix}\n" in out
        for dev in b.devices:
            assert f"{dev:<5} {'available' if b.available(dev) else 'unavailable: ' + b.why_not(dev)}" in out
    assert "backends (each implements nearest_code, quantize, code_stats, sample_code):" in out
    # the C++ CPU op's kernels, as far as the extension reports them
    from vqkernels import _ext

    data = info.collect()
    assert data["cpu_features"] == _ext.cpu_features()
    features = ", ".join(data["cpu_features"]) or "none reported"
    assert f"{'cpu_features':<{max(map(len, data))}}  {features}\n" in out
    plans = {dt: _ext.cpu_plan(dt) for dt in info.CPU_DTYPES}
    assert {dt: (p["tile"], p["epilogue"]) for dt, p in data["cpu_plans"].items()} == {
        dt: (p["tile"], p["epilogue"]) for dt, p in plans.items() if p is not None
    }
    if not data["cpu_plans"]:
        assert "cpu kernels: not reported" in out


def test_info_reports_the_cpu_kernels(capsys, monkeypatch):
    """``info`` prints the CPU features and, per dtype, the tile kernel / epilogue that runs and every one that can
    (here from a faked extension, the plan read from the environment like the C++ op reads it)."""
    from vqkernels import _ext, info

    def plan(dtype, rows=None):
        default = "avx512bf16" if dtype == "bf16" else ("mm" if dtype == "fp64" else "brgemm")
        return {
            "tile": os.environ.get(_ext.CPU_TILE_ENV, default),
            "epilogue": os.environ.get(_ext.CPU_EPILOGUE_ENV, "avx512"),
        }

    def variants(dtype, rows=None):
        tiles = {"bf16": ("avx512bf16", "brgemm"), "fp64": ("mm",)}.get(dtype, ("brgemm",))
        pairs = [(t, e) for t in tiles for e in ("avx512", "avx2", "scalar")]
        return [{"tile": t, "epilogue": e, "env": {_ext.CPU_TILE_ENV: t, _ext.CPU_EPILOGUE_ENV: e}} for t, e in pairs]

    monkeypatch.setattr(_ext, "cpu_plan", plan)
    monkeypatch.setattr(_ext, "cpu_variants", variants)
    monkeypatch.setattr(_ext, "cpu_features", lambda: ["avx2", "avx512f", "avx512bf16"])
    monkeypatch.delenv(_ext.CPU_TILE_ENV, raising=False)
    monkeypatch.setenv(_ext.CPU_EPILOGUE_ENV, "avx2")
    data = info.collect()
    assert data["cpu_features"] == ["avx2", "avx512f", "avx512bf16"]
    assert list(data["cpu_plans"]) == ["fp32", "bf16", "fp16", "fp64"]
    few = {"tile": "avx512bf16", "epilogue": "avx2", "variants": variants("bf16", 1)}  # the fake ignores rows
    assert data["cpu_plans"]["bf16"] == {
        "tile": "avx512bf16",
        "epilogue": "avx2",
        "variants": variants("bf16"),
        "few_rows": few,
    }
    info.main([])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert ["cpu_features", "avx2, avx512f, avx512bf16"] in [ln.split(None, 1) for ln in lines]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("cpu kernels"))
    assert "VQK_CPU_EPILOGUE=avx2 is set" in lines[start]
    block = lines[start + 1 : start + 5]
    assert [ln.split()[:2] for ln in block] == [
        ["fp32", "brgemm/avx2"],
        ["bf16", "avx512bf16/avx2"],
        ["fp16", "brgemm/avx2"],
        ["fp64", "mm/avx2"],
    ]
    bf16 = "avx512bf16/avx512 (auto), avx512bf16/avx2, avx512bf16/scalar, brgemm/avx512, brgemm/avx2, brgemm/scalar"
    assert block[1].endswith(f"can run: {bf16}")
    assert lines[start + 5].startswith("backends (each implements")  # the backend block follows, unchanged


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_empty_batch_returns_empty_results(bd):
    backend, dev = bd
    for exact in (False, True):
        q = vq.quantize(X[:0].to(dev), CB.to(dev), exact=exact, backend=backend)
        assert q.codes.shape == (0,) and q.z_q.shape == (0, 4) and q.dist.shape == (0,)
        assert torch.equal(q.counts.cpu(), torch.zeros(6, dtype=torch.int64))
        codes, dist = vq.nearest_code(X[:0].to(dev), CB.to(dev), exact=exact, backend=backend)
        assert codes.shape == dist.shape == (0,)
    sums, counts = vq.code_stats(X[:0].to(dev), torch.zeros(0, dtype=torch.int64, device=dev), 6, backend=backend)
    assert sums.shape == (6, 4) and not sums.any() and not counts.any()


def test_triton_backend_loads_where_it_should():
    """With triton installed and a GPU or the interpreter, the backend must load: a kernel module that fails to
    import would otherwise only turn every Triton test into a skip."""
    import importlib.util

    from vqkernels import triton as vqt

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if not (torch.cuda.is_available() or vqt.interpreting()):
        pytest.skip("no GPU and no TRITON_INTERPRET")
    assert vqt.load(), vqt.load_error
    assert dispatch.BACKENDS["triton"].why_not() is None
    assert dispatch.BACKENDS["triton"].available("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bd", BACKEND_DEVICES)
def test_non_finite_policy_of_the_backend_table(bd):
    """A backend marked ``checks_finite`` refuses NaN/Inf in its own ops (its kernels read every element anyway);
    for the others the check is vqkernels.ops's, before the launch (tested above through the public API)."""
    backend, dev = bd
    b = dispatch.BACKENDS[backend]
    bad_x = X.clone().index_fill_(0, torch.tensor([3]), float("nan")).to(dev)
    bad_cb = CB.clone().index_fill_(0, torch.tensor([2]), float("inf")).to(dev)
    calls = {
        "nearest_code": lambda x, cb: b.op("nearest_code")(x, cb, "l2", False),
        "quantize": lambda x, cb: b.op("quantize")(x, cb, "cosine", True),
        "sample_code": lambda x, cb: b.op("sample_code")(x, cb, "dot", 7),
    }
    for call in calls.values():
        for x, cb, which in ((bad_x, CB.to(dev), "x"), (X.to(dev), bad_cb, "codebook")):
            if b.checks_finite:
                with pytest.raises(ValueError, match=f"{which} contains non-finite"):
                    call(x, cb)
            else:
                call(x, cb)  # no check of its own: it runs (on garbage), vqkernels.ops is the gate

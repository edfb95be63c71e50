"""The extension WITH its CUDA ops, built against a CUDA build of torch, checked on a machine without a GPU.

Run by ``make cuda-ext-check`` (Makefile): a separate venv with a CUDA torch builds ``vqkernels._C`` out of tree
into ``build/cuda-ext/lib`` (a full package copy) and runs this file from ``build/cuda-ext`` with that copy first on
PYTHONPATH. The file name does not match pytest's ``test_*.py``, so ``make test`` never collects it; run anywhere
else (a CPU torch, an extension without CUDA ops) the whole module skips.

What it proves without a device: the CUDA-linked library loads; every op of the ``vqkernels`` library defined in
csrc/registration.cpp has a CUDA and a CPU kernel; the ops' fakes pass ``torch.library.opcheck`` on meta tensors
and on fake CUDA tensors and give the right shapes and dtypes; the ``cuda`` backend is built and lacks only a
device (``dispatch`` and ``python -m vqkernels.info`` say so); the CPU ops of this build give correct results;
the constants of csrc/numerics.h that ``vqkernels._C`` exposes are those of vqkernels/numerics.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if torch.version.cuda is None:
    pytest.skip(f"torch {torch.__version__} is not a CUDA build", allow_module_level=True)

import vqkernels as vq  # noqa: E402
from vqkernels import _ext  # noqa: E402
from vqkernels.dispatch import BACKENDS, select  # noqa: E402

if not _ext.with_cuda():
    pytest.skip(
        f"vqkernels._C was built without its CUDA ops ({_ext.load_error or 'CPU-only build'})", allow_module_level=True
    )

# The package copy that `make cuda-ext-check` built (absolute path), when run by it.
BUILT_LIB = os.environ.get("VQK_CUDA_EXT_LIB")
EXPECTED_OPS = {"nearest_code", "quantize", "code_stats", "sample_code"}
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
METRICS = ("l2", "cosine", "dot")
HAS_DEVICE = torch.cuda.is_available()


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _library_ops() -> list[str]:
    """The vqkernels ops whose schema csrc/registration.cpp defines, from the dispatcher (not a hard-coded list):
    the Python-defined ``*_ref`` / ``*_triton`` custom ops of the same namespace are registered elsewhere."""
    names = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("vqkernels::"):
            continue
        if "registration.cpp" in torch._C._dispatch_dump(name):
            names.append(name.split("::", 1)[1])
    return sorted(names)


OPS = _library_ops()


def _op(name):
    return getattr(torch.ops.vqkernels, name).default


# seeds as the schema's int carries them (a signed int64 bit pattern): s_code = low 32 bits, s_row = high 32 bits
SEEDS = (0, 1, 2**32 - 1, -(2**32), -1)


def _args(name, n, k, d, dtype, metric="l2", exact=False, device="meta", seed=0):
    x = torch.empty(n, d, dtype=dtype, device=device)
    if name == "code_stats":
        return (x, torch.empty(n, dtype=torch.int64, device=device), k)
    if name == "sample_code":
        return (x, torch.empty(k, d, dtype=dtype, device=device), metric, seed)
    return (x, torch.empty(k, d, dtype=dtype, device=device), metric, exact)


def _variants(name):
    """(metric, exact or seed) pairs each op is checked with."""
    if name == "code_stats":
        return [(None, None)]
    if name == "sample_code":
        return [(m, s) for m in METRICS for s in SEEDS[:2]] + [("l2", s) for s in SEEDS[2:]]
    return [(m, e) for m in METRICS for e in (False, True)]


def _expected(name, n, k, d, dtype):
    """(shape, dtype) of every output of op `name`."""
    acc = _acc(dtype)
    if name == "nearest_code":
        return [((n,), torch.int64), ((n,), acc)]
    if name == "quantize":
        return [((n,), torch.int64), ((n, d), dtype), ((n,), acc), ((k,), torch.int64)]
    if name == "sample_code":
        return [((k,), torch.int64)]
    return [((k, d), acc), ((k,), torch.int64)]


def _outputs(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


# ---------------------------------------------------------------------------------------------------------------
# the library that loaded is this build's, with CUDA code in it
# ---------------------------------------------------------------------------------------------------------------
def test_loaded_the_cuda_build():
    so = os.path.realpath(_ext.C.__file__)
    if BUILT_LIB is not None:
        lib = os.path.realpath(BUILT_LIB)
        assert os.path.realpath(vq.__file__).startswith(lib + os.sep), (vq.__file__, lib)
        assert so.startswith(os.path.join(lib, "vqkernels") + os.sep), (so, lib)
    assert _ext.C.with_cuda == 1
    blob = open(so, "rb").read()
    assert b"libc10_cuda.so" in blob and b"libcudart" in blob, "the _C library does not link the CUDA runtime"
    assert b".nv_fatbin" in blob, "the _C library holds no device code"
    # the archs the Makefile asked for (TORCH_CUDA_ARCH_LIST syntax: "8.0;9.0")
    for arch in filter(None, os.environ.get("VQK_CUDA_EXT_ARCHS", "").replace(" ", ";").split(";")):
        sm = "sm_" + arch.replace("+PTX", "").replace(".", "")
        assert sm.encode() in blob, f"no {sm} code in {so}"


def test_build_flags_have_no_fast_math():
    """Distances are compared and returned: IEEE division/sqrt, no --use_fast_math anywhere in the build."""
    import glob

    base = os.path.dirname(BUILT_LIB) if BUILT_LIB else None
    files = glob.glob(os.path.join(base, "temp.*", "build.ninja")) if base else []
    if not files:
        pytest.skip("no build.ninja of the CUDA build next to the package copy")
    text = open(files[0]).read()
    assert "nvcc" in text and "vq_cuda.cu" in text
    for flag in ("use_fast_math", "ftz=true", "prec-div=false", "prec-sqrt=false", "-ffast-math"):
        assert flag not in text, f"{flag} in {files[0]}"


# ---------------------------------------------------------------------------------------------------------------
# dispatcher: every op of the library has a CUDA and a CPU kernel
# ---------------------------------------------------------------------------------------------------------------
def test_library_ops_are_the_schemas():
    assert set(OPS) == EXPECTED_OPS, OPS


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("key", ["CUDA", "CPU"])
def test_kernel_registered(name, key):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vqkernels::{name}", key)
    # ... and by this project's sources: csrc/cuda/binding.cpp for CUDA, csrc/cpu/*.cpp for CPU
    where = {"CUDA": "csrc/cuda/binding.cpp", "CPU": "csrc/cpu/"}[key]
    line = next(ln for ln in torch._C._dispatch_dump(f"vqkernels::{name}").splitlines() if ln.startswith(key + ":"))
    assert where in line, line


# ---------------------------------------------------------------------------------------------------------------
# opcheck and fakes, on meta tensors (and on fake CUDA tensors: what torch.compile traces for a GPU)
# ---------------------------------------------------------------------------------------------------------------
# On meta tensors all four of opcheck's tests run: the schema, the autograd registration (quantize with a codebook
# that requires grad), the fake against the Meta kernel (which is the fake) and AOT dispatch with dynamic shapes.
# The values are only checked where there is data: the CPU-tensor opcheck below, tests/test_cuda_backend.py on a GPU.
META_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
CASES = [(5, 7, 3), (0, 7, 3), (33, 70, 9), (1, 1, 1)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(EXPECTED_OPS))
def test_opcheck_meta(name, dtype, case):
    n, k, d = case
    for metric, extra in _variants(name):
        if name == "sample_code":
            args = _args(name, n, k, d, dtype, metric, seed=extra)
        else:
            args = _args(name, n, k, d, dtype, metric, extra)
        if name == "quantize":
            args[1].requires_grad_()
        torch.library.opcheck(_op(name), args, test_utils=META_UTILS)
        out = _outputs(_op(name)(*args))  # the Meta kernel is the fake
        got = [(tuple(t.shape), t.dtype) for t in out]
        assert got == _expected(name, n, k, d, dtype), (name, metric, extra)
        assert all(t.device.type == "meta" for t in out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(EXPECTED_OPS))
def test_fake_cuda_tensors(name, dtype):
    """Fake CUDA tensors (no device needed): the fakes keep the device, shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, k, d = 33, 70, 9
    with FakeTensorMode():
        args = _args(name, n, k, d, dtype, "cosine", True, device="cuda", seed=-1)
        torch.library.opcheck(_op(name), args, test_utils=("test_schema", "test_faketensor"))
        out = _outputs(_op(name)(*args))
        assert [(tuple(t.shape), t.dtype) for t in out] == _expected(name, n, k, d, dtype)
        assert all(t.device.type == "cuda" for t in out)


# ---------------------------------------------------------------------------------------------------------------
# the backend is built; only the device is missing
# ---------------------------------------------------------------------------------------------------------------
def test_cuda_backend_lacks_only_a_device(monkeypatch):
    assert BACKENDS["cuda"].why_not() is None, "the cuda backend's ops are not registered"  # built: ops exist
    if HAS_DEVICE:
        assert BACKENDS["cuda"].why_not("cuda") is None
        return
    assert BACKENDS["cuda"].why_not("cuda") == "no CUDA device is visible"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert BACKENDS["cuda"].why_not("cuda") is None, "the cuda backend lacks more than a device"


def test_info_reports_cuda_built_without_device():
    out = subprocess.run(
        [sys.executable, "-m", "vqkernels.info"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ.copy(),
        timeout=300,
    ).stdout
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert lines["extension_cuda"].split()[1] == "True", out
    assert lines["torch_cuda"].split()[1] == torch.version.cuda, out
    assert "loaded" in lines["extension"], out
    # the cuda backend's block: "  cuda     <summary>", then indented lines, one per device type ("cuda  <state>")
    rows = out.splitlines()
    start = next(i for i, ln in enumerate(rows) if ln.startswith("  cuda "))
    block = []
    for ln in rows[start + 1 :]:
        if not ln.startswith("   "):  # the next backend (two spaces) or the end
            break
        block.append(ln.strip())
    state = next(ln[len("cuda") :].strip() for ln in block if ln.startswith("cuda "))
    if HAS_DEVICE:
        assert state == "available", out
    else:
        assert state == "unavailable: no CUDA device is visible", out


# ---------------------------------------------------------------------------------------------------------------
# the CPU ops of the CUDA-linked library still work
# ---------------------------------------------------------------------------------------------------------------
def test_cpu_ops_of_cuda_build():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    cb = torch.randn(70, 16, generator=g)
    codes, dist = _op("nearest_code")(x, cb, "l2", False)
    ref = torch.cdist(x.double(), cb.double()).argmin(1)
    assert torch.equal(codes, ref)
    torch.testing.assert_close(dist, ((x.double() - cb.double()[ref]) ** 2).sum(1).float(), rtol=1e-4, atol=1e-4)
    # the public API picks this build's cpu backend for CPU tensors and agrees with the reference
    assert select("auto", x.device) == "cpu"
    q = vq.quantize(x, cb, metric="cosine", exact=True)
    r = vq.quantize(x, cb, metric="cosine", exact=True, backend="torch")
    assert torch.equal(q.codes, r.codes) and torch.equal(q.z_q, r.z_q) and torch.equal(q.counts, r.counts)
    sums, counts = vq.code_stats(x, q.codes, 70)
    rs, rc = vq.code_stats(x, q.codes, 70, backend="torch")
    assert torch.equal(counts, rc)
    torch.testing.assert_close(sums, rs, rtol=1e-5, atol=1e-5)


def test_opcheck_cpu_tensors():
    """The full opcheck (autograd registration, AOT dispatch) on CPU tensors of this build."""
    g = torch.Generator().manual_seed(1)
    x, cb = torch.randn(33, 9, generator=g), torch.randn(70, 9, generator=g)
    torch.library.opcheck(_op("nearest_code"), (x, cb, "l2", False))
    # (without requires_grad: torch 2.14's test_aot_dispatch_dynamic sums the int64 and float outputs into one
    # tensor when an input requires grad and fails on the cast; autograd is checked by tests/test_quantize.py)
    torch.library.opcheck(_op("quantize"), (x, cb, "cosine", False))
    torch.library.opcheck(_op("code_stats"), (x, torch.randint(0, 9, (33,), generator=g), 9))
    torch.library.opcheck(_op("sample_code"), (x, cb, "dot", -(2**32) + 7))


def test_sample_code_cpu_of_cuda_build():
    """The CPU sampling op of this build draws what the reference draws (up to rounding on near-ties)."""
    from vqkernels import reference
    from vqkernels.numerics import seed_to_schema

    g = torch.Generator().manual_seed(2)
    x, cb = torch.randn(500, 12, generator=g), torch.randn(90, 12, generator=g)
    for metric in METRICS:
        for seed in (0, 2**32 - 1, 2**64 - 1):
            s = seed_to_schema(seed)
            got = _op("sample_code")(x, cb, metric, s)
            assert got.dtype == torch.int64 and got.shape == (90,)
            assert (got == reference.sample(x, cb, metric, s)).float().mean() >= 0.97


def test_numerics_constants_match_python():
    """csrc/numerics.h's constants, as vqkernels._C exposes them, are vqkernels/numerics.py's."""
    from vqkernels import numerics

    assert _ext.C.cos_eps == numerics.COS_EPS
    assert _ext.C.exact_safety == numerics.EXACT_SAFETY
    assert _ext.C.exact_candidates == numerics.EXACT_CANDIDATES


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))

"""Shared test helpers: inputs, the fp64 brute force, and the precision rule of METHODS §1."""

from __future__ import annotations

import pytest
import torch

from vqkernels import reference
from vqkernels.dispatch import BACKENDS

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
METRICS = ("l2", "cosine", "dot")


def backend_devices() -> list[tuple[str, str]]:
    """Every ``(backend, device type)`` pair that runs here: on CPU tensors the reference, the C++ op and Triton
    (under ``TRITON_INTERPRET=1``, which conftest.py sets when no GPU is visible); with a GPU also every backend
    available on CUDA tensors (reference, C++/CUDA, Triton compiled)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(name, dev) for dev in devices for name, b in BACKENDS.items()
            if dev in b.devices and b.available() and b.device_why_not(dev) is None]


# The test matrix of the backend-generic suites: one case per (backend, device), ids like "triton-cuda".
BACKEND_DEVICES = [pytest.param(bd, id=f"{bd[0]}-{bd[1]}") for bd in backend_devices()]


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors here."""
    return [b for b, dev in backend_devices() if dev == "cpu"]


def make_inputs(n: int, k: int, d: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    cb = torch.randn(k, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, cb


def brute_distances(x: torch.Tensor, cb: torch.Tensor, metric: str, direct: bool = False) -> torch.Tensor:
    """fp64 distance matrix ``[N, K]`` from the values as stored (tests only: small N).

    ``direct=True`` evaluates l2 as ``sum((x - c)^2)`` (the exact-mode formula); otherwise by the fp64 expansion,
    whose error (~1e-16 relative) is far below any low-precision effect under test.
    """
    x64, c64 = x.to(torch.float64), cb.to(torch.float64)
    if metric == "l2":
        if direct:
            return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
        return ((x64 * x64).sum(1, keepdim=True) - 2 * x64 @ c64.T + (c64 * c64).sum(1)).clamp_min(0)
    dot = x64 @ c64.T
    if metric == "dot":
        return -dot
    xn = x64.norm(dim=1, keepdim=True).clamp_min(reference.COS_EPS)
    cn = c64.norm(dim=1).clamp_min(reference.COS_EPS)
    return 1 - dot / (xn * cn)


def same_precision_torch_codes(x: torch.Tensor, cb: torch.Tensor, metric: str) -> torch.Tensor:
    """What a plain PyTorch computation in the input precision picks (the yardstick of the precision rule)."""
    if metric == "l2":
        key = (cb * cb).sum(1) - 2 * (x @ cb.T)
    elif metric == "cosine":
        key = -(x @ cb.T) / cb.norm(dim=1).clamp_min(reference.COS_EPS)
    else:
        key = -(x @ cb.T)
    return key.argmin(1)


def rounding_scale(x: torch.Tensor, cb: torch.Tensor, metric: str, u: float | None = None) -> torch.Tensor:
    """Per-row size of the rounding error of a key/distance accumulated with unit roundoff ``u`` (``[N]``, fp64).

    ``u`` defaults to that of the accumulation dtype of ``x`` (fp32, or fp64 for fp64 inputs).
    """
    d = x.shape[1]
    u = reference.unit_roundoff(reference.acc_dtype(x.dtype)) if u is None else u
    xn = x.to(torch.float64).norm(dim=1)
    cmax = cb.to(torch.float64).norm(dim=1).max()
    if metric == "l2":
        s = (xn + cmax) ** 2
    elif metric == "cosine":
        s = torch.ones_like(xn)
    else:
        s = xn * cmax
    return 4 * (d + 4) * u * s


def check_search(x, cb, metric, codes, dist, exact: bool, max_rows: int = 512) -> None:
    """Assert the precision rule (or exactness) and the distance accuracy on up to ``max_rows`` rows."""
    x, cb, codes, dist = x.cpu(), cb.cpu(), codes.cpu(), dist.cpu()
    n = x.shape[0]
    assert codes.shape == (n,) and codes.dtype == torch.int64
    assert dist.shape == (n,) and dist.dtype == reference.acc_dtype(x.dtype)
    if n == 0:
        return
    assert bool((codes >= 0).all()) and bool((codes < cb.shape[0]).all()), "code out of range"
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:max_rows]
    rows = torch.arange(n) if n <= max_rows else sample
    xs, cs, ds = x[rows], codes[rows], dist[rows]
    d64 = brute_distances(xs, cb, metric, direct=exact)
    d_star, i_star = d64.min(1)
    d_sel = d64.gather(1, cs[:, None]).squeeze(1)
    if exact:
        assert torch.equal(cs, i_star), f"exact mode differs from fp64 argmin on {(cs != i_star).sum()} rows"
        # fp32 output: one rounding of the fp64 value; fp64: the summation order may differ from ours
        rtol = max(2 * reference.unit_roundoff(ds.dtype), 4 * (x.shape[1] + 4) * 2.0**-53)
        atol = rounding_scale(xs, cb, metric, u=2.0**-53).max().item()
        torch.testing.assert_close(ds.to(torch.float64), d_star, rtol=rtol, atol=atol)
        return
    regret = d_sel - d_star
    ref_codes = same_precision_torch_codes(xs, cb, metric)
    ref_regret = d64.gather(1, ref_codes[:, None]).squeeze(1) - d_star
    scale = rounding_scale(xs, cb, metric)
    allowed = 2 * ref_regret.max() + 1e-3 * scale.max()
    assert regret.max() <= allowed, f"worst regret {regret.max():.3g} > allowed {allowed:.3g}"
    err = (ds.to(torch.float64) - d_sel).abs()
    assert bool((err <= scale).all()), f"dist error {(err / scale).max():.3g}x the rounding scale"


OPCHECK_ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def triton_interpreted(backend: str) -> bool:
    """Triton on CPU tensors: its interpreter."""
    from vqkernels.triton import interpreting

    return backend == "triton" and interpreting()


def opcheck_utils(backend: str, utils: tuple[str, ...] = OPCHECK_ALL) -> tuple[str, ...]:
    """opcheck's tests for ``backend``: under triton's interpreter AOT tracing cannot run the kernels (it needs a
    GPU), so ``test_aot_dispatch_dynamic`` is left to the GPU run there."""
    if triton_interpreted(backend):
        return tuple(u for u in utils if u != "test_aot_dispatch_dynamic")
    return utils


def skip_compile_if_interpreted(backend: str) -> None:
    if triton_interpreted(backend):
        pytest.skip("torch.compile cannot trace triton_op kernels under TRITON_INTERPRET (a GPU test)")

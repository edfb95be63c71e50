"""Shared test helpers: the (backend, device) matrix from the backend table, inputs, and the oracle of
:mod:`vqkernels.testing` (fp64 brute force and the precision rule of README "Method" §1.2)."""

from __future__ import annotations

import pytest
import torch

from vqkernels import dispatch
from vqkernels.numerics import FLOAT_DTYPES, METRICS
from vqkernels.testing import assert_search, brute_distances

__all__ = [
    "BACKEND_DEVICES",
    "DTYPES",
    "METRICS",
    "OPS",
    "RULES_OFF",
    "backend_devices",
    "brute_distances",
    "check_search",
    "cpu_backends",
    "make_inputs",
    "op_of",
    "opcheck_utils",
    "skip_compile_if_interpreted",
    "triton_interpreted",
]

DTYPES = FLOAT_DTYPES
OPS = dispatch.OPS

# every codebook-rule option of the layers at its default (README "Method" §2.9-§2.14)
RULES_OFF = dict(
    ema_update=False,
    decay=0.99,
    eps=1e-5,
    threshold_ema_dead_code=0,
    rotation_trick=False,
    stochastic_sample_codes=False,
    sample_codebook_temp=1.0,
    orthogonal_reg_weight=0.0,
    orthogonal_reg_active_codes_only=False,
    orthogonal_reg_max_codes=None,
    codebook_dim=None,
)


def backend_devices() -> list[tuple[str, str]]:
    """Every ``(backend, device type)`` pair of the backend table that runs here: on CPU tensors the reference, the
    C++ op and Triton (under ``TRITON_INTERPRET=1``, which conftest.py sets when no GPU is visible); with a GPU also
    every backend that runs CUDA tensors (reference, C++/CUDA, Triton compiled)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(name, dev) for dev in devices for name in dispatch.runnable(dev)]


# The test matrix of the backend-generic suites: one case per (backend, device), ids like "triton-cuda".
BACKEND_DEVICES = [pytest.param(bd, id=f"{bd[0]}-{bd[1]}") for bd in backend_devices()]


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors here."""
    return dispatch.runnable("cpu")


def op_of(backend: str, op: str):
    """The registered op ``op`` of ``backend`` (from the backend table)."""
    return dispatch.BACKENDS[backend].op(op)


def make_inputs(n: int, k: int, d: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    cb = torch.randn(k, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, cb


def check_search(x, cb, metric, codes, dist, exact: bool, max_rows: int = 512) -> None:
    """The oracle's verdict on a search result, as an assertion."""
    assert_search(x, cb, metric, codes, dist, exact, max_rows)


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

"""The op benchmark of ``python -m vqkernels.bench`` as a pytest-benchmark suite: one group per (shape, dtype,
metric), holding every runnable backend of ``quantize`` and every baseline, so that pytest-benchmark's table
compares them side by side. Backends must pass the CLI's correctness check (:func:`vqkernels.bench.check_quantized`:
the structure, then the oracle of :mod:`vqkernels.testing`)."""

from __future__ import annotations

import functools

import pytest
from suite import timed, vqk_shapes

from vqkernels import bench


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    device = cfg.getoption("--vqk-device")
    cases = [
        (s, dt, m)
        for s in vqk_shapes(cfg)
        for dt in cfg.getoption("--vqk-dtype")
        for m in cfg.getoption("--vqk-metric")
    ]
    names = [*bench.BASELINES, *bench.default_backends(device)]
    metafunc.parametrize("case", cases, ids=[f"{n}x{k}x{d}-{dt}-{m}" for (n, k, d), dt, m in cases])
    metafunc.parametrize("name", names)


@functools.lru_cache(maxsize=1)
def _inputs(shape, dtype_name, device):
    """The case's inputs, kept while consecutive tests share them."""
    return bench.make_inputs(*shape, bench.DTYPES[dtype_name], device)


def test_quantize(benchmark, case, name, vqk_device):
    shape, dtype_name, metric = case
    x, codebook = _inputs(shape, dtype_name, vqk_device)
    fns = bench.make_callables(x, codebook, metric, [] if name in bench.BASELINES else [name])
    if name not in fns:
        pytest.skip(f"{name} does not run {metric}" + ("" if name != "vqp_layer" else " or is not installed"))
    n, k, d = shape
    if (why := bench.skip_reason(name, n, k, x.element_size())) is not None:
        pytest.skip(why)
    benchmark.group = f"{n},{k},{d} {dtype_name} {metric}"
    benchmark.extra_info.update(N=n, K=k, D=d, dtype=dtype_name, metric=metric, flops=2 * n * k * d)
    out = benchmark(timed(fns[name], vqk_device))
    if name not in bench.BASELINES:
        verdict = bench.check_quantized(x, codebook, metric, out)
        benchmark.extra_info["check"] = verdict.details
        assert verdict.ok, str(verdict)

"""The layer benchmark of ``python -m vqkernels.bench_layer`` as a pytest-benchmark suite: one training step
(forward + backward) of ``VectorQuant`` and ``VectorQuantize`` against the bare op, a vqtorch-style layer,
vector-quantize-pytorch and the 8-head rows, fp32,
at N, K, D = 65536, 4096, 64 (``--vqk-shape`` replaces it). Every step must pass the CLI's check
(:func:`vqkernels.bench.layer.check_step`: its codes under the precision rule of :mod:`vqkernels.testing`, its loss
against fp64)."""

from __future__ import annotations

import pytest
from suite import timed

from vqkernels.bench import layer, vqp_missing


def pytest_generate_tests(metafunc):
    if "layer_shape" in metafunc.fixturenames:
        shapes = metafunc.config.getoption("--vqk-shape") or list(layer.DEFAULT_SHAPES)
        metafunc.parametrize("layer_shape", shapes, ids=[f"{n}x{k}x{d}" for n, k, d in shapes])


@pytest.mark.parametrize("name", layer.STEPS)
def test_layer_step(benchmark, layer_shape, name, vqk_device):
    if name in layer.VQP_ROWS and (why := vqp_missing()):
        pytest.skip(why)
    x, cb0, makers = layer.make_steps(layer_shape, vqk_device, "auto")
    step = makers[name]()
    benchmark.group = "layer step " + ",".join(map(str, layer_shape))
    benchmark(timed(step, vqk_device))
    verdict = layer.judge(name, x, cb0, *makers[name]()())  # the first step of a fresh layer (EMA moves codes)
    benchmark.extra_info["check"] = verdict.details
    assert verdict.ok, str(verdict)

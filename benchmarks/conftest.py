"""pytest-benchmark suites of the ``python -m vqkernels.bench`` cases: ``pytest benchmarks/ --benchmark-only``.

Options (besides pytest-benchmark's own):
  --vqk-preset NAME    shape preset of vqkernels.bench (default: cpu-default on the CPU, gpu on CUDA)
  --vqk-shape N,K,D    a shape (repeatable; replaces the preset)
  --vqk-dtype LIST     comma list (default fp32,bf16)
  --vqk-metric LIST    comma list (default: every metric)
  --vqk-device DEV     cpu or cuda (default: cuda when available)

Each backend row asserts the same correctness verdict as the CLI (:func:`vqkernels.bench.check_quantized`: the
structure, then the oracle of :mod:`vqkernels.testing`). Without pytest-benchmark installed (e.g. on
a machine without network), a small stand-in ``benchmark`` fixture times with :func:`vqkernels.bench.measure_time`
and prints one line per case, so the suites still run.
"""

from __future__ import annotations

import pytest
import torch

from vqkernels import bench
from vqkernels.numerics import METRICS

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PLUGIN = True
except ImportError:
    HAVE_PLUGIN = False


def pytest_addoption(parser):
    group = parser.getgroup("vqkernels benchmarks")
    group.addoption("--vqk-preset", choices=tuple(bench.PRESETS), default=None)
    group.addoption("--vqk-shape", action="append", type=bench.parse_shape, default=None, metavar="N,K,D")
    group.addoption("--vqk-dtype", type=bench.parse_names(tuple(bench.DTYPES)), default=["fp32", "bf16"])
    group.addoption("--vqk-metric", type=bench.parse_names(METRICS), default=list(METRICS))
    group.addoption("--vqk-device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    if not HAVE_PLUGIN:  # accept the plugin's switches that the README shows
        group.addoption("--benchmark-only", action="store_true")
        group.addoption("--benchmark-disable", action="store_true")


@pytest.fixture(scope="session")
def vqk_device(pytestconfig) -> str:
    device = pytestconfig.getoption("--vqk-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.exit("--vqk-device cuda: no CUDA device is available", returncode=2)
    return device


if not HAVE_PLUGIN:

    class _StandIn:
        """The part of pytest-benchmark's fixture the suites use: ``group``, ``extra_info`` and ``__call__``."""

        def __init__(self, config, name: str):
            self.group, self.extra_info, self.name = None, {}, name
            self.disabled = config.getoption("--benchmark-disable")
            self.device = config.getoption("--vqk-device")

        def __call__(self, fn, *args, **kwargs):
            call = lambda: fn(*args, **kwargs)
            if self.disabled:
                return call()
            t = bench.measure_time(call, self.device, 0.5)
            print(
                f"\n{self.group} {self.name}: median {t.median * 1e3:.4g} ms "
                f"(p20 {t.p20 * 1e3:.4g}, p80 {t.p80 * 1e3:.4g})"
            )
            return call()

    @pytest.fixture
    def benchmark(request):
        return _StandIn(request.config, request.node.name)

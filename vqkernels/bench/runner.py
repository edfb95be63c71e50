"""One case of the op benchmark (a shape, a dtype and a metric): every baseline and backend timed, its peak memory
measured and, for the backends, its result checked; the ``cpu`` backend's rows stamped with the tile kernel and
epilogue that ran, and followed by one row per other kernel variant this CPU can run (:mod:`.variants`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor

from .. import roofline
from . import baselines
from .cases import DTYPES, Shape, make_inputs
from .check import check_quantized
from .memory import measure_peak
from .report import Row, add_ratios
from .timing import Timing, measure_time
from .variants import VARIANT_BACKEND, VARIANT_METRICS, cpu_stamp, forced_env, other_variants, variant_name

CHECKED_KINDS = ("backend", "variant")
"""The rows whose result is checked (and whose exception fails the run): the package's own op."""


def record_timing(row: Row, t: Timing, bound_s: float | None = None) -> None:
    """The timing columns of ``row`` from ``t`` (seconds in, milliseconds and rates out)."""
    row.median_ms, row.p20_ms, row.p80_ms, row.samples = t.median * 1e3, t.p20 * 1e3, t.p80 * 1e3, t.samples
    row.gflops = 2 * row.N * row.K * row.D / t.median / 1e9
    row.dists_per_s = row.N * row.K / t.median
    if bound_s is not None:
        row.bound_ms, row.pct_of_bound = bound_s * 1e3, 100 * bound_s / t.median


def run_one(
    row: Row,
    fn: Callable[[], Any],
    x: Tensor,
    codebook: Tensor,
    min_time: float,
    check: bool,
    bound_s: float | None = None,
) -> None:
    """Fill ``row`` with the timing, peak memory and (backends and variants, unless ``check`` is off) verdict of
    ``fn``.

    Timing comes first: its warm-up keeps one-time costs (thread pools, JIT kernels) out of the peak memory of
    the single call that is then measured and checked.
    """
    record_timing(row, measure_time(fn, row.device, min_time), bound_s)
    row.peak_extra_mib, out = measure_peak(fn, row.device)
    if row.kind in CHECKED_KINDS:
        if check:
            verdict = check_quantized(x, codebook, row.metric, out)
            row.verdict, row.check = str(verdict), verdict.details
        else:
            row.verdict, row.check = "skipped", {}


def run_case(
    shape: Shape,
    dtype_name: str,
    metric: str,
    device: str,
    backends: Sequence[str],
    min_time: float,
    check: bool,
    peaks: roofline.Peaks | None = None,
    cpu_variants: bool = True,
) -> list[Row]:
    """Every baseline and backend on one shape, dtype and metric; an exception fails that row only (a backend's or
    variant's: FAIL; a baseline's: ERROR, which does not fail the run).

    The ``cpu`` row is stamped with the tile kernel and epilogue it ran; with ``cpu_variants`` and a metric of
    ``VARIANT_METRICS`` it is followed by one ``variant`` row per other combination this CPU can run, on the same
    inputs and callable, its environment forced around the whole measurement and restored afterwards."""
    n, k, d = shape
    x, codebook = make_inputs(n, k, d, DTYPES[dtype_name], device)
    bound_s = None if peaks is None else roofline.bound_seconds(n, k, d, x.dtype, peaks)
    rows = []

    def measure(row: Row, fn: Callable[[], Any]) -> None:
        try:
            if row.name == VARIANT_BACKEND or row.kind == "variant":  # what runs under the environment in force
                row.cpu_tile, row.cpu_epilogue = cpu_stamp(dtype_name, n)
            run_one(row, fn, x, codebook, min_time, check, bound_s)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking the others
            row.verdict = f"{'FAIL' if row.kind in CHECKED_KINDS else 'ERROR'}({type(e).__name__}: {e})"

    for name, fn in baselines.make_callables(x, codebook, metric, backends).items():
        row = Row(n, k, d, dtype_name, metric, device, name, "baseline" if name in baselines.BASELINES else "backend")
        rows.append(row)
        skip = baselines.skip_reason(name, n, k, x.element_size())
        if skip is not None:
            row.verdict = skip
            continue
        measure(row, fn)
        if name == VARIANT_BACKEND and cpu_variants and metric in VARIANT_METRICS:
            timed = [(row, {})]
            for v in other_variants(dtype_name, n):
                vrow = Row(n, k, d, dtype_name, metric, device, variant_name(v), "variant", cpu_env=dict(v["env"]))
                rows.append(vrow)
                with forced_env(v["env"]):
                    measure(vrow, fn)
                timed.append((vrow, v["env"]))
            # A second timing pass in the reverse order, each row keeping its faster pass: the first row of a
            # sequence would otherwise carry whatever drifts during it (a neighbour's load, clocks), and "is the
            # default the fastest" compares rows measured seconds apart.
            if len(timed) > 1:
                for r, env in reversed(timed):
                    if r.median_ms is None or r.verdict.startswith(("FAIL", "ERROR")):
                        continue
                    with forced_env(env):
                        t = measure_time(fn, device, min_time)
                    if t.median * 1e3 < r.median_ms:
                        record_timing(r, t, bound_s)
    add_ratios(rows)
    return rows

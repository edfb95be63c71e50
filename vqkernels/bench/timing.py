"""Per-call time of a zero-argument callable: median and 20 % / 80 % quantiles.

- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with the process's thread count;
- CUDA: ``triton.testing.do_bench`` (L2 flushed between calls) when triton imports, else synchronised CUDA events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

MIN_RUNS = 3
"""Timed samples per measurement at least, whatever the time budget says."""


@dataclass
class Timing:
    """Per-call time statistics over timed blocks, in seconds (``samples``: None when the timer hides it)."""

    median: float
    p20: float
    p80: float
    samples: int | None


def summarise(times: Sequence[float]) -> Timing:
    """Median and 20 % / 80 % quantiles of per-call times in seconds (linear interpolation, like
    ``torch.utils.benchmark.Measurement.median``)."""
    med, p20, p80 = np.percentile(np.asarray(times), [50, 20, 80])
    return Timing(float(med), float(p20), float(p80), len(times))


def time_cpu(fn: Callable[[], Any], min_time: float) -> Timing:
    """``torch.utils.benchmark`` blocked autorange with the process's thread count (the Timer defaults to 1).

    Slow functions get extra blocks up to ``MIN_RUNS`` samples, so that the quantiles mean something.
    """
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_time)
    times = list(m.times)
    while len(times) < MIN_RUNS:
        times += timer.timeit(m.number_per_run).times
    return summarise(times)


def time_cuda(fn: Callable[[], Any], min_time: float) -> Timing:
    """``triton.testing.do_bench`` when triton imports, else a loop of synchronised CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, rep=max(1, int(min_time * 1000)), quantiles=[0.5, 0.2, 0.8])
        return Timing(med / 1e3, p20 / 1e3, p80 / 1e3, None)
    fn()
    torch.cuda.synchronize()
    times: list[float] = []
    while sum(times) < min_time or len(times) < MIN_RUNS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return summarise(times)


def measure_time(fn: Callable[[], Any], device: str, min_time: float) -> Timing:
    """Time ``fn`` for about ``min_time`` seconds on ``device`` ("cpu" or "cuda")."""
    return time_cuda(fn, min_time) if device == "cuda" else time_cpu(fn, min_time)

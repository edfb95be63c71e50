"""``python -m vqkernels.bench``: microbenchmark of :func:`vqkernels.quantize` against plain PyTorch.

For every shape ``(N, K, D)`` and dtype it times, in one run and on the same inputs:

- every requested backend's ``quantize(x, C, metric=..., backend=b)`` (search + gather + usage counts);
- ``naive``: the textbook PyTorch search in the input dtype, e.g. for l2
  ``((x*x).sum(1, keepdim=True) - 2*x@C.T + (C*C).sum(1)).argmin(1)`` (materialises N x K);
- ``gemm``: ``x @ C.T`` alone in the input dtype (the floor a GEMM-based search is measured against);
- ``gemm_out``: the same GEMM into a preallocated N x K buffer. On the CPU a fresh N x K output is returned to
  the OS after every call and faulted in again by the next, which can double the time of ``gemm``;
  ``gemm_out`` is the pure GEMM;
- ``gemm_argmin``: one GEMM into the argmin key, then argmin (the best unfused search);
- ``cdist_chunked``: vqtorch's search, ``torch.cdist`` over 1024-row chunks + ``topk`` (l2);
- ``vqp_layer``: vector-quantize-pytorch's ``VectorQuantize`` forward in eval mode on the same codebook (l2,
  when the package is installed; at seconds per call on the CPU it is left out of the other metrics, whose search
  it runs the same way).

Each row reports median and 20%/80% quantiles of the per-call time, GFLOP/s (``2NKD / t``), distances/s
(``NK / t``), the percentage of the device roofline (the lower bound of :mod:`vqkernels.roofline` over ``t``;
datasheet peaks for known GPUs, else measured GEMM and copy peaks), the speed-up over every baseline (JSON
``speedups``; the table shows ``t_naive / t`` and the speed-up over the fastest unfused search among naive,
gemm_argmin, cdist_chunked and vqp_layer), the time as a multiple of the GEMMs' (``t / t_gemm`` and
``t / t_gemm_out``), the measured peak extra memory of one call, and (backends only) a
correctness verdict against an fp64 brute force on a sample of rows. The exit code is 1 when any check fails
(a baseline that raises is reported as ERROR and does not fail the run).

Examples::

    python -m vqkernels.bench                                  # default shapes, fp32 + bf16, every metric
    python -m vqkernels.bench --preset gpu --backend triton,cuda --dtype bf16 --metric l2
    python -m vqkernels.bench --shape 8192,2048,128 --dtype fp32 --metric cosine --json out.json
    python -m vqkernels.bench --quick --min-time 0.05           # seconds; what tests/test_bench.py runs
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import info, reference, roofline
from .dispatch import BACKENDS
from .ops import METRICS, Quantized, quantize

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
}
DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((4096, 1024, 64), (65536, 4096, 64), (16384, 16384, 256))
QUICK_SHAPES: tuple[tuple[int, int, int], ...] = ((4096, 1024, 64), (1000, 257, 40))
# Shape presets named after the workloads they stand for (N rows x K codes x D features).
PRESETS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "cpu-default": DEFAULT_SHAPES,  # a few minutes on 2 cores
    "quick": QUICK_SHAPES,  # seconds; what the tests run
    "gpu": (
        (65536, 1024, 256), (65536, 16384, 256),  # VQGAN-style tokenizers
        (262144, 16384, 8), (262144, 16384, 32),  # low-dimensional factorised codes (epilogue-bound)
        (1048576, 16384, 64),  # a large batch of image tokens
        (262144, 100000, 256),  # large codebooks, K not a power of two
        (65536, 1048576, 64),  # a million codes: split-K
        (1048576, 4096, 1024),  # wide features: GEMM-bound, compare to cuBLAS
        (100003, 1000, 100),  # odd sizes everywhere
    ),
}
# Shapes a preset runs with l2 only unless --metric says otherwise: cosine and dot take the same kernels with another
# epilogue, and timing them at every large shape would take the CPU default past a few minutes.
PRESET_L2_ONLY: dict[str, frozenset[tuple[int, int, int]]] = {
    "cpu-default": frozenset({(65536, 4096, 64), (16384, 16384, 256)}),
}
DEFAULT_MIN_TIME = 1.0  # seconds of timed runs per measurement
QUICK_MIN_TIME = 0.1
BASELINES = ("naive", "gemm", "gemm_out", "gemm_argmin", "cdist_chunked", "vqp_layer")
NK_BASELINES = ("naive", "gemm", "gemm_out", "gemm_argmin", "vqp_layer")  # they hold an N x K matrix
SEARCH_BASELINES = ("naive", "gemm_argmin", "cdist_chunked", "vqp_layer")  # the ones that find the codes
# Baselines that hold an N x K matrix are skipped above this many bytes of it (env VQK_BENCH_MAX_NK_BYTES).
MAX_NK_BYTES = int(os.environ.get("VQK_BENCH_MAX_NK_BYTES", 8 << 30))
CDIST_CHUNK = 1024  # vqtorch's cdist_chunk_size
MIN_RUNS = 3  # timed samples per measurement at least, whatever --min-time says

CHECK_ROWS = 2048  # rows sampled for the fp64 correctness check (against all K codes)
CHECK_CHUNK_ELEMS = 1 << 22  # rows x K fp64 elements per chunk of the brute force (32 MiB)
DIST_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
REGRET_REL = 1e-5  # extra regret allowed, relative to the median |fp64 minimum distance|
REGRET_TINY = 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-call time statistics over timed blocks, in seconds (``samples``: None when the timer hides it)."""

    median: float
    p20: float
    p80: float
    samples: int | None


@dataclass
class Row:
    """One line of the table / one entry of the JSON ``rows``."""

    N: int
    K: int
    D: int
    dtype: str
    metric: str
    device: str
    name: str
    kind: str  # "backend" or "baseline"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    samples: int | None = None  # timed blocks (each the mean of one or more calls)
    gflops: float | None = None
    dists_per_s: float | None = None
    bound_ms: float | None = None  # roofline lower bound of the fused search on this device
    pct_of_bound: float | None = None  # 100 * bound_ms / median_ms
    speedups: dict[str, float] = field(default_factory=dict)  # t_baseline / t for every baseline that ran
    speedup_vs_best_search: float | None = None  # over the fastest of SEARCH_BASELINES
    speedup_vs_naive: float | None = None
    speedup_vs_gemm: float | None = None
    x_gemm_time: float | None = None
    x_gemm_out_time: float | None = None
    peak_extra_mib: float | None = None
    verdict: str = "-"
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.verdict.startswith("FAIL")


# ---------------------------------------------------------------------------------------------------------------
# The measured functions.
# ---------------------------------------------------------------------------------------------------------------
def naive_codes(x: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """Textbook PyTorch nearest code in the input dtype; materialises the N x K distance matrix."""
    dot = x @ codebook.T
    if metric == "l2":
        dist = (x * x).sum(1, keepdim=True) - 2 * dot + (codebook * codebook).sum(1)
    elif metric == "cosine":
        dist = 1 - dot / (x.norm(dim=1, keepdim=True) * codebook.norm(dim=1))
    else:
        dist = -dot
    return dist.argmin(1)


def gemm_argmin_codes(x: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """One GEMM into the argmin key (METHODS §1), then argmin: the best unfused search (writes N x K once)."""
    if metric == "l2":
        return torch.addmm((codebook * codebook).sum(1), x, codebook.T, alpha=-2).argmin(1)
    if metric == "cosine":
        return (x @ (codebook / codebook.norm(dim=1, keepdim=True).clamp_min(1e-12)).T).argmax(1)
    return (x @ codebook.T).argmax(1)


def cdist_chunked_codes(x: Tensor, codebook: Tensor) -> Tensor:
    """vqtorch's search: ``torch.cdist`` over 1024-row chunks and ``topk(1)`` (l2 only)."""
    return torch.cat([torch.cdist(xc, codebook).topk(1, dim=1, largest=False).indices.squeeze(1)
                      for xc in x.split(CDIST_CHUNK)])


def vqp_missing() -> str | None:
    """Why vector-quantize-pytorch cannot run (None when it imports)."""
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError as e:
        return f"not installed ({e}); pip install vector-quantize-pytorch"
    return None


def vqp_layer_codes(x: Tensor, codebook: Tensor, metric: str) -> Callable[[], Tensor]:
    """vector-quantize-pytorch's ``VectorQuantize`` (eval, no grad) holding ``codebook`` -> a callable giving codes.

    Its cosine codebook is used as stored (it keeps it l2-normalised itself), so it gets the normalised codes:
    the same argmin as ours.
    """
    from vector_quantize_pytorch import VectorQuantize  # optional: the bench extra

    layer = VectorQuantize(dim=codebook.shape[1], codebook_size=codebook.shape[0],
                           use_cosine_sim=metric == "cosine").to(device=x.device, dtype=x.dtype).eval()
    with torch.no_grad():
        emb = layer._codebook.embed  # [heads=1, K, D]
        cb = torch.nn.functional.normalize(codebook, dim=1) if metric == "cosine" else codebook
        emb.copy_(cb.view_as(emb))
        layer._codebook.initted.fill_(True)

    @torch.no_grad()
    def run() -> Tensor:
        return layer(x[None])[1][0]

    return run


def make_callables(x: Tensor, codebook: Tensor, metric: str,
                   backends: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """Name -> zero-argument callable, baselines first (their times are the denominators of the speed-ups)."""
    buf: list[Tensor] = []
    vqp: list[Callable[[], Tensor]] = []

    def vqp_layer():
        if not vqp:  # built on first use, like gemm_out's buffer
            vqp.append(vqp_layer_codes(x, codebook, metric))
        return vqp[0]()

    def gemm_out():
        if not buf:  # allocated on first use: a skipped baseline costs no N x K memory
            buf.append(x.new_empty(x.shape[0], codebook.shape[0]))
        return torch.matmul(x, codebook.T, out=buf[0])

    fns: dict[str, Callable[[], Any]] = {
        "naive": lambda: naive_codes(x, codebook, metric),
        "gemm": lambda: x @ codebook.T,
        "gemm_out": gemm_out,
        "gemm_argmin": lambda: gemm_argmin_codes(x, codebook, metric),
    }
    if metric == "l2":
        fns["cdist_chunked"] = lambda: cdist_chunked_codes(x, codebook)
    if metric == "l2" and vqp_missing() is None:
        fns["vqp_layer"] = vqp_layer
    for b in backends:
        fns[b] = functools.partial(quantize, x, codebook, metric=metric, backend=b)
    return fns


def make_inputs(n: int, k: int, d: int, dtype: torch.dtype, device: str,
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian ``x [N, D]`` and codebook ``[K, D]`` (drawn in fp32 on the CPU, then cast and moved)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    codebook = torch.randn(k, d, generator=g).to(device=device, dtype=dtype)
    return x, codebook


# ---------------------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------------------
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
    return _summarise(times)


def _summarise(times: Sequence[float]) -> Timing:
    """Median and 20%/80% quantiles of per-call times (linear interpolation, like ``Measurement.median``)."""
    med, p20, p80 = np.percentile(np.asarray(times), [50, 20, 80])
    return Timing(float(med), float(p20), float(p80), len(times))


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
    return _summarise(times)


def measure_time(fn: Callable[[], Any], device: str, min_time: float) -> Timing:
    """Time ``fn`` for about ``min_time`` seconds on ``device``."""
    return time_cuda(fn, min_time) if device == "cuda" else time_cpu(fn, min_time)


# ---------------------------------------------------------------------------------------------------------------
# Peak extra memory of one call (measured, not estimated).
# ---------------------------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in /proc/self/status")
    return int(match.group(1))


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc, for ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _release_free_heap() -> None:
    """Give freed heap back to the OS, so that the call's allocations fault in fresh pages VmHWM sees."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_extra_cpu(fn: Callable[[], Any]) -> tuple[float | None, Any]:
    """Run ``fn`` once; return (peak RSS above the RSS before the call in MiB, or None without /proc; result).

    Writing ``5`` to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS.
    """
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
    except OSError:
        return None, fn()
    out = fn()
    return (_proc_status_kib("VmHWM") - before) / 1024, out


def peak_extra_cuda(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once; return (peak CUDA allocation above the allocation before the call in MiB, result)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20, out


def measure_peak(fn: Callable[[], Any], device: str) -> tuple[float | None, Any]:
    """Run ``fn`` once: (peak extra memory in MiB or None, result)."""
    return peak_extra_cuda(fn) if device == "cuda" else peak_extra_cpu(fn)


# ---------------------------------------------------------------------------------------------------------------
# Correctness check against an fp64 brute force on sampled rows.
# ---------------------------------------------------------------------------------------------------------------
def _keys(x: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """Argmin keys ``[rows, K]`` in the dtype of the inputs (the per-row constant of the distance dropped)."""
    dot = x @ codebook.T
    if metric == "l2":
        return (codebook * codebook).sum(1) - 2 * dot
    if metric == "cosine":
        return -dot / codebook.norm(dim=1).clamp_min(reference.COS_EPS)
    return -dot


def _fp64_distances(x: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """fp64 distance matrix ``[rows, K]`` from the stored values (expansion form; ~1e-16 relative error)."""
    x64, c64 = x.to(torch.float64), codebook.to(torch.float64)
    keys = _keys(x64, c64, metric)
    if metric == "l2":
        return (keys + (x64 * x64).sum(1, keepdim=True)).clamp_min(0)
    if metric == "cosine":
        return 1 + keys / x64.norm(dim=1, keepdim=True).clamp_min(reference.COS_EPS)
    return keys


def _rounding_scale(x: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """Per-row size ``[rows]`` (fp64) of the rounding error of a distance accumulated in the acc. dtype."""
    u = reference.unit_roundoff(reference.acc_dtype(x.dtype))
    xn = x.to(torch.float64).norm(dim=1)
    cmax = codebook.to(torch.float64).norm(dim=1).max()
    scale = {"l2": (xn + cmax) ** 2, "cosine": torch.ones_like(xn), "dot": xn * cmax}[metric]
    return 4 * (x.shape[1] + 4) * u * scale


def _sample_rows(n: int, device: torch.device) -> Tensor:
    """All rows, or ``CHECK_ROWS`` of them drawn with a fixed seed."""
    if n <= CHECK_ROWS:
        return torch.arange(n, device=device)
    return torch.randperm(n, generator=torch.Generator().manual_seed(1))[:CHECK_ROWS].to(device)


def _regrets(xs: Tensor, codebook: Tensor, metric: str, codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp64 ``(d(chosen), d_min, d(same-precision torch choice))`` per sampled row, chunked over rows.

    The yardstick is the plain PyTorch key in the accumulation dtype (fp32 for fp32/bf16/fp16, fp64 for fp64).
    """
    acc = reference.acc_dtype(xs.dtype)
    ca = codebook.to(acc)
    step = max(1, CHECK_CHUNK_ELEMS // codebook.shape[0])
    chosen, best, yardstick = [], [], []
    for r0 in range(0, xs.shape[0], step):
        xc = xs[r0:r0 + step]
        d64 = _fp64_distances(xc, codebook, metric)
        ref_codes = _keys(xc.to(acc), ca, metric).argmin(1)
        chosen.append(d64.gather(1, codes[r0:r0 + step, None]).squeeze(1))
        best.append(d64.min(1).values)
        yardstick.append(d64.gather(1, ref_codes[:, None]).squeeze(1))
    return torch.cat(chosen), torch.cat(best), torch.cat(yardstick)


def _structure_errors(x: Tensor, codebook: Tensor, q: Quantized) -> list[str]:
    """Shape/dtype/range/consistency problems of a :class:`Quantized` result (empty when fine)."""
    n, k = x.shape[0], codebook.shape[0]
    acc = reference.acc_dtype(x.dtype)
    if q.codes.shape != (n,) or q.codes.dtype != torch.int64:
        return [f"codes {tuple(q.codes.shape)} {q.codes.dtype}"]
    if n and (int(q.codes.min()) < 0 or int(q.codes.max()) >= k):
        return ["codes out of range"]
    errors = []
    if q.dist.shape != (n,) or q.dist.dtype != acc:
        errors.append(f"dist {tuple(q.dist.shape)} {q.dist.dtype}")
    if q.counts.shape != (k,) or int(q.counts.sum()) != n:
        errors.append("counts.sum() != N")
    elif not torch.equal(q.counts, torch.bincount(q.codes, minlength=k)):
        errors.append("counts != bincount(codes)")
    if q.z_q.dtype != codebook.dtype or not torch.equal(q.z_q, codebook[q.codes]):
        errors.append("z_q != C[codes]")
    return errors


def check_quantized(x: Tensor, codebook: Tensor, metric: str, q: Quantized) -> tuple[str, dict[str, Any]]:
    """Verdict ``"PASS"`` or ``"FAIL(reason)"`` and the numbers behind it.

    On up to ``CHECK_ROWS`` sampled rows (all K codes) the fp64 regret ``d(chosen) - d_min`` must not exceed
    ``2 x`` the worst regret of the same-precision PyTorch search plus ``REGRET_REL x median|d_min|``, and
    ``dist`` must match the fp64 distance of the chosen code within ``DIST_RTOL`` plus the row's rounding
    scale.
    """
    errors = _structure_errors(x, codebook, q)
    if errors:
        return f"FAIL({'; '.join(errors)})", {}
    rows = _sample_rows(x.shape[0], x.device)
    xs = x[rows]
    d_sel, d_min, d_ref = _regrets(xs, codebook, metric, q.codes[rows])
    max_regret = float((d_sel - d_min).max())
    allowed = 2 * float((d_ref - d_min).max()) + REGRET_REL * float(d_min.abs().median()) + REGRET_TINY
    dist_err = (q.dist[rows].to(torch.float64) - d_sel).abs()
    dist_tol = DIST_RTOL[x.dtype] * d_sel.abs() + _rounding_scale(xs, codebook, metric)
    worst_dist = float((dist_err / dist_tol).max())
    details = {"rows": int(rows.numel()), "max_regret": max_regret, "allowed_regret": allowed,
               "worst_dist_err_over_tol": worst_dist}
    if max_regret > allowed:
        errors.append(f"regret {max_regret:.3g} > {allowed:.3g}")
    if worst_dist > 1:
        errors.append(f"dist error {worst_dist:.3g}x tolerance")
    return ("FAIL(" + "; ".join(errors) + ")" if errors else "PASS"), details


# ---------------------------------------------------------------------------------------------------------------
# One case: a shape and a dtype.
# ---------------------------------------------------------------------------------------------------------------
def run_one(row: Row, fn: Callable[[], Any], x: Tensor, codebook: Tensor, min_time: float,
            check: bool, bound_s: float | None = None) -> None:
    """Fill ``row`` with the timing, peak memory and (backends, unless ``check`` is off) verdict of ``fn``.

    Timing comes first: its warm-up keeps one-time costs (thread pools, JIT kernels) out of the peak memory of
    the single call that is then measured and checked.
    """
    t = measure_time(fn, row.device, min_time)
    row.median_ms, row.p20_ms, row.p80_ms, row.samples = t.median * 1e3, t.p20 * 1e3, t.p80 * 1e3, t.samples
    row.gflops = 2 * row.N * row.K * row.D / t.median / 1e9
    row.dists_per_s = row.N * row.K / t.median
    if bound_s is not None:
        row.bound_ms, row.pct_of_bound = bound_s * 1e3, 100 * bound_s / t.median
    row.peak_extra_mib, out = measure_peak(fn, row.device)
    if row.kind == "backend":
        row.verdict, row.check = check_quantized(x, codebook, row.metric, out) if check else ("skipped", {})


def add_ratios(rows: list[Row]) -> None:
    """Speed-ups against every baseline of the case (and the fastest search among them), and the time as a
    multiple of the GEMMs'."""
    by_name = {r.name: r.median_ms for r in rows if r.median_ms is not None}
    t_naive, t_gemm, t_gemm_out = by_name.get("naive"), by_name.get("gemm"), by_name.get("gemm_out")
    searches = [by_name[b] for b in SEARCH_BASELINES if b in by_name]
    for r in rows:
        if r.median_ms is None:
            continue
        r.speedups = {b: by_name[b] / r.median_ms for b in BASELINES if b in by_name}
        if searches:
            r.speedup_vs_best_search = min(searches) / r.median_ms
        if t_naive is not None:
            r.speedup_vs_naive = t_naive / r.median_ms
        if t_gemm is not None:
            r.speedup_vs_gemm = t_gemm / r.median_ms
            r.x_gemm_time = r.median_ms / t_gemm
        if t_gemm_out is not None:
            r.x_gemm_out_time = r.median_ms / t_gemm_out


def run_case(shape: tuple[int, int, int], dtype_name: str, metric: str, device: str, backends: Sequence[str],
             min_time: float, check: bool, peaks: roofline.Peaks | None = None) -> list[Row]:
    """Every backend and baseline on one shape, dtype and metric; an exception fails that row only."""
    n, k, d = shape
    x, codebook = make_inputs(n, k, d, DTYPES[dtype_name], device)
    bound_s = None if peaks is None else roofline.bound_seconds(n, k, d, x.dtype, peaks)
    rows = []
    nk_bytes = n * k * x.element_size()
    for name, fn in make_callables(x, codebook, metric, backends).items():
        row = Row(n, k, d, dtype_name, metric, device, name, "baseline" if name in BASELINES else "backend")
        if name in NK_BASELINES and nk_bytes > MAX_NK_BYTES:
            row.verdict = f"skipped (N x K = {nk_bytes / 2**30:.0f} GiB > VQK_BENCH_MAX_NK_BYTES)"
            rows.append(row)
            continue
        try:
            run_one(row, fn, x, codebook, min_time, check, bound_s)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking the others
            row.verdict = f"{'FAIL' if row.kind == 'backend' else 'ERROR'}({type(e).__name__}: {e})"
        rows.append(row)
    add_ratios(rows)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Machine description.
# ---------------------------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def git_commit() -> str | None:
    """Short commit of the checkout this package lives in (None outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def machine_info(device: str) -> dict[str, Any]:
    """:func:`vqkernels.info.collect` plus device, commit, date and load (a busy host skews timings)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {**info.collect(), "device": device, "device_name": device_name(device),
            "git_commit": git_commit(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_1m": None if load is None else round(load[0], 2)}


# ---------------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------------
# The terminal table leaves out what the JSON also has as an inverse (speedup_vs_gemm = 1 / x_gemm_time).
COLUMNS = ("shape N,K,D", "dtype", "metric", "name", "median ms", "p20-p80 ms (n)", "GFLOP/s", "Gdist/s",
           "% roofline", "vs naive", "vs best unfused", "x GEMM time", "x gemm_out", "peak MiB", "check")
LEFT_COLUMNS = (0, 1, 2, 3, len(COLUMNS) - 1)  # text; the numbers are right-aligned


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _ms(value: float) -> str:
    """About 4 significant digits, never in exponent notation."""
    return f"{value:.{max(0, 3 - int(np.floor(np.log10(max(abs(value), 1e-9)))))}f}"


def format_row(r: Row) -> list[str]:
    """The table cells of a row (``-`` where a number is missing)."""
    median = "-" if r.median_ms is None else _ms(r.median_ms)
    spread = "-" if r.p20_ms is None else f"{_ms(r.p20_ms)}-{_ms(r.p80_ms)} ({r.samples or '?'})"
    gdist = None if r.dists_per_s is None else r.dists_per_s / 1e9
    return [f"{r.N},{r.K},{r.D}", r.dtype, r.metric, r.name, median, spread, _fmt(r.gflops, ".1f"),
            _fmt(gdist, ".2f"), _fmt(r.pct_of_bound, ".1f", "%"), _fmt(r.speedup_vs_naive, ".2f", "x"),
            _fmt(r.speedup_vs_best_search, ".2f", "x"),
            _fmt(r.x_gemm_time, ".2f", "x"), _fmt(r.x_gemm_out_time, ".2f", "x"),
            _fmt(r.peak_extra_mib, ".1f"), r.verdict]


def header_line(machine: dict[str, Any], min_time: float) -> str:
    """One line saying what ran where: version, commit, date, device, threads, torch/triton, load, options, and
    where the roofline's peaks come from."""
    m = machine
    line = (f"vqkernels {m['vqkernels']} @ {m['git_commit'] or 'unknown commit'} | {m['date']} | "
            f"{m['device']}: {m['device_name']} | threads {m['threads']} | torch {m['torch']} | "
            f"triton {m['triton']} | load {m['loadavg_1m']} | min-time {min_time:g}s")
    peaks = m.get("roofline")
    if peaks:
        tflops = ", ".join(f"{k} {v:.3g}" for k, v in sorted(peaks["tflops"].items()))
        line += f" | roofline {peaks['source']}: TFLOP/s {tflops}; {peaks['bandwidth_gb_s']:.0f} GB/s"
    return line


def print_table(rows: list[Row], header: str) -> None:
    """The header line, then a rich table when rich imports, else aligned plain text."""
    print(header)
    cells = [format_row(r) for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c) for c in col) for col in zip(COLUMNS, *cells)]
        for line in (COLUMNS, *cells):
            print("  ".join(c.ljust(w) if i in LEFT_COLUMNS else c.rjust(w)
                            for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        return
    table = Table()
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i in LEFT_COLUMNS else "right", no_wrap=True)
    for r, line in zip(rows, cells):
        bad = r.failed or r.verdict.startswith("ERROR")
        table.add_row(*line, style="red" if bad else ("bold" if r.kind == "backend" else None))
    Console(width=max(180, Console().width)).print(table)


def plot_speedups(rows: list[Row], path: Path, title: str) -> None:
    """PNG: speed-up of each backend over the naive reference against K (log scale), one line per (backend,
    dtype, D); the dashed line marks parity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, str, int], list[tuple[int, float]]] = {}
    for r in rows:
        if r.kind == "backend" and r.speedup_vs_naive is not None:
            series.setdefault((r.name, r.dtype, r.metric, r.D), []).append((r.K, r.speedup_vs_naive))
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, dtype, metric, d), pts in sorted(series.items()):
        pts.sort()
        ax.plot([k for k, _ in pts], [s for _, s in pts], marker="o", label=f"{name} {dtype} {metric} D={d}")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("codebook size K")
    ax.set_ylabel("speed-up over the naive PyTorch search")
    ax.set_title(textwrap.fill(title, 130), fontsize=7)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fastest_backends(rows: list[Row]) -> list[dict[str, Any]]:
    """Per case with two or more passing backends: the fastest one and every backend's median (ms). On a GPU this
    is the triton / cuda crossover that ``backend="auto"`` should follow."""
    cases: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.kind == "backend" and r.median_ms is not None and not r.failed:
            cases.setdefault((r.N, r.K, r.D, r.dtype, r.metric), {})[r.name] = r.median_ms
    return [{"shape": [n, k, d], "dtype": dt, "metric": m, "fastest": min(t, key=t.get), "median_ms": t}
            for (n, k, d, dt, m), t in cases.items() if len(t) > 1]


def write_json(path: Path, machine: dict[str, Any], config: dict[str, Any], rows: list[Row]) -> None:
    """``{"machine", "config", "rows", "fastest_backend"}``, every number as measured (times in ms); each row
    stamped with device name, versions, commit and date."""
    # every row carries its stamp, so that rows merged from several runs keep where and when they were measured
    stamp = {k: machine.get(k) for k in ("device_name", "vqkernels", "torch", "torch_cuda", "triton", "git_commit",
                                        "date")}
    rows_json = []
    for r in rows:
        d = asdict(r)
        d["shape"] = [r.N, r.K, r.D]
        d["stamp"] = stamp
        rows_json.append(d)
    result = {"machine": machine, "config": config, "rows": rows_json, "fastest_backend": fastest_backends(rows)}
    # written whole to a temporary file, then renamed: a run stopped at any moment leaves the last complete JSON
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, int, int]:
    """argparse type: ``N,K,D``."""
    try:
        n, k, d = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,K,D (three integers); got {text!r}") from None
    if n < 1 or k < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"N, K and D must be positive; got {text!r}")
    return n, k, d


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a non-empty comma list of ``choices``."""
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in names if v not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}; got {text!r}")
        return names

    return parse


def runnable_backends(device: str) -> list[str]:
    """The backends that can run on ``device`` ("cpu" or "cuda") in this process."""
    return [n for n, b in BACKENDS.items()
            if device in b.devices and b.available() and b.device_why_not(device) is None]


def default_backends(device: str) -> list[str]:
    """The backends timed unless asked otherwise: timing triton's interpreter says nothing about its kernels."""
    return [n for n in runnable_backends(device) if not (n == "triton" and device == "cpu")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and resolve the options (default backends, shapes and min-time filled in)."""
    p = argparse.ArgumentParser(prog="python -m vqkernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=_shape, action="append", metavar="N,K,D",
                   help="a shape to run (repeatable; replaces the defaults "
                        + " ".join(",".join(map(str, s)) for s in DEFAULT_SHAPES) + ")")
    p.add_argument("--dtype", type=_names(tuple(DTYPES)), default=["fp32", "bf16"],
                   help=f"comma list of {','.join(DTYPES)} (default fp32,bf16)")
    p.add_argument("--metric", type=_names(METRICS), default=None,
                   help=f"comma list of {','.join(METRICS)} (default: all; the large shapes of the cpu-default "
                        "preset run l2 only)")
    p.add_argument("--backend", type=_names(tuple(BACKENDS)), default=None,
                   help="comma list (default: every backend available on the device)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write machine info and rows here")
    p.add_argument("--min-time", type=float, default=None, metavar="SECONDS",
                   help=f"timed seconds per measurement (default {DEFAULT_MIN_TIME}, "
                        f"{QUICK_MIN_TIME} with --quick)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="named shape set (default: cpu-default on the CPU, gpu on CUDA); --shape overrides it")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH",
                   help="write a PNG of each backend's speed-up over the naive reference vs K, one line per D")
    p.add_argument("--quick", action="store_true", help="small shapes only (for tests): "
                   + " ".join(",".join(map(str, s)) for s in QUICK_SHAPES))
    p.add_argument("--no-check", action="store_true", help="skip the fp64 correctness check")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this many seconds (the JSON says which cases ran)")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    runnable = runnable_backends(args.device)
    if args.backend is None:
        args.backend = default_backends(args.device)
    for name in args.backend:
        if name not in runnable:
            why = BACKENDS[name].why_not() or f"it does not run on {args.device}"
            p.error(f"--backend {name}: {why}")
    preset = "quick" if args.quick else (args.preset or ("gpu" if args.device == "cuda" else "cpu-default"))
    args.shapes = args.shape or list(PRESETS[preset])
    l2_only = PRESET_L2_ONLY.get(preset, frozenset()) if args.shape is None and args.metric is None else frozenset()
    args.metric = args.metric or list(METRICS)
    args.cases = [(s, dt, m) for s in args.shapes for dt in args.dtype for m in args.metric
                  if m == "l2" or s not in l2_only]
    if args.min_time is None:
        args.min_time = QUICK_MIN_TIME if args.quick else DEFAULT_MIN_TIME
    return args


def _progress(cases: list, **kwargs):
    """``tqdm`` over ``cases`` on stderr (silent when stderr is not a terminal or tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return cases
    return tqdm(cases, file=sys.stderr, unit="case", disable=None, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table (and write JSON); return 1 if any correctness check failed."""
    args = parse_args(argv)
    machine = machine_info(args.device)
    print(f"roofline peaks for {args.device} ...", file=sys.stderr, flush=True)
    peaks = roofline.peaks(args.device, tuple(args.dtype))
    machine["roofline"] = peaks.as_json()
    cases = args.cases
    config = {"shapes": [list(s) for s in args.shapes], "dtypes": args.dtype, "metrics": args.metric,
              "cases": [[list(s), dt, m] for s, dt, m in cases],
              "backends": args.backend, "min_time": args.min_time, "check": not args.no_check,
              "check_rows": CHECK_ROWS, "complete": False}
    rows: list[Row] = []
    bar = _progress(cases, desc="bench")
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    for i, (shape, dtype_name, metric) in enumerate(bar):
        if deadline is not None and time.monotonic() > deadline:
            print(f"time limit of {args.time_limit:.0f} s reached: {len(cases) - i} of {len(cases)} cases not run",
                  file=sys.stderr)
            break
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{','.join(map(str, shape))} {dtype_name} {metric}")
        rows += run_case(shape, dtype_name, metric, args.device, args.backend, args.min_time,
                         not args.no_check, peaks)
        if args.json is not None:  # after every case: a run stopped from outside keeps what it measured
            config["cases_done"] = i + 1
            write_json(args.json, machine, config, rows)
    else:
        config["complete"] = True
    print_table(rows, header_line(machine, args.min_time))
    for case in fastest_backends(rows):
        times = ", ".join(f"{b} {_ms(t)} ms" for b, t in case["median_ms"].items())
        print(f"fastest backend at {','.join(map(str, case['shape']))} {case['dtype']} {case['metric']}: "
              f"{case['fastest']} ({times})")
    if args.json is not None:
        write_json(args.json, machine, config, rows)
    if args.plot is not None:
        plot_speedups(rows, args.plot, header_line(machine, args.min_time))
    failed = [r for r in rows if r.failed]
    for r in failed:
        print(f"FAILED: {r.N},{r.K},{r.D} {r.dtype} {r.metric} {r.name}: {r.verdict}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

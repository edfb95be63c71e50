"""``python -m vqkernels.bench``: microbenchmark of :func:`vqkernels.quantize` against plain PyTorch.

For every shape ``(N, K, D)``, dtype and metric it times, in one run and on the same inputs, every requested
backend's ``quantize(x, C, metric=..., backend=b)`` (search + gather + usage counts) and the baselines: ``naive``
(the textbook search, materialising N x K), ``gemm`` (``x @ C.T`` alone), ``gemm_out`` (the same GEMM into a
preallocated buffer), ``gemm_argmin`` (one GEMM into the argmin key + argmin: the best unfused search),
``cdist_chunked`` (vqtorch's search, l2) and ``vqp_layer`` (vector-quantize-pytorch's ``VectorQuantize`` forward,
l2, when installed); :mod:`vqkernels.bench.baselines` gives their formulas.

Each row reports median and 20%/80% quantiles of the per-call time, GFLOP/s (``2NKD / t``), distances/s
(``NK / t``), the percentage of the device roofline (the lower bound of :mod:`vqkernels.roofline` over ``t``;
datasheet peaks for known GPUs, else measured GEMM and copy peaks), the speed-up over every baseline (JSON
``speedups``; the table shows ``t_naive / t`` and the speed-up over the fastest unfused search among naive,
gemm_argmin, cdist_chunked and vqp_layer), the time as a multiple of the GEMMs' (``t / t_gemm`` and
``t / t_gemm_out``), the measured peak extra memory of one call, and (backends only) a correctness verdict: the
structure of the result, then the oracle of :mod:`vqkernels.testing` (fp64 brute force and the precision rule)
on a sample of rows. The exit code is 1 when any check fails (a baseline that raises is reported as ERROR and
does not fail the run).

The ``cpu`` backend's rows say which tile kernel and epilogue ran (``cpu_tile``, ``cpu_epilogue``), and for l2 every
other combination this CPU can run is timed and checked beside it on the same inputs, as a row named
``cpu[<tile>/<epilogue>]`` (``--no-cpu-variants``: not); a line per case says whether the automatic choice was
the fastest of them (JSON ``cpu_variants``).

Examples::

    python -m vqkernels.bench                                  # default shapes, fp32 + bf16, every metric
    python -m vqkernels.bench --preset gpu --backend triton,cuda --dtype bf16 --metric l2
    python -m vqkernels.bench --shape 8192,2048,128 --dtype fp32 --metric cosine --json out.json
    python -m vqkernels.bench --quick --min-time 0.05           # seconds; what tests/test_bench.py runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import dispatch, roofline
from ..numerics import METRICS
from .cases import (
    DEFAULT_MIN_TIME,
    DEFAULT_SHAPES,
    DTYPES,
    PRESETS,
    QUICK_MIN_TIME,
    QUICK_SHAPES,
    Shape,
    case_list,
    default_preset,
)
from .check import CHECK_ROWS
from .machine import machine_info
from .report import Row, fastest_backends, fmt_ms, header_line, plot_speedups, print_table, progress, write_json
from .runner import run_case
from .variants import VARIANT_BACKEND, VARIANT_METRICS, default_fastest, describe, env_in_force


def parse_shape(text: str) -> Shape:
    """argparse type: ``N,K,D`` (three positive integers)."""
    try:
        n, k, d = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,K,D (three integers); got {text!r}") from None
    if n < 1 or k < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"N, K and D must be positive; got {text!r}")
    return n, k, d


def parse_names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a non-empty comma list of ``choices``, in the order given."""

    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in names if v not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}; got {text!r}")
        return names

    return parse


def default_backends(device: str) -> list[str]:
    """The backends timed unless asked otherwise: :func:`vqkernels.dispatch.runnable` on ``device``, less triton on
    the CPU (timing triton's interpreter says nothing about its kernels)."""
    return [n for n in dispatch.runnable(device) if not (n == "triton" and device == "cpu")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and resolve the options (default backends, shapes, cases and min-time filled in)."""
    p = argparse.ArgumentParser(
        prog="python -m vqkernels.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        metavar="N,K,D",
        help="a shape to run (repeatable; replaces the defaults "
        + " ".join(",".join(map(str, s)) for s in DEFAULT_SHAPES)
        + ")",
    )
    p.add_argument(
        "--dtype",
        type=parse_names(tuple(DTYPES)),
        default=["fp32", "bf16"],
        help=f"comma list of {','.join(DTYPES)} (default fp32,bf16)",
    )
    p.add_argument(
        "--metric",
        type=parse_names(METRICS),
        default=None,
        help=f"comma list of {','.join(METRICS)} (default: all; the large shapes of the cpu-default "
        "preset run l2 only)",
    )
    p.add_argument(
        "--backend",
        type=parse_names(tuple(dispatch.BACKENDS)),
        default=None,
        help="comma list (default: every backend available on the device)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write machine info and rows here")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"timed seconds per measurement (default {DEFAULT_MIN_TIME}, {QUICK_MIN_TIME} with --quick)",
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="named shape set (default: cpu-default on the CPU, gpu on CUDA); --shape overrides it",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a PNG of each backend's speed-up over the naive reference vs K, one line per D",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small shapes only (for tests): " + " ".join(",".join(map(str, s)) for s in QUICK_SHAPES),
    )
    p.add_argument("--no-check", action="store_true", help="skip the fp64 correctness check")
    p.add_argument(
        "--cpu-variants",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with the cpu backend, also time and check every other tile kernel / epilogue this CPU can run, "
        f"metric {', '.join(VARIANT_METRICS)} only (default: on)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new case after this many seconds (the JSON says which cases ran)",
    )
    args = p.parse_args(None if argv is None else [str(a) for a in argv])
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    runnable = dispatch.runnable(args.device)
    if args.backend is None:
        args.backend = default_backends(args.device)
    for name in args.backend:
        if name not in runnable:
            p.error(f"--backend {name}: {dispatch.BACKENDS[name].why_not(args.device)}")
    preset = "quick" if args.quick else (args.preset or default_preset(args.device))
    args.shapes = args.shape or list(PRESETS[preset])
    args.cases = case_list(args.shapes, args.dtype, args.metric, None if args.shape else preset)
    args.metric = args.metric or list(METRICS)
    if args.min_time is None:
        args.min_time = QUICK_MIN_TIME if args.quick else DEFAULT_MIN_TIME
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table (and write JSON / the plot); return 1 if any correctness check failed."""
    args = parse_args(argv)
    machine = machine_info(args.device)
    print(f"roofline peaks for {args.device} ...", file=sys.stderr, flush=True)
    peaks = roofline.peaks(args.device, tuple(args.dtype))
    machine["roofline"] = peaks.as_json()
    cases = args.cases
    config = {
        "shapes": [list(s) for s in args.shapes],
        "dtypes": args.dtype,
        "metrics": args.metric,
        "cases": [[list(s), dt, m] for s, dt, m in cases],
        "backends": args.backend,
        "min_time": args.min_time,
        "check": not args.no_check,
        "check_rows": CHECK_ROWS,
        "cpu_variants": args.cpu_variants,
        "cpu_env": env_in_force(),
        "complete": False,
    }
    if args.cpu_variants and VARIANT_BACKEND in args.backend:
        if config["cpu_env"]:
            forced = " ".join(f"{k}={v}" for k, v in config["cpu_env"].items())
            print(
                f"note: {forced} is set: the {VARIANT_BACKEND} rows run that, not the automatic choice", file=sys.stderr
            )
        if not set(VARIANT_METRICS) & set(args.metric):
            print(
                f"note: the {VARIANT_BACKEND} kernel variants run with {', '.join(VARIANT_METRICS)} only",
                file=sys.stderr,
            )
    rows: list[Row] = []
    bar = progress(cases, desc="bench")
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    for i, (shape, dtype_name, metric) in enumerate(bar):
        if deadline is not None and time.monotonic() > deadline:
            print(
                f"time limit of {args.time_limit:.0f} s reached: {len(cases) - i} of {len(cases)} cases not run",
                file=sys.stderr,
            )
            break
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{','.join(map(str, shape))} {dtype_name} {metric}")
        rows += run_case(
            shape,
            dtype_name,
            metric,
            args.device,
            args.backend,
            args.min_time,
            not args.no_check,
            peaks,
            cpu_variants=args.cpu_variants,
        )
        if args.json is not None:  # after every case: a run stopped from outside keeps what it measured
            config["cases_done"] = i + 1
            write_json(args.json, machine, config, rows)
    else:
        config["complete"] = True
    print_table(rows, header_line(machine, args.min_time))
    for case in fastest_backends(rows):
        times = ", ".join(f"{b} {fmt_ms(t)} ms" for b, t in case["median_ms"].items())
        print(
            f"fastest backend at {','.join(map(str, case['shape']))} {case['dtype']} {case['metric']}: "
            f"{case['fastest']} ({times})"
        )
    for entry in default_fastest(rows):
        print(describe(entry))
    if args.json is not None:
        write_json(args.json, machine, config, rows)
    if args.plot is not None:
        plot_speedups(rows, args.plot, header_line(machine, args.min_time))
    failed = [r for r in rows if r.failed]
    for r in failed:
        print(f"FAILED: {r.N},{r.K},{r.D} {r.dtype} {r.metric} {r.name}: {r.verdict}", file=sys.stderr)
    return 1 if failed else 0

"""The benchmarks of vqkernels: ``python -m vqkernels.bench`` (the ops against plain PyTorch) and
``python -m vqkernels.bench_layer`` (one training step of a VQ layer against other libraries'); README
"Benchmarking" describes both.

One concern per module:

=============  ==================================================================================================
``cases``      dtype names, shape presets (the few-rows shapes), the l2-only rule of the CPU default, time budgets,
               case list, inputs
``baselines``  the plain-PyTorch and third-party baselines (each with its formula) and the callables of a case
``timing``     median and 20 % / 80 % quantiles: ``torch.utils.benchmark`` (CPU), ``triton.testing.do_bench``
``memory``     peak extra memory of one call (RSS high-water mark on the CPU, torch's allocator on CUDA)
``check``      the correctness column: structural checks, then the oracle of :mod:`vqkernels.testing`
``machine``    device name, commit, date and load on top of :func:`vqkernels.info.collect`
``report``     the :class:`Row`, speed-ups, terminal table, plot, fastest backend per case, JSON
``runner``     one case: every baseline, backend and ``cpu`` kernel variant timed, measured and checked
``variants``   the ``cpu`` backend's kernel variants: the stamp of a row, the variant rows, was the default fastest
``cli``        ``python -m vqkernels.bench``: options and ``main``
``layer``      ``python -m vqkernels.bench_layer``: the layer training-step benchmark
=============  ==================================================================================================

The backends a run can time come from :func:`vqkernels.dispatch.runnable`; the numbers in a row's ``check`` are
the oracle's :attr:`vqkernels.testing.Verdict.details`.
"""

from .baselines import (
    BASELINES,
    CDIST_CHUNK,
    MAX_NK_BYTES,
    NK_BASELINES,
    SEARCH_BASELINES,
    cdist_chunked_codes,
    gemm_argmin_codes,
    make_callables,
    naive_codes,
    skip_reason,
    vqp_layer_codes,
    vqp_missing,
)
from .cases import (
    DEFAULT_MIN_TIME,
    DEFAULT_SHAPES,
    DTYPES,
    FEW_ROWS_SHAPES,
    PRESET_L2_ONLY,
    PRESETS,
    QUICK_MIN_TIME,
    QUICK_SHAPES,
    case_list,
    default_preset,
    make_inputs,
)
from .check import CHECK_ROWS, check_codes, check_quantized, structure_errors
from .cli import default_backends, main, parse_args, parse_names, parse_shape
from .machine import device_name, git_commit, machine_info
from .memory import measure_peak, peak_extra_cpu, peak_extra_cuda
from .report import (
    Row,
    add_ratios,
    fastest_backends,
    fmt_ms,
    fmt_number,
    format_row,
    header_line,
    plot_speedups,
    print_table,
    progress,
    write_json,
    write_json_atomic,
)
from .runner import CHECKED_KINDS, run_case, run_one
from .timing import MIN_RUNS, Timing, measure_time, summarise, time_cpu, time_cuda
from .variants import (
    FASTEST_TOLERANCE,
    VARIANT_BACKEND,
    VARIANT_METRICS,
    cpu_stamp,
    default_fastest,
    describe,
    env_in_force,
    forced_env,
    other_variants,
    variant_name,
)

__all__ = [
    "BASELINES",
    "CDIST_CHUNK",
    "MAX_NK_BYTES",
    "NK_BASELINES",
    "SEARCH_BASELINES",
    "cdist_chunked_codes",
    "gemm_argmin_codes",
    "make_callables",
    "naive_codes",
    "skip_reason",
    "vqp_layer_codes",
    "vqp_missing",
    "DEFAULT_MIN_TIME",
    "DEFAULT_SHAPES",
    "DTYPES",
    "FEW_ROWS_SHAPES",
    "PRESET_L2_ONLY",
    "PRESETS",
    "QUICK_MIN_TIME",
    "QUICK_SHAPES",
    "case_list",
    "default_preset",
    "make_inputs",
    "CHECK_ROWS",
    "check_codes",
    "check_quantized",
    "structure_errors",
    "default_backends",
    "main",
    "parse_args",
    "parse_names",
    "parse_shape",
    "device_name",
    "git_commit",
    "machine_info",
    "measure_peak",
    "peak_extra_cpu",
    "peak_extra_cuda",
    "Row",
    "add_ratios",
    "fastest_backends",
    "fmt_ms",
    "fmt_number",
    "format_row",
    "header_line",
    "plot_speedups",
    "print_table",
    "progress",
    "write_json",
    "write_json_atomic",
    "CHECKED_KINDS",
    "run_case",
    "run_one",
    "MIN_RUNS",
    "Timing",
    "measure_time",
    "summarise",
    "time_cpu",
    "time_cuda",
    "FASTEST_TOLERANCE",
    "VARIANT_BACKEND",
    "VARIANT_METRICS",
    "cpu_stamp",
    "default_fastest",
    "describe",
    "env_in_force",
    "forced_env",
    "other_variants",
    "variant_name",
]

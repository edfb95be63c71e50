"""The op benchmark's records and output: the :class:`Row`, the speed-ups of a case, the terminal table, the
plot, the fastest backend per case and the JSON file; plus the number formats, the progress bar and the atomic
JSON write the layer benchmark shares."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .baselines import BASELINES, SEARCH_BASELINES
from .variants import default_fastest


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
    kind: str  # "backend", "baseline" or "variant" (the cpu backend with another tile kernel / epilogue forced)
    cpu_tile: str | None = None  # cpu backend and its variants: the tile kernel that ran (vqkernels.info.cpu_plan)
    cpu_epilogue: str | None = None  # ... and the epilogue
    cpu_env: dict[str, str] | None = None  # variants: the environment that forced them
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
    check: dict[str, Any] = field(default_factory=dict)  # the oracle's details (vqkernels.testing.Verdict)

    @property
    def failed(self) -> bool:
        return self.verdict.startswith("FAIL")


def add_ratios(rows: list[Row]) -> None:
    """Fill the speed-ups of one case's rows against every baseline of the case (and the fastest search among
    them), and the time as a multiple of the GEMMs'."""
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


def fastest_backends(rows: list[Row]) -> list[dict[str, Any]]:
    """Per case with two or more passing backends: the fastest one and every backend's median (ms). On a GPU this
    is the triton / cuda crossover that ``backend="auto"`` should follow."""
    cases: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.kind == "backend" and r.median_ms is not None and not r.failed:
            cases.setdefault((r.N, r.K, r.D, r.dtype, r.metric), {})[r.name] = r.median_ms
    return [
        {"shape": [n, k, d], "dtype": dt, "metric": m, "fastest": min(t, key=t.get), "median_ms": t}
        for (n, k, d, dt, m), t in cases.items()
        if len(t) > 1
    ]


# ---------------------------------------------------------------------------------------------------------------
# Terminal output.
# ---------------------------------------------------------------------------------------------------------------
# The terminal table leaves out what the JSON also has as an inverse (speedup_vs_gemm = 1 / x_gemm_time).
COLUMNS = (
    "shape N,K,D",
    "dtype",
    "metric",
    "name",
    "cpu kernel",
    "median ms",
    "p20-p80 ms (n)",
    "GFLOP/s",
    "Gdist/s",
    "% roofline",
    "vs naive",
    "vs best unfused",
    "x GEMM time",
    "x gemm_out",
    "peak MiB",
    "check",
)
LEFT_COLUMNS = (0, 1, 2, 3, 4, len(COLUMNS) - 1)  # text; the numbers are right-aligned


def fmt_number(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` plus ``suffix``, or ``-`` when missing."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def fmt_ms(value: float) -> str:
    """A time in ms with about 4 significant digits, never in exponent notation."""
    return f"{value:.{max(0, 3 - int(np.floor(np.log10(max(abs(value), 1e-9)))))}f}"


def format_row(r: Row) -> list[str]:
    """The table cells of a row (``-`` where a number is missing)."""
    median = "-" if r.median_ms is None else fmt_ms(r.median_ms)
    spread = "-" if r.p20_ms is None else f"{fmt_ms(r.p20_ms)}-{fmt_ms(r.p80_ms)} ({r.samples or '?'})"
    gdist = None if r.dists_per_s is None else r.dists_per_s / 1e9
    return [
        f"{r.N},{r.K},{r.D}",
        r.dtype,
        r.metric,
        r.name,
        "-" if r.cpu_tile is None else f"{r.cpu_tile}/{r.cpu_epilogue}",
        median,
        spread,
        fmt_number(r.gflops, ".1f"),
        fmt_number(gdist, ".2f"),
        fmt_number(r.pct_of_bound, ".1f", "%"),
        fmt_number(r.speedup_vs_naive, ".2f", "x"),
        fmt_number(r.speedup_vs_best_search, ".2f", "x"),
        fmt_number(r.x_gemm_time, ".2f", "x"),
        fmt_number(r.x_gemm_out_time, ".2f", "x"),
        fmt_number(r.peak_extra_mib, ".1f"),
        r.verdict,
    ]


def header_line(machine: dict[str, Any], min_time: float) -> str:
    """One line saying what ran where: version, commit, date, device, threads, torch/triton, load, options, and
    where the roofline's peaks come from."""
    m = machine
    line = (
        f"vqkernels {m['vqkernels']} @ {m['git_commit'] or 'unknown commit'} | {m['date']} | "
        f"{m['device']}: {m['device_name']} | threads {m['threads']} | torch {m['torch']} | "
        f"triton {m['triton']} | load {m['loadavg_1m']} | min-time {min_time:g}s"
    )
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
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        widths = [max(len(c) for c in col) for col in zip(COLUMNS, *cells)]
        for line in (COLUMNS, *cells):
            print(
                "  ".join(
                    c.ljust(w) if i in LEFT_COLUMNS else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
                ).rstrip()
            )
        return
    table = Table()
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i in LEFT_COLUMNS else "right", no_wrap=True)
    for r, line in zip(rows, cells):
        bad = r.failed or r.verdict.startswith("ERROR")
        style = "red" if bad else {"backend": "bold", "variant": "italic"}.get(r.kind)
        table.add_row(*map(escape, line), style=style)  # a variant's name has brackets, rich's markup
    Console(width=max(220, Console().width)).print(table)


def progress(items: list, **kwargs) -> Iterable:
    """``tqdm`` over ``items`` on stderr (silent when stderr is not a terminal or tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, file=sys.stderr, unit="case", disable=None, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------------------------
def plot_speedups(rows: list[Row], path: Path, title: str) -> None:
    """PNG: speed-up of each backend over the naive reference against K (log scale), one line per (backend,
    dtype, metric, D); the dashed line marks parity."""
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


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written whole to a temporary file and then renamed: a run stopped at any moment
    leaves the last complete file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, machine: dict[str, Any], config: dict[str, Any], rows: list[Row]) -> None:
    """``{"machine", "config", "rows", "fastest_backend", "cpu_variants"}``, every number as measured (times in
    ms); each row stamped with device name, versions, commit and date; ``cpu_variants`` holds, per case with
    variant rows, whether the ``cpu`` backend's automatic kernel choice was the fastest
    (:func:`vqkernels.bench.variants.default_fastest`)."""
    # every row carries its stamp, so that rows merged from several runs keep where and when they were measured
    stamp = {
        k: machine.get(k) for k in ("device_name", "vqkernels", "torch", "torch_cuda", "triton", "git_commit", "date")
    }
    rows_json = []
    for r in rows:
        d = asdict(r)
        d["shape"] = [r.N, r.K, r.D]
        d["stamp"] = stamp
        rows_json.append(d)
    write_json_atomic(
        path,
        {
            "machine": machine,
            "config": config,
            "rows": rows_json,
            "fastest_backend": fastest_backends(rows),
            "cpu_variants": default_fastest(rows),
        },
    )

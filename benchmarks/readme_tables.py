"""Markdown tables for the README from the JSON that ``vqkernels.bench`` / ``vqkernels.bench_layer`` wrote, so
that no number in the README is typed by hand.

    python benchmarks/readme_tables.py ops benchmarks/results/cpu-amd-epyc-2core-ops.json [--backend cpu]
    python benchmarks/readme_tables.py layer benchmarks/results/cpu-amd-epyc-2core-layer.json
    python benchmarks/readme_tables.py demo benchmarks/results/demo-cpu.json
    python benchmarks/readme_tables.py compile benchmarks/results/gpu-compile-triton-3.9.0.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.4g} ms" if v < 1000 else f"{v:.0f} ms"


def _x(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}×"


def _mib(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f} MiB"


FEW_ROWS = 64
"""Shapes with at most this many rows are the few-rows cases (a huge codebook against a handful of queries): they
get a table of their own instead of a line in the l2 table."""


def _cases(result: dict) -> dict[tuple, dict[str, dict]]:
    """(shape, dtype, metric) -> row name -> row, in the order of the rows."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        cases.setdefault((tuple(r["shape"]), r["dtype"], r["metric"]), {})[r["name"]] = r
    return cases


def ops_tables(result: dict, backend: str) -> str:
    """One table for l2 (every baseline) and one for every metric (the op against the fastest unfused search);
    then, when the result has them, one for the few-rows shapes and one per dtype for the ``cpu`` kernel
    variants."""
    cases = _cases(result)
    out = [
        f"| N, K, D | dtype | `{backend}` op | % of roofline | `x @ C.T` alone | GEMM + argmin | naive reference "
        "| vector-quantize-pytorch | op / GEMM | peak extra memory (op / naive) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, dtype, metric), by in cases.items():
        if metric != "l2" or backend not in by or shape[0] <= FEW_ROWS:
            continue
        op = by[backend]
        t = {name: by.get(name, {}).get("median_ms") for name in ("gemm", "gemm_argmin", "naive", "vqp_layer")}
        out.append(
            f"| {', '.join(map(str, shape))} | {dtype} | {_ms(op['median_ms'])} | "
            f"{op['pct_of_bound']:.0f} % | {_ms(t['gemm'])} | {_ms(t['gemm_argmin'])} | "
            f"{_ms(t['naive'])} | {_ms(t['vqp_layer'])} | {_x(op['x_gemm_time'])} | "
            f"{_mib(op['peak_extra_mib'])} / {_mib(by.get('naive', {}).get('peak_extra_mib'))} |"
        )
    out += [
        "",
        f"| N, K, D | dtype | metric | `{backend}` op | fastest unfused search | op is faster by | check |",
        "|---|---|---|---|---|---|---|",
    ]
    for (shape, dtype, metric), by in cases.items():
        if backend not in by:
            continue
        op = by[backend]
        searches = {
            n: by[n]["median_ms"]
            for n in ("naive", "gemm_argmin", "cdist_chunked", "vqp_layer")
            if n in by and by[n]["median_ms"] is not None
        }
        best = min(searches, key=searches.get) if searches else None
        out.append(
            f"| {', '.join(map(str, shape))} | {dtype} | {metric} | {_ms(op['median_ms'])} | "
            f"{best} {_ms(searches.get(best))} | {_x(op['speedup_vs_best_search'], 1)} | {op['verdict']} |"
        )
    for table in (few_rows_table(result, backend), *variant_tables(result)):
        if table:
            out += ["", table]
    return "\n".join(out)


def few_rows_table(result: dict, backend: str) -> str:
    """The l2 cases with at most ``FEW_ROWS`` rows: the op, the GEMM alone and their ratio, GEMM + argmin (empty
    when the result has none)."""
    out = [
        f"| N, K, D | dtype | `{backend}` op | `x @ C.T` alone | op / GEMM | GEMM + argmin |",
        "|---|---|---|---|---|---|",
    ]
    for (shape, dtype, metric), by in _cases(result).items():
        if metric != "l2" or backend not in by or shape[0] > FEW_ROWS:
            continue
        op = by[backend]
        gemm, gemm_argmin = (by.get(name, {}).get("median_ms") for name in ("gemm", "gemm_argmin"))
        out.append(
            f"| {', '.join(map(str, shape))} | {dtype} | {_ms(op['median_ms'])} | {_ms(gemm)} | "
            f"{_x(op['x_gemm_time'])} | {_ms(gemm_argmin)} |"
        )
    return "\n".join(out) if len(out) > 2 else ""


def _kernel(row: dict) -> str:
    return f"{row['cpu_tile']}/{row['cpu_epilogue']}"


def variant_tables(result: dict) -> list[str]:
    """Per dtype, the cases with ``cpu`` kernel variant rows: every variant's median and its time as a multiple
    of the GEMM alone (same shape and dtype), which one is the default (the ``cpu`` row, automatic choice), and
    whether the default is the fastest (JSON ``cpu_variants``, within its tolerance). Empty for a result without
    variant rows."""
    verdicts = {(tuple(v["shape"]), v["dtype"], v["metric"]): v for v in result.get("cpu_variants", [])}
    by_dtype: dict[str, list[tuple[tuple, dict[str, dict]]]] = {}
    for (shape, dtype, metric), by in _cases(result).items():
        if "cpu" in by and any(r["kind"] == "variant" for r in by.values()):
            by_dtype.setdefault(dtype, []).append(((shape, dtype, metric), by))
    tables = []
    for dtype, cases in by_dtype.items():
        kernels: list[str] = []  # columns: every tile/epilogue met, in order of appearance
        for _, by in cases:
            for r in by.values():
                if (r["name"] == "cpu" or r["kind"] == "variant") and _kernel(r) not in kernels:
                    kernels.append(_kernel(r))
        out = [
            f"| N, K, D | dtype | metric | {' | '.join(f'`{k}`' for k in kernels)} | default | default is fastest |",
            "|---|---|---|" + "---|" * len(kernels) + "---|---|",
        ]
        for case, by in cases:
            shape, _, metric = case
            cells = {}
            for r in by.values():
                if r["name"] == "cpu" or r["kind"] == "variant":
                    ok = r["median_ms"] is not None and not r["verdict"].startswith("FAIL")
                    cells[_kernel(r)] = f"{_ms(r['median_ms'])} ({_x(r['x_gemm_time'])} GEMM)" if ok else "FAIL"
            v = verdicts.get(case, {})
            fastest = v.get("cpu_default_fastest")
            if fastest is None:
                judged = "—"
            elif v["fastest"] == "cpu":
                judged = "yes"
            else:
                other = by[v["fastest"]]
                ratio = f"{v['default_over_fastest']:.2f}×"
                beat = f"`{_kernel(other)}` {ratio} faster"
                judged = f"yes, within {100 * v['tolerance']:g} % ({beat})" if fastest else f"no: {beat}"
            out.append(
                f"| {', '.join(map(str, shape))} | {dtype} | {metric} | "
                + " | ".join(cells.get(k, "—") for k in kernels)
                + f" | `{_kernel(by['cpu'])}` | {judged} |"
            )
        tables.append("\n".join(out))
    return tables


def layer_table(result: dict) -> str:
    """One row per step (time relative to the ``vqkernels`` row), then the targets the run judged (a result from
    before the ``VectorQuantize`` and 8-head rows has no ``targets`` lines of theirs)."""
    rows = result["rows"]
    base = next(r for r in rows if r["name"] == "vqkernels")
    n, k, d = base["N"], base["K"], base["D"]
    out = [f"| layer step, N={n}, K={k}, D={d}, fp32 | median | vqkernels is | check |", "|---|---|---|---|"]
    for r in rows:
        rel = r.get("x_vqkernels_time")
        what = (
            "—" if r["name"] == "vqkernels" else (f"{rel:.2g}× faster" if rel and rel >= 1 else _x(rel) + " its time")
        )
        out.append(f"| {r['name']} | {_ms(r['median_ms'])} | {what} | {r['verdict']} |")
    targets = [t for t in result.get("targets", []) if "VectorQuantize" in t["text"] or "8 heads" in t["text"]]
    if targets:
        out += ["", "| target | met |", "|---|---|"]
        out += [f"| {t['text']} | {'yes' if t['met'] else '**no**'} |" for t in targets]
    return "\n".join(out)


def demo_table(result: dict) -> str:
    """Test usage, perplexity and MSE per (data set, method) of ``python -m vqkernels.demo``: mean ± std over the
    seeds from its ``summary`` (one line per run for a result from before ``--seeds``)."""
    k = result["config"]["num_codes"]
    if "summary" in result:
        n = len(result["config"]["seeds"])
        out = [
            f"| data set | method | test usage ({n} seeds) | codes used | test perplexity | test MSE | train time |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["summary"]:
            u, c, p, m = r["usage"], r["used_codes"], r["perplexity"], r["mse"]
            out.append(
                f"| {r['dataset']} | `{r['method']}` | {100 * u['mean']:.1f} ± {100 * u['std']:.1f}% | "
                f"{c['mean']:.0f} ± {c['std']:.0f} / {k} | {p['mean']:.1f} ± {p['std']:.1f} | "
                f"{m['mean']:.4f} ± {m['std']:.4f} | {r['train_time_s']['mean']:.0f} s |"
            )
        return "\n".join(out)
    out = [
        "| data set | method | test usage | codes used | test perplexity | test MSE | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        t = r["test"]
        out.append(
            f"| {r['dataset']} | `{r['method']}` | {100 * t['usage']:.1f}% | {t['used_codes']}/{k} | "
            f"{t['perplexity']:.1f} | {t['mse']:.4f} | {r['train_time_s']:.0f} s |"
        )
    return "\n".join(out)


def compile_table(results: list[dict]) -> str:
    """Per kernel and triton version: variants, max registers and shared memory per arch, failures (from
    ``python -m vqkernels.triton.gpu_compile --json``)."""
    out = [
        "| kernel | triton | variants (sm_80 + sm_90) | max registers (sm_80 / sm_90) | "
        "max shared memory (sm_80 / sm_90) | spills or failures |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        kernels: dict[str, dict[int, list[dict]]] = {}
        for v in result["variants"]:
            kernels.setdefault(v["kernel"], {}).setdefault(v["arch"], []).append(v)
        for name, by_arch in sorted(kernels.items()):
            a80, a90 = by_arch.get(80, []), by_arch.get(90, [])
            regs = " / ".join(str(max((v["regs"] for v in a), default=0)) for a in (a80, a90))
            smem = " / ".join(f"{max((v['shared'] for v in a), default=0) / 1024:.1f} KiB" for a in (a80, a90))
            bad = sum(bool(v["problems"]) for v in a80 + a90)
            out.append(f"| `{name}` | {result['triton']} | {len(a80)} + {len(a90)} | {regs} | {smem} | {bad} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("ops", "layer", "demo", "compile"))
    p.add_argument("json", type=Path, nargs="+")
    p.add_argument("--backend", default="cpu", help="the backend row of the ops tables (default cpu)")
    args = p.parse_args()
    results = [json.loads(path.read_text()) for path in args.json]
    result = results[0]
    tables = {
        "ops": lambda: ops_tables(result, args.backend),
        "layer": lambda: layer_table(result),
        "demo": lambda: demo_table(result),
        "compile": lambda: compile_table(results),
    }
    print(tables[args.kind]())


if __name__ == "__main__":
    main()

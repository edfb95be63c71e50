"""The ``cpu`` backend's kernel variants: which tile kernel and epilogue a measurement ran (the stamp of its row),
every other combination that can run on this CPU timed as a row of its own, and whether the automatic choice was
the fastest of them.

The C++ op chooses its tile kernel and epilogue by what the CPU has and reads ``VQK_CPU_TILE`` /
``VQK_CPU_EPILOGUE`` at every call (:func:`vqkernels.info.cpu_plan`, :func:`vqkernels.info.cpu_variants`). A
variant row runs the backend's own callable with its variables set for the whole measurement (every timed call, the
peak-memory call and the checked call) and restored afterwards, so nothing leaks into the rows that follow. Without
those functions in the extension there are no variant rows and no stamp.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

from .. import info

VARIANT_BACKEND = "cpu"
"""The backend whose kernel variants are timed."""
VARIANT_METRICS = ("l2",)
"""The metrics the variants run with: the tile kernel and the epilogue do not depend on the metric, and timing
every variant at every metric would take ``make bench`` far past its few minutes."""
FASTEST_TOLERANCE = 0.03
"""The default counts as the fastest unless a variant beats its median by more than this fraction (noise)."""


def variant_name(variant: Mapping[str, Any]) -> str:
    """``cpu[<tile>/<epilogue>]``: the row name of a variant."""
    return f"{VARIANT_BACKEND}[{variant['tile']}/{variant['epilogue']}]"


@contextlib.contextmanager
def forced_env(env: Mapping[str, str]) -> Iterator[None]:
    """Set the variables of ``env`` for the duration; afterwards each has its old value again, or is unset if it
    was (also when the body raises)."""
    old = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_stamp(dtype_name: str, rows: int | None = None) -> tuple[str | None, str | None]:
    """(tile kernel, epilogue) the ``cpu`` backend runs for a search of ``rows`` input rows (default: a large batch)
    in ``dtype_name`` under the environment in force now; (None, None) when the extension does not say."""
    plan = info.cpu_plan(dtype_name, rows)
    return (None, None) if plan is None else (plan["tile"], plan["epilogue"])


def other_variants(dtype_name: str, rows: int | None = None) -> list[dict]:
    """The variants of a search of ``rows`` input rows in ``dtype_name`` that the ``cpu`` row itself does not run:
    every one of :func:`vqkernels.info.cpu_variants` but the plan in force (the automatic choice, first in the
    list, when the extension gives no plan). Empty without the extension's functions."""
    variants = info.cpu_variants(dtype_name, rows)
    tile, epilogue = cpu_stamp(dtype_name, rows)
    if tile is None:
        return variants[1:]
    return [v for v in variants if (v["tile"], v["epilogue"]) != (tile, epilogue)]


def env_in_force() -> dict[str, str]:
    """The variant-forcing variables set in this process (empty when the op chooses for itself)."""
    return {k: os.environ[k] for k in info.CPU_ENV_VARS if k in os.environ}


def default_fastest(rows: list, tolerance: float = FASTEST_TOLERANCE) -> list[dict[str, Any]]:
    """Per case with a ``cpu`` backend row and at least one variant row: every measured median, the fastest, and
    ``cpu_default_fastest``: True when no variant that passed its check beats the ``cpu`` row's median by more than
    ``tolerance``, False when one does, None when it cannot be judged (the ``cpu`` row failed or has no time, or no
    variant has one). ``default_over_fastest`` is the default's median over the fastest one's."""
    cases: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r.N, r.K, r.D, r.dtype, r.metric)
        if r.kind == "backend" and r.name == VARIANT_BACKEND:
            cases.setdefault(key, {"variants": []})["default"] = r
        elif r.kind == "variant":
            cases.setdefault(key, {"variants": []})["variants"].append(r)
    out = []
    for (n, k, d, dt, m), case in cases.items():
        default, variants = case.get("default"), case["variants"]
        if default is None or not variants:
            continue
        timed = {r.name: r.median_ms for r in (default, *variants) if r.median_ms is not None and not r.failed}
        entry: dict[str, Any] = {
            "shape": [n, k, d],
            "dtype": dt,
            "metric": m,
            "default": {"name": default.name, "tile": default.cpu_tile, "epilogue": default.cpu_epilogue},
            "median_ms": timed,
            "tolerance": tolerance,
            "fastest": None,
            "default_over_fastest": None,
            "cpu_default_fastest": None,
        }
        if default.name in timed and len(timed) > 1:
            fastest = min(timed, key=timed.get)
            best_variant = min(t for name, t in timed.items() if name != default.name)
            entry["fastest"] = fastest
            entry["default_over_fastest"] = timed[default.name] / timed[fastest]
            entry["cpu_default_fastest"] = timed[default.name] <= (1 + tolerance) * best_variant
        out.append(entry)
    return out


def describe(entry: Mapping[str, Any]) -> str:
    """One terminal line for an entry of :func:`default_fastest`: is the default the fastest, or which variant
    beat it and by how much."""
    shape = ",".join(map(str, entry["shape"]))
    d = entry["default"]
    default = f"{d['tile']}/{d['epilogue']}" if d["tile"] is not None else d["name"]
    head = f"cpu kernels at {shape} {entry['dtype']} {entry['metric']}: the default ({default})"
    times = entry["median_ms"]
    if entry["cpu_default_fastest"] is None:
        why = "its row failed or has no time" if d["name"] not in times else "no variant has a time"
        return f"{head} is not judged: {why}"
    mine = times[d["name"]]
    others = {name: t for name, t in times.items() if name != d["name"]}
    runner_up = min(others, key=others.get)
    tol = f"{100 * entry['tolerance']:g} %"
    if entry["fastest"] == d["name"]:
        return (
            f"{head} is the fastest of {len(times)}: {mine:.4g} ms; next {runner_up} {others[runner_up]:.4g} ms "
            f"({others[runner_up] / mine:.2f}x its time)"
        )
    beat = f"{runner_up} {others[runner_up]:.4g} ms is {mine / others[runner_up]:.2f}x faster than its {mine:.4g} ms"
    if entry["cpu_default_fastest"]:
        return f"{head} is the fastest within {tol}: {beat}"
    return f"{head} is NOT the fastest: {beat}"

"""``python -m vqkernels.info``: versions, build flags, the CPU features and kernels of the C++ CPU op, and every
backend of the table with its ops and, per device type, whether it runs here and why not."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import _ext
from ._version import __version__
from .dispatch import BACKENDS, OPS

CPU_DTYPES = ("fp32", "bf16", "fp16", "fp64")
"""The dtypes whose C++ CPU kernel choice ``info`` reports."""
CPU_ENV_VARS = (_ext.CPU_TILE_ENV, _ext.CPU_EPILOGUE_ENV)
"""The variables that force the C++ CPU op's tile kernel and epilogue (read by the op at every call)."""


def cpu_plan(dtype: str, rows: int | None = None) -> dict[str, str] | None:
    """``{"tile", "epilogue"}`` the C++ CPU op runs for a search of ``rows`` input rows (default: a large batch) in
    ``dtype`` under the environment in force now (None when the extension does not say):
    :func:`vqkernels._ext.cpu_plan`, public for the benchmark."""
    return _ext.cpu_plan(dtype) if rows is None else _ext.cpu_plan(dtype, rows)


def cpu_variants(dtype: str, rows: int | None = None) -> list[dict]:
    """Every ``{"tile", "epilogue", "env"}`` the C++ CPU op can run for a search of ``rows`` input rows in ``dtype``
    here, the automatic choice first (empty when the extension does not say): :func:`vqkernels._ext.cpu_variants`,
    public for the benchmark."""
    return _ext.cpu_variants(dtype) if rows is None else _ext.cpu_variants(dtype, rows)


FEW_ROWS = 1
"""The search ``info`` reports besides a large batch: one row (retrieval), which takes the GEMV tile kernel."""


def cpu_plans() -> dict[str, dict]:
    """Per dtype of ``CPU_DTYPES`` that the extension reports: the tile kernel and epilogue under the environment in
    force (:func:`cpu_plan`) and every variant that can run on this CPU (:func:`cpu_variants`), for a large batch
    and, under ``few_rows``, for a single row."""
    out = {}
    for dt in CPU_DTYPES:
        plan, variants = cpu_plan(dt), cpu_variants(dt)
        if plan is None and not variants:
            continue
        few = cpu_plan(dt, FEW_ROWS)
        out[dt] = {
            "tile": None if plan is None else plan["tile"],
            "epilogue": None if plan is None else plan["epilogue"],
            "variants": variants,
            "few_rows": None if few is None else {**few, "variants": cpu_variants(dt, FEW_ROWS)},
        }
    return out


def collect() -> dict:
    """Everything ``info`` prints, as a dict (also stamped into benchmark JSON)."""
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_version = f"not importable ({type(e).__name__})"
    return {
        "vqkernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "extension": "loaded" if _ext.available() else f"missing: {_ext.load_error}",
        "extension_cuda": _ext.with_cuda(),
        "cpu_features": _ext.cpu_features(),
        "cpu_plans": cpu_plans(),
        "backends": {name: {dev: b.why_not(dev) or "available" for dev in b.devices} for name, b in BACKENDS.items()},
    }


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vqkernels.info", description=__doc__.split(":")[0])
    p.add_argument(
        "--kernels",
        action="store_true",
        help="compile every Triton kernel variant for real GPU targets (no GPU needed) and print the "
        "per-variant table: kernel, tile, warps, stages, registers, spills, shared memory",
    )
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="with --kernels: sm_80 and/or sm_90")
    args = p.parse_args(argv)
    if args.kernels:
        import subprocess

        # a fresh process: the compile check needs the real compiler (no TRITON_INTERPRET) and an empty cache
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [
            sys.executable,
            "-m",
            "vqkernels.triton.gpu_compile",
            "--table",
            "--quiet",
            "--arch",
            *map(str, args.arch),
        ]
        return subprocess.run(cmd, env=env).returncode
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key in ("backends", "cpu_plans"):
            continue
        if key == "cpu_features":
            value = ", ".join(value) or "none reported"
        print(f"{key:<{width}}  {value}")
    print_cpu_kernels(info["cpu_plans"])
    print("backends (each implements " + ", ".join(OPS) + "):")
    for name, b in BACKENDS.items():
        print(f"  {name:<8} {b.summary}")
        print(f"           ops vqkernels::<op>{b.suffix}")
        for dev in b.devices:
            why = b.why_not(dev)
            print(f"           {dev:<5} {'available' if why is None else 'unavailable: ' + why}")
    return 0


def print_cpu_kernels(plans: dict[str, dict]) -> None:
    """The ``cpu kernels:`` block: per dtype, the tile kernel / epilogue that runs now and every one that can."""
    if not plans:
        print("cpu kernels: not reported (no extension, or one without cpu_plan)")
        return
    forced = " ".join(f"{k}={os.environ[k]}" for k in CPU_ENV_VARS if k in os.environ)
    print(
        f"cpu kernels (tile kernel/epilogue that runs, then every one that can; {_ext.CPU_TILE_ENV} and "
        f"{_ext.CPU_EPILOGUE_ENV} force one{': ' + forced + ' is set' if forced else ''}):"
    )
    for dt, p in plans.items():
        can = ", ".join(
            f"{v['tile']}/{v['epilogue']}" + (" (auto)" if i == 0 else "") for i, v in enumerate(p["variants"])
        )
        now = f"{p['tile']}/{p['epilogue']}"
        print(f"  {dt:<5} {now:<26} can run: {can or 'not reported'}")
        few = p.get("few_rows")
        if few is not None and (few["tile"], few["epilogue"]) != (p["tile"], p["epilogue"]):
            print(f"  {'':<5} {few['tile'] + '/' + few['epilogue']:<26} for searches of fewer than 16 rows")


if __name__ == "__main__":
    sys.exit(main())

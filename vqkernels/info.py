"""``python -m vqkernels.info``: versions, build flags, and every backend of the table with its ops and, per
device type, whether it runs here and why not."""

from __future__ import annotations

import platform
import sys

import torch

from . import _ext
from ._version import __version__
from .dispatch import BACKENDS, OPS


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
        "cpu_bf16_tile_kernel": getattr(_ext.C, "cpu_bf16_tile_kernel", None) if _ext.available() else None,
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
        import os
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
        if key == "backends":
            continue
        print(f"{key:<{width}}  {value}")
    print("backends (each implements " + ", ".join(OPS) + "):")
    for name, b in BACKENDS.items():
        print(f"  {name:<8} {b.summary}")
        print(f"           ops vqkernels::<op>{b.suffix}")
        for dev in b.devices:
            why = b.why_not(dev)
            print(f"           {dev:<5} {'available' if why is None else 'unavailable: ' + why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

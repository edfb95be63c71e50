"""Helpers shared by the benchmark suites (a module of its own: test modules cannot import a conftest reliably)."""

from __future__ import annotations

import torch

from vqkernels import bench


def vqk_shapes(config) -> list[tuple[int, int, int]]:
    """The ``--vqk-shape`` list, else the preset's shapes."""
    device = config.getoption("--vqk-device")
    preset = config.getoption("--vqk-preset") or bench.default_preset(device)
    return config.getoption("--vqk-shape") or list(bench.PRESETS[preset])


def timed(fn, device: str):
    """``fn`` followed by a CUDA synchronisation on GPUs, so that wall-clock timers see the kernel time."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run

"""What the op benchmark runs: dtype names, shape presets, the l2-only rule of the CPU default, timing budgets, the
case list, and the inputs of a case."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..numerics import METRICS

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
"""The ``--dtype`` names."""

Shape = tuple[int, int, int]  # (N rows, K codes, D features)
Case = tuple[Shape, str, str]  # (shape, dtype name, metric)

FEW_ROWS_SHAPES: tuple[Shape, ...] = ((1, 1048576, 64), (64, 1048576, 64), (8, 262144, 256))
"""A few rows against a huge codebook: retrieval, and the CVQ anchor search with the roles swapped (the op must stay
near the GEMM alone, whose time is then reading the codebook)."""
DEFAULT_SHAPES: tuple[Shape, ...] = ((4096, 1024, 64), (65536, 4096, 64), (16384, 16384, 256), *FEW_ROWS_SHAPES)
QUICK_SHAPES: tuple[Shape, ...] = ((4096, 1024, 64), (1000, 257, 40))
PRESETS: dict[str, tuple[Shape, ...]] = {
    "cpu-default": DEFAULT_SHAPES,  # a few minutes on 2 cores
    "quick": QUICK_SHAPES,  # seconds; what the tests run
    "gpu": (
        (65536, 1024, 256),
        (65536, 16384, 256),  # VQGAN-style tokenizers
        (262144, 16384, 8),
        (262144, 16384, 32),  # low-dimensional factorised codes (epilogue-bound)
        (1048576, 16384, 64),  # a large batch of image tokens
        (262144, 100000, 256),  # large codebooks, K not a power of two
        (65536, 1048576, 64),  # a million codes: split-K
        (1048576, 4096, 1024),  # wide features: GEMM-bound, compare to cuBLAS
        (100003, 1000, 100),  # odd sizes everywhere
    ),
}
"""Shape presets (N rows x K codes x D features) named after the workloads they stand for."""

PRESET_L2_ONLY: dict[str, frozenset[Shape]] = {
    "cpu-default": frozenset({(65536, 4096, 64), (16384, 16384, 256), *FEW_ROWS_SHAPES})
}
"""Shapes a preset runs with l2 only unless ``--metric`` says otherwise: cosine and dot take the same kernels with
another epilogue, and timing them at every large shape would take the CPU default past a few minutes."""

DEFAULT_MIN_TIME = 1.0
"""Seconds of timed runs per measurement."""
QUICK_MIN_TIME = 0.1
"""Seconds of timed runs per measurement with ``--quick``."""


def default_preset(device: str) -> str:
    """The preset run on ``device`` when none is named: ``gpu`` on CUDA, else ``cpu-default``."""
    return "gpu" if device == "cuda" else "cpu-default"


def case_list(
    shapes: Sequence[Shape], dtypes: Sequence[str], metrics: Sequence[str] | None, preset: str | None = None
) -> list[Case]:
    """Every (shape, dtype, metric), shapes outermost. ``metrics=None`` means every metric, except that the
    shapes of ``PRESET_L2_ONLY[preset]`` then run l2 only (pass ``preset=None`` when the shapes were asked for
    explicitly: asked-for shapes run every metric)."""
    l2_only = PRESET_L2_ONLY.get(preset, frozenset()) if metrics is None and preset is not None else frozenset()
    return [(s, dt, m) for s in shapes for dt in dtypes for m in (metrics or METRICS) if m == "l2" or s not in l2_only]


def make_inputs(n: int, k: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian ``x [N, D]`` and codebook ``[K, D]`` (drawn in fp32 on the CPU, then cast and moved)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    codebook = torch.randn(k, d, generator=g).to(device=device, dtype=dtype)
    return x, codebook

"""Hardware ceilings and the derived lower bound on the time of a fused VQ search (README "Benchmarking").

The bound of one ``quantize`` call on ``N x D`` rows and a ``K x D`` codebook is the largest of
- compute: ``2 N K D`` FLOPs at the dtype's peak (tensor cores on GPUs; fp32 uses TF32 only when torch allows it);
- memory: ``b D (N + K)`` bytes read, ``b N D`` (``z_q``) ``+ 12 N`` (codes, distances) ``+ 8 K`` (counts) written,
  at the DRAM bandwidth;
- epilogue (GPUs): about 4 CUDA-core instructions per distance (FMA, compare, 1-2 selects), i.e. ``N K``
  distances at ``fp32 FLOP/s / 8``.

Peaks come from a small table of known GPUs (dense NVIDIA datasheet figures), else they are measured on the spot:
the best of a few large ``torch.matmul`` calls per dtype and a large tensor copy. A measured peak is what torch's
own GEMM reaches on this machine, so a fused kernel can exceed 100 % of it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# name substring (first match wins, so specific names come first) -> dense peaks:
# TFLOP/s for bf16/fp16 tensor, tf32 tensor, fp32 CUDA cores, fp64 (non-tensor); DRAM GB/s.
_GPU_TABLE: tuple[tuple[str, str, dict[str, float], float], ...] = (
    ("H200", "NVIDIA H200", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 66.9, "fp64": 33.5}, 4800),
    ("H100 PCIe", "NVIDIA H100 PCIe", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51.2, "fp64": 25.6}, 2000),
    ("H100 NVL", "NVIDIA H100 NVL", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60.0, "fp64": 30.0}, 3900),
    ("H100", "NVIDIA H100 SXM", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 66.9, "fp64": 33.5}, 3350),
    (
        "A100-SXM4-80GB",
        "NVIDIA A100 SXM 80GB",
        {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5, "fp64": 9.7},
        2039,
    ),
    (
        "A100 80GB PCIe",
        "NVIDIA A100 PCIe 80GB",
        {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5, "fp64": 9.7},
        1935,
    ),
    ("A100", "NVIDIA A100 40GB", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5, "fp64": 9.7}, 1555),
    ("L40S", "NVIDIA L40S", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6, "fp64": 1.4}, 864),
    ("L4", "NVIDIA L4", {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3, "fp64": 0.49}, 300),
)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
EPILOGUE_FLOPS_PER_DIST = 8  # ~4 instructions per distance, an FMA counting as 2 FLOPs


@dataclass
class Peaks:
    """Ceilings of one device: FLOP/s per dtype name, DRAM bytes/s, and distances/s of the epilogue (or None)."""

    source: str  # "spec: <GPU>" or "measured: ..."
    flops: dict[str, float] = field(default_factory=dict)
    bandwidth: float = 0.0
    dists_per_s: float | None = None

    def as_json(self) -> dict:
        return {
            "source": self.source,
            "tflops": {k: v / 1e12 for k, v in self.flops.items()},
            "bandwidth_gb_s": self.bandwidth / 1e9,
            "dists_per_s": self.dists_per_s,
        }


def gpu_spec(name: str) -> Peaks | None:
    """Datasheet peaks of a known GPU (matched by a substring of its name), else None.

    fp32 is given at the TF32 rate when ``torch.backends.cuda.matmul.allow_tf32`` is on (the kernels follow it).
    """
    for key, label, tflops, gb_s in _GPU_TABLE:
        if key.lower() in name.lower():
            flops = {k: v * 1e12 for k, v in tflops.items() if k != "tf32"}
            if torch.backends.cuda.matmul.allow_tf32:
                flops["fp32"] = tflops["tf32"] * 1e12
            return Peaks(f"spec: {label}", flops, gb_s * 1e9, tflops["fp32"] * 1e12 / EPILOGUE_FLOPS_PER_DIST)
    return None


def _best_time(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Fastest of ``repeats`` calls in seconds, after one warm-up call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measured_gemm_flops(dtype: torch.dtype, device: str, min_seconds: float = 0.05) -> float:
    """FLOP/s of the best of a few square ``torch.matmul`` calls, the size grown until one call takes
    ``min_seconds`` (starts at 512, at most 8192)."""
    size = 512
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        t = _best_time(functools.partial(torch.matmul, a, b), device, 3)
        if t >= min_seconds or size >= 8192:
            return 2 * size**3 / t
        size *= 2


def measured_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """DRAM bytes/s of the best of a few copies of an ``nbytes`` buffer (read + write counted)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_time(lambda: dst.copy_(src), device, 5)


@functools.lru_cache(maxsize=None)
def _measured(device: str, dtype_names: tuple[str, ...]) -> Peaks:
    flops = {n: measured_gemm_flops(dt, device) for dt, n in _DTYPE_NAMES.items() if n in dtype_names}
    return Peaks("measured: best torch.matmul per dtype, tensor copy", flops, measured_bandwidth(device))


def peaks(device: str, dtype_names: tuple[str, ...]) -> Peaks:
    """Ceilings of ``device`` ("cpu" or "cuda"): the GPU table when the GPU is in it, else measured (cached per
    process) for the given dtype names."""
    if device == "cuda":
        spec = gpu_spec(torch.cuda.get_device_name())
        if spec is not None:
            return spec
    return _measured(device, tuple(sorted(dtype_names)))


def bound_seconds(n: int, k: int, d: int, dtype: torch.dtype, p: Peaks) -> float | None:
    """Lower bound on one fused ``quantize`` call, or None when the dtype's peak is unknown."""
    name = _DTYPE_NAMES.get(dtype)
    if name not in p.flops or p.bandwidth <= 0:
        return None
    b = torch.empty((), dtype=dtype).element_size()
    t_compute = 2 * n * k * d / p.flops[name]
    t_memory = (b * d * (n + k) + b * n * d + 12 * n + 8 * k) / p.bandwidth
    t_epilogue = n * k / p.dists_per_s if p.dists_per_s else 0.0
    return max(t_compute, t_memory, t_epilogue)

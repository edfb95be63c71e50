"""Backend records and selection.

A backend is a name, the device types it serves, and a check that says whether it can run here and why not.
``select(backend, device)`` turns ``"auto"`` into the best available backend for a device and turns a request
for an unavailable backend into an error that says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import _ext
from . import triton as _triton


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    why_not: Callable[[], str | None]  # None when available
    summary: str
    device_why_not: Callable[[str], str | None] = lambda device_type: None  # per device type, beyond `devices`

    def available(self) -> bool:
        return self.why_not() is None


def _cuda_why_not() -> str | None:
    if not _ext.available():
        return f"the C++ extension vqkernels._C is not built or failed to load ({_ext.load_error})"
    if not _ext.with_cuda():
        return "vqkernels._C was built without its CUDA ops (torch is a CPU build, or CUDA_HOME / VQK_BUILD_CUDA)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def _cpu_why_not() -> str | None:
    if not _ext.available():
        return f"the C++ extension vqkernels._C is not built or failed to load ({_ext.load_error})"
    return None


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", ("cpu", "cuda"), lambda: None,
                     "pure-PyTorch reference (chunked, never holds more than a bounded N-chunk x K block)"),
    "cpu": Backend("cpu", ("cpu",), _cpu_why_not,
                   "fused C++ CPU op: tiled GEMM + argmin epilogue + gather + histogram"),
    "cuda": Backend("cuda", ("cuda",), _cuda_why_not,
                    "C++/CUDA kernels (csrc/cuda): WMMA tensor-core / FMA tiled search + top-2 epilogue, split-K, "
                    "warp-aggregated histogram and code_stats"),
    "triton": Backend("triton", ("cuda", "cpu"), _triton.why_not,
                      "Triton kernels: fused search (tl.dot + online argmin), split-K, gather + histogram; "
                      "CPU tensors only under TRITON_INTERPRET=1", _triton.device_why_not),
}

# Preference order of "auto" per device type.
_AUTO = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def select(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` (a name or ``"auto"``) for tensors on ``device``; raise a clear error if impossible."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")
    dev = device.type
    if backend == "auto":
        for name in _AUTO.get(dev, ("torch",)):
            if BACKENDS[name].available():
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}; got {backend!r}")
    b = BACKENDS[backend]
    if dev not in b.devices:
        raise ValueError(f"backend {backend!r} runs on {', '.join(b.devices)} tensors; the inputs are on {device}")
    why = b.why_not() or b.device_why_not(dev)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {why}")
    return backend


def availability() -> dict[str, str | None]:
    """Map backend name -> None if available, else the reason it is not."""
    return {name: b.why_not() for name, b in BACKENDS.items()}

"""The backend table: one record per backend, owning its op set, the devices it serves and why it cannot run.

Every backend implements the same four ops (:data:`OPS`), each a ``torch.library`` op
``vqkernels::<op><suffix>``:

========  ===========  =====================================================================================
backend   suffix       kernels
========  ===========  =====================================================================================
torch     ``_ref``     :mod:`vqkernels.reference` (pure PyTorch; the ground truth)
cpu       (none)       ``csrc/cpu`` (C++, schemas in ``csrc/registration.cpp``)
cuda      (none)       ``csrc/cuda`` (the same C++ ops; the dispatcher picks the kernel by the tensors' device)
triton    ``_triton``  :mod:`vqkernels.triton` (``triton_op``)
========  ===========  =====================================================================================

:mod:`vqkernels.ops` registers one fake and one autograd formula per op name from this table, and the test suites
run every op of every backend that can run here (:func:`runnable`). ``select(backend, device)`` turns ``"auto"``
into the best backend for a device and a request for an unavailable backend into an error that says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import _ext
from . import triton as _triton

OPS = ("nearest_code", "quantize", "code_stats", "sample_code")
"""The op set every backend implements (README "Method" §1)."""


@dataclass(frozen=True)
class Backend:
    """A backend: its name, the tensor device types it serves, its ops, and why it cannot run (None when it can).

    ``build_why_not()`` says why its ops are not registered in this process (extension not built, triton
    missing); ``device_why_not(device_type)`` why tensors of that device type cannot use it although its ops are
    registered (no GPU visible, triton's interpreter off). ``checks_finite``: its kernels refuse NaN/Inf inputs
    themselves in a pass they make anyway; for the others :mod:`vqkernels.ops` checks before the launch.
    """

    name: str
    devices: tuple[str, ...]
    suffix: str
    summary: str
    checks_finite: bool
    build_why_not: Callable[[], str | None]
    device_why_not: Callable[[str], str | None] = lambda device_type: None

    def why_not(self, device_type: str | None = None) -> str | None:
        """None when the backend can run (on ``device_type`` tensors, when given), else the reason."""
        why = self.build_why_not()
        if why is not None or device_type is None:
            return why
        if device_type not in self.devices:
            return f"it runs on {', '.join(self.devices)} tensors, not {device_type}"
        return self.device_why_not(device_type)

    def available(self, device_type: str | None = None) -> bool:
        return self.why_not(device_type) is None

    def registered(self) -> bool:
        """Whether its ops exist in ``torch.ops.vqkernels`` (they may still lack a device to run on)."""
        return self.build_why_not() is None

    def op_name(self, op: str) -> str:
        """``vqkernels::<op><suffix>``."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}; got {op!r}")
        return f"vqkernels::{op}{self.suffix}"

    def op(self, op: str) -> torch._ops.OpOverload:
        """The registered op (``torch.ops.vqkernels.<op><suffix>.default``)."""
        self.op_name(op)
        return getattr(torch.ops.vqkernels, op + self.suffix).default


def _ext_why_not() -> str | None:
    if not _ext.available():
        return f"the C++ extension vqkernels._C is not built or failed to load ({_ext.load_error})"
    return None


def _cuda_build_why_not() -> str | None:
    why = _ext_why_not()
    if why is None and not _ext.with_cuda():
        why = "vqkernels._C was built without its CUDA ops (torch is a CPU build, or CUDA_HOME / VQK_BUILD_CUDA)"
    return why


def _no_gpu(device_type: str) -> str | None:
    return "no CUDA device is visible" if device_type == "cuda" and not torch.cuda.is_available() else None


BACKENDS: dict[str, Backend] = {
    "torch": Backend(
        "torch",
        ("cpu", "cuda"),
        "_ref",
        "pure-PyTorch reference (chunked, never holds more than a bounded N-chunk x K block)",
        checks_finite=True,
        build_why_not=lambda: None,
        device_why_not=_no_gpu,
    ),
    "cpu": Backend(
        "cpu",
        ("cpu",),
        "",
        "fused C++ CPU op: tiled GEMM + argmin / top-4 / Gumbel epilogue + gather + histogram",
        checks_finite=True,
        build_why_not=_ext_why_not,
    ),
    "cuda": Backend(
        "cuda",
        ("cuda",),
        "",
        "C++/CUDA kernels (csrc/cuda): WMMA tensor-core / FMA tiled search + top-4 / Gumbel epilogue, "
        "split-K, warp-aggregated histogram and code_stats",
        checks_finite=False,
        build_why_not=_cuda_build_why_not,
        device_why_not=_no_gpu,
    ),
    "triton": Backend(
        "triton",
        ("cuda", "cpu"),
        "_triton",
        "Triton kernels: fused search (tl.dot + online argmin / top-4 / Gumbel epilogue), split-K, "
        "gather + histogram, code_stats; CPU tensors only under TRITON_INTERPRET=1",
        checks_finite=False,
        build_why_not=_triton.build_why_not,
        device_why_not=_triton.device_why_not,
    ),
}

# Preference order of "auto" per device type.
AUTO: dict[str, tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def select(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` (a name or ``"auto"``) for tensors on ``device``; raise a clear error if impossible."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")
    dev = device.type
    if backend == "auto":
        for name in AUTO.get(dev, ("torch",)):
            if BACKENDS[name].available(dev):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}; got {backend!r}")
    b = BACKENDS[backend]
    if dev not in b.devices:
        raise ValueError(f"backend {backend!r} runs on {', '.join(b.devices)} tensors; the inputs are on {device}")
    why = b.why_not(dev)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {why}")
    return backend


def runnable(device_type: str) -> list[str]:
    """Names of the backends that can run ``device_type`` tensors in this process, in table order."""
    return [name for name, b in BACKENDS.items() if b.available(device_type)]


def registered() -> list[Backend]:
    """The backends whose ops are registered in this process."""
    return [b for b in BACKENDS.values() if b.registered()]


def availability() -> dict[str, str | None]:
    """Map backend name -> None if it can run on some device here, else why not (the first device's reason)."""
    out = {}
    for name, b in BACKENDS.items():
        reasons = [b.why_not(dev) for dev in b.devices]
        out[name] = None if None in reasons else reasons[0]
    return out

"""The Triton backend: fused search + gather + histogram, split-K, exact mode, ``sample_code`` (Gumbel-max) and
``code_stats`` (kernels in :mod:`.kernels`, ``torch.library.triton_op`` launchers in :mod:`.ops`).

It runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is imported (the
test suite does that on machines without a GPU). Importing :mod:`vqkernels` never fails because triton is missing:
:func:`load` keeps the reason, and ``python -m vqkernels.info`` prints it.
"""

from __future__ import annotations

import os

import torch

load_error: str | None = None
_loaded: bool | None = None


def interpreting() -> bool:
    """True when triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load() -> bool:
    """Import triton and register the ``vqkernels::*_triton`` ops once; False (with :data:`load_error`) if not."""
    global _loaded, load_error
    if _loaded is None:
        if not (torch.version.cuda or torch.version.hip or interpreting()):
            load_error = "torch is a CPU build (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
            _loaded = False
        else:
            try:
                from . import ops  # noqa: F401  (registers the ops)

                _loaded = True
            except Exception as e:  # noqa: BLE001 - a missing or broken triton only disables this backend
                load_error = f"triton is not usable ({type(e).__name__}: {e})"
                _loaded = False
    return _loaded


def build_why_not() -> str | None:
    """None when the ``vqkernels::*_triton`` ops are registered in this process, else the reason."""
    return None if load() else load_error


def device_why_not(device_type: str) -> str | None:
    """Why ``device_type`` tensors cannot use this backend although its ops are registered (None when they can)."""
    if device_type == "cpu" and not interpreting():
        return "the triton backend runs CPU tensors only under TRITON_INTERPRET=1"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible (TRITON_INTERPRET=1 runs the kernels on CPU tensors)"
    return None

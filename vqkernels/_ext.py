"""Loads the compiled extension ``vqkernels._C`` if it was built; never raises at import.

``load_error`` keeps the reason when it is missing so that ``python -m vqkernels.info`` and backend selection can
say why a backend is unavailable.
"""

from __future__ import annotations

C = None
load_error: str | None = None

try:  # the import runs the TORCH_LIBRARY registrations of csrc/
    from . import _C as C  # type: ignore[attr-defined,no-redef]
except Exception as e:  # noqa: BLE001 - any failure (missing .so, ABI mismatch) only disables the C++ backends
    C = None
    load_error = f"{type(e).__name__}: {e}"


def available() -> bool:
    """True when the C++ ops (``torch.ops.vqkernels.*``) are registered."""
    return C is not None


def with_cuda() -> bool:
    """True when the extension was compiled with its CUDA ops."""
    return C is not None and bool(getattr(C, "with_cuda", 0))

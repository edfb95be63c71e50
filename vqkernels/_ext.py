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


# ---------------------------------------------------------------------------------------------------------------
# The C++ CPU op's kernel choice (csrc/cpu/cpu_features.cpp): which tile GEMM and which epilogue run for a dtype on
# this CPU, and every combination that can run here. The environment forces a choice: VQK_CPU_TILE
# (auto|brgemm|avx512bf16|avx512bf16+rescore|brgemm+rescore|gemv|gemv-avx512bf16) and VQK_CPU_EPILOGUE
# (auto|avx512|avx2|neon|scalar); the C++ op reads them per call.
# ---------------------------------------------------------------------------------------------------------------
CPU_TILE_ENV = "VQK_CPU_TILE"
CPU_EPILOGUE_ENV = "VQK_CPU_EPILOGUE"


def _plan_pair(text: str) -> dict[str, str]:
    tile, epilogue = text.split(",")
    return {"tile": tile, "epilogue": epilogue}


def cpu_plan(dtype: str, rows: int | None = None) -> dict[str, str] | None:
    """``{"tile", "epilogue"}`` the cpu backend runs now for a search of ``rows`` input rows (default: a large
    batch) in ``dtype`` ("fp32", "bf16", "fp16", "fp64"), under the environment in force; None without the
    extension. Few rows take another tile kernel than many (README "Backends")."""
    if C is None or not hasattr(C, "cpu_plan"):
        return None
    return _plan_pair(C.cpu_plan(dtype) if rows is None else C.cpu_plan(dtype, rows))


def cpu_variants(dtype: str, rows: int | None = None) -> list[dict]:
    """Every (tile kernel, epilogue) the cpu backend can run for a search of ``rows`` input rows in ``dtype`` on
    this CPU, the automatic choice first: ``{"tile", "epilogue", "env"}`` with ``env`` the variables that force it.
    Empty without the extension."""
    if C is None or not hasattr(C, "cpu_variants"):
        return []
    out = []
    for pair in (C.cpu_variants(dtype) if rows is None else C.cpu_variants(dtype, rows)).split(";"):
        v = _plan_pair(pair)
        v["env"] = {CPU_TILE_ENV: v["tile"], CPU_EPILOGUE_ENV: v["epilogue"]}
        out.append(v)
    return out


def cpu_features() -> list[str]:
    """The CPU features the C++ op detected and uses (e.g. avx2, avx512f, avx512bf16, amx_bf16), [] without it."""
    if C is None or not hasattr(C, "cpu_features"):
        return []
    return [f for f in C.cpu_features().split(",") if f]

"""Peak extra memory of one call, measured (not estimated): on the CPU the peak resident set size above the one
before the call (``VmHWM`` reset through ``/proc/self/clear_refs``), on CUDA the peak of torch's allocator above
its allocation before the call."""

from __future__ import annotations

import ctypes
import functools
import gc
import re
from pathlib import Path
from typing import Any, Callable

import torch


def _proc_status_kib(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in /proc/self/status")
    return int(match.group(1))


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc, for ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _release_free_heap() -> None:
    """Give freed heap back to the OS, so that the call's allocations fault in fresh pages VmHWM sees."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_extra_cpu(fn: Callable[[], Any]) -> tuple[float | None, Any]:
    """Run ``fn`` once; return (peak RSS above the RSS before the call in MiB, or None without /proc; result).

    Writing ``5`` to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS.
    """
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
    except OSError:
        return None, fn()
    out = fn()
    return (_proc_status_kib("VmHWM") - before) / 1024, out


def peak_extra_cuda(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once; return (peak CUDA allocation above the allocation before the call in MiB, result)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20, out


def measure_peak(fn: Callable[[], Any], device: str) -> tuple[float | None, Any]:
    """Run ``fn`` once on ``device`` ("cpu" or "cuda"): (peak extra memory in MiB or None, result)."""
    return peak_extra_cuda(fn) if device == "cuda" else peak_extra_cpu(fn)

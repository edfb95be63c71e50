"""What ran where: device name, commit, date and load, on top of :func:`vqkernels.info.collect` (stamped into
every benchmark's JSON and header line)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from .. import info


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def git_commit() -> str | None:
    """Short commit of the checkout this package lives in (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def machine_info(device: str) -> dict[str, Any]:
    """:func:`vqkernels.info.collect` plus device, commit, date and load (a busy host skews timings)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        **info.collect(),
        "device": device,
        "device_name": device_name(device),
        "git_commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_1m": None if load is None else round(load[0], 2),
    }

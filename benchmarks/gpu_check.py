"""``make gpu-check OUT=dir``: the prepared run for a lent GPU, in one command that stops at its own time limit.

The lent machine (one H100 / H200, a Python with torch >= 2.11 built for CUDA, triton, pytest; no network) runs:

1. ``info``: ``python -m vqkernels.info`` (versions, backends and why not);
2. ``build``: the extension with its CUDA ops for the local GPU's arch only (``TORCH_CUDA_ARCH_LIST``), in place
   (``setup.py build_ext --inplace``: the tests import the package from the source tree);
3. ``tests``: the GPU test matrix: the backend-generic suites on CUDA tensors (cases ``*-cuda``: the reference,
   the C++/CUDA and the Triton backends) and the Triton- and CUDA-specific files;
4. ``bench``: ``python -m vqkernels.bench --preset gpu`` with the roofline, under the time that is left.

Every step writes its log under OUT; ``OUT/gpu-check.json`` says what ran, how long, and how it ended, and is
rewritten (atomically) after each step, as the benchmark JSON is after each case: a run stopped at any moment
leaves complete JSON files. Without a visible GPU it says so and exits 2 before building anything.

Usage: ``python benchmarks/gpu_check.py --out DIR [--budget SECONDS]`` (the Makefile target passes ``OUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_SUITES = (
    "tests/test_nearest_code.py",
    "tests/test_quantize.py",
    "tests/test_code_stats.py",
    "tests/test_validation.py",
    "tests/test_sample_code.py",
)
GPU_FILES = ("tests/test_triton.py", "tests/test_cuda_backend.py")
# (name, seconds it may take at most, seconds kept back for the steps after it)
PLAN = (("info", 60, 420), ("build", 180, 270), ("tests", 200, 80), ("bench", 420, 5))


def write_json(path: Path, data: dict) -> None:
    """Whole file to a temporary name, then renamed: never a half-written JSON."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_step(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` (its own process group) with output to ``log``; kill the group at ``timeout`` seconds."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        if timeout <= 0:
            f.write("not started: no time left\n")
            return {"cmd": cmd, "status": "skipped (no time left)", "rc": None, "seconds": 0.0}
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            rc, status = None, f"stopped at its time limit ({timeout:.0f} s)"
            f.write(f"\n{status}\n")
    return {"cmd": cmd, "status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1)}


def gpu_visible(python: str) -> tuple[bool, str, str]:
    """Whether ``python``'s torch sees a CUDA GPU, a line that says what it sees, and its arch (``"9.0"``)."""
    code = (
        "import torch\n"
        "ok = torch.cuda.is_available()\n"
        "name = torch.cuda.get_device_name(0) if ok else 'none'\n"
        "cap = '%d.%d' % torch.cuda.get_device_capability(0) if ok else ''\n"
        "print(int(ok), cap, torch.__version__, torch.version.cuda, name, sep='|')\n"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot run {python}: {e}", ""
    if out.returncode != 0:
        return False, f"{python} cannot import torch: {out.stderr.strip().splitlines()[-1:]}", ""
    ok, cap, ver, cuda, name = out.stdout.strip().split("|")
    return ok == "1", f"torch {ver} (CUDA {cuda}), GPU: {name}" + (f", sm {cap}" if cap else ""), cap


def plan(python: str, out: Path, arch: str) -> list[tuple[str, list[str], dict]]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    build_env = dict(env, VQK_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 4))
    tests = [
        python,
        "-m",
        "pytest",
        "-q",
        "--maxfail=25",
        "-p",
        "no:cacheprovider",
        f"--junitxml={out / 'tests.xml'}",
        *GPU_SUITES,
        *GPU_FILES,
        "-k",
        "cuda or gpu or test_triton or test_cuda_backend",
    ]
    return [
        ("info", [python, "-m", "vqkernels.info"], env),
        ("build", [python, "setup.py", "build_ext", "--inplace"], build_env),
        ("tests", tests, env),
        (
            "bench",
            [
                python,
                "-m",
                "vqkernels.bench",
                "--preset",
                "gpu",
                "--device",
                "cuda",
                "--json",
                str(out / "bench-gpu.json"),
            ],
            env,
        ),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the logs and JSON")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    p.add_argument("--python", default=sys.executable, help="the interpreter with the GPU torch")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"budget_s": args.budget, "steps": {}, "complete": False}
    ok, seen, arch = gpu_visible(args.python)
    summary["device"] = seen
    if not ok:
        summary["status"] = "no GPU visible"
        write_json(args.out / "gpu-check.json", summary)
        print(
            f"gpu-check: no CUDA GPU is visible ({seen}); nothing was built or run. This target needs a lent GPU "
            "machine (the device tool).",
            file=sys.stderr,
        )
        return 2
    print(
        f"gpu-check: {seen}; building for sm {arch}, budget {args.budget:.0f} s, logs in {args.out}",
        file=sys.stderr,
        flush=True,
    )
    failed = False
    for (name, cmd, env), (_, cap_s, reserve) in zip(plan(args.python, args.out, arch), PLAN):
        left = args.budget - (time.monotonic() - t_start)
        timeout = min(cap_s, left - min(reserve, left / 2))
        if name == "bench":  # the benchmark stops itself between cases; the timeout is the backstop
            timeout = left - 5
            cmd = cmd + ["--time-limit", str(max(1, int(timeout - 60)))]
        res = run_step(cmd, args.out / f"{name}.log", timeout, env)
        summary["steps"][name] = res
        print(f"gpu-check: {name}: {res['status']} in {res['seconds']} s", file=sys.stderr, flush=True)
        write_json(args.out / "gpu-check.json", summary)
        failed |= res["status"] != "ok"
        if name == "build" and res["status"] != "ok":
            print("gpu-check: the build failed; the tests and the benchmark run without the CUDA ops", file=sys.stderr)
    summary["complete"] = True
    summary["status"] = "failed" if failed else "ok"
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    write_json(args.out / "gpu-check.json", summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

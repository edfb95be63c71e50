"""Compile every Triton kernel the launchers request for a real GPU target, on a machine without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``, what the test suite runs without a GPU) accepts code that the real
compiler rejects, and it says nothing about registers, spills or shared memory. This module installs a stand-in
triton driver (``triton.runtime.driver.set_active``) that reports a real target (``GPUTarget("cuda", 80 | 90,
32)``) with A100 / H100 limits, compiles whatever a launch asks for, reads the resource usage of each cubin with
the ``cuobjdump -res-usage`` bundled in triton's NVIDIA backend, and launches nothing. The launchers in
:mod:`vqkernels.triton.ops` run unchanged on small CPU tensors, so the variants compiled are exactly the ones real
calls would request (tile choice, constexprs, int specialisation of arguments equal to 1, divisibility by 16).

A variant fails on a compile error, shared memory over the target's per-block limit, more than 255 registers,
or any spill (STACK or LOCAL bytes in ``cuobjdump -res-usage``).

Run it in a fresh process with an empty ``TRITON_CACHE_DIR`` (the CLI does both): triton's cache key hashes a
kernel's source, not the module globals it reads, so a warm cache can report a stale success.

CLI: ``python -m vqkernels.triton.gpu_compile [--arch 80 90] [--quick] [--json FILE]`` (also
``python -m vqkernels.info --kernels``). Exit status 1 when any variant fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuLimits:
    name: str
    max_shared: int  # opt-in dynamic shared memory per block, bytes
    sms: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255


# Datasheet limits (CUDA C programming guide, compute capability table).
LIMITS = {
    80: GpuLimits("A100 (sm_80)", 166912, 108),  # 163 KiB
    90: GpuLimits("H100 (sm_90)", 232448, 132),  # 227 KiB
}


@dataclass
class Variant:
    """One compiled kernel variant and its resource usage."""

    kernel: str
    arch: int
    constexprs: dict
    specialised: list  # arguments that triton turned into constants (ints equal to 1)
    warps: int = 0
    stages: int = 0
    shared: int = 0
    regs: int = -1
    stack: int = 0
    local: int = 0
    dtype: str = ""  # element type of the first pointer argument
    layout: str = ""  # "aligned" or "any" (the twin of vqkernels.triton.kernels._twins)
    compile_s: float = 0.0
    error: str | None = None
    launches: int = 0
    tags: set = field(default_factory=set)

    def problems(self) -> list[str]:
        lim = LIMITS[self.arch]
        out = []
        if self.error:
            out.append(self.error)
        if self.shared > lim.max_shared:
            out.append(f"shared memory {self.shared} B > {lim.max_shared} B")
        if self.regs > lim.max_regs_per_thread:
            out.append(f"{self.regs} registers > {lim.max_regs_per_thread}")
        if self.stack or self.local:
            out.append(f"spills: STACK {self.stack} B, LOCAL {self.local} B")
        return out


# ---------------------------------------------------------------------------------------------------------------
# The stand-in driver.
# ---------------------------------------------------------------------------------------------------------------
def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"triton's bundled cuobjdump is missing ({path})")
    return path


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """``(registers, stack bytes, static shared bytes, local bytes)`` of the one function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output:\n{out}")
    return tuple(int(v) for v in m.groups())


class _Recorder:
    """Collects the variants compiled under one target."""

    def __init__(self, arch: int):
        self.arch = arch
        self.variants: dict[str, Variant] = {}
        self._pending: Variant | None = None
        self.tags: set = set()

    def begin(self, src, metadata) -> Variant:
        fn = src.fn
        consts = {}
        specialised = []
        for path, value in src.constants.items():
            name = fn.arg_names[path[0]]
            if fn.params[path[0]].is_constexpr:
                consts[name] = value
            else:
                specialised.append(f"{name}=={value}")
        attrs = src.attrs if isinstance(src.attrs, dict) else {}
        aligned = sorted(
            fn.arg_names[p[0]]
            for p, a in attrs.items()
            if any(x and x[0] == "tt.divisibility" for x in a)
            and not str(src.signature.get(fn.arg_names[p[0]], "")).startswith("*")
        )
        specialised += [f"{n}%16" for n in aligned]
        key = f"{src.name}|{metadata.hash}"
        v = self.variants.get(key)
        if v is None:
            first_ptr = next((t for t in src.signature.values() if str(t).startswith("*")), "")
            v = Variant(
                src.name,
                self.arch,
                consts,
                sorted(specialised),
                metadata.num_warps,
                getattr(metadata, "num_stages", 0),
                metadata.shared,
                dtype=str(first_ptr).lstrip("*"),
                layout=getattr(fn, "vqk_layout", ""),
            )
            self.variants[key] = v
        self._pending = v
        return v

    def loaded(self, cubin: bytes) -> tuple[int, int]:
        v = self._pending
        if v is not None and v.regs < 0:
            v.regs, v.stack, _, v.local = resource_usage(cubin)
        return (v.regs if v else 0), (v.stack + v.local if v else 0)


class _Utils:
    def __init__(self, recorder: _Recorder, limits: GpuLimits):
        self.recorder = recorder
        self.limits = limits

    def load_binary(self, name, kernel, shared, device):
        regs, spills = self.recorder.loaded(kernel)
        return 0, 0, regs, spills, 1024

    def unload_module(self, module):
        return None

    def get_device_properties(self, device):
        lim = self.limits
        return {
            "max_shared_mem": lim.max_shared,
            "max_num_regs": lim.regs_per_sm,
            "multiprocessor_count": lim.sms,
            "warpSize": 32,
            "sm_clock_rate": 1_755_000,
            "mem_clock_rate": 2_619_000,
            "mem_bus_width": 5120,
        }

    def get_current_device(self):
        return 0


def _make_driver(arch: int, recorder: _Recorder):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    limits = LIMITS[arch]
    utils = _Utils(recorder, limits)

    class _Launcher:
        def __init__(self, src, metadata):
            self.variant = recorder.begin(src, metadata)

        def __call__(self, *args, **kwargs):
            self.variant.launches += 1
            self.variant.tags |= recorder.tags

    class OfflineCudaDriver(DriverBase):
        """A CUDA target without a device: compiles, never launches."""

        def __init__(self):
            self.utils = utils
            self.launcher_cls = _Launcher

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("the offline compile driver cannot time kernels")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            return None

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return divmod(arch, 10)

        def get_device_interface(self):
            raise RuntimeError("the offline compile driver has no device interface")

        def get_empty_cache_for_benchmark(self):
            raise RuntimeError("the offline compile driver cannot time kernels")

        def clear_cache(self, cache):
            return None

    return OfflineCudaDriver()


def _jit_functions():
    from triton.runtime.jit import JITFunction

    from . import kernels

    return [v for v in vars(kernels).values() if isinstance(v, JITFunction)]


@contextlib.contextmanager
def offline_target(arch: int):
    """Within the block, triton launches compile for ``sm_<arch>`` and record a :class:`Variant` each."""
    from triton.runtime import driver

    from . import interpreting

    if interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the compile check needs the real compiler")
    recorder = _Recorder(arch)
    for fn in _jit_functions():
        fn.device_caches.clear()  # their binders cache the target of the driver that created them
    previous = driver._active  # None unless a real driver was already in use
    driver.set_active(_make_driver(arch, recorder))
    try:
        yield recorder
    finally:
        for fn in _jit_functions():
            for caches in fn.device_caches.values():
                for compiled in caches[0].values():
                    compiled.module = None  # nothing was loaded: no unload at garbage collection
            fn.device_caches.clear()
        driver._active = previous


# ---------------------------------------------------------------------------------------------------------------
# The launch matrix.
# ---------------------------------------------------------------------------------------------------------------
DTYPES = ("float16", "bfloat16", "float32", "float64")
METRICS = ("l2", "cosine", "dot")
# D = 1 and D = 3 (tiny, int specialisation of 1), 16 / 32 / 64 (row tile loaded once, each clip of the feature
# tile), 20 / 33 (once, not a multiple of 16), 100 / 257 (runtime feature loop, masked tail), 1024 / 4096 (wide)
FULL_D = (1, 3, 16, 20, 32, 33, 64, 100, 257, 1024, 4096)
QUICK_D = (1, 33, 64, 257)
# the batched form: each tile tier of every dtype class (row tile once / looped, aligned / not: kernels' BD is 16
# for D <= 16, else 64 / 32 / 16 for half / fp32 / fp64)
BATCHED_D = (3, 16, 20, 32, 33, 64, 257, 1024)


@dataclass(frozen=True)
class Case:
    op: str  # "search" (nearest_code), "quantize", "code_stats", "sample"
    dtype: str
    metric: str
    d: int
    n: int = 3
    k: int = 5
    exact: bool = False
    candidates: int = 2
    tf32: bool = False
    layout: str = "contiguous"  # or "row-strided" (rows of a wider tensor), "column-major" (made contiguous),
    # "head-split" (batched: x a [G, N, D] view of an [N, G D] tensor, as the layers split heads)
    groups: int = 0  # 0: the 2-D form; G >= 1: the batched form (x [G, N, D], codebook [G, K, D])
    split: int | None = None  # VQK_TRITON_SPLIT; None = the launcher's choice
    seed: int = 12345

    def label(self) -> str:
        bits = [self.op, self.dtype, self.metric, f"N{self.n}", f"K{self.k}", f"D{self.d}"]
        if self.groups:
            bits.insert(3, f"G{self.groups}")
        if self.exact:
            bits.append(f"exact{self.candidates}")
        if self.tf32:
            bits.append("tf32")
        if self.layout != "contiguous":
            bits.append(self.layout)
        if self.split is not None:
            bits.append(f"split{self.split}")
        if self.op == "sample":
            bits.append(f"seed{self.seed}")
        return " ".join(bits)


def cases(quick: bool = False) -> list[Case]:
    """Launches that reach every tile choice and branch of every kernel (quick: a smaller sample)."""
    ds = QUICK_D if quick else FULL_D
    out: list[Case] = []
    for dtype in DTYPES:
        for d in ds:
            for metric in METRICS:
                out.append(Case("search", dtype, metric, d))
                out.append(Case("quantize", dtype, metric, d))
                for t in (2,) if quick else (1, 2, 3, 4):
                    out.append(Case("quantize", dtype, metric, d, exact=True, candidates=t))
                if dtype == "float32":
                    out.append(Case("search", dtype, metric, d, tf32=True))
            out.append(Case("code_stats", dtype, "l2", d))
            if dtype in ("float32", "float64"):  # sampling runs in fp32 / fp64 (bf16 / fp16 rows are upcast)
                for metric in METRICS:
                    out.append(Case("sample", dtype, metric, d, seed=1))
        # split-K with the launcher's own split choice (1 row, many codes), and forced splits
        for op, exact in (("search", False), ("quantize", True)):
            out.append(Case(op, dtype, "l2", 64, n=1, k=4096, exact=exact))
            out.append(Case(op, dtype, "l2", 257, n=1, k=4096, exact=exact, split=3))
        # ints equal to 1: one row, one code, one feature, one split, seed 1
        out.append(Case("quantize", dtype, "l2", 1, n=1, k=1, split=1))
        out.append(Case("quantize", dtype, "cosine", 1, n=1, k=1, exact=True, candidates=1))
        out.append(Case("code_stats", dtype, "l2", 1, n=1, k=1))
        if dtype in ("float32", "float64"):
            out.append(Case("sample", dtype, "l2", 1, n=1, k=1, seed=1))
            out.append(Case("sample", dtype, "cosine", 64, n=700, k=3, seed=0xFFFFFFFF, split=2))
        # layouts: rows of a wider tensor (row stride != D: unaligned row starts), and a column-major codebook
        for d in (33, 64, 257):
            for layout in ("row-strided", "column-major"):
                out.append(Case("quantize", dtype, "l2", d, layout=layout))
                out.append(Case("quantize", dtype, "cosine", d, exact=True, candidates=4, layout=layout))
                out.append(Case("code_stats", dtype, "l2", d, layout=layout))
                if dtype in ("float32", "float64"):
                    out.append(Case("sample", dtype, "dot", d, layout=layout))
        # the batched form (GROUPED variants: the group on grid axis 2): every tile tier, row tile once or looped,
        # aligned or not, as the head split the layers use (row stride G D, group stride D), a contiguous
        # [G, N, D], split-K chosen and forced
        for d in BATCHED_D:
            out.append(Case("quantize", dtype, "cosine", d, n=7, groups=3, layout="head-split"))
            out.append(Case("quantize", dtype, "l2", d, n=7, groups=3, exact=True, layout="head-split"))
            out.append(Case("code_stats", dtype, "l2", d, n=7, groups=3, layout="head-split"))
            if dtype in ("float32", "float64"):
                out.append(Case("sample", dtype, "dot", d, n=7, groups=3, layout="head-split"))
            if dtype == "float32":
                out.append(Case("search", dtype, "l2", d, n=7, groups=3, tf32=True, layout="head-split"))
        out.append(Case("search", dtype, "dot", 64, n=7, groups=3))
        out.append(Case("code_stats", dtype, "l2", 64, n=7, groups=3))
        out.append(Case("search", dtype, "l2", 64, n=1, k=4096, groups=2))
        out.append(Case("quantize", dtype, "l2", 257, n=1, k=4096, groups=2, exact=True, split=3))
        if dtype in ("float32", "float64"):
            out.append(Case("sample", dtype, "l2", 64, n=700, k=3, groups=2, split=2, layout="head-split"))
    return out


@contextlib.contextmanager
def _case_env(case: Case):
    import torch

    old_env = {k: os.environ.get(k) for k in ("VQK_TRITON_SPLIT", "VQK_TRITON_EXACT_CANDIDATES")}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        if case.split is not None:
            os.environ["VQK_TRITON_SPLIT"] = str(case.split)
        else:
            os.environ.pop("VQK_TRITON_SPLIT", None)
        os.environ["VQK_TRITON_EXACT_CANDIDATES"] = str(case.candidates)
        torch.backends.cuda.matmul.allow_tf32 = case.tf32
        yield
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


def launch(case: Case) -> None:
    """Run the launcher of ``case`` on small CPU tensors (under :func:`offline_target` nothing executes)."""
    import torch

    from . import ops

    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    lead = (case.groups,) if case.groups else ()
    x = torch.randn(*lead, case.n, case.d, generator=g).to(dtype)
    cb = torch.randn(*lead, case.k, case.d, generator=g).to(dtype)
    if case.layout == "head-split":
        x = torch.randn(case.n, case.groups * case.d, generator=g).to(dtype).view(case.n, case.groups, case.d)
        x = x.transpose(0, 1)
    elif case.layout == "row-strided":
        x = torch.randn(case.n, case.d + 3, generator=g).to(dtype)[:, 1 : case.d + 1]
        cb = torch.randn(case.k, case.d + 5, generator=g).to(dtype)[:, 2 : case.d + 2]
    elif case.layout == "column-major":
        cb = cb.T.contiguous().T
    with _case_env(case):
        if case.op == "search":
            ops.nearest_code_triton(x, cb, case.metric, case.exact)
        elif case.op == "quantize":
            ops.quantize_triton(x, cb, case.metric, case.exact)
        elif case.op == "code_stats":
            ops.code_stats_triton(x, torch.randint(0, case.k, (*lead, case.n), generator=g), case.k)
        elif case.op == "sample":
            from ..numerics import join_seed, seed_to_schema

            ops.sample_code_triton(x, cb, case.metric, seed_to_schema(join_seed(case.seed, case.seed)))
        else:
            raise ValueError(f"unknown op {case.op!r}")


def check(archs=(80, 90), quick: bool = False, progress: bool = True) -> list[Variant]:
    """Compile every variant the :func:`cases` request, per arch; returns them (see :meth:`Variant.problems`)."""
    out: list[Variant] = []
    todo = cases(quick)
    for arch in archs:
        with offline_target(arch) as rec:
            t_arch = time.perf_counter()
            for i, case in enumerate(todo):
                rec.tags = {case.label()}
                before = set(rec.variants)
                t0 = time.perf_counter()
                try:
                    launch(case)
                except Exception as e:  # noqa: BLE001 - every failure is a result of the check
                    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    v = rec._pending if rec._pending is not None and rec._pending.regs < 0 else None
                    key = f"failed|{case.label()}"
                    if v is None:
                        v = Variant("?", arch, {}, [])
                        rec.variants[key] = v
                    v.error = f"{msg} (launch: {case.label()})"
                new = set(rec.variants) - before
                for key in new:
                    rec.variants[key].compile_s = (time.perf_counter() - t0) / len(new)
                    rec.variants[key].tags.add(case.label())
                if progress and new:
                    print(
                        f"  sm_{arch} [{i + 1}/{len(todo)}] {case.label()}: {len(new)} new variant(s), "
                        f"{time.perf_counter() - t0:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
            if progress:
                print(
                    f"sm_{arch}: {len(rec.variants)} variants in {time.perf_counter() - t_arch:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            out.extend(rec.variants.values())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------------------
_SHOWN = ("T", "TP", "EXACT", "SAMPLE", "PRECISION", "ACC_FP64", "ONE_D", "GROUPED", "BM", "BN", "BD", "BK", "BR")


def _tile(v: Variant) -> str:
    c = v.constexprs
    parts = [f"{k}={c[k]}" for k in _SHOWN if k in c]
    return " ".join(parts)


def table(variants: list[Variant]) -> str:
    """A fixed-width table: kernel, arch, constexprs, warps, stages, registers, spills, shared memory."""
    rows = [("kernel", "arch", "variant", "warps", "stages", "regs", "spill B", "smem KiB", "status")]
    for v in sorted(variants, key=lambda v: (v.kernel, v.arch, v.dtype, _tile(v), v.specialised)):
        probs = v.problems()
        rows.append(
            (
                v.kernel,
                f"sm_{v.arch}",
                f"{v.dtype} {v.layout} {_tile(v)}" + (" " + " ".join(v.specialised) if v.specialised else ""),
                str(v.warps),
                str(v.stages),
                str(v.regs),
                str(v.stack + v.local),
                f"{v.shared / 1024:.1f}",
                "ok" if not probs else "FAIL: " + "; ".join(probs),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def summary(variants: list[Variant]) -> dict:
    """Per kernel and arch: variant count, max registers, max shared memory, failures."""
    out: dict = {}
    for v in variants:
        s = out.setdefault(
            f"{v.kernel} sm_{v.arch}",
            {"variants": 0, "max_regs": 0, "max_shared_kib": 0.0, "max_spill_bytes": 0, "failures": 0},
        )
        s["variants"] += 1
        s["max_regs"] = max(s["max_regs"], v.regs)
        s["max_shared_kib"] = max(s["max_shared_kib"], round(v.shared / 1024, 1))
        s["max_spill_bytes"] = max(s["max_spill_bytes"], v.stack + v.local)
        s["failures"] += bool(v.problems())
    return out


def _run_children(archs, quick: bool) -> list[Variant]:
    """One process per arch (they compile in parallel); each starts from its own empty cache."""
    procs = []
    with tempfile.TemporaryDirectory(prefix="vqk-gpu-compile-") as tmp:
        for arch in archs:
            out = os.path.join(tmp, f"sm_{arch}.json")
            cmd = [
                sys.executable,
                "-m",
                "vqkernels.triton.gpu_compile",
                "--arch",
                str(arch),
                "--json",
                out,
                "--jobs",
                "1",
                "--quiet",
            ] + (["--quick"] if quick else [])
            procs.append((arch, out, subprocess.Popen(cmd)))
        variants = []
        for arch, out, p in procs:
            p.wait()
            if not os.path.exists(out):
                died = f"the sm_{arch} compile process died ({p.returncode})"
                variants.append(Variant("?", arch, {}, [], error=died))
                continue
            with open(out) as f:
                for row in json.load(f)["variants"]:
                    row.pop("problems", None)
                    row["tags"] = set(row["tags"])
                    variants.append(Variant(**row))
    return variants


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqkernels.triton.gpu_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(LIMITS))
    p.add_argument("--quick", action="store_true", help="a smaller launch matrix (fewer D and candidate counts)")
    p.add_argument("--json", help="write every variant and the summary here")
    p.add_argument("--table", action="store_true", help="print the per-variant table (default: summary only)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes (one arch each)")
    p.add_argument("--quiet", action="store_true", help="no per-launch progress lines")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the compile check needs the real compiler", file=sys.stderr)
        return 2
    # the kernels pin the key's FMA explicitly; the default of the rest is pinned here (triton 3.9 warns, 3.10
    # flips it) so every run compiles the same code
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    t0 = time.perf_counter()
    if args.jobs > 1 and len(args.arch) > 1:
        variants = _run_children(args.arch, args.quick)
    else:
        with tempfile.TemporaryDirectory(prefix="vqk-triton-cache-") as cache:
            # an empty cache: a warm one can hold a stale success (its key hashes sources, not module globals)
            os.environ["TRITON_CACHE_DIR"] = cache
            variants = check(tuple(args.arch), quick=args.quick, progress=not args.quiet)
    elapsed = time.perf_counter() - t0
    if args.table:
        print(table(variants))
    summ = summary(variants)
    if not args.quiet or args.jobs > 1:
        print(
            f"triton {triton.__version__}: {len(variants)} variants for "
            f"{', '.join(f'sm_{a}' for a in args.arch)} in {elapsed:.0f} s"
        )
        for key, s in sorted(summ.items()):
            print(
                f"  {key:<28} {s['variants']:>4} variants  max {s['max_regs']:>3} regs  "
                f"max {s['max_shared_kib']:>6.1f} KiB smem  max spill {s['max_spill_bytes']} B  "
                f"{s['failures']} failed"
            )
    failed = [v for v in variants if v.problems()]
    if not args.quiet or args.jobs > 1:
        for v in failed:
            print(
                f"FAIL {v.kernel} sm_{v.arch} {v.dtype} {v.layout} {_tile(v)} {' '.join(v.specialised)}: "
                f"{'; '.join(v.problems())}",
                file=sys.stderr,
            )
            print(f"     requested by: {sorted(v.tags)[:3]}", file=sys.stderr)
    if args.json:
        rows = []
        for v in variants:
            d = dataclasses.asdict(v)
            d["tags"] = sorted(v.tags)[:8]  # a sample of the launches that requested it (``launches`` counts all)
            d["constexprs"] = {k: str(val) for k, val in v.constexprs.items()}
            d["problems"] = v.problems()
            rows.append(d)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "triton": triton.__version__,
                    "archs": args.arch,
                    "elapsed_s": elapsed,
                    "summary": summ,
                    "variants": rows,
                },
                f,
                indent=1,
            )
        os.replace(tmp, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

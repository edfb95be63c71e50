"""The GPU compile check (vqkernels.triton.gpu_compile) and the prepared GPU run (benchmarks/gpu_check.py), as far
as a machine without a GPU allows.

``make test`` runs the full compile check before pytest (``make gpu-compile-check``: every variant the launchers
request, sm_80 and sm_90, an empty triton cache) and leaves its JSON in build/gpu-compile; the tests here read
that JSON, and show in subprocesses (the real compiler needs TRITON_INTERPRET unset before triton is imported)
that the check catches what the interpreter accepts: a module global, shared memory over the limit, a spill.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK_JSON = ROOT / "build" / "gpu-compile" / "triton-venv.json"


def _compiled_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def _run_offline(body: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh process with the real compiler, an empty cache and ``gc`` = vqkernels.triton.
    gpu_compile imported."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import triton, triton.language as tl\nfrom vqkernels.triton import gpu_compile as gc\n" + textwrap.dedent(body)
    )
    env = _compiled_env() | {"TRITON_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=timeout
    )


# ---------------------------------------------------------------------------------------------------------------
# The full check's results (written by `make gpu-compile-check`, a prerequisite of `make test`)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_check():
    if not CHECK_JSON.exists():
        pytest.skip(f"{CHECK_JSON} is missing: run `make gpu-compile-check` (make test runs it before pytest)")
    return json.loads(CHECK_JSON.read_text())


def test_every_variant_compiles_without_spills_for_both_archs(full_check):
    variants = full_check["variants"]
    assert sorted(full_check["archs"]) == [80, 90]
    bad = [(v["kernel"], v["arch"], v["dtype"], v["layout"], v["problems"]) for v in variants if v["problems"]]
    assert not bad, bad
    for v in variants:
        assert 0 < v["regs"] <= 255 and v["stack"] == 0 and v["local"] == 0
        assert v["shared"] <= {80: 166912, 90: 232448}[v["arch"]]


def test_the_matrix_reaches_every_kernel_and_every_design_choice(full_check):
    from triton.runtime.jit import JITFunction

    from vqkernels.triton import kernels

    variants = full_check["variants"]
    launched = {(v["kernel"], v["layout"] or "-", v["arch"], v["constexprs"]["GROUPED"]) for v in variants}
    for obj in vars(kernels).values():
        if isinstance(obj, JITFunction) and obj.fn.__name__.endswith("_kernel"):
            layout = getattr(obj, "vqk_layout", "-")
            for arch in (80, 90):
                for grouped in ("False", "True"):  # the 2-D form and the batched form
                    assert (obj.fn.__name__, layout, arch, grouped) in launched, (obj.fn.__name__, layout, arch)
    search = [v for v in variants if v["kernel"] == "search_kernel" and v["arch"] == 90]
    for dtype in ("fp16", "bf16", "fp32", "fp64"):
        for grouped in ("False", "True"):
            mine = [v["constexprs"] for v in search if v["dtype"] == dtype and v["constexprs"]["GROUPED"] == grouped]
            assert {c["TP"] for c in mine} == {"1", "4"}, dtype  # fast and exact
            assert {c["ONE_D"] for c in mine} == {"True", "False"}, dtype  # row tile once, runtime feature loop
            assert {c["BD"] for c in mine} >= {"16"}, dtype  # the D <= 16 tier
    # the batched form compiles every tile the 2-D form does (GROUPED aside, same constexprs and layout), but for
    # the one it narrows on purpose: bf16 / fp16 fast tile, unaligned operands, feature loop (ops.GROUPED_ANY_HALF_BD)
    from vqkernels.triton.ops import GROUPED_ANY_HALF_BD

    def batched_tile(v):
        c = {k: val for k, val in v["constexprs"].items() if k != "GROUPED"}
        narrowed = v["dtype"] in ("fp16", "bf16") and v["layout"] == "any" and c["TP"] == "1" and c["ONE_D"] == "False"
        if narrowed and v["constexprs"]["GROUPED"] == "False":
            c["BD"] = str(GROUPED_ANY_HALF_BD)
        return v["dtype"], v["layout"], json.dumps(c, sort_keys=True)

    tiles = {g: {batched_tile(v) for v in search if v["constexprs"]["GROUPED"] == g} for g in ("False", "True")}
    assert tiles["True"] == tiles["False"], tiles["False"] ^ tiles["True"]
    assert any(v["constexprs"]["PRECISION"] == "tf32" for v in search)
    assert {v["dtype"] for v in search if v["constexprs"]["SAMPLE"] == "True"} == {"fp32", "fp64"}
    # the launch matrix: ints equal to 1, seeds 0/1/2^32-1 aside, D from 1 to 4096, split-K forced and chosen,
    # every candidate count, unaligned and column-major operands
    from vqkernels.triton import gpu_compile

    cases = gpu_compile.cases()
    assert any(c.n == 1 and c.k == 1 and c.d == 1 for c in cases)
    assert {c.seed for c in cases if c.op == "sample"} >= {1, 0xFFFFFFFF}
    assert min(c.d for c in cases) == 1 and max(c.d for c in cases) >= 4096
    assert any(c.split is None and c.k >= 4096 and c.n == 1 for c in cases) and any(c.split for c in cases)
    assert {c.candidates for c in cases if c.exact} == {1, 2, 3, 4}
    assert {c.layout for c in cases} == {"contiguous", "row-strided", "column-major", "head-split"}
    assert {c.op for c in cases} == {"search", "quantize", "code_stats", "sample"}
    assert {c.op for c in cases if c.groups > 1} == {"search", "quantize", "code_stats", "sample"}


def test_variant_count_does_not_grow_with_shapes(full_check):
    """Every (kernel, dtype, constexprs) has at most two variants (aligned / any) whatever the D, strides and
    pointers of the launches: the twins keep compile time bounded."""
    seen: dict = {}
    for v in full_check["variants"]:
        key = (v["kernel"], v["arch"], v["dtype"], json.dumps(v["constexprs"], sort_keys=True))
        seen.setdefault(key, []).append(v["layout"])
    over = {k: ls for k, ls in seen.items() if len(ls) > 2 or len(set(ls)) != len(ls)}
    assert not over, over


# ---------------------------------------------------------------------------------------------------------------
# The check catches what the interpreter accepts
# ---------------------------------------------------------------------------------------------------------------
def test_catches_a_module_global_a_spill_and_too_much_shared_memory(tmp_path):
    out = _run_offline(
        """
        import torch

        SCALE = 3  # a plain module global: the interpreter reads it, compiled triton refuses it

        @triton.jit
        def uses_global(X, Y):
            i = tl.arange(0, 16)
            tl.store(Y + i, tl.load(X + i) * SCALE)

        @triton.jit
        def keep_many(X, Y, BM: tl.constexpr, BN: tl.constexpr):
            # one warp keeps a 64 x 128 fp32 tile live across a cumulative sum: more than 255 registers a thread
            i = tl.arange(0, BM)
            j = tl.arange(0, BN)
            x = tl.load(X + i[:, None] * BN + j[None, :])
            s = tl.cumsum(x, 1)
            tl.store(Y + i[:, None] * BN + j[None, :], s * x + tl.sum(x * s, 1)[:, None])

        @triton.jit
        def big_smem(A, B, Cp, K, BM: tl.constexpr, BK: tl.constexpr):
            # 4 stages of two 128 x 128 bf16 tiles: 256 KiB of shared memory, over H100's 227 KiB
            i = tl.arange(0, BM)
            acc = tl.zeros([BM, BM], dtype=tl.float32)
            for k0 in range(0, K, BK):
                k = k0 + tl.arange(0, BK)
                a = tl.load(A + i[:, None] * K + k[None, :])
                b = tl.load(B + i[:, None] * K + k[None, :])
                acc = tl.dot(a, tl.trans(b), acc)
            tl.store(Cp + i[:, None] * BM + i[None, :], acc)

        x = torch.zeros(16)
        a = torch.zeros(128, 1024, dtype=torch.bfloat16)
        with gc.offline_target(90) as rec:
            for name, launch in [
                ("global", lambda: uses_global[(1,)](x, x)),
                ("spill", lambda: keep_many[(1,)](torch.zeros(8192), torch.zeros(8192), BM=64, BN=128,
                                                  num_warps=1)),
                ("smem", lambda: big_smem[(1,)](a, a, torch.zeros(128, 128), 1024, BM=128, BK=128, num_warps=8,
                                                num_stages=4)),
            ]:
                try:
                    launch()
                    v = rec._pending
                    print(name, "compiled", v.regs, v.stack + v.local, v.shared, v.problems())
                except Exception as e:
                    print(name, "raised", type(e).__name__, " ".join(str(e).split())[:400])
    """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln.split()}
    assert "raised" in lines["global"] and "SCALE" in lines["global"], lines["global"]
    assert "spills" in lines["spill"], lines["spill"]
    assert "OutOfResources" in lines["smem"] or "shared memory" in lines["smem"], lines["smem"]


def test_info_kernels_prints_the_table_for_one_launch(tmp_path):
    """The table printer on a real (small) result: one quick launch compiled for sm_80."""
    out = _run_offline(
        """
        with gc.offline_target(80) as rec:
            gc.launch(gc.Case("quantize", "bfloat16", "l2", 64))
        vs = list(rec.variants.values())
        print(gc.table(vs))
        print(sorted(gc.summary(vs)))
    """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    head = out.stdout.splitlines()[0].split()
    assert head[:8] == ["kernel", "arch", "variant", "warps", "stages", "regs", "spill", "B"]
    for kernel in ("sum_squares_kernel", "search_kernel", "finalize_kernel"):
        assert any(
            ln.startswith(kernel) and "sm_80" in ln and ln.rstrip().endswith("ok") for ln in out.stdout.splitlines()
        ), kernel


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-m", "vqkernels.triton.gpu_compile", "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and "TRITON_INTERPRET" in out.stderr


# ---------------------------------------------------------------------------------------------------------------
# make gpu-check without a GPU
# ---------------------------------------------------------------------------------------------------------------
def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
def test_gpu_check_says_no_gpu_and_exits_nonzero(tmp_path):
    out = subprocess.run(
        ["make", "-s", "gpu-check", f"OUT={tmp_path}", f"PYTHON={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "no CUDA GPU is visible" in out.stderr
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["status"] == "no GPU visible" and summary["steps"] == {}
    assert not list(tmp_path.glob("*.tmp"))


def test_gpu_check_steps_stop_at_their_time_limit(tmp_path):
    gpu_check = _gpu_check_module()
    t0 = time.monotonic()
    res = gpu_check.run_step(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
        tmp_path / "slow.log",
        timeout=2,
    )
    assert time.monotonic() - t0 < 20
    assert res["rc"] is None and "time limit" in res["status"]
    assert "started" in (tmp_path / "slow.log").read_text()
    assert gpu_check.run_step(["true"], tmp_path / "none.log", timeout=0)["status"].startswith("skipped")
    ok = gpu_check.run_step([sys.executable, "-c", "print(1)"], tmp_path / "ok.log", timeout=60)
    assert ok["status"] == "ok" and ok["rc"] == 0
    gpu_check.write_json(tmp_path / "s.json", {"steps": {"slow": res}})
    assert json.loads((tmp_path / "s.json").read_text())["steps"]["slow"]["rc"] is None
    assert not list(tmp_path.glob("*.tmp"))


def test_gpu_check_plan_targets_cuda_cases_only(tmp_path):
    gpu_check = _gpu_check_module()
    steps = {name: (cmd, env) for name, cmd, env in gpu_check.plan("python3", tmp_path, "9.0")}
    assert list(steps) == ["info", "build", "tests", "bench"]
    assert steps["build"][1]["TORCH_CUDA_ARCH_LIST"] == "9.0" and steps["build"][1]["VQK_BUILD_CUDA"] == "1"
    assert "TRITON_INTERPRET" not in steps["tests"][1]
    assert "--preset" in steps["bench"][0] and "gpu" in steps["bench"][0]
    for f in gpu_check.GPU_SUITES + gpu_check.GPU_FILES:
        assert (ROOT / f).exists(), f


def test_readme_compile_table_is_generated_from_the_committed_json():
    results = sorted((ROOT / "benchmarks" / "results").glob("gpu-compile-triton-*.json"), reverse=True)
    assert [p.name for p in results] == ["gpu-compile-triton-3.9.0.json", "gpu-compile-triton-3.6.0.json"]
    table = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "compile", *map(str, results)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert table in (ROOT / "README.md").read_text()
    for path in results:
        data = json.loads(path.read_text())
        assert sorted(data["archs"]) == [80, 90] and not any(v["problems"] for v in data["variants"])

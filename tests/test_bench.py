"""The benchmark package: ``python -m vqkernels.bench --quick`` and ``python -m vqkernels.bench_layer --quick`` run,
check and write their JSON; the correctness column is the oracle of ``vqkernels.testing``; the modules share public
names only."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cpu_backends

import vqkernels as vq
from vqkernels import _ext, bench, dispatch, roofline, testing
from vqkernels.bench import layer
from vqkernels.bench import layer as layer_mod
from vqkernels.ops import METRICS, Quantized, quantize

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_json(tmp_path):
    out = tmp_path / "b.json"
    metrics = ["l2", "cosine"]  # l2 has every baseline; dot runs the cosine code path without the norms
    assert (
        bench.main(["--quick", "--device", "cpu", "--json", out, "--min-time", "0.02", "--metric", ",".join(metrics)])
        == 0
    )
    result = json.loads(out.read_text())
    machine = result["machine"]
    for key in ("vqkernels", "torch", "threads", "device_name", "git_commit", "date", "roofline"):
        assert key in machine
    assert machine["roofline"]["source"].startswith("measured")
    assert set(machine["roofline"]["tflops"]) == {"fp32", "bf16"} and machine["roofline"]["bandwidth_gb_s"] > 0
    rows = result["rows"]
    backends = set(cpu_backends()) - {"triton"}  # the interpreter is not timed
    cases = {(tuple(r["shape"]), r["dtype"], r["metric"]) for r in rows}
    assert cases == {(s, dt, m) for s in bench.QUICK_SHAPES for dt in ("fp32", "bf16") for m in metrics}
    vqp = bench.vqp_missing() is None
    for case in cases:
        case_rows = [r for r in rows if (tuple(r["shape"]), r["dtype"], r["metric"]) == case]
        metric = case[2]
        expected = backends | {"naive", "gemm", "gemm_out", "gemm_argmin"}
        expected |= ({"cdist_chunked"} | ({"vqp_layer"} if vqp else set())) if metric == "l2" else set()
        # the cpu backend's other kernel variants, l2 only (none while the extension does not list them)
        variants = (
            {bench.variant_name(v) for v in bench.other_variants(case[1], case[0][0])} if "cpu" in backends else set()
        )
        variants = variants if metric in bench.VARIANT_METRICS else set()
        assert {r["name"] for r in case_rows} == expected | variants
        plan = _ext.cpu_plan(case[1], case[0][0]) or {"tile": None, "epilogue": None}
        bounds = {r["bound_ms"] for r in case_rows}
        assert len(bounds) == 1 and bounds.pop() > 0  # one roofline per case
        for r in case_rows:
            assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["stamp"]["device_name"] == machine["device_name"] and r["stamp"]["date"] == machine["date"]
            assert r["gflops"] > 0 and r["speedup_vs_naive"] > 0 and r["x_gemm_time"] > 0
            assert r["pct_of_bound"] == pytest.approx(100 * r["bound_ms"] / r["median_ms"])
            assert set(r["speedups"]) == expected - backends
            # the stamp: what the cpu backend ran (null elsewhere, and everywhere without the extension's plan)
            stamp = (r["cpu_tile"], r["cpu_epilogue"])
            if r["name"] == "cpu":
                assert stamp == (plan["tile"], plan["epilogue"])
            elif r["kind"] == "variant":
                assert r["name"] == bench.variant_name(dict(zip(("tile", "epilogue"), stamp)))
            else:
                assert stamp == (None, None)
            assert r["speedups"]["naive"] == pytest.approx(r["speedup_vs_naive"])
            best = min(r["speedups"][b] for b in bench.SEARCH_BASELINES if b in r["speedups"])  # fastest
            assert r["speedup_vs_best_search"] == pytest.approx(best)
            if r["kind"] in ("backend", "variant"):
                assert r["verdict"] == "PASS", r
                # the oracle's numbers (vqkernels.testing.judge_search) on the sampled rows
                assert set(r["check"]) == {"rows", "max_regret", "allowed_regret", "worst_dist_err_over_scale"}
                assert r["check"]["rows"] == min(r["N"], bench.CHECK_ROWS)
                assert 0 <= r["check"]["max_regret"] <= r["check"]["allowed_regret"]
                assert r["check"]["worst_dist_err_over_scale"] <= 1
            else:
                assert r["verdict"] == "-" and r["check"] == {}
    tables = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "ops", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # the README's generator
    assert tables.count("| PASS |") == len(cases) and "| 4096, 1024, 64 | bf16 | " in tables
    with_variants = {(tuple(r["shape"]), r["dtype"], r["metric"]) for r in rows if r["kind"] == "variant"}
    assert {(tuple(e["shape"]), e["dtype"], e["metric"]) for e in result["cpu_variants"]} == with_variants
    assert all(isinstance(e["cpu_default_fastest"], bool) for e in result["cpu_variants"])
    fastest = {(tuple(f["shape"]), f["dtype"], f["metric"]): f for f in result["fastest_backend"]}
    assert set(fastest) == (cases if len(backends) > 1 else set())
    for case, f in fastest.items():
        times = {
            r["name"]: r["median_ms"]
            for r in rows
            if (tuple(r["shape"]), r["dtype"], r["metric"]) == case and r["kind"] == "backend"
        }
        assert f["median_ms"] == times and f["fastest"] == min(times, key=times.get)


def test_bench_time_limit_stops_between_cases_with_a_complete_json(tmp_path):
    """--time-limit starts no case after the limit; the JSON (rewritten whole after every case) says so."""
    out = tmp_path / "b.json"
    args = ["--quick", "--device", "cpu", "--json", out, "--min-time", "0.01", "--metric", "dot", "--dtype", "fp32"]
    assert bench.main([*args, "--backend", "torch", "--time-limit", "0"]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == [] and result["config"]["complete"] is False
    assert not list(tmp_path.glob("*.tmp"))
    assert bench.main([*args, "--backend", "torch", "--time-limit", "600"]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["complete"] is True and result["config"]["cases_done"] == len(bench.QUICK_SHAPES)
    assert {tuple(r["shape"]) for r in result["rows"]} == set(bench.QUICK_SHAPES)


def test_roofline_of_known_gpus_matches_the_derived_bounds():
    """Lower bounds on an H100 SXM (ms), worked out by hand from its datasheet peaks (989 TFLOP/s bf16, 3.35 TB/s);
    the table must reproduce them."""
    h100 = roofline.gpu_spec("NVIDIA H100 80GB HBM3")
    assert h100.source.endswith("H100 SXM") and h100.bandwidth == 3.35e12
    for (n, k, d), ms in {
        (65536, 16384, 256): 0.56,
        (262144, 16384, 8): 0.51,
        (1048576, 16384, 64): 2.2,
        (65536, 1048576, 64): 8.9,
        (1048576, 4096, 1024): 8.9,
    }.items():
        assert roofline.bound_seconds(n, k, d, torch.bfloat16, h100) * 1e3 == pytest.approx(ms, abs=0.01 + ms / 100)
    # memory-bound: D large, K tiny -> bytes / bandwidth
    t = roofline.bound_seconds(1 << 20, 1, 1024, torch.bfloat16, h100)
    assert t == pytest.approx((2 * 1024 * ((1 << 20) + 1) * 2 + 12 * (1 << 20) + 8) / 3.35e12)
    assert roofline.gpu_spec("NVIDIA H100 PCIe").bandwidth == 2.0e12
    assert roofline.gpu_spec("NVIDIA H200").bandwidth == 4.8e12
    assert roofline.gpu_spec("Some Future GPU") is None
    assert roofline.bound_seconds(10, 10, 10, torch.float16, roofline.Peaks("x", {"fp32": 1e12}, 1e9)) is None


@pytest.mark.skipif(bench.vqp_missing() is not None, reason="vector-quantize-pytorch not installed")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vqp_layer_baseline_finds_our_codes(metric):
    """The vector-quantize-pytorch row times the same search: its codes equal the fp64 argmin."""
    x, codebook = bench.make_inputs(500, 300, 16, torch.float64, "cpu")
    codes = bench.vqp_layer_codes(x, codebook, metric)()
    assert torch.equal(codes, vq.nearest_code(x, codebook, metric=metric, backend="torch")[0])


def test_bench_presets_and_plot(tmp_path):
    args = bench.parse_args(["--preset", "gpu", "--device", "cpu"])
    assert args.shapes == list(bench.PRESETS["gpu"]) and len(args.shapes) == 9
    assert bench.parse_args(["--device", "cpu"]).shapes == list(bench.PRESETS["cpu-default"])
    default = bench.parse_args(["--device", "cpu"])
    assert default.metric == list(METRICS) and bench.parse_args(["--metric", "dot"]).metric == ["dot"]
    # cpu-default: every metric on the small shape, l2 only on the large ones (a few minutes on 2 cores)
    assert sorted(default.cases) == sorted(
        [((4096, 1024, 64), dt, m) for dt in ("fp32", "bf16") for m in METRICS]
        + [(s, dt, "l2") for s in bench.PRESET_L2_ONLY["cpu-default"] for dt in ("fp32", "bf16")]
    )
    n_default = len(bench.PRESETS["cpu-default"])
    assert len(bench.parse_args(["--device", "cpu", "--metric", "l2,dot"]).cases) == n_default * 2 * 2  # asked: all
    # a few rows against a huge codebook (retrieval, the CVQ anchor search with roles swapped): l2 only, and the
    # N x K guard of the baselines lets them run (64 x 1M fp32 = 256 MiB)
    few = [(1, 1048576, 64), (64, 1048576, 64), (8, 262144, 256)]
    assert set(few) <= set(bench.PRESETS["cpu-default"]) and set(few) <= bench.PRESET_L2_ONLY["cpu-default"]
    assert {c for c in default.cases if c[0] in few} == {(s, dt, "l2") for s in few for dt in ("fp32", "bf16")}
    assert not any(bench.skip_reason(b, n, k, 4) for b in bench.NK_BASELINES for n, k, _ in few)
    assert default.cpu_variants is True and bench.parse_args(["--no-cpu-variants"]).cpu_variants is False
    assert len(bench.parse_args(["--preset", "gpu", "--dtype", "bf16"]).cases) == 9 * 3
    # the backends come from the dispatch table (triton's interpreter is not timed)
    assert default.backend == [b for b in dispatch.runnable("cpu") if b != "triton"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--metric", "l3"])
    assert bench.parse_args(["--preset", "gpu", "--shape", "10,20,30"]).shapes == [(10, 20, 30)]
    png = tmp_path / "speedup.png"
    assert (
        bench.main(
            [
                "--shape",
                "304,70,8",
                "--shape",
                "300,140,8",
                "--dtype",
                "fp32",
                "--min-time",
                "0.01",
                "--metric",
                "dot",
                "--plot",
                png,
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bench_skips_nxk_baselines_over_the_memory_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.baselines, "MAX_NK_BYTES", 1)  # where run_case reads it
    out = tmp_path / "b.json"
    assert (
        bench.main(["--shape", "200,50,8", "--dtype", "fp32", "--min-time", "0.01", "--metric", "l2", "--json", out])
        == 0
    )
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("naive", "gemm", "gemm_out", "gemm_argmin"):
        assert rows[name]["verdict"].startswith("skipped") and rows[name]["median_ms"] is None
    assert rows["cpu"]["verdict"] == "PASS" and rows["cdist_chunked"]["median_ms"] is not None


FAKE_TILE, FAKE_EPILOGUE = "VQK_BENCH_TEST_TILE", "VQK_BENCH_TEST_EPILOGUE"  # variables the op never reads


def _fake_kernel_choice(monkeypatch):
    """Make vqkernels._ext report three cpu kernel variants forced by variables the op ignores (so all three run
    the same kernel and must pass), the plan read from those variables like the C++ op reads its own."""

    def plan(dtype, rows=None):
        return {"tile": os.environ.get(FAKE_TILE, "tileA"), "epilogue": os.environ.get(FAKE_EPILOGUE, "epiA")}

    def variants(dtype, rows=None):
        pairs = (("tileA", "epiA"), ("tileB", "epiA"), ("tileA", "epiB"))
        return [{"tile": t, "epilogue": e, "env": {FAKE_TILE: t, FAKE_EPILOGUE: e}} for t, e in pairs]

    monkeypatch.setattr(_ext, "cpu_plan", plan)
    monkeypatch.setattr(_ext, "cpu_variants", variants)
    monkeypatch.delenv(FAKE_TILE, raising=False)
    monkeypatch.delenv(FAKE_EPILOGUE, raising=False)


@pytest.mark.skipif("cpu" not in dispatch.runnable("cpu"), reason="the C++ extension is not built")
def test_cpu_variant_rows_are_timed_checked_stamped_and_leave_the_environment_alone(tmp_path, monkeypatch):
    """Beside the cpu row, one row per other kernel variant, on the same inputs: every call under its variables
    (restored afterwards), stamped, checked, with its own ratios; JSON ``cpu_variants`` and the README tables."""
    _fake_kernel_choice(monkeypatch)
    calls = []  # (backend, the two variables) at every call of the op, timed or not
    real = bench.baselines.quantize

    def spy(x, codebook, *, metric, backend):
        calls.append((backend, os.environ.get(FAKE_TILE), os.environ.get(FAKE_EPILOGUE)))
        return real(x, codebook, metric=metric, backend=backend)

    monkeypatch.setattr(bench.baselines, "quantize", spy)
    out = tmp_path / "b.json"
    args = ["--shape", "8,300,16", "--shape", "200,50,8", "--dtype", "fp32", "--metric", "l2", "--backend", "cpu"]
    assert bench.main([*args, "--min-time", "0.01", "--json", out]) == 0
    assert FAKE_TILE not in os.environ and FAKE_EPILOGUE not in os.environ
    # every call of a variant ran under its variables, every other call (the cpu rows) under none
    assert set(calls) == {("cpu", None, None), ("cpu", "tileB", "epiA"), ("cpu", "tileA", "epiB")}
    for forced in (("cpu", "tileB", "epiA"), ("cpu", "tileA", "epiB")):
        assert calls.count(forced) >= 2 * (bench.MIN_RUNS + 1)  # two cases: the timed calls, then the checked one
    result = json.loads(out.read_text())
    assert result["config"]["cpu_variants"] is True and result["config"]["cpu_env"] == {}
    rows = result["rows"]
    for shape in ((8, 300, 16), (200, 50, 8)):
        case = {r["name"]: r for r in rows if tuple(r["shape"]) == shape}
        names = list(case)
        assert names[names.index("cpu") :] == ["cpu", "cpu[tileB/epiA]", "cpu[tileA/epiB]"]  # beside the cpu row
        for name, r in case.items():
            stamp = (r["cpu_tile"], r["cpu_epilogue"], r["cpu_env"])
            if name == "cpu":
                assert stamp == ("tileA", "epiA", None)
            elif r["kind"] == "variant":
                tile, epilogue = name[4:-1].split("/")
                assert stamp == (tile, epilogue, {FAKE_TILE: tile, FAKE_EPILOGUE: epilogue})
            else:
                assert stamp == (None, None, None)
            if r["kind"] == "variant":  # timed, measured and checked like the backend row, with its own ratios
                assert r["verdict"] == "PASS" and r["check"]["rows"] == shape[0], r
                assert r["median_ms"] > 0 and r["peak_extra_mib"] is not None
                assert set(r["speedups"]) == {"naive", "gemm", "gemm_out", "gemm_argmin", "cdist_chunked"} | (
                    {"vqp_layer"} if bench.vqp_missing() is None else set()
                )
                assert r["x_gemm_time"] == pytest.approx(r["median_ms"] / case["gemm"]["median_ms"])
        entry = next(e for e in result["cpu_variants"] if tuple(e["shape"]) == shape)
        times = {n: case[n]["median_ms"] for n in ("cpu", "cpu[tileB/epiA]", "cpu[tileA/epiB]")}
        assert entry["median_ms"] == times and entry["default"] == {"name": "cpu", "tile": "tileA", "epilogue": "epiA"}
        assert entry["cpu_default_fastest"] == (
            times["cpu"] <= 1.03 * min(times["cpu[tileB/epiA]"], times["cpu[tileA/epiB]"])
        )
    assert len(result["cpu_variants"]) == 2
    tables = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "ops", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        "| N, K, D | dtype | metric | `tileA/epiA` | `tileB/epiA` | `tileA/epiB` | default | default is fastest |"
        in tables
    )
    assert re.search(
        r"\| 200, 50, 8 \| fp32 \| l2 \|( [0-9.]+ ms \([0-9.]+× GEMM\) \|){3} `tileA/epiA` \| (yes|no)", tables
    )
    assert "| N, K, D | dtype | `cpu` op | `x @ C.T` alone | op / GEMM | GEMM + argmin |" in tables
    assert re.search(r"\| 8, 300, 16 \| fp32 \| [0-9.]+ ms \| [0-9.]+ ms \| [0-9.]+× \| [0-9.]+ ms \|", tables)
    l2_table = tables.split("\n\n")[0]
    assert "| 200, 50, 8 | fp32 |" in l2_table and "| 8, 300, 16 |" not in l2_table
    # no variant rows for the other metrics, nor with --no-cpu-variants; the stamp stays
    for metric, variants in (("dot", True), ("l2", False)):
        rows = bench.run_case((200, 50, 8), "fp32", metric, "cpu", ["cpu"], 0.01, True, cpu_variants=variants)
        assert [(r.name, r.cpu_tile, r.verdict) for r in rows if r.kind != "baseline"] == [("cpu", "tileA", "PASS")]


def test_forced_env_restores_what_was_there():
    os.environ[FAKE_TILE] = "before"
    try:
        with pytest.raises(RuntimeError):
            with bench.forced_env({FAKE_TILE: "x", FAKE_EPILOGUE: "y"}):
                assert (os.environ[FAKE_TILE], os.environ[FAKE_EPILOGUE]) == ("x", "y")
                raise RuntimeError
        assert os.environ[FAKE_TILE] == "before" and FAKE_EPILOGUE not in os.environ
    finally:
        os.environ.pop(FAKE_TILE, None)


def test_other_variants_leave_out_the_plan_in_force(monkeypatch):
    _fake_kernel_choice(monkeypatch)
    assert [bench.variant_name(v) for v in bench.other_variants("bf16")] == ["cpu[tileB/epiA]", "cpu[tileA/epiB]"]
    monkeypatch.setenv(FAKE_TILE, "tileB")  # forced from outside: the cpu row runs tileB, the automatic one is a row
    assert [bench.variant_name(v) for v in bench.other_variants("bf16")] == ["cpu[tileA/epiA]", "cpu[tileA/epiB]"]
    monkeypatch.setattr(_ext, "cpu_plan", lambda dtype, rows=None: None)  # no plan: all but the automatic choice
    assert [bench.variant_name(v) for v in bench.other_variants("bf16")] == ["cpu[tileB/epiA]", "cpu[tileA/epiB]"]
    monkeypatch.setattr(_ext, "cpu_variants", lambda dtype, rows=None: [])
    assert bench.other_variants("bf16") == [] and bench.cpu_stamp("bf16") == (None, None)


def test_cpu_default_fastest_within_the_tolerance():
    """cpu_default_fastest: no passing variant beats the cpu row's median by more than 3 %."""

    def case(n, cpu_ms, variants, cpu_verdict="PASS"):
        cpu = bench.Row(n, 10, 4, "fp32", "l2", "cpu", "cpu", "backend", median_ms=cpu_ms, verdict=cpu_verdict)
        cpu.cpu_tile, cpu.cpu_epilogue = "t", "e"
        others = [
            bench.Row(n, 10, 4, "fp32", "l2", "cpu", f"cpu[v{i}/e]", "variant", median_ms=ms, verdict=verdict)
            for i, (ms, verdict) in enumerate(variants)
        ]
        gemm = bench.Row(n, 10, 4, "fp32", "l2", "cpu", "gemm", "baseline", median_ms=0.1)
        return [gemm, cpu, *others]

    rows = (
        case(1, 1.00, [(1.20, "PASS"), (1.05, "PASS")])  # the fastest
        + case(2, 1.00, [(0.98, "PASS"), (1.5, "PASS")])  # 2 % slower than a variant: noise, still the fastest
        + case(3, 1.00, [(0.95, "PASS"), (0.90, "PASS")])  # beaten by 11 %
        + case(4, 1.00, [(0.50, "FAIL(regret)"), (1.10, "PASS")])  # a failing variant does not count
        + case(5, 1.00, [(None, "FAIL(RuntimeError: x)")])  # nothing to compare with
        + case(6, None, [(1.0, "PASS")], cpu_verdict="FAIL(RuntimeError: x)")  # the default failed
        + [bench.Row(7, 10, 4, "fp32", "l2", "cpu", "cpu", "backend", median_ms=1.0)]  # no variant rows: no entry
    )
    entries = {e["shape"][0]: e for e in bench.default_fastest(rows)}
    assert sorted(entries) == [1, 2, 3, 4, 5, 6]
    assert [entries[n]["cpu_default_fastest"] for n in range(1, 7)] == [True, True, False, True, None, None]
    assert [entries[n]["fastest"] for n in range(1, 5)] == ["cpu", "cpu[v0/e]", "cpu[v1/e]", "cpu"]
    assert entries[3]["default_over_fastest"] == pytest.approx(1 / 0.9)
    assert entries[4]["median_ms"] == {"cpu": 1.0, "cpu[v1/e]": 1.1}
    assert entries[1]["default"] == {"name": "cpu", "tile": "t", "epilogue": "e"} and entries[1]["tolerance"] == 0.03
    lines = {n: bench.describe(e) for n, e in entries.items()}
    assert "is the fastest of 3" in lines[1] and "next cpu[v1/e]" in lines[1]
    assert "is the fastest within 3 %: cpu[v0/e]" in lines[2] and "1.02x faster" in lines[2]
    assert "is NOT the fastest: cpu[v1/e] 0.9 ms is 1.11x faster than its 1 ms" in lines[3]
    assert "not judged: no variant has a time" in lines[5] and "not judged: its row failed" in lines[6]
    assert all(
        line.startswith(f"cpu kernels at {n},10,4 fp32 l2: the default (t/e) ") for n, line in lines.items() if n != 6
    )


def test_readme_tables_come_from_the_committed_results():
    """The README's op and layer tables are benchmarks/readme_tables.py's output for the committed JSON (a result
    without kernel variants or few-rows shapes gives the same tables as before those existed)."""
    readme = (ROOT / "README.md").read_text()
    for kind, name in (("ops", "cpu-amd-epyc-2core-ops.json"), ("layer", "cpu-amd-epyc-2core-layer.json")):
        path = ROOT / "benchmarks" / "results" / name
        out = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), kind, str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out and out in readme, kind


def _run_suites(*extra, env=None):
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "benchmarks"),
        "-q",
        "-p",
        "no:cacheprovider",
        "--vqk-shape",
        "304,70,8",
        "--vqk-dtype",
        "fp32,bf16",
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_benchmark_suites_run_and_check():
    """``pytest benchmarks/`` collects every case and its correctness assertions pass (each case run once)."""
    pytest.importorskip("pytest_benchmark")
    out = _run_suites("--benchmark-disable")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    backends = len(set(cpu_backends()) - {"triton"})
    # ops: per dtype and metric 4 baselines (naive, gemm, gemm_out, gemm_argmin) plus the backends; l2 also cdist
    # and vector-quantize-pytorch
    vqp = bench.vqp_missing() is None
    ops = 2 * (3 * (4 + backends) + 1 + vqp)
    layer = len(layer_mod.STEPS) - (0 if vqp else len(layer_mod.VQP_ROWS))
    assert f"{ops + layer} passed" in out.stdout, out.stdout[-2000:]


def test_benchmark_suites_run_without_the_plugin(tmp_path):
    """Without pytest-benchmark (the GPU box has no network) the stand-in fixture times the same suites."""
    shim = tmp_path / "pytest_benchmark"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('hidden for the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = _run_suites("-p", "no:benchmark", "--benchmark-only", "--vqk-metric", "l2", "-s", env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "304,70,8 fp32 l2 test_quantize[304x70x8-fp32-l2-cpu]: median" in out.stdout


def test_check_quantized_judges_the_structure_then_the_oracle():
    """The correctness column: structural checks (codes range, counts, z_q), then vqkernels.testing's verdict."""
    x, cb = bench.make_inputs(600, 50, 8, torch.float32, "cpu")
    q = quantize(x, cb, backend="torch")
    v = bench.check_quantized(x, cb, "l2", q)
    oracle = testing.judge_search(x, cb, "l2", q.codes, q.dist, exact=False, max_rows=bench.CHECK_ROWS)
    assert v.ok and str(v) == "PASS" and v.details == oracle.details
    far = (q.codes + 25) % 50  # other codes: a regret far above the allowance
    v = bench.check_quantized(x, cb, "l2", Quantized(far, cb[far], q.dist, torch.bincount(far, minlength=50)))
    assert not v.ok and "regret" in str(v) and v.details["max_regret"] > v.details["allowed_regret"]
    v = bench.check_quantized(x, cb, "l2", q._replace(dist=q.dist + 1))
    assert not v.ok and "dist error" in str(v)
    assert str(bench.check_quantized(x, cb, "l2", q._replace(counts=q.counts.flip(0)))).startswith("FAIL(counts")
    assert "z_q != C[codes]" in str(bench.check_quantized(x, cb, "l2", q._replace(z_q=q.z_q + 1)))
    assert str(bench.check_quantized(x, cb, "l2", q._replace(codes=q.codes + 50))) == "FAIL(codes out of range)"


def test_layer_bench_quick_json(tmp_path):
    """``python -m vqkernels.bench_layer --quick``: every step's codes judged by vqkernels.testing, the loss by fp64."""
    out = tmp_path / "layer.json"
    assert layer.main(["--quick", "--device", "cpu", "--min-time", "0.02", "--json", out]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"machine", "config", "rows", "targets"}
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == list(layer.STEPS)
    n = layer.QUICK_SHAPES[0][0]
    ours = ["vqkernels", "quantize op + loss", "vqtorch-style", "VectorQuantize (defaults)"]
    ours += ["quantize op + commitment loss", "8 heads: batched op + loss", "8 heads: per-head loop"]
    ours += ["8 heads: VectorQuantize"]
    for name in ours + ([name for name in layer.VQP_ROWS] if bench.vqp_missing() is None else []):
        r = rows[name]
        assert r["verdict"] == "PASS" and r["median_ms"] > 0, r
        if name.startswith("8 heads"):  # head 0's codes against head 0's rows and codebook
            assert set(r["check"]) == {"rows", "max_regret", "allowed_regret"}
            assert r["check"]["rows"] == min(n // layer.HEADS, bench.CHECK_ROWS)
        elif name != "vector-quantize-pytorch":  # every other loss is the mse of the chosen codes
            assert set(r["check"]) == {"rows", "max_regret", "allowed_regret", "loss_rel_err"}
            assert r["check"]["rows"] == min(n, bench.CHECK_ROWS)
    # the 8-head rows search the same codes, batched or in a loop
    x, cb0, makers = layer.make_steps((256, 40, 8), "cpu", "torch")
    batched, loop = makers["8 heads: batched op + loss"]()(), makers["8 heads: per-head loop"]()()
    assert batched[0].shape == (layer.HEADS, 256 // layer.HEADS) and torch.equal(batched[0], loop[0])
    assert torch.allclose(batched[1], loop[1])
    x, cb0, makers = layer.make_steps((304, 40, 8), "cpu", "torch")
    codes, loss = makers["vqtorch-style"]()()
    assert layer.check_step(x, cb0, codes, loss).ok
    v = layer.check_step(x, cb0, (codes + 20) % 40, loss)
    assert not v.ok and "regret" in str(v) and "loss" in str(v)


@pytest.mark.parametrize("module", ["vqkernels.bench", "vqkernels.bench_layer"])
def test_entry_points_run(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"python -m {module}" in out.stdout and "--json" in out.stdout


def test_bench_modules_share_public_names_only():
    """No module of the benchmark (nor a user of it) imports another module's private (underscore) helper, and
    none carries its own distance oracle: the correctness column is vqkernels.testing's."""
    files = [
        *sorted((ROOT / "vqkernels" / "bench").glob("*.py")),
        ROOT / "vqkernels" / "bench_layer.py",
        ROOT / "vqkernels" / "demo" / "cli.py",
        *sorted((ROOT / "benchmarks").glob("*.py")),
    ]
    for path in files:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("vqkernels")):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__doc__"]
                assert not private, f"{path.name} imports {private} from {node.module}"
        assert not re.search(r"\b(bench|bench_layer|layer)\._[a-z]", text), path.name
    oracle_names = re.compile(r"def (_?keys|_?fp64_distances|_?rounding_scale|_?regrets)\(|DIST_RTOL|REGRET_REL")
    for path in (ROOT / "vqkernels" / "bench").glob("*.py"):
        assert not oracle_names.search(path.read_text()), path.name

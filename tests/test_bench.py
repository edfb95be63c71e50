"""Smoke test of the benchmark CLI: ``python -m vqkernels.bench --quick`` runs, checks and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cpu_backends

import vqkernels as vq
from vqkernels import bench, roofline
from vqkernels.ops import METRICS

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_json(tmp_path):
    out = tmp_path / "b.json"
    metrics = ["l2", "cosine"]  # l2 has every baseline; dot runs the cosine code path without the norms
    assert bench.main(["--quick", "--device", "cpu", "--json", out, "--min-time", "0.02",
                       "--metric", ",".join(metrics)]) == 0
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
        assert {r["name"] for r in case_rows} == expected
        bounds = {r["bound_ms"] for r in case_rows}
        assert len(bounds) == 1 and bounds.pop() > 0  # one roofline per case
        for r in case_rows:
            assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["stamp"]["device_name"] == machine["device_name"] and r["stamp"]["date"] == machine["date"]
            assert r["gflops"] > 0 and r["speedup_vs_naive"] > 0 and r["x_gemm_time"] > 0
            assert r["pct_of_bound"] == pytest.approx(100 * r["bound_ms"] / r["median_ms"])
            assert set(r["speedups"]) == expected - backends
            assert r["speedups"]["naive"] == pytest.approx(r["speedup_vs_naive"])
            best = min(r["speedups"][b] for b in bench.SEARCH_BASELINES if b in r["speedups"])  # fastest
            assert r["speedup_vs_best_search"] == pytest.approx(best)
            if r["kind"] == "backend":
                assert r["verdict"] == "PASS", r
    tables = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "ops", str(out)],
                            capture_output=True, text=True, check=True).stdout  # the README's generator
    assert tables.count("| PASS |") == len(cases) and "| 4096, 1024, 64 | bf16 | " in tables
    fastest = {(tuple(f["shape"]), f["dtype"], f["metric"]): f for f in result["fastest_backend"]}
    assert set(fastest) == (cases if len(backends) > 1 else set())
    for case, f in fastest.items():
        times = {r["name"]: r["median_ms"] for r in rows
                 if (tuple(r["shape"]), r["dtype"], r["metric"]) == case and r["kind"] == "backend"}
        assert f["median_ms"] == times and f["fastest"] == min(times, key=times.get)


def test_bench_time_limit_stops_between_cases_with_a_complete_json(tmp_path):
    """--time-limit starts no case after the limit; the JSON (rewritten whole after every case) says so."""
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", out, "--min-time", "0.01", "--metric", "dot",
                       "--dtype", "fp32", "--time-limit", "0", "--backend", "torch"]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == [] and result["config"]["complete"] is False
    assert not list(tmp_path.glob("*.tmp"))
    assert bench.main(["--quick", "--device", "cpu", "--json", out, "--min-time", "0.01", "--metric", "dot",
                       "--dtype", "fp32", "--time-limit", "600", "--backend", "torch"]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["complete"] is True and result["config"]["cases_done"] == len(bench.QUICK_SHAPES)
    assert {tuple(r["shape"]) for r in result["rows"]} == set(bench.QUICK_SHAPES)


def test_roofline_of_known_gpus_matches_the_derived_bounds():
    """PERFORMANCE.md derives lower bounds on an H100 SXM (ms); the datasheet table must reproduce them."""
    h100 = roofline.gpu_spec("NVIDIA H100 80GB HBM3")
    assert h100.source.endswith("H100 SXM") and h100.bandwidth == 3.35e12
    for (n, k, d), ms in {(65536, 16384, 256): 0.56, (262144, 16384, 8): 0.51, (1048576, 16384, 64): 2.2,
                          (65536, 1048576, 64): 8.9, (1048576, 4096, 1024): 8.9}.items():
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
    assert sorted(default.cases) == sorted([((4096, 1024, 64), dt, m) for dt in ("fp32", "bf16") for m in METRICS]
                                           + [(s, dt, "l2") for s in bench.PRESET_L2_ONLY["cpu-default"]
                                              for dt in ("fp32", "bf16")])
    assert len(bench.parse_args(["--device", "cpu", "--metric", "l2,dot"]).cases) == 3 * 2 * 2  # asked: all shapes
    assert len(bench.parse_args(["--preset", "gpu", "--dtype", "bf16"]).cases) == 9 * 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--metric", "l3"])
    assert bench.parse_args(["--preset", "gpu", "--shape", "10,20,30"]).shapes == [(10, 20, 30)]
    png = tmp_path / "speedup.png"
    assert bench.main(["--shape", "300,70,8", "--shape", "300,140,8", "--dtype", "fp32", "--min-time", "0.01",
                       "--metric", "dot", "--plot", png]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bench_skips_nxk_baselines_over_the_memory_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "MAX_NK_BYTES", 1)
    out = tmp_path / "b.json"
    assert bench.main(["--shape", "200,50,8", "--dtype", "fp32", "--min-time", "0.01", "--metric", "l2",
                       "--json", out]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("naive", "gemm", "gemm_out", "gemm_argmin"):
        assert rows[name]["verdict"].startswith("skipped") and rows[name]["median_ms"] is None
    assert rows["cpu"]["verdict"] == "PASS" and rows["cdist_chunked"]["median_ms"] is not None


def _run_suites(*extra, env=None):
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "-q", "-p", "no:cacheprovider",
           "--vqk-shape", "300,70,8", "--vqk-dtype", "fp32,bf16", *extra]
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
    layer = 3 + vqp
    assert f"{ops + layer} passed" in out.stdout, out.stdout[-2000:]


def test_benchmark_suites_run_without_the_plugin(tmp_path):
    """Without pytest-benchmark (the GPU box has no network) the stand-in fixture times the same suites."""
    shim = tmp_path / "pytest_benchmark"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('hidden for the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = _run_suites("-p", "no:benchmark", "--benchmark-only", "--vqk-metric", "l2", "-s", env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "300,70,8 fp32 l2 test_quantize[300x70x8-fp32-l2-cpu]: median" in out.stdout

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
from vqkernels import bench, dispatch, roofline, testing
from vqkernels.bench import layer
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
                "300,70,8",
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
        "300,70,8",
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
    for name in ("vqkernels", "quantize op + loss", "vqtorch-style"):
        r = rows[name]
        assert r["verdict"] == "PASS" and r["median_ms"] > 0, r
        assert set(r["check"]) == {"rows", "max_regret", "allowed_regret", "loss_rel_err"}
        assert r["check"]["rows"] == min(layer.QUICK_SHAPES[0][0], bench.CHECK_ROWS)
    x, cb0, makers = layer.make_steps((300, 40, 8), "cpu", "torch")
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

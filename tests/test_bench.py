"""Smoke test of the benchmark CLI: ``python -m vqkernels.bench --quick`` runs, checks and writes its JSON."""

import json

from helpers import cpu_backends

from vqkernels import bench


def test_bench_quick_json(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", out, "--min-time", "0.05"]) == 0
    result = json.loads(out.read_text())
    machine = result["machine"]
    for key in ("vqkernels", "torch", "threads", "device_name", "git_commit", "date"):
        assert key in machine
    rows = result["rows"]
    expected = (set(cpu_backends()) - {"triton"}) | set(bench.BASELINES)  # the interpreter is not timed
    cases = {(tuple(r["shape"]), r["dtype"]) for r in rows}
    assert cases == {(s, dt) for s in bench.QUICK_SHAPES for dt in ("fp32", "bf16")}
    for case in cases:
        case_rows = [r for r in rows if (tuple(r["shape"]), r["dtype"]) == case]
        assert {r["name"] for r in case_rows} == expected
        for r in case_rows:
            assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["gflops"] > 0 and r["speedup_vs_naive"] > 0 and r["x_gemm_time"] > 0
            if r["kind"] == "backend":
                assert r["verdict"] == "PASS", r


def test_bench_presets_and_plot(tmp_path):
    args = bench.parse_args(["--preset", "gpu", "--device", "cpu"])
    assert args.shapes == list(bench.PRESETS["gpu"]) and len(args.shapes) == 9
    assert bench.parse_args(["--device", "cpu"]).shapes == list(bench.PRESETS["cpu-default"])
    assert bench.parse_args(["--preset", "gpu", "--shape", "10,20,30"]).shapes == [(10, 20, 30)]
    png = tmp_path / "speedup.png"
    assert bench.main(["--shape", "300,70,8", "--shape", "300,140,8", "--dtype", "fp32", "--min-time", "0.01",
                       "--plot", png]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bench_skips_nxk_baselines_over_the_memory_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "MAX_NK_BYTES", 1)
    out = tmp_path / "b.json"
    assert bench.main(["--shape", "200,50,8", "--dtype", "fp32", "--min-time", "0.01", "--json", out]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("naive", "gemm", "gemm_out", "gemm_argmin"):
        assert rows[name]["verdict"].startswith("skipped") and rows[name]["median_ms"] is None
    assert rows["cpu"]["verdict"] == "PASS" and rows["cdist_chunked"]["median_ms"] is not None

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

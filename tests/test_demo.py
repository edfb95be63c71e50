"""``python -m vqkernels.demo``: a quick run writes complete JSON and PNG, the reported statistics equal a
recomputation from the trained models, runs are deterministic, training helps, bad options exit."""

import json
import math

import numpy as np
import pytest
import torch

from vqkernels import demo
from vqkernels.demo import data as demo_data
from vqkernels.demo.train import DEFAULT_SEEDS, DEFAULT_STEPS, QUICK_STEPS
from vqkernels.nn import VectorQuantiser, VectorQuantize


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run of every data set and method, two seeds: (results, JSON payload, PNG path)."""
    out = tmp_path_factory.mktemp("demo")
    results = demo.main(
        ["--quick", "--seeds", "2", "--seed", "5", "--json", out / "sub" / "demo.json", "--plot", out / "demo.png"]
    )
    return results, json.loads((out / "sub" / "demo.json").read_text()), out / "demo.png"


def test_quick_run_writes_every_run(quick):
    results, payload, png = quick
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    for key in ("vqkernels", "torch", "threads", "device", "device_name", "git_commit", "date"):
        assert key in payload["machine"]
    cfg = payload["config"]
    assert cfg["steps"] == QUICK_STEPS and cfg["seeds"] == [5, 6] and cfg["device"] == "cpu"
    k = cfg["num_codes"]
    runs = payload["runs"]
    assert [(r["seed"], r["dataset"], r["method"]) for r in runs] == [
        (s, d, m) for s in (5, 6) for d in demo.DATASETS for m in demo.METHODS
    ]
    assert len(results) == len(runs)
    for r in runs:
        t = r["test"]
        counts = np.array(t["counts"])
        assert counts.shape == (k,) and counts.min() >= 0
        assert 0 < t["usage"] <= 1 and t["used_codes"] == round(t["usage"] * k) == (counts > 0).sum()
        assert 1 - 1e-5 <= t["perplexity"] <= t["used_codes"] * (1 + 1e-5)
        assert t["mse"] > 0 and r["init_test_mse"] > 0 and r["train_time_s"] > 0
        c = r["curves"]
        assert c["step"] == list(range(1, QUICK_STEPS + 1))  # log_every = 1 for so few steps
        assert len(c["usage"]) == len(c["train_mse"]) == QUICK_STEPS
        assert all(0 < u <= 1 for u in c["usage"]) and all(m > 0 for m in c["train_mse"])
    # one seed: the same encoder/decoder start for every method, so layers with equal initial codes (plain and
    # vqtorch: affine starts as the identity; the three CVQ anchors) start from the same test error
    for s in (5, 6):
        for d in demo.DATASETS:
            init = {r["method"]: r["init_test_mse"] for r in runs if r["dataset"] == d and r["seed"] == s}
            assert init["plain"] == init["vqtorch"] == init["ema"] == init["rotation"]
            assert init["cvq-closest"] == init["cvq-random"] == init["cvq-probrandom"]
    # the summary: mean and sample std over the two seeds of each (data set, method), recomputed from the runs
    summary = payload["summary"]
    assert [(r["dataset"], r["method"]) for r in summary] == [(d, m) for d in demo.DATASETS for m in demo.METHODS]
    for row in summary:
        mine = [r for r in runs if r["dataset"] == row["dataset"] and r["method"] == row["method"]]
        assert row["seeds"] == [5, 6]
        for key in ("usage", "perplexity", "mse"):
            v = np.array([r["test"][key] for r in mine])
            assert row[key]["mean"] == pytest.approx(v.mean()) and row[key]["std"] == pytest.approx(v.std(ddof=1))
        assert row["mse"]["std"] > 0  # two seeds train two different models


def _recount(model, x):
    """Codes and squared error recomputed from the model's parts: encoder, nearest effective code by brute force
    in fp64 (l2 for VectorQuant, angle for CVQ's cosine), decoder of those codes."""
    model.eval()
    with torch.no_grad():
        z = model.encoder(x)
        rows = z.movedim(1, -1).reshape(-1, z.shape[1]).double()
        q = model.quantiser
        if isinstance(q, VectorQuantiser):
            cb = q.embedding.weight.double()
            key = -(torch.nn.functional.normalize(rows, dim=1) @ torch.nn.functional.normalize(cb, dim=1).T)
        elif isinstance(q, VectorQuantize):  # vector-quantize-pytorch's defaults: l2, no projection
            cb = q.codebook.detach().double()
            key = torch.cdist(rows, cb)
        else:
            cb = q.get_codebook().double()
            key = torch.cdist(rows, cb)
        codes = key.argmin(1)
        z_q = cb[codes].float().view(z.shape[0], z.shape[2], z.shape[3], -1).movedim(-1, 1)
        sq = float((model.decoder(z_q).double() - x.double()).square().sum())
    return codes.numpy(), key.numpy(), sq


def test_reported_statistics_equal_a_recount_from_the_models(quick):
    results, payload, _ = quick
    k = payload["config"]["num_codes"]
    for r, j in zip(results, payload["runs"]):
        x = demo.load_dataset(r.dataset).test
        codes, key, sq = _recount(r.model, x)
        _, _, layer_codes = r.model(x)
        layer_codes = layer_codes.flatten().numpy()
        # the layer's code is the fp64 nearest one, up to fp32 rounding on near-ties (CVQ's anchors put several
        # codes within ~1e-9 of one another), and exactly it wherever the runner-up is clearly farther
        rows = np.arange(len(codes))
        best = key[rows, codes]
        tol = 1e-5 * np.maximum(1.0, np.abs(best))
        assert (key[rows, layer_codes] - best <= tol).all(), (r.dataset, r.method)
        runner_up = np.partition(key, 1, axis=1)[:, 1]
        clear = runner_up - best > tol
        assert (layer_codes[clear] == codes[clear]).all(), (r.dataset, r.method)
        counts = np.bincount(layer_codes, minlength=k)
        p = counts[counts > 0] / counts.sum()
        assert j["test"]["counts"] == counts.tolist()
        assert j["test"]["used_codes"] == (counts > 0).sum() and j["test"]["usage"] == (counts > 0).sum() / k
        assert j["test"]["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
        if (layer_codes == codes).all():
            assert j["test"]["mse"] == pytest.approx(sq / x.numel(), rel=1e-5)


def test_evaluate_on_a_tiny_model():
    """Hand-set encoder (2x2 mean pixel -> latent (v, 0)), K = 4 codes, decoder back to pixels: a known histogram."""
    cfg = demo.Config(num_codes=4, code_dim=2)
    model = demo.VQAutoEncoder(1, 4, 2, 1, lambda: demo.make_quantiser("plain", cfg))
    model.encoder = torch.nn.Sequential(torch.nn.AvgPool2d(2), torch.nn.Conv2d(1, 2, 1))
    model.decoder = torch.nn.Sequential(torch.nn.Conv2d(2, 1, 1), torch.nn.Upsample(scale_factor=2))
    with torch.no_grad():
        for conv in (model.encoder[1], model.decoder[0]):
            conv.weight.zero_()
            conv.bias.zero_()
        model.encoder[1].weight[0, 0] = 1.0
        model.decoder[0].weight[0, 0] = 1.0
        model.quantiser.codebook.weight.copy_(torch.tensor([[0.0, 0], [1.0, 0], [5.0, 0], [9.0, 0]]))
    x = torch.zeros(2, 1, 8, 8)
    x[1, :, :, :4] = 1.0  # 8 of the 32 latents are (1, 0), the rest (0, 0)
    stats = demo.evaluate(model, x, 4)
    assert stats["counts"].tolist() == [24, 8, 0, 0] and stats["used_codes"] == 2 and stats["usage"] == 0.5
    assert stats["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert stats["mse"] == 0.0
    with torch.no_grad():
        model.quantiser.codebook.weight[1, 0] = 0.9  # still the nearest code: 8 latents x 4 pixels off by 0.1
    stats = demo.evaluate(model, x, 4)
    assert stats["counts"].tolist() == [24, 8, 0, 0] and stats["mse"] == pytest.approx(8 * 4 * 0.01 / 128)
    assert model.training  # evaluate restores the mode


def test_same_seed_same_numbers_and_another_seed_differs():
    def numbers(seed):
        results = demo.main(["--quick", "--datasets", "digits", "--seed", seed, "--seeds", "1"])
        return [
            (
                r.method,
                {k: v for k, v in r.test.items() if k != "counts"},
                r.test["counts"].tolist(),
                r.init_test_mse,
                r.curves,
            )
            for r in results
        ]

    first = numbers(3)
    assert numbers(3) == first
    assert numbers(4) != first


def test_short_training_lowers_the_test_error():
    cfg = demo.Config(steps=60, seed=1)
    r = demo.train_one(demo.load_dataset("digits"), "plain", cfg)
    assert r.test["mse"] < 0.5 * r.init_test_mse
    assert r.curves["step"][-1] == 60 and len(r.curves["step"]) == 60 // cfg.log_every


def test_data_splits():
    digits = demo_data.load_digits_data(0)
    assert digits.train.shape == (1438, 1, 8, 8) and digits.test.shape == (359, 1, 8, 8)
    assert 0 <= digits.train.min() and digits.train.max() <= 1
    assert torch.equal(demo_data.load_digits_data(0).test, digits.test)
    # train and test partition the 1797 digits
    from sklearn.datasets import load_digits

    def rows_sorted(a):
        a = np.asarray(a, dtype=np.float32).reshape(len(a), -1)
        return a[np.lexsort(a.T[::-1])]

    both = torch.cat([digits.train, digits.test]).numpy()
    assert np.array_equal(rows_sorted(both), rows_sorted(load_digits().data / 16.0))
    patches = demo_data.load_patch_data()
    assert patches.train.shape == (2 * 52 * 63, 3, 16, 16) and patches.test.shape == (2 * 26 * 8, 3, 16, 16)
    # the test tiles of the first photo reassemble its right 128 columns (raster order, as the figure assumes)
    from sklearn.datasets import load_sample_images

    photo = torch.tensor(load_sample_images().images[0], dtype=torch.float32).permute(2, 0, 1) / 255.0
    tiles = patches.test[: 26 * 8].view(26, 8, 3, 16, 16).permute(2, 0, 3, 1, 4).reshape(3, 26 * 16, 8 * 16)
    assert torch.equal(tiles, photo[:, : 26 * 16, -128:])


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "0"],
        ["--steps", "ten"],
        ["--datasets", "mnist"],
        ["--datasets", ""],
        ["--methods", "plain,emma"],
        ["--methods", ","],
        ["--seed", "-1"],
        ["--seeds", "0"],
        ["--device", "tpu"],
        ["--backend", "numpy"],
        ["--backend", "cpu", "--device", "cuda"],
        ["--bogus"],
    ],
)
def test_bad_options_exit(argv, capsys):
    if argv[-1] == "cuda" and torch.cuda.is_available():
        argv = ["--backend", "cuda", "--device", "cpu"]  # the same mismatch the other way round
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_defaults_and_narrowing():
    args = demo.parse_args([])
    assert args.steps == DEFAULT_STEPS and args.datasets == list(demo.DATASETS)
    assert args.methods == list(demo.METHODS) and args.device == "cpu" and args.backend == "auto"
    args = demo.parse_args(["--quick", "--methods", "cvq-random, plain", "--datasets", "patches"])
    assert args.steps == QUICK_STEPS and args.methods == ["plain", "cvq-random"] and args.datasets == ["patches"]
    assert demo.parse_args(["--quick", "--steps", "5"]).steps == 5


def test_readme_table_is_generated_from_the_json(quick, tmp_path):
    """The README's demo table comes from ``benchmarks/readme_tables.py demo``: one line per (data set, method), the
    mean ± std over seeds of its runs."""
    import subprocess
    import sys
    from pathlib import Path

    _, payload, _ = quick
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(payload))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "readme_tables.py"
    table = subprocess.run(
        [sys.executable, str(script), "demo", str(path)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    summary = payload["summary"]
    assert len(table) == 2 + len(summary) and len(summary) < len(payload["runs"])  # one line per (data set, method)
    assert f"({len(payload['config']['seeds'])} seeds)" in table[0]
    first = summary[0]
    usages = [
        r["test"]["usage"]
        for r in payload["runs"]
        if (r["dataset"], r["method"]) == (first["dataset"], first["method"])
    ]
    mean = 100 * sum(usages) / len(usages)
    assert table[2].startswith(f"| {first['dataset']} | `{first['method']}` | {mean:.1f} ± ")


def test_readme_demo_table_comes_from_the_committed_result():
    """The README's demo table is the generator's output for ``benchmarks/results/demo-cpu.json``, a run of every
    method over the default seeds and steps."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = root / "benchmarks" / "results" / "demo-cpu.json"
    result = json.loads(path.read_text())
    assert result["config"]["steps"] == DEFAULT_STEPS and len(result["config"]["seeds"]) == DEFAULT_SEEDS
    assert {r["method"] for r in result["summary"]} == set(demo.METHODS)
    table = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "readme_tables.py"), "demo", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert table and table in (root / "README.md").read_text()

"""The demo's outputs: terminal table, JSON and figure."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dispatch import select
from .data import Dataset
from .train import METHODS, Config, RunResult, summarise

COLUMNS = ("dataset", "method", "seeds", "test usage", "codes used", "test perplexity", "test MSE", "train time")


def _pm(stat: dict[str, float], fmt: str, scale: float = 1.0, unit: str = "") -> str:
    """``mean ± std`` of a summary entry."""
    return f"{format(scale * stat['mean'], fmt)} ± {format(scale * stat['std'], fmt)}{unit}"


def format_row(row: dict[str, Any], num_codes: int) -> list[str]:
    """One line of the table from a :func:`vqkernels.demo.train.summarise` entry (mean ± std over seeds)."""
    return [
        row["dataset"],
        row["method"],
        str(len(row["seeds"])),
        _pm(row["usage"], ".1f", 100.0, "%"),
        f"{_pm(row['used_codes'], '.0f')}/{num_codes}",
        _pm(row["perplexity"], ".1f"),
        _pm(row["mse"], ".4f"),
        f"{row['train_time_s']['mean']:.0f} s",
    ]


def header_line(machine: dict[str, Any], cfg: Config, seeds: list[int] | None = None) -> str:
    """One line saying what ran where: version, commit, date, device, threads, torch, load and the budget."""
    m = machine
    return (
        f"vqkernels {m['vqkernels']} @ {m['git_commit'] or 'unknown commit'} | {m['date']} | "
        f"{m['device']}: {m['device_name']} | threads {m['threads']} | torch {m['torch']} | "
        f"load {m['loadavg_1m']} | backend {select(cfg.backend, torch.device(cfg.device))} | "
        f"steps {cfg.steps} x batch {cfg.batch_size} | K {cfg.num_codes} | D {cfg.code_dim} | "
        f"seeds {','.join(str(s) for s in (seeds or [cfg.seed]))}"
    )


def print_table(results: list[RunResult], header: str, num_codes: int) -> None:
    """The header line, then (mean ± std over seeds per data set and method) a rich table when rich imports, else
    aligned plain text."""
    print(header)
    cells = [format_row(r, num_codes) for r in summarise(results)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c) for c in col) for col in zip(COLUMNS, *cells)]
        for line in (COLUMNS, *cells):
            print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        return
    table = Table()
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right", no_wrap=True)
    for line in cells:
        table.add_row(*line)
    Console(width=max(120, Console().width)).print(table)  # a pipe would get 80 columns and truncate the cells


def mosaic(images: np.ndarray, rows: int, cols: int, gap: int) -> np.ndarray:
    """``images [rows * cols, C, h, w]`` -> one ``[H, W, C]`` picture, row-major, ``gap`` white pixels apart."""
    n, c, h, w = images.shape
    out = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap, c), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = images[i].transpose(1, 2, 0)
    return out


def plot(results: list[RunResult], datasets: dict[str, Dataset], path: Path, title: str, num_codes: int) -> None:
    """PNG, one row per data set: usage-vs-step and training-MSE curves of every method, and the test images next
    to each method's reconstruction of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in datasets if any(r.dataset == n for r in results)]
    fig = plt.figure(figsize=(18, 5.2 * len(names)), layout="constrained")
    outer = fig.add_gridspec(len(names), 3, width_ratios=[1, 1, 1.15])
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    for i, name in enumerate(names):
        data, all_runs = datasets[name], [r for r in results if r.dataset == name]
        first_seed = all_runs[0].seed
        runs = [r for r in all_runs if r.seed == first_seed]  # the reconstructions shown: the first seed's
        ax_use, ax_mse = fig.add_subplot(outer[i, 0]), fig.add_subplot(outer[i, 1])
        for method in dict.fromkeys(r.method for r in all_runs):
            seeds = [r for r in all_runs if r.method == method]
            steps = seeds[0].curves["step"]
            for ax, key in ((ax_use, "usage"), (ax_mse, "train_mse")):
                curves = np.array([r.curves[key] for r in seeds])  # [seeds, points]
                ax.plot(steps, curves.mean(0), color=colors[method], label=method)
                if len(seeds) > 1:  # +- one standard deviation over seeds
                    sd = curves.std(0, ddof=1)
                    ax.fill_between(steps, curves.mean(0) - sd, curves.mean(0) + sd, color=colors[method], alpha=0.15)
        window = runs[0].curves["step"][0]
        ax_use.set(
            title=f"{name}: codebook usage during training",
            xlabel="training step",
            ylim=(0, 1.02),
            ylabel=f"fraction of the K = {num_codes} codes\nused in the last {window} steps",
        )
        ax_mse.set(
            title=f"{name}: training reconstruction MSE",
            xlabel="training step",
            ylabel="MSE (pixels in [0, 1])",
            yscale="log",
        )
        for ax in (ax_use, ax_mse):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)

        rows, cols, gap = data.show_grid
        pics = [("test images", mosaic(data.test[data.show].numpy(), rows, cols, gap))]
        pics += [
            (f"{r.method}  (seed {r.seed}, test MSE {r.test['mse']:.4f})", mosaic(r.recon, rows, cols, gap))
            for r in runs
        ]
        h, w = pics[0][1].shape[:2]
        wide = w >= 3 * h  # strips stack in one column with side labels; squarer pictures go in a grid
        grid = (len(pics), 1) if wide else (2, math.ceil(len(pics) / 2))
        inner = outer[i, 2].subgridspec(*grid)
        for j, (label, pic) in enumerate(pics):
            ax = fig.add_subplot(inner[j // grid[1], j % grid[1]])
            ax.imshow(pic[..., 0] if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if wide:
                ax.set_ylabel(label.replace("  ", "\n"), rotation=0, ha="right", va="center", fontsize=8)
            else:
                ax.set_title(label.replace("  ", "\n"), fontsize=8)
            if j == 0 and wide:
                ax.set_title(f"{name}: test images and reconstructions")
    fig.suptitle(textwrap.fill(title, 170), fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(
    path: Path, machine: dict[str, Any], cfg: Config, datasets: dict[str, Dataset], results: list[RunResult]
) -> None:
    """``{"machine", "config", "datasets", "runs", "summary"}``, every number as measured; ``summary`` holds the
    mean and standard deviation over seeds per data set and method."""
    config = {
        **asdict(cfg),
        "seeds": sorted({r.seed for r in results}),
        "log_every": cfg.log_every,
        "optimizer": "Adam",
        "loss": "mse(recon, x) / var(train x) + vq loss of the layer",
    }
    payload = {
        "machine": machine,
        "config": config,
        "datasets": {n: d.description for n, d in datasets.items()},
        "runs": [r.to_json() for r in results],
        "summary": summarise(results),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")

"""Command line of ``python -m vqkernels.demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..bench import machine_info
from ..bench import parse_names as bench_names
from ..dispatch import BACKENDS, select
from . import __doc__ as DOC
from .data import DATASETS
from .report import header_line, plot, print_table, write_json
from .train import DEFAULT_SEEDS, DEFAULT_STEPS, METHODS, QUICK_STEPS, Config, RunResult, run


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: the benchmark's comma list of ``choices``, returned in the order of ``choices``."""
    parse_any_order = bench_names(choices)
    return lambda text: [c for c in choices if c in parse_any_order(text)]


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}; got {v}")
        return v

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the options (``steps`` filled in); bad options exit through ``argparse``'s error."""
    p = argparse.ArgumentParser(
        prog="python -m vqkernels.demo", description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=None,
        help=f"training steps per run (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)",
    )
    p.add_argument(
        "--datasets",
        type=_names(DATASETS),
        default=list(DATASETS),
        help=f"comma list of {','.join(DATASETS)} (default all)",
    )
    p.add_argument(
        "--methods",
        type=_names(METHODS),
        default=list(METHODS),
        help=f"comma list of {','.join(METHODS)} (default all)",
    )
    p.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="first seed: initial weights and batch order (default 0)"
    )
    p.add_argument(
        "--seeds",
        type=_int_at_least(1),
        default=DEFAULT_SEEDS,
        help=f"number of seeds, from --seed on; the table gives mean +- std over them (default {DEFAULT_SEEDS})",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--backend", choices=("auto", *BACKENDS), default="auto", help="backend of the vqkernels ops (default auto)"
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write machine, config and runs here")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write the figure (PNG) here")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run (seconds; for tests)")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    try:
        select(args.backend, torch.device(args.device))
    except (ValueError, RuntimeError) as e:
        p.error(f"--backend {args.backend}: {e}")
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    return args


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    """Run the demo, print the table, write the JSON and the figure; returns the runs (with their models)."""
    args = parse_args(argv)
    cfg = Config(steps=args.steps, seed=args.seed, device=args.device, backend=args.backend)
    machine = machine_info(args.device)
    seeds = list(range(args.seed, args.seed + args.seeds))
    data, results = run(args.datasets, args.methods, cfg, seeds)
    header = header_line(machine, cfg, seeds)
    print_table(results, header, cfg.num_codes)
    for path in (args.json, args.plot):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.json is not None:
        write_json(args.json, machine, cfg, data, results)
    if args.plot is not None:
        plot(results, data, args.plot, header, cfg.num_codes)
    return results

"""``python -m vqkernels.bench_layer``: one training step (forward + backward) of a VQ layer, side by side.

For each shape ``(N, K, D)`` it times, in one run, on the same inputs and the same initial codebook, the step
``z_q, loss = layer(x); ((z_q * g).sum() + loss).backward()`` (``g`` a fixed downstream gradient) of:

- ``vqkernels``: :class:`vqkernels.nn.VectorQuant` ``(D, K, dim=-1)`` (fused search, gather and counts; the
  codebook gradient by the ``code_stats`` op);
- ``quantize op + loss``: the bare :func:`vqkernels.quantize` op plus the same loss and straight-through
  arithmetic, no module (the layer's overhead is measured against it);
- ``vqtorch-style``: what vqtorch (Huh et al., ICML 2023) does: ``torch.cdist`` over 1024-row chunks + ``topk``,
  the gather by ``F.embedding``, the same convex loss and straight-through output (written here, not imported);
- ``vector-quantize-pytorch``: ``VectorQuantize(D, K, learnable_codebook=True, ema_update=False)`` when the
  package is installed (``pip install vector-quantize-pytorch``, in the ``bench`` extra).

Each row: median and 20/80 % times, the step time as a multiple of the ``vqkernels`` row, peak extra memory of
one step, and a correctness verdict: the chosen codes under the precision rule of :mod:`vqkernels.testing` on
sampled rows (as in ``python -m vqkernels.bench``) and, for the rows with vqtorch's loss, the loss against an fp64
evaluation.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import select
from ..nn import VectorQuant
from ..nn.functional import convex_vq_loss, straight_through
from ..ops import quantize
from ..testing import Verdict
from .baselines import vqp_missing
from .cases import DEFAULT_MIN_TIME, QUICK_MIN_TIME, Shape
from .check import CHECK_ROWS, check_codes
from .cli import parse_shape
from .machine import machine_info
from .memory import measure_peak
from .report import fmt_number, progress, write_json_atomic
from .timing import measure_time

DEFAULT_SHAPES: tuple[Shape, ...] = ((65536, 4096, 64),)
QUICK_SHAPES: tuple[Shape, ...] = ((2048, 256, 16),)
BETA = 0.95  # vqtorch's default
VQTORCH_CHUNK = 1024  # vqtorch's cdist_chunk_size
LOSS_RTOL = 1e-4
"""Relative error allowed between a step's loss and the fp64 loss on the same codes."""
# Targets of the layer issue on its shape (fp32, 2 cores): (row name, lower bound on the row's time / the
# vqkernels time).
TARGET_SHAPE = (65536, 4096, 64)
TARGETS = (("vqtorch-style", 2.0), ("vector-quantize-pytorch", 15.0), ("quantize op + loss", 1 / 1.3))
STEPS = ("vqkernels", "quantize op + loss", "vqtorch-style", "vector-quantize-pytorch")
"""The rows of a case, in order ("vqkernels" first: the times are relative to it)."""


@dataclass
class LayerRow:
    """One line of the layer table / one entry of the JSON ``rows``."""

    N: int
    K: int
    D: int
    dtype: str
    device: str
    name: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    samples: int | None = None
    x_vqkernels_time: float | None = None  # this row's time / the vqkernels row's time
    peak_extra_mib: float | None = None
    verdict: str = "-"
    check: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# The steps. Each returns (codes [N], loss or None when the library's loss is a different formula).
# ---------------------------------------------------------------------------------------------------------------
Step = Callable[[], tuple[Tensor, Tensor | None]]


def vqkernels_step(x: Tensor, cb0: Tensor, g: Tensor, backend: str) -> Step:
    """The training step of :class:`vqkernels.nn.VectorQuant` holding ``cb0``."""
    layer = VectorQuant(cb0.shape[1], cb0.shape[0], beta=BETA, dim=-1, backend=backend).to(x.device, x.dtype)
    with torch.no_grad():
        layer.codebook.weight.copy_(cb0)

    def step():
        x.grad = layer.codebook.weight.grad = None
        z_q, out = layer(x)
        ((z_q * g).sum() + out["loss"]).backward()
        return out["q"].squeeze(-1), out["loss"]

    return step


def op_step(x: Tensor, cb0: Tensor, g: Tensor, backend: str) -> Step:
    """The same step with the bare :func:`vqkernels.quantize` op, the convex loss and the straight-through output."""
    cb = cb0.clone().requires_grad_(True)

    def step():
        x.grad = cb.grad = None
        q = quantize(x, cb, backend=backend)
        loss = convex_vq_loss(x, q.z_q, BETA)
        ((straight_through(x, q.z_q) * g).sum() + loss).backward()
        return q.codes, loss

    return step


def vqtorch_step(x: Tensor, cb0: Tensor, g: Tensor) -> Step:
    """vqtorch's step, written out: chunked ``cdist`` + ``topk``, ``F.embedding``, the convex loss
    ``(1 - beta) mean((x - sg(z_q))^2) + beta mean((sg(x) - z_q)^2)``, straight-through output."""
    cb = cb0.clone().requires_grad_(True)

    def step():
        x.grad = cb.grad = None
        with torch.no_grad():
            codes = torch.cat(
                [
                    torch.cdist(xc, cb).topk(1, dim=1, largest=False).indices.squeeze(1)
                    for xc in x.detach().split(VQTORCH_CHUNK)
                ]
            )
        z_q = F.embedding(codes, cb)
        loss = (1 - BETA) * ((x - z_q.detach()) ** 2).mean() + BETA * ((x.detach() - z_q) ** 2).mean()
        out = x + (z_q - x).detach()
        ((out * g).sum() + loss).backward()
        return codes, loss

    return step


def vqp_step(x: Tensor, cb0: Tensor, g: Tensor) -> Step:
    """vector-quantize-pytorch's ``VectorQuantize(learnable_codebook=True, ema_update=False)`` holding ``cb0`` (its
    loss is another formula: None)."""
    from vector_quantize_pytorch import VectorQuantize  # optional: the bench extra

    vqp = VectorQuantize(dim=cb0.shape[1], codebook_size=cb0.shape[0], learnable_codebook=True, ema_update=False).to(
        x.device
    )
    params = list(vqp.parameters())
    with torch.no_grad():
        emb = vqp._codebook.embed  # [heads=1, K, D]
        emb.copy_(cb0.view_as(emb))

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        quantized, codes, loss = vqp(x[None])
        ((quantized[0] * g).sum() + loss).backward()
        return codes[0], None

    return step


# ---------------------------------------------------------------------------------------------------------------
# Correctness.
# ---------------------------------------------------------------------------------------------------------------
def check_step(x: Tensor, cb0: Tensor, codes: Tensor, loss: Tensor | None, max_rows: int = CHECK_ROWS) -> Verdict:
    """The codes of a step under the precision rule of :mod:`vqkernels.testing` (l2, on up to ``max_rows`` sampled
    rows; :func:`vqkernels.bench.check.check_codes`) and, when given, ``loss`` against vqtorch's convex loss
    evaluated in fp64 on the chosen codes (both of its terms have the value of the mse) within ``LOSS_RTOL``."""
    verdict = check_codes(x, cb0, "l2", codes, max_rows)
    if not verdict.details:  # codes of the wrong shape or range: nothing else to judge
        return verdict
    if loss is not None:
        mse = ((x.detach().double() - cb0.double()[codes]) ** 2).mean()
        rel = abs(float(loss.detach()) - float(mse)) / max(float(mse), 1e-30)
        verdict.details["loss_rel_err"] = rel
        if rel > LOSS_RTOL:
            verdict.reasons.append(f"loss rel. error {rel:.2g}")
            verdict.ok = False
    return verdict


# ---------------------------------------------------------------------------------------------------------------
# Running and reporting.
# ---------------------------------------------------------------------------------------------------------------
StepMaker = Callable[[], Step]


def make_steps(shape: Shape, device: str, backend: str) -> tuple[Tensor, Tensor, dict[str, StepMaker]]:
    """Inputs ``x [N, D]`` (requires grad), initial codebook ``[K, D]`` and name -> maker of a zero-argument
    training step returning ``(codes [N], loss or None)``, in the order of ``STEPS``."""
    n, k, d = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    cb0 = torch.randn(k, d, generator=gen).to(device)
    g = torch.randn(n, d, generator=gen).to(device)
    makers: dict[str, StepMaker] = {
        "vqkernels": lambda: vqkernels_step(x, cb0, g, backend),
        "quantize op + loss": lambda: op_step(x, cb0, g, backend),
        "vqtorch-style": lambda: vqtorch_step(x, cb0, g),
        "vector-quantize-pytorch": lambda: vqp_step(x, cb0, g),
    }
    return x, cb0, makers


def run_case(shape: Shape, device: str, backend: str, min_time: float) -> list[LayerRow]:
    """Every step of :func:`make_steps` on one shape; an exception fails that row only (ERROR for the other
    libraries' rows)."""
    n, k, d = shape
    x, cb0, makers = make_steps(shape, device, backend)
    rows = []
    for name, make in makers.items():
        row = LayerRow(n, k, d, "fp32", device, name)
        rows.append(row)
        if name == "vector-quantize-pytorch" and (why := vqp_missing()):
            row.verdict = f"skipped: {why}"
            continue
        try:
            step = make()
            t = measure_time(step, device, min_time)
            row.median_ms, row.p20_ms, row.p80_ms, row.samples = t.median * 1e3, t.p20 * 1e3, t.p80 * 1e3, t.samples
            row.peak_extra_mib, (codes, loss) = measure_peak(step, device)
            verdict = check_step(x, cb0, codes, loss)
            row.verdict, row.check = str(verdict), verdict.details
        except Exception as e:  # noqa: BLE001 - report it, keep measuring the others
            row.verdict = f"{'FAIL' if name == 'vqkernels' else 'ERROR'}({type(e).__name__}: {e})"
    base = rows[0].median_ms
    for r in rows:
        if base is not None and r.median_ms is not None:
            r.x_vqkernels_time = r.median_ms / base
    return rows


def target_lines(rows: list[LayerRow]) -> list[tuple[str, bool | None]]:
    """``("<name>: vqkernels is 2.31x faster (target >= 2x)", met)`` per target whose row ran."""
    out = []
    by_name = {r.name: r for r in rows if (r.N, r.K, r.D) == TARGET_SHAPE}
    for name, bound in TARGETS:
        r = by_name.get(name)
        if r is None or r.x_vqkernels_time is None:
            continue
        ratio = r.x_vqkernels_time
        if bound >= 1:
            text = f"vs {name}: vqkernels is {ratio:.2f}x faster (target >= {bound:g}x)"
        else:
            text = f"vs {name}: vqkernels takes {1 / ratio:.2f}x its time (target <= {1 / bound:.2g}x)"
        out.append((f"{r.N},{r.K},{r.D} " + text, ratio >= bound))
    return out


def print_table(rows: list[LayerRow], header: str) -> None:
    """The rows as a rich table under ``header``, then one line per target (MET / NOT MET)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=header, title_justify="left")
    for col in ("shape N,K,D", "layer (fwd+bwd)", "median ms", "p20-p80 ms", "x vqkernels time", "peak MiB", "check"):
        table.add_column(col, justify="left" if col in ("shape N,K,D", "layer (fwd+bwd)", "check") else "right")
    for r in rows:
        table.add_row(
            f"{r.N},{r.K},{r.D}",
            r.name,
            fmt_number(r.median_ms, ".1f"),
            "-" if r.p20_ms is None else f"{r.p20_ms:.1f}-{r.p80_ms:.1f} ({r.samples})",
            fmt_number(r.x_vqkernels_time, ".2f", "x"),
            fmt_number(r.peak_extra_mib, ".0f"),
            r.verdict,
            style="red" if r.verdict.startswith(("FAIL", "ERROR")) else ("bold" if r.name == "vqkernels" else None),
        )
    console = Console(width=max(120, Console().width))
    console.print(table)
    for text, met in target_lines(rows):
        console.print(("MET     " if met else "NOT MET ") + text, style=None if met else "yellow")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and resolve the options (backend, shapes and min-time filled in)."""
    p = argparse.ArgumentParser(
        prog="python -m vqkernels.bench_layer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        metavar="N,K,D",
        help="a shape (repeatable; default " + " ".join(",".join(map(str, s)) for s in DEFAULT_SHAPES) + ")",
    )
    p.add_argument("--backend", default=None, help="backend of the vqkernels rows (default: auto for the device)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.add_argument("--min-time", type=float, default=None, metavar="SECONDS")
    p.add_argument("--quick", action="store_true", help="a small shape only (for tests)")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    try:
        args.backend = select(args.backend or "auto", torch.device(args.device))
    except (ValueError, RuntimeError) as e:
        p.error(f"--backend: {e}")
    args.shapes = args.shape or list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.min_time is None:
        args.min_time = QUICK_MIN_TIME if args.quick else DEFAULT_MIN_TIME
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table and the targets (and write JSON); return 1 if a vqkernels row failed its check."""
    args = parse_args(argv)
    machine = machine_info(args.device)
    rows: list[LayerRow] = []
    for shape in progress(args.shapes, desc="layer bench"):
        rows += run_case(shape, args.device, args.backend, args.min_time)
    header = (
        f"VQ layer forward+backward, fp32, beta={BETA}, backend={args.backend} | {machine['device_name']} "
        f"({machine['threads']} threads) | torch {torch.__version__} | "
        f"load {machine.get('loadavg_1m')}"
    )
    print_table(rows, header)
    if args.json is not None:
        config = {
            "shapes": [list(s) for s in args.shapes],
            "backend": args.backend,
            "min_time": args.min_time,
            "beta": BETA,
        }
        targets = [{"text": t, "met": m} for t, m in target_lines(rows)]
        write_json_atomic(
            args.json, {"machine": machine, "config": config, "rows": [asdict(r) for r in rows], "targets": targets}
        )
    ours = [r for r in rows if r.name in ("vqkernels", "quantize op + loss")]
    return 1 if any(r.verdict.startswith("FAIL") for r in ours) else 0

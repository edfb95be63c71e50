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
  package is installed (``pip install vector-quantize-pytorch``, in the ``bench`` extra);
- the one-line swap with vector-quantize-pytorch's defaults (EMA codebook, rotation trick, commitment weight 1):
  ``VectorQuantize (defaults)`` (:class:`vqkernels.nn.VectorQuantize`) against ``vector-quantize-pytorch
  (defaults)``, and the bare op with that loss (``quantize op + commitment loss``: the search, the commitment MSE
  and the straight-through output, no codebook gradient);
- 8 heads with separate codebooks, the same total work (each head N/8 rows of D features against its own K codes):
  ``8 heads: batched op + loss`` (one batched :func:`vqkernels.quantize` on ``[8, N/8, D]`` against
  ``[8, K, D]``), ``8 heads: per-head loop`` (8 calls, what the layers did before the batched op), and the layers
  ``8 heads: VectorQuantize`` / ``8 heads: vector-quantize-pytorch`` (``heads=8, separate_codebook_per_head=True``,
  defaults otherwise); ``quantize op + loss`` is the one search doing the same work.

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
from ..nn import VectorQuant, VectorQuantize
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
HEADS = 8
# Targets on the target shape (fp32, 2 cores): (row, reference row, kind, bound). "faster": the reference row is
# at least `bound` times faster than the row (row time / reference time >= bound); "within": the row takes at most
# `bound` times the reference row's time.
TARGET_SHAPE = (65536, 4096, 64)
TARGETS = (
    ("vqtorch-style", "vqkernels", "faster", 2.0),
    ("vector-quantize-pytorch", "vqkernels", "faster", 15.0),
    ("vqkernels", "quantize op + loss", "within", 1.3),
    ("vector-quantize-pytorch (defaults)", "VectorQuantize (defaults)", "faster", 20.0),
    ("VectorQuantize (defaults)", "quantize op + commitment loss", "within", 1.2),
    ("8 heads: batched op + loss", "quantize op + loss", "within", 1.1),
    ("8 heads: per-head loop", "8 heads: batched op + loss", "faster", 1.5),
)
STEPS = (
    "vqkernels",
    "quantize op + loss",
    "vqtorch-style",
    "vector-quantize-pytorch",
    "VectorQuantize (defaults)",
    "quantize op + commitment loss",
    "vector-quantize-pytorch (defaults)",
    "8 heads: batched op + loss",
    "8 heads: per-head loop",
    "8 heads: VectorQuantize",
    "8 heads: vector-quantize-pytorch",
)
"""The rows of a case, in order ("vqkernels" first: the times are relative to it)."""
VQP_ROWS = frozenset(name for name in STEPS if "vector-quantize-pytorch" in name)
OTHERS = VQP_ROWS | {"vqtorch-style"}  # other libraries' rows: an exception there is an ERROR, not our FAIL


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


def vq_defaults_step(x: Tensor, cb0: Tensor, g: Tensor, backend: str, heads: int = 1) -> Step:
    """Our :class:`vqkernels.nn.VectorQuantize` with vector-quantize-pytorch's defaults (EMA, rotation trick) holding
    ``cb0`` (``[K, D]``, or ``[heads, K, D]`` with separate codebooks); ``x [N, heads * D]``."""
    return _vq_layer_step(_vq_layer(VectorQuantize, cb0.shape[-1], cb0, heads, backend=backend), x, g, heads)


def vqp_defaults_step(x: Tensor, cb0: Tensor, g: Tensor, heads: int = 1) -> Step:
    """vector-quantize-pytorch's ``VectorQuantize`` with its defaults (EMA, rotation trick) holding ``cb0``."""
    from vector_quantize_pytorch import VectorQuantize as TheirVectorQuantize  # optional: the bench extra

    return _vq_layer_step(_vq_layer(TheirVectorQuantize, cb0.shape[-1], cb0, heads), x, g, heads)


def _vq_layer_step(vq, x: Tensor, g: Tensor, heads: int) -> Step:
    """One training step of a ``VectorQuantize`` (either) on ``x [N, heads * D]`` as one ``[1, N, heads * D]`` batch;
    the codes come back ``[N]``, or ``[heads, N]`` with heads."""

    def step():
        x.grad = None
        quantized, codes, loss = vq(x[None])
        ((quantized[0] * g).sum() + loss).backward()
        return codes[0].T if heads > 1 else codes[0], loss

    return step


def _vq_layer(cls, d: int, cb0: Tensor, heads: int, **kwargs):
    """A ``VectorQuantize`` (ours or theirs: the same constructor) for ``D = d`` per head holding ``cb0``."""
    if heads == 1:
        vq = cls(dim=d, codebook_size=cb0.shape[-2], **kwargs)
    else:
        # codebook_dim = d: each head searches its own d features (no projection; the default is dim per head)
        vq = cls(
            dim=heads * d,
            codebook_size=cb0.shape[-2],
            codebook_dim=d,
            heads=heads,
            separate_codebook_per_head=True,
            **kwargs,
        )
    vq = vq.to(cb0.device)
    with torch.no_grad():
        for name in ("embed", "embed_avg"):  # embed_avg = embed x cluster size (1): the EMA starts from cb0
            buf = getattr(vq._codebook, name)
            buf.copy_(cb0.reshape(buf.shape))
    return vq


def commitment_op_step(x: Tensor, cb0: Tensor, g: Tensor, backend: str) -> Step:
    """The bare op with the EMA layers' loss: search + gather + counts, ``mean((x - sg(z_q))^2)``, straight-through
    output; the codebook takes no gradient (an EMA codebook is a buffer)."""

    def step():
        x.grad = None
        q = quantize(x.detach(), cb0, backend=backend)
        loss = convex_vq_loss(x, q.z_q, 0.0)
        ((straight_through(x, q.z_q) * g).sum() + loss).backward()
        return q.codes, loss

    return step


def heads_op_step(x: Tensor, cb0: Tensor, g: Tensor, backend: str, heads: int, batched: bool) -> Step:
    """8 heads with separate codebooks, op + convex loss + straight-through: ``x [N / heads, heads * D]`` (a
    ``[heads, N / heads, D]`` view, not copied) against ``cb0 [heads, K, D]``, one batched search or a loop of one
    search per head."""
    cb = cb0.clone().requires_grad_(True)
    n = x.shape[0]
    xh = x.view(n, heads, -1).transpose(0, 1)  # [heads, N / heads, D]
    gh = g.view(n, heads, -1).transpose(0, 1)

    def step():
        x.grad = cb.grad = None
        if batched:
            q = quantize(xh, cb, backend=backend)
            codes, z_q = q.codes, q.z_q
        else:
            parts = [quantize(xh[h], cb[h], backend=backend) for h in range(heads)]
            codes = torch.stack([p.codes for p in parts])
            z_q = torch.stack([p.z_q for p in parts])
        loss = convex_vq_loss(xh, z_q, BETA)
        ((straight_through(xh, z_q) * gh).sum() + loss).backward()
        return codes, loss

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
    training step returning ``(codes, loss or None)``, in the order of ``STEPS``. The 8-head rows view the same
    ``N x D`` numbers as ``[N / 8, 8 * D]`` and hold the codebook ``[8, K, D]`` whose head 0 is ``cb0``; their
    codes are ``[8, N / 8]``."""
    n, k, d = shape
    if n % HEADS:
        raise ValueError(f"N must be a multiple of {HEADS} (the 8-head rows split the rows); got {n}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    cb0 = torch.randn(k, d, generator=gen).to(device)
    g = torch.randn(n, d, generator=gen).to(device)
    cbh = torch.cat([cb0[None], torch.randn(HEADS - 1, k, d, generator=gen).to(device)])
    xh = x.detach().view(n // HEADS, HEADS * d).requires_grad_(True)
    gh = g.view(n // HEADS, HEADS * d)
    makers: dict[str, StepMaker] = {
        "vqkernels": lambda: vqkernels_step(x, cb0, g, backend),
        "quantize op + loss": lambda: op_step(x, cb0, g, backend),
        "vqtorch-style": lambda: vqtorch_step(x, cb0, g),
        "vector-quantize-pytorch": lambda: vqp_step(x, cb0, g),
        "VectorQuantize (defaults)": lambda: vq_defaults_step(x, cb0, g, backend),
        "quantize op + commitment loss": lambda: commitment_op_step(x, cb0, g, backend),
        "vector-quantize-pytorch (defaults)": lambda: vqp_defaults_step(x, cb0, g),
        "8 heads: batched op + loss": lambda: heads_op_step(xh, cbh, gh, backend, HEADS, batched=True),
        "8 heads: per-head loop": lambda: heads_op_step(xh, cbh, gh, backend, HEADS, batched=False),
        "8 heads: VectorQuantize": lambda: vq_defaults_step(xh, cbh, gh, backend, HEADS),
        "8 heads: vector-quantize-pytorch": lambda: vqp_defaults_step(xh, cbh, gh, HEADS),
    }
    return x, cb0, makers


def judge(name: str, x: Tensor, cb0: Tensor, codes: Tensor, loss: Tensor | None) -> Verdict:
    """The verdict on one step's output of row ``name`` (:func:`check_step`); the 8-head rows are judged on head 0
    (its rows: ``x`` viewed as ``[N / 8, 8, D]``, column block 0; its codebook: ``cb0``), without the loss."""
    if name.startswith("8 heads"):
        n, d = x.shape
        return check_step(x.detach().view(n // HEADS, HEADS, d)[:, 0], cb0, codes[0], None)
    return check_step(x, cb0, codes, loss)


def run_case(shape: Shape, device: str, backend: str, min_time: float) -> list[LayerRow]:
    """Every step of :func:`make_steps` on one shape; an exception fails that row only (ERROR for the other
    libraries' rows)."""
    n, k, d = shape
    x, cb0, makers = make_steps(shape, device, backend)
    rows = []
    for name, make in makers.items():
        row = LayerRow(n, k, d, "fp32", device, name)
        rows.append(row)
        if name in VQP_ROWS and (why := vqp_missing()):
            row.verdict = f"skipped: {why}"
            continue
        try:
            step = make()
            t = measure_time(step, device, min_time)
            row.median_ms, row.p20_ms, row.p80_ms, row.samples = t.median * 1e3, t.p20 * 1e3, t.p80 * 1e3, t.samples
            row.peak_extra_mib, _ = measure_peak(step, device)
            # judged on the first step of a fresh layer: an EMA codebook has moved during the timing
            verdict = judge(name, x, cb0, *make()())
            row.verdict, row.check = str(verdict), verdict.details
        except Exception as e:  # noqa: BLE001 - report it, keep measuring the others
            row.verdict = f"{'ERROR' if name in OTHERS else 'FAIL'}({type(e).__name__}: {e})"
    base = rows[0].median_ms
    for r in rows:
        if base is not None and r.median_ms is not None:
            r.x_vqkernels_time = r.median_ms / base
    return rows


def target_lines(rows: list[LayerRow]) -> list[tuple[str, bool | None]]:
    """``("<ref> is 2.31x faster than <row> (target >= 2x)", met)`` per target of :data:`TARGETS` whose rows ran
    on the target shape."""
    out = []
    by_name = {r.name: r for r in rows if (r.N, r.K, r.D) == TARGET_SHAPE}
    for name, ref, kind, bound in TARGETS:
        r, base = by_name.get(name), by_name.get(ref)
        if r is None or base is None or r.median_ms is None or base.median_ms is None:
            continue
        ratio = r.median_ms / base.median_ms
        if kind == "faster":
            text, met = f"{ref} is {ratio:.2f}x faster than {name} (target >= {bound:g}x)", ratio >= bound
        else:
            text, met = f"{name} takes {ratio:.2f}x the time of {ref} (target <= {bound:g}x)", ratio <= bound
        out.append((f"{r.N},{r.K},{r.D}: " + text, met))
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
    return 1 if any(r.verdict.startswith("FAIL") for r in rows) else 0

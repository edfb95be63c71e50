"""The autoencoder, the quantisers, the training loop and the test statistics."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..nn import VectorQuant, VectorQuantiser, VectorQuantize
from ..nn.functional import perplexity
from .data import Dataset, load_dataset

METHODS = ("plain", "vqtorch", "ema", "rotation", "vq-pytorch", "cvq-closest", "cvq-random", "cvq-probrandom")
DEFAULT_STEPS = 500  # 8 methods x 2 data sets x 3 seeds in under 10 minutes on 2 cores
DEFAULT_SEEDS = 3
QUICK_STEPS = 12
NUM_CURVE_POINTS = 50  # log points per run; the usage window is the steps between two points


@dataclass(frozen=True)
class Config:
    """Everything shared by all runs; stamped into the JSON."""

    steps: int = DEFAULT_STEPS
    seed: int = 0
    split_seed: int = 0  # the digits train/test split does not move with the seed
    num_codes: int = 512  # K, CVQ-VAE's default
    code_dim: int = 32  # D, vqtorch's example
    hidden: int = 64  # conv channels of encoder and decoder
    batch_size: int = 128  # images: 2048 latent vectors per step
    lr: float = 3e-4  # Adam on every parameter of every method (codebook included), both papers' value
    plain_beta: float = 0.8  # commitment : codebook = 0.2 : 0.8 = 0.25 : 1, the VQ-VAE weights CVQ uses
    vqtorch_affine_lr: float = 10.0  # vqtorch's README and examples
    vqtorch_sync_nu: float = 0.2
    vqtorch_inplace_lr: float = 50.0  # vqtorch's alternating step: SGD(lr=50, momentum=0.9) on the codebook
    vqtorch_inplace_momentum: float = 0.9
    cvq_beta: float = 0.25  # CVQ-VAE's defaults (its README trains with --distance cos)
    cvq_distance: str = "cos"
    ema_decay: float = 0.99  # VQ-VAE's EMA (van den Oord et al. 2017, app. A.1; Razavi et al. 2019)
    device: str = "cpu"
    backend: str = "auto"

    @property
    def log_every(self) -> int:
        return max(1, self.steps // NUM_CURVE_POINTS)


# ---------------------------------------------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------------------------------------------
class VQAutoEncoder(nn.Module):
    """Conv encoder -> quantiser on a ``[B, D, h, w]`` grid -> conv decoder; ``h = H / 2^downsample``.

    ``forward(x [B, C, H, W]) -> (recon [B, C, H, W], vq_loss scalar, codes int64 [B, h, w])`` whatever the
    quantiser's API (vqtorch's ``(z_q, out)`` or CVQ-VAE's ``(z_q, loss, (perplexity, encodings, codes))``).
    """

    def __init__(
        self, channels: int, hidden: int, code_dim: int, downsample: int, make_quantiser: Callable[[], nn.Module]
    ):
        super().__init__()
        # VQ-VAE's layout: strided 4x4 convolutions down, a 3x3 at the latent resolution, mirrored up
        enc: list[nn.Module] = [nn.Conv2d(channels, hidden, 4, stride=2, padding=1), nn.ReLU()]
        dec: list[nn.Module] = [nn.Conv2d(code_dim, hidden, 3, padding=1), nn.ReLU()]
        for _ in range(downsample - 1):
            enc += [nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
            dec += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(
            *enc, nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, code_dim, 1)
        )
        self.decoder = nn.Sequential(*dec, nn.ConvTranspose2d(hidden, channels, 4, stride=2, padding=1))
        # built last, so the encoder and decoder start from the same weights whatever the quantiser draws
        self.quantiser = make_quantiser()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = self.encoder(x)
        if isinstance(self.quantiser, VectorQuantiser):
            z_q, loss, (_, _, codes) = self.quantiser(z)
        elif isinstance(self.quantiser, VectorQuantize):
            z_q, codes, loss = self.quantiser(z)
        else:
            z_q, out = self.quantiser(z)
            loss, codes = out["loss"], out["q"][..., 0]
        return self.decoder(z_q), loss, codes.reshape(z.shape[0], *z.shape[2:])


def make_quantiser(method: str, cfg: Config) -> nn.Module:
    """The method's VQ layer for ``[B, D, h, w]`` latents (feature axis 1)."""
    k, d, backend = cfg.num_codes, cfg.code_dim, cfg.backend
    if method == "plain":
        return VectorQuant(d, k, beta=cfg.plain_beta, dim=1, backend=backend)
    if method == "ema":
        # the codebook follows the EMA of its clusters; the loss keeps plain's commitment weight (1 - beta)
        return VectorQuant(d, k, beta=cfg.plain_beta, ema_update=True, decay=cfg.ema_decay, dim=1, backend=backend)
    if method == "rotation":
        return VectorQuant(d, k, beta=cfg.plain_beta, rotation_trick=True, dim=1, backend=backend)
    if method == "vq-pytorch":
        # vector-quantize-pytorch's defaults: EMA (decay 0.8), rotation trick, commitment weight 1
        return VectorQuantize(dim=d, codebook_size=k, accept_image_fmap=True, backend=backend)
    if method == "vqtorch":
        # alternating optimisation needs beta = 1: no commitment term, the codes chase the encoder instead; the
        # in-place SGD steps the codebook only (the layer's default, as vqtorch)
        lr, momentum = cfg.vqtorch_inplace_lr, cfg.vqtorch_inplace_momentum
        opt = lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)  # noqa: E731
        return VectorQuant(
            d,
            k,
            beta=1.0,
            affine_lr=cfg.vqtorch_affine_lr,
            sync_nu=cfg.vqtorch_sync_nu,
            inplace_optimizer=opt,
            dim=1,
            backend=backend,
        )
    if method in METHODS:
        return VectorQuantiser(
            k, d, beta=cfg.cvq_beta, distance=cfg.cvq_distance, anchor=method.removeprefix("cvq-"), backend=backend
        )
    raise ValueError(f"method must be one of {METHODS}; got {method!r}")


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation.
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: VQAutoEncoder, x: Tensor, num_codes: int, batch_size: int = 512) -> dict[str, Any]:
    """Test statistics of ``model`` on ``x [M, C, H, W]``, in eval mode (no codebook update happens).

    Returns ``usage`` (fraction of the ``num_codes`` codes chosen at least once), ``used_codes``, ``perplexity``
    (exp of the entropy of the code histogram), ``mse`` (mean squared pixel error) and ``counts`` (the int64
    ``[num_codes]`` code histogram).
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    counts = torch.zeros(num_codes, dtype=torch.int64, device=dev)
    sq_err = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(dev)
        recon, _, codes = model(xb)
        counts += torch.bincount(codes.flatten(), minlength=num_codes)
        sq_err += float((recon.double() - xb.double()).square().sum())
    model.train(was_training)
    used = int((counts > 0).sum())
    return {
        "usage": used / num_codes,
        "used_codes": used,
        "perplexity": float(perplexity(counts)),
        "mse": sq_err / x.numel(),
        "counts": counts.cpu(),
    }


@dataclass
class RunResult:
    """One (data set, method) run. ``model`` (the trained autoencoder) and ``recon`` (the figure's test images,
    reconstructed, ``[n, C, H, W]``) are not written to the JSON."""

    dataset: str
    method: str
    seed: int
    quantiser: str
    test: dict[str, Any]
    init_test_mse: float
    train_time_s: float
    curves: dict[str, list] = field(default_factory=dict)
    model: VQAutoEncoder | None = None
    recon: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        test = {**self.test, "counts": self.test["counts"].tolist()}
        return {
            "dataset": self.dataset,
            "method": self.method,
            "seed": self.seed,
            "quantiser": self.quantiser,
            "test": test,
            "init_test_mse": self.init_test_mse,
            "train_time_s": self.train_time_s,
            "curves": self.curves,
        }


def _progress(total: int, desc: str):
    """``tqdm`` on stderr (hidden when stderr is not a terminal), or None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, unit="step", disable=None, leave=False)


def train_one(data: Dataset, method: str, cfg: Config) -> RunResult:
    """Train one autoencoder for ``cfg.steps`` Adam steps on ``recon MSE / var(train) + vq loss``.

    The seed fixes the initial weights and the batch order (a CPU ``torch.Generator``), identical for every
    method; the global generator (CVQ's random anchors) is reseeded too, so a run is reproducible on the CPU.
    Every ``cfg.log_every`` steps the curves get the codebook usage over those steps (the fraction of codes
    chosen at least once in the window) and the mean training MSE.
    """
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    model = VQAutoEncoder(
        data.train.shape[1], cfg.hidden, cfg.code_dim, data.downsample, lambda: make_quantiser(method, cfg)
    ).to(dev)
    init_mse = evaluate(model, data.test, cfg.num_codes)["mse"]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train = data.train.to(dev)
    # dividing by the data variance (as CVQ-VAE does) keeps the weight of the VQ loss comparable across data sets
    inv_var = 1.0 / float(train.var())
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos = torch.randperm(train.shape[0], generator=gen), 0
    curves: dict[str, list] = {"step": [], "usage": [], "train_mse": []}
    window = torch.zeros(cfg.num_codes, dtype=torch.bool, device=dev)
    mse_sum, mse_n = 0.0, 0
    bar = _progress(cfg.steps, f"{data.name}/{method}")
    model.train()
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > order.shape[0]:  # a new epoch; the last partial batch is dropped
            order, pos = torch.randperm(train.shape[0], generator=gen), 0
        xb = train[order[pos : pos + cfg.batch_size].to(dev)]
        pos += cfg.batch_size
        recon, vq_loss, codes = model(xb)
        mse = (recon - xb).square().mean()
        opt.zero_grad(set_to_none=True)
        (mse * inv_var + vq_loss).backward()
        opt.step()
        window[codes.flatten()] = True
        mse_sum, mse_n = mse_sum + mse.item(), mse_n + 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            usage = float(window.float().mean())
            curves["step"].append(step)
            curves["usage"].append(usage)
            curves["train_mse"].append(mse_sum / mse_n)
            if bar is not None:
                bar.set_postfix_str(f"usage {usage:.2f} mse {mse_sum / mse_n:.4f}")
            window.zero_()
            mse_sum, mse_n = 0.0, 0
        if bar is not None:
            bar.update()
    train_time = time.perf_counter() - start
    if bar is not None:
        bar.close()
    test = evaluate(model, data.test, cfg.num_codes)
    with torch.no_grad():
        model.eval()
        recon = model(data.test[data.show].to(dev))[0].clamp(0, 1).cpu().numpy()
    return RunResult(
        data.name, method, cfg.seed, repr(model.quantiser), test, init_mse, train_time, curves, model, recon
    )


def run(
    datasets: Sequence[str], methods: Sequence[str], cfg: Config, seeds: Sequence[int] | None = None
) -> tuple[dict[str, Dataset], list[RunResult]]:
    """Every (seed, data set, method) run, seed by seed (``seeds`` default: ``[cfg.seed]``)."""
    data = {name: load_dataset(name, cfg.split_seed) for name in datasets}
    seeds = [cfg.seed] if seeds is None else list(seeds)
    runs = [train_one(data[d], m, replace(cfg, seed=s)) for s in seeds for d in datasets for m in methods]
    return data, runs


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per (data set, method), in run order: the number of seeds and the mean and sample standard deviation over
    seeds of test usage, test perplexity, test MSE and training time (std 0 for one seed)."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.method), []).append(r)
    out = []
    for (dataset, method), runs in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "method": method, "seeds": [r.seed for r in runs]}
        values = {
            "usage": [r.test["usage"] for r in runs],
            "used_codes": [r.test["used_codes"] for r in runs],
            "perplexity": [r.test["perplexity"] for r in runs],
            "mse": [r.test["mse"] for r in runs],
            "train_time_s": [r.train_time_s for r in runs],
        }
        for key, v in values.items():
            a = np.asarray(v, dtype=np.float64)
            row[key] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}
        out.append(row)
    return out

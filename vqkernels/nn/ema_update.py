"""The EMA codebook update and dead-code expiry by EMA cluster size on a layer (README "Method" §2.9, §2.10), with
their distributed sync (§4). The maths is in :mod:`.ema`; this module wires it to the layer's buffers.

Buffers (registered only when ``ema_update`` or ``threshold_ema_dead_code > 0`` is on, so other layers' state_dict
is unchanged): ``cluster_size [K]`` (the EMA count ``N_k``) and ``embed_avg [K, D']`` (the EMA sum ``m_k``), both in
the space the search runs in (after the projection and norms; the *effective* codes). They start as if every code
had held one row equal to itself (``N_k = 1``, ``m_k = c_k``), so a code that nothing chooses stays where it is
until its EMA size has decayed (a zero start would send such a code to ``c_k / eps`` on the first step).

After a training forward, under no_grad: per-code sums and counts of the rows by the codes they chose (one
``code_stats`` call, one all-reduce under sync), the EMA step, then with ``ema_update`` the codebook becomes the
Laplace-smoothed mean ``m_k / N~_k``, written as effective codes; with ``threshold_ema_dead_code = t > 0`` every
code with ``N_k < t`` becomes a random row of the rows that searched its block (``N_k = t``, ``m_k = t v``).
Separate code blocks (``GroupVectorQuant`` / ``ResidualVectorQuant`` with ``share=False``) are smoothed and
expired per block.

Other writers of the codebook (k-means init, LRU replacement, CVQ anchors) go through
``CodebookMixin._write_effective``, which re-seeds ``m_k = c_k N~_k`` for the codes written, so the next EMA step
starts from the written code instead of reverting it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ema
from .segments import Segment


def register(layer: nn.Module) -> None:
    """``cluster_size [K]`` and ``embed_avg [K, D']`` on ``layer``, started by :func:`restart`."""
    layer.register_buffer("cluster_size", torch.ones(layer.num_codes))
    layer.register_buffer("embed_avg", torch.zeros(layer.num_codes, layer.code_dim))
    restart(layer)


@torch.no_grad()
def restart(layer: nn.Module) -> None:
    """``N_k = 1`` and ``m_k = c_k N~_k`` (= the effective code ``c_k``): as if every code had held one row equal to
    itself (at construction, and when a checkpoint without EMA statistics loads)."""
    layer.cluster_size.fill_(1.0)
    eff = layer.effective_codebook().detach()
    layer.embed_avg.copy_(eff * smoothed_sizes(layer)[:, None])


def enabled(layer: nn.Module) -> bool:
    """Static: the layer tracks EMA statistics (for the update, the expiry or both)."""
    return hasattr(layer, "cluster_size")


def state(layer: nn.Module) -> list[Tensor]:
    """The EMA buffers (empty when off): what a writer that broadcasts the codebook must broadcast with it."""
    return [layer.cluster_size, layer.embed_avg] if enabled(layer) else []


def _blocks(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """``cluster_size`` and ``embed_avg`` viewed per code block: ``[B, K/B]`` and ``[B, K/B, D']``."""
    b = layer._num_code_blocks()
    k = layer.num_codes
    return layer.cluster_size.view(b, k // b), layer.embed_avg.view(b, k // b, -1)


def smoothed_sizes(layer: nn.Module) -> Tensor:
    """``N~_k = (N_k + eps) / (n + K_b eps) n`` per block (``n``, ``K_b``: the block's EMA total and size), ``[K]``:
    the divisor of :func:`vqkernels.nn.ema.smoothed_codebook`."""
    cs, _ = _blocks(layer)
    n = cs.sum(-1, keepdim=True)
    return ((cs + layer.ema_eps) / (n + cs.shape[-1] * layer.ema_eps) * n).reshape(-1)


@torch.no_grad()
def reseed(layer: nn.Module, codes: Tensor) -> None:
    """After ``codes`` were written from outside the EMA: ``m_k = c_k N~_k`` so the smoothed code equals the written
    effective code ``c_k`` (sizes unchanged)."""
    if not (enabled(layer) and layer.ema_update) or codes.numel() == 0:
        return
    eff = layer.effective_codebook().detach().index_select(0, codes)
    size = smoothed_sizes(layer).index_select(0, codes)
    layer.embed_avg.index_copy_(0, codes, (eff * size[:, None]).to(layer.embed_avg.dtype))


@torch.no_grad()
def update(layer: nn.Module, segments: list[Segment], codes: list[Tensor]) -> None:
    """One training step: EMA statistics, the codebook update (``ema_update``) and the expiry
    (``threshold_ema_dead_code``). ``codes[i]``: the codes (in ``[0, K)``) that ``segments[i].rows`` chose.
    Every rank must call it: under sync it holds collectives."""
    sync = layer._sync_active()
    rows = torch.cat([s.rows for s in segments])
    flat = torch.cat([c.reshape(-1) for c in codes])
    sums, counts = ema.batch_stats(rows, flat, layer.num_codes, sync, backend=layer.backend)
    ema.ema_step_(layer.cluster_size, layer.embed_avg, counts, sums, layer.ema_decay)
    if layer.ema_update:
        cs, avg = _blocks(layer)
        new = ema.smoothed_codebook(cs, avg, layer.ema_eps).reshape(layer.num_codes, -1)
        layer._write_effective(torch.arange(layer.num_codes, device=new.device), new, reseed=False)
    if layer.threshold_ema_dead_code > 0:
        _expire(layer, segments, sync)


def _block_rows(layer: nn.Module, segments: list[Segment]) -> Tensor:
    """The rows that searched each code block, ``[B, n, D']``."""
    if layer._num_code_blocks() == 1:
        return torch.cat([s.rows for s in segments])[None]
    return torch.stack([s.rows for s in segments])  # one segment per block, in block order, n rows each


def _expire(layer: nn.Module, segments: list[Segment], sync: bool) -> None:
    t = float(layer.threshold_ema_dead_code)
    cs, avg = _blocks(layer)
    dead = cs < t  # the same on every rank: the sizes come from all-reduced statistics
    if not bool(dead.any()):
        return
    k = layer.num_codes
    embed = layer.effective_codebook().detach().to(avg.dtype).view(cs.shape[0], cs.shape[1], -1).clone()
    ema.expire_codes_(embed, cs, avg, _block_rows(layer, segments), t, reset=t, sync=sync)
    # replaced: dead before, reset to t now (under sync, rank 0's choice, broadcast with the buffers)
    idx = torch.nonzero((dead & (cs >= t)).reshape(-1)).squeeze(1)
    layer._write_effective(idx, embed.view(k, -1).index_select(0, idx), reseed=False)

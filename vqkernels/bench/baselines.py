"""The measured functions: the baselines the backends are compared against, and the table of zero-argument
callables one case times.

Every baseline is plain PyTorch in the input dtype, the way a user would write it without this package. The keys
they compare are the *unfused textbook forms on purpose*: they are the thing being measured against, not a
statement of this package's numerics (those are README "Method" §1 and :mod:`vqkernels.numerics`; the
correctness oracle is :mod:`vqkernels.testing`). With ``x [N, D]``, ``C [K, D]``:

==================  ==============================================================================================
``naive``           the textbook search, materialising N x K distances: l2
                    ``(|x|^2 - 2 x C^T + |c|^2).argmin(1)``, cosine ``(1 - x C^T / (|x| |c|)).argmin(1)``, dot
                    ``(-x C^T).argmin(1)``
``gemm``            ``x @ C.T`` alone (the floor a GEMM-based search is measured against)
``gemm_out``        the same GEMM into a preallocated N x K buffer. On the CPU a fresh N x K output is returned to
                    the OS after every call and faulted in again by the next, which can double the time of
                    ``gemm``; ``gemm_out`` is the pure GEMM
``gemm_argmin``     one GEMM into the argmin key, then argmin: the best unfused search (writes N x K once)
``cdist_chunked``   vqtorch's search (Huh et al., ICML 2023): ``torch.cdist`` over 1024-row chunks + ``topk`` (l2)
``vqp_layer``       vector-quantize-pytorch's ``VectorQuantize`` forward in eval mode on the same codebook (l2, when
                    the package is installed; at seconds per call on the CPU it is left out of the other metrics,
                    whose search it runs the same way)
==================  ==============================================================================================
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..numerics import COS_EPS
from ..ops import quantize

BASELINES = ("naive", "gemm", "gemm_out", "gemm_argmin", "cdist_chunked", "vqp_layer")
"""Every baseline, in the order they run (their times are the denominators of the speed-ups)."""
NK_BASELINES = ("naive", "gemm", "gemm_out", "gemm_argmin", "vqp_layer")
"""The baselines that hold an N x K matrix."""
SEARCH_BASELINES = ("naive", "gemm_argmin", "cdist_chunked", "vqp_layer")
"""The baselines that find the codes (the speed-up over the fastest of them is the headline number)."""
MAX_NK_BYTES = int(os.environ.get("VQK_BENCH_MAX_NK_BYTES", 8 << 30))
"""The ``NK_BASELINES`` are skipped above this many bytes of their N x K matrix (env ``VQK_BENCH_MAX_NK_BYTES``)."""
CDIST_CHUNK = 1024
"""vqtorch's ``cdist_chunk_size``."""


def naive_codes(x: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """The textbook PyTorch nearest code in the input dtype; materialises the N x K distance matrix.

    The unfused textbook distance on purpose (module docstring): l2 ``|x|^2 - 2 x.c + |c|^2``, cosine
    ``1 - x.c / (|x| |c|)`` (no clamping of the norms), dot ``-x.c``.
    """
    dot = x @ codebook.T
    if metric == "l2":
        dist = (x * x).sum(1, keepdim=True) - 2 * dot + (codebook * codebook).sum(1)
    elif metric == "cosine":
        dist = 1 - dot / (x.norm(dim=1, keepdim=True) * codebook.norm(dim=1))
    else:
        dist = -dot
    return dist.argmin(1)


def gemm_argmin_codes(x: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """One GEMM into the argmin key, then argmin: the best unfused search (writes N x K once).

    The key drops the per-row terms of the distance (README "Method" §1), written the unfused way on purpose
    (module docstring): l2 ``addmm(|c|^2, x, C^T, alpha=-2).argmin``, cosine ``(x (C / max(|c|, eps))^T).argmax``,
    dot ``(x C^T).argmax``.
    """
    if metric == "l2":
        return torch.addmm((codebook * codebook).sum(1), x, codebook.T, alpha=-2).argmin(1)
    if metric == "cosine":
        return (x @ (codebook / codebook.norm(dim=1, keepdim=True).clamp_min(COS_EPS)).T).argmax(1)
    return (x @ codebook.T).argmax(1)


def cdist_chunked_codes(x: Tensor, codebook: Tensor) -> Tensor:
    """vqtorch's search: ``torch.cdist(x_chunk, C)`` (the Euclidean distance) over ``CDIST_CHUNK``-row chunks and
    ``topk(1, largest=False)`` (l2 only)."""
    return torch.cat(
        [torch.cdist(xc, codebook).topk(1, dim=1, largest=False).indices.squeeze(1) for xc in x.split(CDIST_CHUNK)]
    )


def vqp_missing() -> str | None:
    """Why vector-quantize-pytorch cannot run (None when it imports)."""
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError as e:
        return f"not installed ({e}); pip install vector-quantize-pytorch"
    return None


def vqp_layer_codes(x: Tensor, codebook: Tensor, metric: str) -> Callable[[], Tensor]:
    """vector-quantize-pytorch's ``VectorQuantize`` (eval, no grad) holding ``codebook`` -> a callable giving codes.

    Its cosine codebook is used as stored (it keeps it l2-normalised itself), so it gets the normalised codes:
    the same argmin as ours.
    """
    from vector_quantize_pytorch import VectorQuantize  # optional: the bench extra

    vqp = (
        VectorQuantize(dim=codebook.shape[1], codebook_size=codebook.shape[0], use_cosine_sim=metric == "cosine")
        .to(device=x.device, dtype=x.dtype)
        .eval()
    )
    with torch.no_grad():
        emb = vqp._codebook.embed  # [heads=1, K, D]
        cb = torch.nn.functional.normalize(codebook, dim=1) if metric == "cosine" else codebook
        emb.copy_(cb.view_as(emb))
        vqp._codebook.initted.fill_(True)

    @torch.no_grad()
    def run() -> Tensor:
        return vqp(x[None])[1][0]

    return run


def skip_reason(name: str, n: int, k: int, element_size: int) -> str | None:
    """Why baseline ``name`` is not run at ``N x K`` (its N x K matrix over ``MAX_NK_BYTES``), else None."""
    nk_bytes = n * k * element_size
    if name in NK_BASELINES and nk_bytes > MAX_NK_BYTES:
        return f"skipped (N x K = {nk_bytes / 2**30:.0f} GiB > VQK_BENCH_MAX_NK_BYTES)"
    return None


def make_callables(x: Tensor, codebook: Tensor, metric: str, backends: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """Name -> zero-argument callable: the baselines that run ``metric`` first (their times are the denominators of
    the speed-ups), then ``quantize(x, codebook, metric=metric, backend=b)`` for every backend ``b`` (search +
    gather + usage counts)."""
    buf: list[Tensor] = []
    vqp: list[Callable[[], Tensor]] = []

    def vqp_layer():
        if not vqp:  # built on first use, like gemm_out's buffer
            vqp.append(vqp_layer_codes(x, codebook, metric))
        return vqp[0]()

    def gemm_out():
        if not buf:  # allocated on first use: a skipped baseline costs no N x K memory
            buf.append(x.new_empty(x.shape[0], codebook.shape[0]))
        return torch.matmul(x, codebook.T, out=buf[0])

    fns: dict[str, Callable[[], Any]] = {
        "naive": lambda: naive_codes(x, codebook, metric),
        "gemm": lambda: x @ codebook.T,
        "gemm_out": gemm_out,
        "gemm_argmin": lambda: gemm_argmin_codes(x, codebook, metric),
    }
    if metric == "l2":
        fns["cdist_chunked"] = lambda: cdist_chunked_codes(x, codebook)
    if metric == "l2" and vqp_missing() is None:
        fns["vqp_layer"] = vqp_layer
    for b in backends:
        fns[b] = functools.partial(quantize, x, codebook, metric=metric, backend=b)
    return fns

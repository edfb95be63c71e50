"""Public functional API (README "Method" §1): ``nearest_code``, ``quantize``, ``code_stats``, ``sample_code``.

Every backend of the table in :mod:`vqkernels.dispatch` implements these four ops as ``torch.library`` ops with
the same schemas. This module validates arguments (errors name the argument), applies the non-finite policy of
:mod:`vqkernels.numerics`, picks the backend and calls its op; and it registers, once per op name and for every
backend in the table, the fake (meta) implementation and the autograd formula of ``quantize``:
``z_q = codebook[codes]``, so ``dL/dcodebook = code_stats(dL/dz_q, codes).sums``.

It also carries the few numerics the layers build on (``COS_EPS``, :func:`acc_dtype`, :func:`distances`,
:func:`paired_distances`, :func:`gumbel_noise`, :func:`draw_seed`) and the argument checks they share, so that
:mod:`vqkernels.nn` needs nothing but this module.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import dispatch, reference  # noqa: F401  (reference: registers the vqkernels::*_ref ops)
from .numerics import (
    COS_EPS,
    FLOAT_DTYPES,
    METRICS,
    acc_dtype,
    check_finite,
    check_seed,
    distances,
    draw_seed,
    gumbel_noise,
    paired_distances,
    seed_to_schema,
)

__all__ = [
    "Quantized",
    "nearest_code",
    "quantize",
    "code_stats",
    "sample_code",
    "METRICS",
    "COS_EPS",
    "acc_dtype",
    "distances",
    "paired_distances",
    "gumbel_noise",
    "draw_seed",
    "check_matrix",
    "check_pair",
    "check_operand",
    "check_finite",
    "resolve_backend",
]


class Quantized(NamedTuple):
    """Result of :func:`quantize`.

    codes  int64 ``[N]``: index of the nearest code (ties -> lowest index).
    z_q    ``[N, D]``, codebook dtype: ``codebook[codes]``; differentiable w.r.t. the codebook.
    dist   fp32 ``[N]`` (fp64 for fp64 inputs): distance to the chosen code under the metric.
    counts int64 ``[K]``: how many rows chose each code.
    """

    codes: Tensor
    z_q: Tensor
    dist: Tensor
    counts: Tensor


# ---------------------------------------------------------------------------------------------------------------
# Fakes: shapes and dtypes only, one per op name, shared by every backend.
# ---------------------------------------------------------------------------------------------------------------
# Every op also takes the batched form (README "Method" §1.6): a leading group axis G on every operand, group g
# searching its own codebook: x [G, N, D], codebook [G, K, D] -> codes [G, N], ..., counts [G, K].
def _fake_nearest_code(x: Tensor, codebook: Tensor, metric: str, exact: bool) -> tuple[Tensor, Tensor]:
    lead = x.shape[:-1]
    return x.new_empty(lead, dtype=torch.int64), x.new_empty(lead, dtype=acc_dtype(x.dtype))


def _fake_quantize(x: Tensor, codebook: Tensor, metric: str, exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    codes, dist = _fake_nearest_code(x, codebook, metric, exact)
    return (
        codes,
        codebook.new_empty(*x.shape[:-1], codebook.shape[-1]),
        dist,
        x.new_empty(codebook.shape[:-1], dtype=torch.int64),
    )


def _fake_code_stats(x: Tensor, codes: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    lead = x.shape[:-2]
    return (
        x.new_empty(*lead, num_codes, x.shape[-1], dtype=acc_dtype(x.dtype)),
        x.new_empty(*lead, num_codes, dtype=torch.int64),
    )


def _fake_sample_code(x: Tensor, codebook: Tensor, metric: str, seed: int) -> Tensor:
    return x.new_empty(codebook.shape[:-1], dtype=torch.int64)


_FAKES = {
    "nearest_code": _fake_nearest_code,
    "quantize": _fake_quantize,
    "code_stats": _fake_code_stats,
    "sample_code": _fake_sample_code,
}


# ---------------------------------------------------------------------------------------------------------------
# Autograd of quantize: only z_q is differentiable, and only w.r.t. the codebook (codes are piecewise constant).
# nearest_code, code_stats and sample_code have no differentiable output.
# ---------------------------------------------------------------------------------------------------------------
def _quantize_autograd(code_stats_op: Callable) -> tuple[Callable, Callable]:
    def setup_context(ctx, inputs, output):
        _, codebook, _, _ = inputs
        codes, _, dist, counts = output
        ctx.save_for_backward(codes)
        ctx.num_codes = codebook.shape[-2]
        ctx.cb_dtype = codebook.dtype
        ctx.mark_non_differentiable(codes, dist, counts)

    def backward(ctx, g_codes, g_zq, g_dist, g_counts):
        (codes,) = ctx.saved_tensors
        g_cb = None
        if ctx.needs_input_grad[1] and g_zq is not None:
            g_cb = code_stats_op(g_zq, codes, ctx.num_codes)[0].to(ctx.cb_dtype)
        return None, g_cb, None, None

    return setup_context, backward


def _register_table() -> None:
    """Fakes and autograd for every op of every backend whose ops are registered here (cpu and cuda share theirs:
    once per op name)."""
    done: set[str] = set()
    for b in dispatch.registered():
        for op in dispatch.OPS:
            name = b.op_name(op)
            if name in done:
                continue
            done.add(name)
            torch.library.register_fake(name)(_FAKES[op])
            if op == "quantize":
                setup_context, backward = _quantize_autograd(b.op("code_stats"))
                torch.library.register_autograd(name, backward, setup_context=setup_context)


_register_table()


# ---------------------------------------------------------------------------------------------------------------
# Argument checks (static metadata only, so they trace under torch.compile).
# ---------------------------------------------------------------------------------------------------------------
def check_matrix(t: object, name: str) -> None:
    """``t`` is a 2-D floating tensor (fp64/fp32/bf16/fp16); errors name ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, D]; got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64/float32/bfloat16/float16; got {t.dtype}")


def check_operand(t: object, name: str, ranks: tuple[int, ...] = (2, 3)) -> None:
    """``t`` is a floating tensor (fp64/fp32/bf16/fp16) of rank 2 ``[rows, D]`` or, batched, 3 ``[G, rows, D]``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() not in ranks:
        raise ValueError(
            f"{name} must be a 2-D tensor [rows, D] or a batched 3-D tensor [G, rows, D]; got shape {tuple(t.shape)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64/float32/bfloat16/float16; got {t.dtype}")


def check_pair(x: object, codebook: object, metric: str, same_dtype: bool = True, batched: bool = True) -> None:
    """x ``[N, D]`` and codebook ``[K >= 1, D]`` (or, with ``batched``, ``[G, N, D]`` and ``[G, K >= 1, D]``):
    floating, same rank, G, D and device (and dtype); a known metric."""
    if not batched:
        check_matrix(x, "x")
        check_matrix(codebook, "codebook")
    check_operand(x, "x")
    check_operand(codebook, "codebook")
    if x.dim() != codebook.dim():
        raise ValueError(
            f"x and codebook must both be 2-D or both batched 3-D; got x {tuple(x.shape)} and codebook "
            f"{tuple(codebook.shape)}"
        )
    if x.dim() == 3 and x.shape[0] != codebook.shape[0]:
        raise ValueError(
            f"batched x and codebook must have the same number of groups G; got x {tuple(x.shape)} and codebook "
            f"{tuple(codebook.shape)}"
        )
    if same_dtype and x.dtype != codebook.dtype:
        raise TypeError(f"x and codebook must have the same dtype; got {x.dtype} and {codebook.dtype}")
    if x.device != codebook.device:
        raise ValueError(f"x and codebook must be on the same device; got {x.device} and {codebook.device}")
    if codebook.shape[-2] == 0:
        raise ValueError("codebook must hold at least one code; got K = 0")
    if x.shape[-1] != codebook.shape[-1]:
        raise ValueError(
            f"x and codebook must have the same D; got x {tuple(x.shape)} and codebook {tuple(codebook.shape)}"
        )
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ``"auto"`` (or the name given) resolves to for ``device`` tensors; raises when it cannot run."""
    return dispatch.select(backend, device)


def _backend(backend: str, device: torch.device, *finite: tuple[Tensor, str]) -> dispatch.Backend:
    """The selected backend, after the non-finite policy (:mod:`vqkernels.numerics`): backends whose kernels do
    not check get the check here, in eager mode only (on a GPU it is a host sync)."""
    b = dispatch.BACKENDS[dispatch.select(backend, device)]
    if not b.checks_finite and not torch.compiler.is_compiling() and not any(is_fake(t) for t, _ in finite):
        for t, name in finite:
            check_finite(t, name)
    return b


def _check_search(x: object, codebook: object, metric: str, exact: object) -> None:
    check_pair(x, codebook, metric)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool; got {type(exact).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------
def nearest_code(
    x: Tensor, codebook: Tensor, *, metric: str = "l2", exact: bool = False, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Index of, and distance to, the nearest code of every row; never materialises N x K.

    Args:
        x: ``[N, D]`` input vectors (fp64/fp32/bf16/fp16; any strides; finite).
        codebook: ``[K, D]`` codes, same dtype and device as ``x`` (finite).
        metric: ``"l2"`` (squared Euclidean), ``"cosine"`` (``1 - cos``) or ``"dot"`` (``-x.c``).
        exact: re-score the candidates within the rounding bound in fp64 so the answer equals the fp64 argmin.
        backend: ``"auto"`` or a name of ``python -m vqkernels.info``'s table (``cpu``, ``cuda``, ``triton``,
            ``torch``).

    Returns:
        ``(codes, dist)``: int64 ``[N]`` (ties -> lowest index) and fp32 ``[N]`` (fp64 for fp64 inputs).

    Batched: ``x [G, N, D]`` and ``codebook [G, K, D]`` search G codebooks in one launch (row ``x[g, i]`` only
    among ``codebook[g]``) -> ``codes [G, N]`` in ``[0, K)``, ``dist [G, N]``; same precision, tie and exact rules.

    Example:
        >>> x, cb = torch.randn(1000, 64), torch.randn(512, 64)
        >>> codes, dist = nearest_code(x, cb)
    """
    _check_search(x, codebook, metric, exact)
    b = _backend(backend, x.device, (codebook, "codebook"), (x, "x"))
    return b.op("nearest_code")(x, codebook, metric, exact)


def quantize(
    x: Tensor, codebook: Tensor, *, metric: str = "l2", exact: bool = False, backend: str = "auto"
) -> Quantized:
    """Fused search + gather + usage histogram.

    Same arguments as :func:`nearest_code`. Returns :class:`Quantized` ``(codes [N], z_q [N, D], dist [N],
    counts [K])``; ``z_q`` is differentiable w.r.t. ``codebook`` (its backward is :func:`code_stats`). Batched
    (``x [G, N, D]``, ``codebook [G, K, D]``): ``codes [G, N]``, ``z_q [G, N, D]``, ``dist [G, N]``,
    ``counts [G, K]``.

    Example:
        >>> q = quantize(torch.randn(1000, 64), torch.randn(512, 64, requires_grad=True))
        >>> q.z_q.sum().backward()
    """
    _check_search(x, codebook, metric, exact)
    b = _backend(backend, x.device, (codebook, "codebook"), (x, "x"))
    return Quantized(*b.op("quantize")(x, codebook, metric, exact))


def code_stats(x: Tensor, codes: Tensor, num_codes: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-code sum of the rows assigned to it, and per-code counts.

    Args:
        x: ``[N, D]`` rows (fp64/fp32/bf16/fp16; any values: the sums are what they are).
        codes: int64 ``[N]`` in ``[0, num_codes)``.
        num_codes: K.

    Returns:
        ``(sums, counts)``: fp32 ``[K, D]`` (fp64 for fp64 ``x``) and int64 ``[K]``. Batched (``x [G, N, D]``,
        ``codes [G, N]``, each group's codes in ``[0, num_codes)``): ``sums [G, K, D]``, ``counts [G, K]``.
    """
    check_operand(x, "x")
    if not isinstance(codes, Tensor):
        raise TypeError(f"codes must be a torch.Tensor; got {type(codes).__name__}")
    if codes.dtype != torch.int64:
        raise TypeError(f"codes must be int64; got {codes.dtype}")
    if tuple(codes.shape) != tuple(x.shape[:-1]):
        want = "[N]" if x.dim() == 2 else "[G, N]"
        raise ValueError(f"codes must have shape {want} = {list(x.shape[:-1])}; got {tuple(codes.shape)}")
    if codes.device != x.device:
        raise ValueError(f"x and codes must be on the same device; got {x.device} and {codes.device}")
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int; got {num_codes!r}")
    return _backend(backend, x.device).op("code_stats")(x, codes, num_codes)


def sample_code(
    x: Tensor, codebook: Tensor, *, metric: str = "l2", seed: int | None = None, backend: str = "auto"
) -> Tensor:
    """For every code, a row of ``x`` drawn with ``P(i) ~ exp(-d(x_i, c_k))``; never materialises N x K.

    Gumbel-max turns the draw into a search: ``i_k = argmin_i (d(x_i, c_k) - g_ik)`` with ``g_ik ~ Gumbel(0, 1)``
    from a counter-based generator keyed on ``(seed, k, i)`` (README "Method" §1), added in the search's
    epilogue. The noise depends on nothing but the seed and the two indices, so a seed gives the same rows on
    every backend, block size and split (up to the rounding of the distances on near-ties). For cosine the
    weights are ``exp(cos(x_i, c_k))`` (the distance's constant 1 cancels), for dot ``exp(x_i . c_k)``. This is
    CVQ-VAE's "probrandom" anchor sampling (Zheng & Vedaldi 2023, §3.2).

    Args:
        x: ``[N >= 1, D]`` rows to draw from (finite).
        codebook: ``[K, D]`` codes, same dtype and device as ``x`` (finite).
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``.
        seed: an int in ``[0, 2^64)``; None draws one from torch's default CPU generator.
        backend: as for :func:`nearest_code`.

    Returns:
        int64 ``[K]``: the row drawn for each code. Batched (``x [G, N, D]``, ``codebook [G, K, D]``): int64
        ``[G, K]``, rows of group g drawn for its codes, with code k of group g keyed as code ``g * K + k`` (the
        groups draw independent noise).

    Example:
        >>> rows = sample_code(torch.randn(1000, 64), torch.randn(512, 64), seed=0)
    """
    check_pair(x, codebook, metric)
    seed = draw_seed() if seed is None else check_seed(seed)
    if x.shape[-2] == 0:
        raise ValueError("x must hold at least one row to sample from; got N = 0")
    b = _backend(backend, x.device, (codebook, "codebook"), (x, "x"))
    return b.op("sample_code")(x, codebook, metric, seed_to_schema(seed))

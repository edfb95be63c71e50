"""Public functional API (METHODS §1): ``nearest_code``, ``quantize``, ``code_stats``.

Every backend's implementation is a ``torch.library`` custom op with the same schema:

- ``vqkernels::nearest_code`` / ``quantize`` / ``code_stats``: C++ (csrc/), CPU today, CUDA later;
- ``vqkernels::nearest_code_ref`` / ``quantize_ref`` / ``code_stats_ref``: the pure-PyTorch reference;
- ``vqkernels::nearest_code_triton`` / ``quantize_triton`` / ``code_stats_triton``: Triton (``triton_op``).

They share one fake (meta) implementation per op and one autograd formula: ``z_q = codebook[codes]`` so
``dL/dcodebook = code_stats(dL/dz_q, codes).sums``. The wrappers below validate arguments (naming the argument),
pick a backend (:mod:`vqkernels.dispatch`) and call its op.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _ext, reference
from . import triton as _triton
from .dispatch import select

__all__ = ["Quantized", "nearest_code", "quantize", "code_stats", "METRICS"]

METRICS = ("l2", "cosine", "dot")
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


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
# Reference ops (always registered).
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("vqkernels::nearest_code_ref", mutates_args=())
def _nearest_code_ref(x: Tensor, codebook: Tensor, metric: str, exact: bool) -> tuple[Tensor, Tensor]:
    return reference.search(x, codebook, metric, exact)


@torch.library.custom_op("vqkernels::quantize_ref", mutates_args=())
def _quantize_ref(x: Tensor, codebook: Tensor, metric: str, exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    codes, z_q, dist, counts = reference.quantize(x, codebook, metric, exact)
    return codes, z_q.clone(), dist, counts  # outputs may not alias inputs (z_q of an N=K identity gather)


@torch.library.custom_op("vqkernels::code_stats_ref", mutates_args=())
def _code_stats_ref(x: Tensor, codes: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    return reference.code_stats(x, codes, num_codes)


# Op names per backend; every backend implements the same three schemas.
_OP_NAMES: dict[str, tuple[str, str, str]] = {"torch": ("nearest_code_ref", "quantize_ref", "code_stats_ref")}
if _ext.available():
    _OP_NAMES["cpu"] = ("nearest_code", "quantize", "code_stats")
if _ext.with_cuda():  # the same C++ ops, dispatched to csrc/cuda by the tensors' device
    _OP_NAMES["cuda"] = ("nearest_code", "quantize", "code_stats")
if _triton.load():  # registers vqkernels::*_triton (triton_op) when triton can run here
    _OP_NAMES["triton"] = ("nearest_code_triton", "quantize_triton", "code_stats_triton")
_OPS: dict[str, tuple] = {
    b: tuple(getattr(torch.ops.vqkernels, n).default for n in names) for b, names in _OP_NAMES.items()
}


# ---------------------------------------------------------------------------------------------------------------
# Fakes: shapes and dtypes only, shared by every backend.
# ---------------------------------------------------------------------------------------------------------------
def _fake_nearest_code(x, codebook, metric, exact):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=reference.acc_dtype(x.dtype))


def _fake_quantize(x, codebook, metric, exact):
    codes, dist = _fake_nearest_code(x, codebook, metric, exact)
    return codes, codebook.new_empty(x.shape[0], codebook.shape[1]), dist, x.new_empty(
        codebook.shape[0], dtype=torch.int64)


def _fake_code_stats(x, codes, num_codes):
    return (x.new_empty(num_codes, x.shape[1], dtype=reference.acc_dtype(x.dtype)),
            x.new_empty(num_codes, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------------
# Autograd of quantize: only z_q is differentiable, and only w.r.t. the codebook (codes are piecewise constant).
# ---------------------------------------------------------------------------------------------------------------
def _make_quantize_autograd(code_stats_op):
    def setup_context(ctx, inputs, output):
        _, codebook, _, _ = inputs
        codes, _, dist, counts = output
        ctx.save_for_backward(codes)
        ctx.num_codes = codebook.shape[0]
        ctx.cb_dtype = codebook.dtype
        ctx.mark_non_differentiable(codes, dist, counts)

    def backward(ctx, g_codes, g_zq, g_dist, g_counts):
        (codes,) = ctx.saved_tensors
        g_cb = None
        if ctx.needs_input_grad[1] and g_zq is not None:
            g_cb = code_stats_op(g_zq, codes, ctx.num_codes)[0].to(ctx.cb_dtype)
        return None, g_cb, None, None

    return setup_context, backward


def _register(backend: str) -> None:
    if any(_OP_NAMES[b] == _OP_NAMES[backend] for b in list(_OP_NAMES)[:list(_OP_NAMES).index(backend)]):
        return  # an op shared with an earlier backend (cpu / cuda) is registered once
    nc, qz, cs = (f"vqkernels::{n}" for n in _OP_NAMES[backend])
    torch.library.register_fake(nc)(_fake_nearest_code)
    torch.library.register_fake(qz)(_fake_quantize)
    torch.library.register_fake(cs)(_fake_code_stats)
    setup_context, backward = _make_quantize_autograd(_OPS[backend][2])
    torch.library.register_autograd(qz, backward, setup_context=setup_context)


for _name in _OP_NAMES:
    _register(_name)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks (static metadata only, so they trace under torch.compile).
# ---------------------------------------------------------------------------------------------------------------
def _check_matrix(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, D]; got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64/float32/bfloat16/float16; got {t.dtype}")


def _check_pair(x, codebook, metric: str, same_dtype: bool = True) -> None:
    """x ``[N, D]`` and codebook ``[K >= 1, D]``: floating, same D and device (and dtype); a known metric."""
    _check_matrix(x, "x")
    _check_matrix(codebook, "codebook")
    if same_dtype and x.dtype != codebook.dtype:
        raise TypeError(f"x and codebook must have the same dtype; got {x.dtype} and {codebook.dtype}")
    if x.device != codebook.device:
        raise ValueError(f"x and codebook must be on the same device; got {x.device} and {codebook.device}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code; got K = 0")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x and codebook must have the same D; got x {tuple(x.shape)} and codebook "
                         f"{tuple(codebook.shape)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")


def _check_search(x, codebook, metric: str, exact) -> None:
    _check_pair(x, codebook, metric)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool; got {type(exact).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------
def nearest_code(x: Tensor, codebook: Tensor, *, metric: str = "l2", exact: bool = False,
                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Index of, and distance to, the nearest code of every row; never materialises N x K.

    Args:
        x: ``[N, D]`` input vectors (fp64/fp32/bf16/fp16; any strides).
        codebook: ``[K, D]`` codes, same dtype and device as ``x``.
        metric: ``"l2"`` (squared Euclidean), ``"cosine"`` (``1 - cos``) or ``"dot"`` (``-x.c``).
        exact: re-score the candidates within the rounding bound in fp64 so the answer equals the fp64 argmin.
        backend: ``"auto"``, ``"cpu"`` or ``"torch"`` (see ``python -m vqkernels.info``).

    Returns:
        ``(codes, dist)``: int64 ``[N]`` (ties -> lowest index) and fp32 ``[N]`` (fp64 for fp64 inputs).

    Example:
        >>> x, cb = torch.randn(1000, 64), torch.randn(512, 64)
        >>> codes, dist = nearest_code(x, cb)
    """
    _check_search(x, codebook, metric, exact)
    return _OPS[select(backend, x.device)][0](x, codebook, metric, exact)


def quantize(x: Tensor, codebook: Tensor, *, metric: str = "l2", exact: bool = False,
             backend: str = "auto") -> Quantized:
    """Fused search + gather + usage histogram.

    Same arguments as :func:`nearest_code`. Returns :class:`Quantized` ``(codes [N], z_q [N, D], dist [N],
    counts [K])``; ``z_q`` is differentiable w.r.t. ``codebook`` (its backward is :func:`code_stats`).

    Example:
        >>> q = quantize(torch.randn(1000, 64), torch.randn(512, 64, requires_grad=True))
        >>> q.z_q.sum().backward()
    """
    _check_search(x, codebook, metric, exact)
    return Quantized(*_OPS[select(backend, x.device)][1](x, codebook, metric, exact))


def code_stats(x: Tensor, codes: Tensor, num_codes: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-code sum of the rows assigned to it, and per-code counts.

    Args:
        x: ``[N, D]`` rows (fp64/fp32/bf16/fp16).
        codes: int64 ``[N]`` in ``[0, num_codes)``.
        num_codes: K.

    Returns:
        ``(sums, counts)``: fp32 ``[K, D]`` (fp64 for fp64 ``x``) and int64 ``[K]``.
    """
    _check_matrix(x, "x")
    if not isinstance(codes, Tensor):
        raise TypeError(f"codes must be a torch.Tensor; got {type(codes).__name__}")
    if codes.dtype != torch.int64:
        raise TypeError(f"codes must be int64; got {codes.dtype}")
    if codes.dim() != 1 or codes.shape[0] != x.shape[0]:
        raise ValueError(f"codes must have shape [N] = [{x.shape[0]}]; got {tuple(codes.shape)}")
    if codes.device != x.device:
        raise ValueError(f"x and codes must be on the same device; got {x.device} and {codes.device}")
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int; got {num_codes!r}")
    return _OPS[select(backend, x.device)][2](x, codes, num_codes)

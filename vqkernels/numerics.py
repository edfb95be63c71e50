"""The numerics every backend shares, in one place: README "Method" §1 states the formulas, this module holds them
for Python, ``csrc/numerics.h`` for the C++ CPU and CUDA sources, and the tests check that the two agree (the
Triton kernels take these values as launch arguments, or repeat a literal that a test compares).

- **Accumulation**: distances, keys and sums in fp32, fp64 for fp64 inputs (:func:`acc_dtype`).
- **Key terms**: the argmin key of code k is ``w_k (x . c_k) + o_k`` with ``s_k = sum_d c_kd^2`` in fp64 from the
  stored values and, rounded once to the accumulation dtype, l2 ``(-2, s_k)``, cosine
  ``(-1 / max(sqrt(s_k), eps), 0)``, dot ``(-1, 0)`` (:func:`key_terms`). A sum of squares, not a rounded norm
  squared: equidistant codes of exactly representable data get equal keys, so the tie goes to the lower index.
- **Exact mode**: every code whose fast key may round below the true minimum lies within ``2 E`` of the fast
  minimum ``key0``, with ``E = gamma * scale(x) + gamma * |key0|`` and ``gamma = EXACT_SAFETY * (D + 4) * u``
  (:func:`exact_gamma`, :func:`key_error_bound`); those candidates are re-scored in fp64, at most
  ``EXACT_CANDIDATES`` of them, and a row with more inside the bound is re-scanned whole.
- **Non-finite inputs**: the search ops (``nearest_code``, ``quantize``, ``sample_code``) refuse NaN/Inf in ``x``
  and ``codebook`` with a ``ValueError`` naming the argument (:func:`check_finite`); ``code_stats`` sums whatever it
  is given. A backend whose kernels read every input element anyway checks there (the C++ CPU op, the reference);
  for the others (Triton, CUDA) :mod:`vqkernels.ops` checks before the launch, in eager mode only: on a GPU the
  check is a host sync, which a compiled graph must not contain.
- **Gumbel noise** of the sampling op: ``g = -log(-log(u))`` with ``u`` from the top 23 bits of
  ``mix(mix(k ^ s_code) ^ mix(i ^ s_row))``, ``mix`` a 32-bit integer hash (:func:`gumbel_noise`): a function of
  the seed and the two indices only, so every backend, block size and split draws the same noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

COS_EPS = 1e-12
"""The cosine distance clamps both norms at this (``1 - x.c / (max(|x|, eps) max(|c|, eps))``)."""

EXACT_SAFETY = 4.0
"""Multiplies ``(D + 4) u`` in the bound on a fast key's rounding error. The classic bound of a D-term dot product
is ``gamma_D = D u / (1 - D u)`` for any summation order; ``+ 4`` covers the product by ``w``, the addition of
``o`` and the roundings of ``w`` and ``o`` themselves. One factor 2: tensor cores may truncate instead of round
when they align addends (an error of up to 2u per addition). The other: margin, so that a bound that is tight in
theory is never the reason an answer differs from fp64."""

EXACT_CANDIDATES = 4
"""Candidates per row exact mode keeps and re-scores in fp64 before it falls back to re-scanning the row."""

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
METRICS = ("l2", "cosine", "dot")
_METRIC_CODE = {"l2": 0, "cosine": 1, "dot": 2}  # the ``metric`` ints of the kernels (and of csrc/numerics.h)

CHUNK_ELEMS = 1 << 22
"""Elements per block of the PyTorch paths (reference, brute force): 16 MiB of fp32, never N x K."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / distance dtype: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u`` of an accumulation dtype (fp64: 2^-53; fp32 and everything accumulated in it: 2^-24)."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def metric_code(metric: str) -> int:
    """The int the kernels take for a metric (0 l2, 1 cosine, 2 dot)."""
    return _METRIC_CODE[metric]


def check_finite(t: Tensor, name: str) -> None:
    """ValueError naming ``name`` when ``t`` holds NaN or Inf (a sync on GPUs)."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf)")


# ---------------------------------------------------------------------------------------------------------------
# Key terms.
# ---------------------------------------------------------------------------------------------------------------
def sum_squares(codebook: Tensor) -> Tensor:
    """``s_k = sum_d c_kd^2`` in fp64 from the values as stored (``[K]``), in chunks: never an fp64 copy of the
    whole codebook."""
    k, d = codebook.shape
    sq = torch.empty(k, dtype=torch.float64, device=codebook.device)
    step = max(1, CHUNK_ELEMS // max(d, 1))
    for k0 in range(0, k, step):
        c = codebook[k0 : k0 + step].to(torch.float64)
        sq[k0 : k0 + step] = (c * c).sum(1)
    return sq


def key_terms(codebook: Tensor, metric: str, sq: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(w [K], o [K], cnorm64 [K])`` of the argmin key ``w (x . c) + o`` (module docstring), w and o in the
    accumulation dtype. ``sq``: the fp64 sums of squares when a kernel computed them (:func:`sum_squares`)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    acc = acc_dtype(codebook.dtype)
    sq = sum_squares(codebook) if sq is None else sq
    cnorm = sq.sqrt()
    if metric == "l2":
        w, o = torch.full_like(sq, -2.0), sq
    elif metric == "cosine":
        w, o = -1.0 / cnorm.clamp_min(COS_EPS), torch.zeros_like(sq)
    else:
        w, o = torch.full_like(sq, -1.0), torch.zeros_like(sq)
    return w.to(acc), o.to(acc), cnorm


def keys(x: Tensor, codebook: Tensor, metric: str, terms: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Dense argmin keys ``w_k (x_i . c_k) + o_k`` ``[N, K]`` in the accumulation dtype: what the fast search
    compares (the reference computes exactly this, block by block). ``terms``: ``(w, o)`` of :func:`key_terms`
    when the caller has them. For bounded blocks only: the ops never build N x K."""
    acc = acc_dtype(x.dtype)
    w, o = key_terms(codebook, metric)[:2] if terms is None else terms
    return torch.addcmul(o, x.to(acc) @ codebook.to(acc).T, w)


def distances(x: Tensor, codebook: Tensor, metric: str, *, direct: bool = False) -> Tensor:
    """Dense distances ``d(x_i, c_k)`` ``[N, K]`` (README "Method" §1), computed in the accumulation dtype of ``x``
    (fp64 inputs give fp64: the oracle's brute force):

    - l2: ``|x|^2 - 2 x.c + |c|^2`` clamped at 0, or with ``direct=True`` ``sum_d (x_d - c_d)^2`` (exact mode's
      cancellation-free form, in row blocks of at most ``CHUNK_ELEMS`` elements of the ``[rows, K, D]``
      difference);
    - cosine: ``1 - x.c / (max(|x|, eps) max(|c|, eps))``;
    - dot: ``-x.c``.

    For bounded blocks only (k-means++ seeding, the contrastive loss, the oracle): the ops never build N x K.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    acc = acc_dtype(x.dtype)
    xa, ca = x.to(acc), codebook.to(acc)
    if metric == "l2" and direct:
        out = torch.empty(xa.shape[0], ca.shape[0], dtype=acc, device=xa.device)
        step = max(1, CHUNK_ELEMS // max(1, ca.shape[0] * ca.shape[1]))
        for r0 in range(0, xa.shape[0], step):
            out[r0 : r0 + step] = ((xa[r0 : r0 + step, None, :] - ca[None, :, :]) ** 2).sum(-1)
        return out
    dot = xa @ ca.T
    if metric == "l2":
        return ((xa * xa).sum(1, keepdim=True) - 2 * dot + (ca * ca).sum(1)).clamp_min_(0)
    if metric == "dot":
        return dot.neg_()
    xn = xa.norm(dim=1, keepdim=True).clamp_min(COS_EPS)
    cn = ca.norm(dim=1).clamp_min(COS_EPS)
    return 1 - dot / (xn * cn)


def paired_distances(
    x: Tensor, c: Tensor, metric: str, xnorm: Tensor | None = None, cnorm: Tensor | None = None
) -> Tensor:
    """fp64 distance between paired rows ``x [P, D]`` and ``c [P, D]`` from the values as stored (``[P]``): l2 as
    ``sum_d (x_d - c_d)^2`` (no cancellation), cosine ``1 - x.c / (max(|x|, eps) max(|c|, eps))``, dot ``-x.c``.
    Exact mode's re-score; ``xnorm`` / ``cnorm``: fp64 norms when the caller has them."""
    x = x.to(torch.float64)
    c = c.to(torch.float64)
    if metric == "l2":
        return ((x - c) ** 2).sum(1)
    dot = (x * c).sum(1)
    if metric == "dot":
        return -dot
    xn = x.norm(dim=1) if xnorm is None else xnorm
    cn = c.norm(dim=1) if cnorm is None else cnorm
    return 1.0 - dot / (xn.clamp_min(COS_EPS) * cn.clamp_min(COS_EPS))


# ---------------------------------------------------------------------------------------------------------------
# Exact mode.
# ---------------------------------------------------------------------------------------------------------------
def exact_gamma(d: int, dtype: torch.dtype) -> float:
    """``EXACT_SAFETY * (D + 4) * u`` for inputs of ``dtype`` (u of their accumulation dtype)."""
    return EXACT_SAFETY * (d + 4) * unit_roundoff(acc_dtype(dtype))


def key_error_bound(metric: str, xnorm: Tensor, cmax: float | Tensor, key0: Tensor, gamma: float) -> Tensor:
    """Bound ``E`` (fp64, per row) on the rounding error of a fast key: ``gamma * (2 |x| cmax + cmax^2)`` for l2,
    ``gamma * |x|`` for cosine (its keys carry ``1 / |c|``), ``gamma * |x| cmax`` for dot, plus ``gamma * |key0|``.
    Every code within ``2 E`` of the fast minimum ``key0`` may be the true minimum."""
    if metric == "l2":
        e = gamma * (2.0 * xnorm * cmax + cmax * cmax)
    elif metric == "cosine":
        e = gamma * xnorm
    else:
        e = gamma * xnorm * cmax
    return e + gamma * key0.abs()


# ---------------------------------------------------------------------------------------------------------------
# Counter-based Gumbel noise (the sampling op's stream; csrc/numerics.h and the Triton kernels implement the same).
# ---------------------------------------------------------------------------------------------------------------
def _i32(c: int) -> int:
    """A 32-bit pattern as the int32 value torch stores."""
    c &= 0xFFFFFFFF
    return c - (1 << 32) if c >= (1 << 31) else c


def _lsr(v: Tensor, s: int) -> Tensor:
    """Logical right shift of int32 bit patterns (``>>`` on int32 is arithmetic)."""
    return (v >> s) & ((1 << (32 - s)) - 1)


# 3-round xorshift-multiply mixer (the public-domain "triple32" of C. Wellons' hash-prospector): a bijection on
# 32-bit words with near-ideal avalanche. It runs on int32 bit patterns; products wrap modulo 2^32 as on every
# torch backend (two's complement), which is exactly the unsigned arithmetic of the C original.
MIX_ROUNDS = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))
MIX_LAST_SHIFT = 14


def mix32(v: Tensor) -> Tensor:
    """The mixer on int32 tensors (bit patterns)."""
    for shift, mult in MIX_ROUNDS:
        v = v ^ _lsr(v, shift)
        v = v * _i32(mult)
    return v ^ _lsr(v, MIX_LAST_SHIFT)


def index_keys(idx: Tensor, salt: int) -> Tensor:
    """int32 key per index: ``mix(idx ^ salt)``."""
    return mix32(idx.to(torch.int32) ^ _i32(salt))


def gumbel_from_keys(code_keys: Tensor, row_keys: Tensor, dtype: torch.dtype) -> Tensor:
    """Gumbel(0, 1) noise ``[codes, rows]`` for the pairs of per-code and per-row keys: ``mix(q_k ^ r_i)``."""
    h = mix32(code_keys[:, None] ^ row_keys[None, :])
    # top 23 bits -> u = (m + 1/2) 2^-23 in (0, 1), exact in fp32 (so u < 1 and -log(u) > 0); the Gumbel tails are
    # cut where their mass is ~6e-8
    u = (_lsr(h, 9).to(dtype) + 0.5) * (2.0**-23)
    return u.log_().neg_().log_().neg_()


def gumbel_noise(seed: tuple[int, int], rows: Tensor, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Counter-based Gumbel(0, 1) noise ``g[k, i]`` keyed on ``(seed, codes[k], rows[i])``.

    Args:
        seed: ``(s_code, s_row)``, two ints in ``[0, 2^32)``.
        rows, codes: int64 index vectors (< 2^31), on one device.
        dtype: fp32 or fp64.
    Returns:
        ``[len(codes), len(rows)]`` noise (codes major).
    """
    s_code, s_row = seed
    return gumbel_from_keys(index_keys(codes, s_code), index_keys(rows, s_row), dtype)


def check_seed(seed: object) -> int:
    """``seed`` as given, after checking that it is an int in ``[0, 2^64)``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an int in [0, 2^64); got {seed!r}")
    return seed


def split_seed(seed: int) -> tuple[int, int]:
    """A 64-bit seed as ``(s_code, s_row)``: its low and high 32 bits."""
    seed = check_seed(seed)
    return seed & 0xFFFFFFFF, seed >> 32


def join_seed(s_code: int, s_row: int) -> int:
    """Inverse of :func:`split_seed`."""
    return (s_code & 0xFFFFFFFF) | ((s_row & 0xFFFFFFFF) << 32)


def seed_to_schema(seed: int) -> int:
    """The 64 bits of a seed in ``[0, 2^64)`` as the signed int64 an op schema's ``int`` carries."""
    seed = check_seed(seed)
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def seed_from_schema(value: int) -> tuple[int, int]:
    """``(s_code, s_row)`` from the signed int64 of :func:`seed_to_schema`."""
    return split_seed(value & 0xFFFFFFFFFFFFFFFF)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 64-bit seed from two 32-bit draws of ``generator`` (torch's default CPU generator when None), on the
    generator's device: ``s_code`` first, then ``s_row``."""
    dev = generator.device if generator is not None else torch.device("cpu")
    s = torch.randint(0, 1 << 32, (2,), generator=generator, device=dev, dtype=torch.int64).tolist()
    return join_seed(s[0], s[1])

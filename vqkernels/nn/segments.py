"""What a layer's search hands to its codebook updates.

Rows handed to the updates come as *segments* ``(rows [n, D'], lo, hi)``: the rows that searched codes
``lo..hi-1``. A plain layer has one segment; a GroupVectorQuant with separate code blocks has one per group.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Segment(NamedTuple):
    rows: Tensor  # [n, D'] detached inputs that searched codes lo..hi-1
    lo: int
    hi: int


class SearchResult(NamedTuple):
    codes: Tensor  # int64 [N]
    z_q: Tensor  # [N, D'] in the input dtype, differentiable w.r.t. the codebook
    dist: Tensor  # fp32 [N] (squared Euclidean for l2)
    counts: Tensor  # int64 [K_block]

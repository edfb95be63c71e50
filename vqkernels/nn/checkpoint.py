"""Loading the original libraries' checkpoints into our layers (README "VQ layers": same state_dict keys).

vqtorch and CVQ-VAE checkpoints hold the codebook, affine parameters and their own buffers under the names our
layers use. Two differences are bridged here: vqtorch kept its LRU counters as a float buffer ``_counts`` (ours are
int64 ``lru_counters``), and our bookkeeping buffers that the originals lack keep their current values instead of
failing a strict load (they restart, as they would in the original code).
"""

from __future__ import annotations

import torch
from torch import nn

# Buffers a vqtorch / CVQ-VAE checkpoint may lack.
OPTIONAL_STATE = (
    "lru_counters",
    "embed_prob",
    "anchor_initialized",
    "feature_pool",
    "pool_filled",
    "affine_transform.running_statistics_initialized",
)


def adapt_state_dict(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Rewrite, in place, the part of ``state_dict`` under ``prefix`` that ``module`` is about to load."""
    legacy = prefix + "_counts"  # vqtorch's LRU counters (float)
    if legacy in state_dict and hasattr(module, "lru_counters"):
        state_dict[prefix + "lru_counters"] = state_dict.pop(legacy).round().to(torch.int64)
    own = dict(module.named_buffers())
    for name in OPTIONAL_STATE:
        if name in own and prefix + name not in state_dict:
            state_dict[prefix + name] = own[name].detach().clone()

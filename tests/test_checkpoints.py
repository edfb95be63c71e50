"""Checkpoints keep loading: the state_dict layout of every layer configuration is a contract (vqtorch / CVQ-VAE
names, and what earlier vqkernels versions saved), and a saved state round-trips strictly into a fresh layer."""

import pytest
import torch

from vqkernels.nn import GroupVectorQuant, ResidualVectorQuant, VectorQuant, VectorQuantiser

CONFIGS = {
    "vq_full": (
        lambda: VectorQuant(
            8,
            16,
            dim=-1,
            kmeans_init=True,
            kmeans_iters=2,
            replace_freq=2,
            affine_lr=2.0,
            affine_groups=2,
            anchor="random",
            sync_nu=0.1,
        ),
        [
            "affine_transform.bias",
            "affine_transform.scale",
            "anchor_initialized",
            "codebook.weight",
            "data_initialized",
            "embed_prob",
            "feature_pool",
            "lru_counters",
            "pool_filled",
        ],
    ),
    "vq_running": (
        lambda: VectorQuant(8, 16, dim=-1, affine_mode="running", anchor="closest"),
        [
            "affine_transform.running_c_mean",
            "affine_transform.running_c_var",
            "affine_transform.running_statistics_initialized",
            "affine_transform.running_ze_mean",
            "affine_transform.running_ze_var",
            "anchor_initialized",
            "codebook.weight",
            "embed_prob",
        ],
    ),
    "group": (
        lambda: GroupVectorQuant(
            8, 16, groups=2, share=False, dim=-1, replace_freq=3, kmeans_init=True, kmeans_iters=2
        ),
        ["codebook.weight", "data_initialized", "lru_counters"],
    ),
    "residual": (
        lambda: ResidualVectorQuant(8, 16, groups=2, dim=-1, anchor="probrandom"),
        ["anchor_initialized", "codebook.weight", "embed_prob"],
    ),
    "cvq": (
        lambda: VectorQuantiser(16, 8, anchor="random"),
        ["anchor_initialized", "embed_prob", "embedding.weight", "feature_pool", "pool_filled"],
    ),
}


def _batch(name: str) -> torch.Tensor:
    return torch.randn(2, 8, 4, 4) if name == "cvq" else torch.randn(40, 8)


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_layout_is_stable_and_round_trips(name):
    make, keys = CONFIGS[name]
    torch.manual_seed(0)
    trained = make().train()
    for _ in range(3):  # every buffer moves off its initial value
        trained(_batch(name))
    state = trained.state_dict()
    assert sorted(state) == keys
    fresh = make()
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    torch.manual_seed(1)
    x = _batch(name)
    trained.eval(), fresh.eval()
    out_a, out_b = trained(x), fresh(x)
    assert torch.equal(out_a[0], out_b[0])

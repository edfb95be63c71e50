"""Checkpoints keep loading: the state_dict layout of every layer configuration is a contract (vqtorch / CVQ-VAE
names, and what earlier vqkernels versions saved), and a saved state round-trips strictly into a fresh layer."""

import pytest
import torch
from helpers import RULES_OFF

from vqkernels.nn import GroupVectorQuant, ResidualVectorQuant, VectorQuant, VectorQuantiser

CONFIGS = {
    "vq_full": (
        lambda **kw: VectorQuant(
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
            **kw,
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
        lambda **kw: VectorQuant(8, 16, dim=-1, affine_mode="running", anchor="closest", **kw),
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
        lambda **kw: GroupVectorQuant(
            8, 16, groups=2, share=False, dim=-1, replace_freq=3, kmeans_init=True, kmeans_iters=2, **kw
        ),
        ["codebook.weight", "data_initialized", "lru_counters"],
    ),
    "residual": (
        lambda **kw: ResidualVectorQuant(8, 16, groups=2, dim=-1, anchor="probrandom", **kw),
        ["anchor_initialized", "codebook.weight", "embed_prob"],
    ),
    "cvq": (
        lambda **kw: VectorQuantiser(16, 8, anchor="random", **kw),
        ["anchor_initialized", "embed_prob", "embedding.weight", "feature_pool", "pool_filled"],
    ),
    # the codebook rules add their state only when on
    "vq_ema": (
        lambda **kw: VectorQuant(
            8, 16, dim=-1, ema_update=True, threshold_ema_dead_code=1.0, codebook_dim=4, kmeans_init=True, **kw
        ),
        [
            "cluster_size",
            "codebook.weight",
            "data_initialized",
            "embed_avg",
            "project_in.bias",
            "project_in.weight",
            "project_out.bias",
            "project_out.weight",
        ],
    ),
    "group_expiry": (
        lambda **kw: GroupVectorQuant(
            8, 16, groups=2, share=False, dim=-1, threshold_ema_dead_code=1.0, rotation_trick=True, **kw
        ),
        ["cluster_size", "codebook.weight", "embed_avg"],
    ),
    "cvq_ema": (
        lambda **kw: VectorQuantiser(16, 8, ema_update=True, orthogonal_reg_weight=0.0, codebook_dim=4, **kw),
        [
            "anchor_initialized",
            "cluster_size",
            "embed_avg",
            "embed_prob",
            "embedding.weight",
            "project_in.bias",
            "project_in.weight",
            "project_out.bias",
            "project_out.weight",
        ],
    ),
}

ORIGINAL = ["vq_full", "vq_running", "group", "residual", "cvq"]


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


@pytest.mark.parametrize("name", ORIGINAL)
def test_rule_options_off_keep_the_layout(name):
    """Every codebook-rule option at its default: the same state_dict keys, and a checkpoint of the layer without
    them loads strictly."""
    make, keys = CONFIGS[name]
    torch.manual_seed(0)
    plain = make().train()
    plain(_batch(name))
    torch.manual_seed(0)
    with_defaults = make(**RULES_OFF)
    assert sorted(with_defaults.state_dict()) == keys
    with_defaults.load_state_dict(plain.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["vq_running", "cvq"])
def test_checkpoint_without_ema_statistics_loads_into_an_ema_layer(name):
    """A checkpoint trained without the EMA (a vqtorch or CVQ-VAE one) loads strictly into a layer with
    ema_update on; the EMA restarts from the loaded codes: N = 1 and m = the effective code."""
    make, _ = CONFIGS[name]
    torch.manual_seed(0)
    old = make().train()
    for _ in range(2):
        old(_batch(name))
    torch.manual_seed(1)
    new = make(ema_update=True)
    assert not torch.equal(new.codebook_weight, old.codebook_weight)
    new.load_state_dict(old.state_dict(), strict=True)
    assert torch.equal(new.codebook_weight, old.codebook_weight)
    assert torch.equal(new.cluster_size, torch.ones(16))
    torch.testing.assert_close(new.embed_avg, old.get_codebook())
    new(_batch(name))  # and it trains on
    assert not torch.equal(new.cluster_size, torch.ones(16))

"""torch.distributed (README "Method" §4): 2 gloo processes on CPU must end with bit-identical codebooks and buffers;
the deterministic updates must equal a single-process run on the concatenated batch; an empty batch on one rank must
neither hang nor diverge. Each test spawns 2 processes with a time limit.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqkernels.nn import GroupVectorQuant, VectorQuant, VectorQuantize

TIMEOUT_S = 120
STEPS = 50


def _store(tmp_path) -> str:
    """A fresh rendezvous file for torch.distributed's file store."""
    path = tmp_path / f"store-{os.getpid()}-{len(list(tmp_path.iterdir()))}"
    return str(path)


def _batch(step: int, rank: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, d, generator=g) * (1 + 0.1 * rank)


def _make(kind: str, anchor: str | None, **kw):
    torch.manual_seed(0)
    common = dict(dim=-1, kmeans_init=True, kmeans_iters=3, anchor=anchor, **kw)
    if kind == "group":
        return GroupVectorQuant(8, 16, groups=2, share=False, replace_freq=2, **common)
    return VectorQuant(8, 16, replace_freq=2, affine_mode="running", **common)


def _init_group(rank: int, store: str) -> None:
    # a file store: no port to race for; a timeout turns a collective mismatch into an error, not a hang
    timeout = datetime.timedelta(seconds=TIMEOUT_S // 2)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timeout)


def _worker(rank, store, out_dir, kind, anchor, empty_rank, train, opts):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _init_group(rank, store)
    try:
        layer = _make(kind, anchor, **opts)
        model = torch.nn.parallel.DistributedDataParallel(layer) if train else layer
        opt = torch.optim.SGD(layer.parameters(), lr=0.05) if train else None
        torch.manual_seed(100 + rank)  # each rank's own randomness: the sync must not depend on it agreeing
        for step in range(STEPS):
            n = 0 if (rank == empty_rank and step % 3 == 1) else 24 + 8 * rank
            x = _batch(step, rank, n, 8)
            z_q, out = model(x)
            if train:
                opt.zero_grad()
                (out["loss"] + 0.0 * z_q.sum()).backward()
                opt.step()
        torch.save({k: v.clone() for k, v in layer.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing down: destroying DDP's reducer can deadlock in ProcessGroupGloo's destructor (it joins
    # a gloo thread that waits for the GIL the destructor holds); the results are on disk already.
    os._exit(0)


def _spawn(tmp_path, target, *args):
    ctx = mp.get_context("spawn")
    store = _store(tmp_path)
    procs = [ctx.Process(target=target, args=(r, store, str(tmp_path), *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung (time limit reached)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _run(tmp_path, kind="vq", anchor="closest", empty_rank=-1, train=True, opts=None):
    _spawn(tmp_path, _worker, kind, anchor, empty_rank, train, opts or {})
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("anchor", [None, "closest", "random", "probrandom"])
def test_ranks_hold_identical_state_after_training(tmp_path, anchor):
    s0, s1 = _run(tmp_path, anchor=anchor)
    assert set(s0) == set(s1)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    assert bool(s0["data_initialized"])


def test_group_layer_and_empty_batches_on_one_rank(tmp_path):
    s0, s1 = _run(tmp_path, kind="group", anchor="probrandom", empty_rank=1)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key


@pytest.mark.parametrize("kind,anchor", [("vq", None), ("group", "probrandom")])
def test_ema_update_and_expiry_keep_ranks_identical(tmp_path, kind, anchor):
    """The EMA update and the expiry by EMA size on top of every other update (k-means init, LRU, anchors, running
    affine for vq), a projection trained by DDP, empty batches on rank 1: the codebook and the EMA buffers stay
    identical on both ranks (the writers that broadcast rank 0's codes broadcast the EMA sums re-seeded from them)."""
    opts = dict(ema_update=True, decay=0.9, threshold_ema_dead_code=1.0, codebook_dim=3)
    s0, s1 = _run(tmp_path, kind=kind, anchor=anchor, empty_rank=1, opts=opts)
    assert {"cluster_size", "embed_avg", "project_in.weight"} <= set(s0)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    assert not torch.equal(s0["cluster_size"], torch.ones(16))  # the EMA moved


def test_rank_zero_with_empty_batches_does_not_hang(tmp_path):
    s0, s1 = _run(tmp_path, anchor="closest", empty_rank=0)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key


def _single_process(anchor):
    layer = VectorQuant(8, 16, dim=-1, kmeans_init=True, kmeans_iters=3, anchor=anchor)
    return layer


def _det_worker(rank, store, out_dir):
    torch.set_num_threads(1)
    _init_group(rank, store)
    try:
        torch.manual_seed(0)
        layer = _single_process("closest")
        torch.manual_seed(7)  # the k-means seeding draws happen on rank 0 only
        for step in range(5):
            layer(_batch(step, rank, 20, 8))
        torch.save(layer.state_dict(), os.path.join(out_dir, f"det{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # see _worker


def test_deterministic_updates_equal_a_single_process_run(tmp_path):
    """k-means init on the gathered rows, global usage EMA and the globally closest anchors: as one process that
    sees the concatenated batch (forward passes only, so no gradient step enters)."""
    ctx = mp.get_context("spawn")
    store = _store(tmp_path)
    procs = [ctx.Process(target=_det_worker, args=(r, store, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = torch.load(tmp_path / "det0.pt")
    torch.manual_seed(0)
    ref = _single_process("closest")
    torch.manual_seed(7)
    for step in range(5):
        ref(torch.cat([_batch(step, 0, 20, 8), _batch(step, 1, 20, 8)]))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_no_collectives_outside_a_process_group_or_with_sync_false():
    layer = VectorQuant(8, 16, dim=-1, anchor="closest", replace_freq=2, sync=True)
    with pytest.raises(RuntimeError, match="process group"):
        layer(torch.randn(10, 8))
    layer = VectorQuant(8, 16, dim=-1, anchor="closest", replace_freq=2, sync=False)
    layer(torch.randn(10, 8))  # no process group needed
    with pytest.raises(ValueError, match="sync"):
        VectorQuant(8, 16, sync="yes")


def test_ddp_example_runs(capfd):
    """The worked example trains 2 gloo ranks and checks, on every rank, that its codebook equals rank 0's (a rank
    that fails raises out of mp.spawn); rank 0 reports it on the shared stdout."""
    from vqkernels.examples import ddp_train

    ddp_train.main(["--epochs", "1", "--max-steps", "6"])
    out = capfd.readouterr().out
    assert "ranks hold identical codebooks after 6 steps" in out, out
    assert "epoch 0: loss" in out


# ---------------------------------------------------------------------------------------------------------------
# VectorQuantize (the vector-quantize-pytorch drop-in): EMA sums and counts all-reduced, k-means init and expired
# codes from rank 0, affine batch moments and in-place optimiser gradients reduced
# ---------------------------------------------------------------------------------------------------------------
VQPT_STEPS = 12


def _make_vqpt(kind: str) -> VectorQuantize:
    common = dict(kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2)
    if kind == "separate-heads":
        # TODO(batched): backend="torch" until the cpu / triton / cuda backends run the batched form
        return VectorQuantize(
            8, 16, heads=2, codebook_dim=4, separate_codebook_per_head=True, backend="torch", **common
        )
    if kind == "shared-heads-affine":
        return VectorQuantize(8, 16, heads=2, codebook_dim=4, affine_param=True, sync_affine_param=True, **common)
    if kind == "per-rank-kmeans":
        # each rank fits its own k-means (as the library with sync_kmeans=False): the ranks' EMA sizes differ, so
        # the expiry must be decided together (else a rank skips its collective and the other hangs); the first
        # expiry then hands every rank rank 0's state
        return VectorQuantize(8, 16, sync_kmeans=False, **common)
    sgd = lambda p: torch.optim.SGD(p, lr=0.5)  # noqa: E731
    return VectorQuantize(8, 16, ema_update=False, learnable_codebook=True, in_place_codebook_optimizer=sgd, **common)


def _vqpt_worker(rank, store, out_dir, kind):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _init_group(rank, store)
    try:
        torch.manual_seed(100 + rank)  # each rank's own draws: the sync must not depend on them agreeing
        layer = _make_vqpt(kind)
        for step in range(VQPT_STEPS):
            n = 0 if (kind == "separate-heads" and rank == 1 and step == 5) else 24 + 8 * rank
            layer(_batch(step, rank, n, 8).view(1, n, 8))
        torch.save(layer.state_dict(), os.path.join(out_dir, f"vqpt{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # see _worker


@pytest.mark.parametrize("kind", ["separate-heads", "shared-heads-affine", "in-place-optimizer", "per-rank-kmeans"])
def test_vector_quantize_ranks_hold_identical_codebooks(tmp_path, kind):
    """Each rank draws its own randomness and sees its own batches (one of them empty once): codebooks, EMA sizes
    and sums (and affine moments) stay bit-identical (with sync_codebook=False they differ: checked by hand)."""
    _spawn(tmp_path, _vqpt_worker, kind)
    s0, s1 = (torch.load(tmp_path / f"vqpt{r}.pt") for r in range(2))
    assert set(s0) == set(s1)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    assert bool(s0["_codebook.initted"]) and float(s0["_codebook.embed"].abs().sum()) > 0
    if kind == "shared-heads-affine":
        assert "_codebook.batch_mean" in s0


def _vqpt_det_worker(rank, store, out_dir):
    torch.set_num_threads(1)
    _init_group(rank, store)
    try:
        torch.manual_seed(7)  # the k-means draws happen on rank 0 only
        layer = VectorQuantize(8, 16, kmeans_init=True, kmeans_iters=3)
        for step in range(5):
            layer(_batch(step, rank, 20, 8).view(1, 20, 8))
        torch.save(layer.state_dict(), os.path.join(out_dir, f"vqpt-det{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # see _worker


def test_vector_quantize_ema_equals_a_single_process_run(tmp_path):
    """k-means on the gathered rows and the EMA of all-reduced sums and counts: as one process that sees the
    concatenated batch."""
    _spawn(tmp_path, _vqpt_det_worker)
    got = torch.load(tmp_path / "vqpt-det0.pt")
    torch.manual_seed(7)
    ref = VectorQuantize(8, 16, kmeans_init=True, kmeans_iters=3)
    for step in range(5):
        ref(torch.cat([_batch(step, 0, 20, 8), _batch(step, 1, 20, 8)]).view(1, 40, 8))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)

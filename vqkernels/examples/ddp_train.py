"""Train a small VQ autoencoder on scikit-learn's digits with 2 ranks of torch.distributed (README "Method" §4).

    python -m vqkernels.examples.ddp_train                 # 2 CPU processes, gloo
    python -m vqkernels.examples.ddp_train --backend nccl  # 2 GPUs

Each rank sees its own half of every batch (DistributedSampler); DDP averages the gradients; the VQ layer keeps
its k-means init, dead-code replacement and CVQ anchor updates identical on both ranks. At the end every rank
checks that its codebook equals rank 0's bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from vqkernels.nn import VectorQuant


class AutoEncoder(nn.Module):
    """64-pixel digit -> 4 latent vectors of 16 features -> VQ -> 64 pixels."""

    def __init__(self, num_codes: int = 64):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.vq = VectorQuant(
            16, num_codes, beta=0.95, sync_nu=0.2, kmeans_init=True, replace_freq=10, anchor="closest", dim=-1
        )
        self.dec = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x):
        z = self.enc(x).view(-1, 4, 16)
        z_q, out = self.vq(z)
        return self.dec(z_q.reshape(-1, 64)), out


def _digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    return TensorDataset(x)


def _run(rank: int, world: int, store: str, backend: str, epochs: int, max_steps: int | None) -> None:
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)
        torch.manual_seed(0)  # same initial weights on every rank
        model = AutoEncoder().to(device)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=2e-3)
        data = _digits()
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(data, batch_size=64, sampler=sampler, drop_last=False)
        step = 0
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            total, ppl, batches = 0.0, 0.0, 0
            for (x,) in loader:
                x = x.to(device)
                recon, out = ddp(x)
                loss = ((recon - x) ** 2).mean() + out["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, ppl, batches = total + loss.item(), ppl + out["perplexity"].item(), batches + 1
                step += 1
                if max_steps is not None and step >= max_steps:
                    break
            if rank == 0:
                print(f"epoch {epoch}: loss {total / max(batches, 1):.4f}  perplexity {ppl / max(batches, 1):.1f}")
            if max_steps is not None and step >= max_steps:
                break
        cb = model.vq.codebook.weight.detach().clone()
        ref = cb.clone()
        dist.broadcast(ref, src=0)
        assert torch.equal(cb, ref), f"rank {rank}: codebook differs from rank 0's"
        if rank == 0:
            print(f"ranks hold identical codebooks after {step} steps", flush=True)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Exit without tearing DDP down: destroying its reducer can deadlock in ProcessGroupGloo's destructor (it joins
    # a gloo thread that is waiting for the GIL the destructor holds). Everything is done and printed by now.
    os._exit(0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m vqkernels.examples.ddp_train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None, help="stop early (for tests)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_run, args=(args.world, store, args.backend, args.epochs, args.max_steps), nprocs=args.world)


if __name__ == "__main__":
    main()

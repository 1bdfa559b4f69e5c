"""DP-SGD on several processes with torch.distributed: one script, started by torchrun.

    .venv/bin/torchrun --nproc-per-node 2 examples/distributed_train.py --epochs 2

Every process runs this file. ``DPDDP`` gives all of them process 0's initial weights;
``make_private`` makes each process sample its own shard of the data set (the union is one
Poisson sample of the whole data set), add up the clipped gradients across processes, and
add the noise once. Every process ends with the same model and reports the same epsilon.
On GPUs use ``--backend nccl`` and put each process's model on its own device.

A synthetic classification task keeps the example self-contained; use ``dpclip.data`` for
MNIST or Fashion-MNIST (see docs/getting-started.md).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpclip import PrivacyEngine
from dpclip.distributed import DPDDP


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="global expected batch size")
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    dist.init_process_group(a.backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(1234)  # the same data on every process
        x = torch.randn(8192, 20, generator=g)
        y = (x[:, :2].sum(1) > 0).long()
        train = TensorDataset(x[:6144], y[:6144])
        test_x, test_y = x[6144:], y[6144:]

        torch.manual_seed(a.seed + rank)  # different on purpose: DPDDP takes process 0's weights
        model = DPDDP(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)))
        optimizer = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
        engine = PrivacyEngine(accountant="prv")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(train, batch_size=a.batch_size),
            noise_multiplier=a.noise_multiplier, max_grad_norm=a.max_grad_norm,
            generator=torch.Generator().manual_seed(a.seed),
        )
        for _ in range(a.epochs):
            for xb, yb in loader:  # this process's share of each Poisson batch
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
        with torch.no_grad():
            accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        result = {"rank": rank, "world_size": world, "steps": engine.steps, "test_accuracy": accuracy,
                  "epsilon": engine.get_epsilon(1e-5), "delta": 1e-5, "parameter_checksum": checksum}
        for r in range(world):  # one line per process, in rank order (no interleaved output)
            if r == rank:
                print(json.dumps(result), flush=True)
            dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

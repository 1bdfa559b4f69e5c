"""Rounds per second of the DP-FedAvg simulation: clients vmapped with torch.func vs one after another.

    python experiments/federated/speed.py [--rounds 5] [--threads 1] [--datasets synthetic,mnist]
    python experiments/federated/speed.py --micro [--threads 1]     # ms per local step, 10 clients

``--micro`` times the local-training step alone (10 clients, batch 32, 10 steps, random
MNIST-shaped data; MLP 784-64-10 and Tramer & Boneh's CNN), vmapped and looped, twice each.

Same data, partition, sampling and noise for both paths (they compute the same deltas);
the first round (torch.func warm-up) is timed separately. Prints one table row per
(dataset, model, path) and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dpclip.controllers import Quantile
from dpclip.federated.datasets import build_model, load
from dpclip.federated.fedavg import FedAvgConfig, simulate
from dpclip.federated.partitions import partition


def measure(dataset: str, model_name: str, path: str, rounds: int, clients: int, per_round: float,
            train_subset: int | None) -> dict:
    g = torch.Generator().manual_seed(0)
    data = load(dataset, g, train_subset=train_subset)
    model = build_model(model_name, data, g)
    parts = partition(data.train_y, clients, "dirichlet:0.5", g)
    config = FedAvgConfig(rounds=rounds, clients_per_round=per_round, local_epochs=1, local_batch_size=32,
                          local_lr=0.1, noise_multiplier=1.0, clip=1.0,
                          controller=Quantile(count_noise_multiplier=max(per_round / 20, 5.0)), client_path=path)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(rnd: int, info: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    result = simulate(model, (data.train_x, data.train_y), parts, config, torch.Generator().manual_seed(1),
                      on_round=tick)
    steady = times[1:] or times
    return {"dataset": dataset, "model": model_name, "path": result.client_path, "clients": clients,
            "clients_per_round": per_round, "examples": len(data.train_y), "first_round_s": times[0],
            "rounds_per_second": len(steady) / sum(steady), "mean_participants":
            sum(result.participants) / len(result.participants)}


def micro() -> list[dict]:
    from dpclip.federated.datasets import MLP
    from dpclip.federated.fedavg import _LocalSGD
    from dpclip.models import build_model as build

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, 1, 28, 28, generator=g), torch.randint(10, (3000,), generator=g)
    rows = []
    for name, model in (("mlp", MLP(784, 64, 10)), ("cnn", build("cnn", 1, 10, image_size=28, generator=g))):
        params = {k: v.detach() for k, v in model.named_parameters()}
        sgd = _LocalSGD(model, x, y, {}, 0.1)
        clients, steps, batch = 10, 10, 32
        plans = [(torch.randint(3000, (steps, batch), generator=g), torch.ones(steps, batch)) for _ in range(clients)]
        sgd.many(params, plans[:2])
        sgd.one(params, *plans[0])  # warm-up
        for _ in range(2):
            t = time.perf_counter()
            sgd.many(params, plans)
            tv = time.perf_counter() - t
            t = time.perf_counter()
            for p in plans:
                sgd.one(params, *p)
            tl = time.perf_counter() - t
            rows.append({"model": name, "vmap_ms_per_step": 1e3 * tv / steps, "loop_ms_per_step": 1e3 * tl / steps})
            print(f"{name}: vmap {rows[-1]['vmap_ms_per_step']:.1f} ms, loop {rows[-1]['loop_ms_per_step']:.1f} ms "
                  f"per local step of {clients} clients (speed-up {tl / tv:.2f}x)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--datasets", default="synthetic,mnist")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--micro", action="store_true", help="time the local step only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.micro:
        rows = micro()
        if args.json:
            print(json.dumps({"threads": torch.get_num_threads(), "micro": rows}))
        return
    rows = []
    for dataset in args.datasets.split(","):
        models = ["mlp"] if dataset == "synthetic" else ["mlp", "cnn"]
        for model_name in models:
            for path in ("vmap", "loop"):
                subset = None if dataset == "synthetic" else 30000
                rows.append(measure(dataset, model_name, path, args.rounds, 100, 10, subset))
                r = rows[-1]
                print(f"{r['dataset']:<10} {r['model']:<4} {r['path']:<5} {r['examples']:>6} examples  "
                      f"{r['mean_participants']:.1f} clients/round  first round {r['first_round_s']:.2f} s  "
                      f"{r['rounds_per_second']:.3g} rounds/s", flush=True)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()

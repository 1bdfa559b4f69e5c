"""Clip-norm controllers in DP-FedAvg (user-level DP) at equal epsilon: MNIST and Fashion-MNIST.

The multi-objective paper's setting (Ranaweera et al. 2025; ``shared/research/anchors.md``
§6.2): 100 clients with a Dirichlet(0.5) label-skewed partition. Here the privacy unit is a
whole client (DP-FedAvg, McMahan et al. 2018), not a sample as in the paper.

    python experiments/federated/controllers.py                # the whole grid, 2 processes
    python experiments/federated/controllers.py --jobs 1 --datasets mnist --epsilons 3 \\
        --controllers fixed,quantile --seeds 0                 # a slice of it
    python experiments/federated/controllers.py --controllers fixed@0.3,fixed@3   # fixed at other norms

Grid: dataset x epsilon x controller x seed. For every run the noise multiplier ``sigma`` is
calibrated with ``accountants.get_noise_multiplier`` so that ``--rounds`` rounds at
``q = clients_per_round / clients`` spend ``epsilon`` at ``delta`` (PRV accountant); every
controller that reads statistics gets ``count_noise_multiplier = count_ratio * sigma``, and
``simulate`` lowers the aggregate's share to ``(sigma^-2 - sigma_c^-2)^(-1/2)``, so all
controllers of a cell spend the same epsilon. Within a seed, the partition, the initial
model, the client sampling, the local batches and the noise seed are the same for every
controller and epsilon (one generator seeded with the seed drives all of them).

Resumable: a run whose key (dataset, epsilon, controller, seed) already has a line in
``--out`` is skipped. Each finished run appends one JSON line and prints one progress line.
Every worker process runs with ``nice 19`` and one torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "controllers.jsonl"
CONTROLLERS = ("fixed", "quantile", "multiobjective", "autoclip", "zclip")

# the settings, chosen once for every controller (see docs/results/federated.md)
SETTINGS: dict[str, Any] = {
    "clients": 100,
    "partition": "dirichlet:0.5",
    "clients_per_round": 20.0,   # expected; Poisson sampling with q = 0.2
    "rounds": 50,
    "local_epochs": 1,
    "local_batch_size": 32,
    "local_lr": 0.1,
    "server_optimizer": "sgd",
    "server_lr": 1.0,
    "server_momentum": 0.0,
    "clip": 1.0,                 # the fixed threshold, and every controller's starting one
    "clipping": "flat",
    "count_ratio": 3.0,          # sigma_c = 3 sigma: the statistics take 1/9 of the precision 1/sigma^2
    "model": "mlp",              # 784-64-10 tanh MLP (dpclip.federated.datasets.MLP), 50,890 parameters
    "hidden": 64,
    "delta": 1e-5,
    "accountant": "prv",
    "eval_every": 5,
}


def key_of(row: dict[str, Any]) -> tuple[str, float, str, int]:
    return (row["dataset"], float(row["target_epsilon"]), row["controller"], int(row["seed"]))


def make_controller(name: str, sigma_c: float) -> Any:
    from dpclip import controllers as c

    if name == "fixed":
        return c.Fixed()
    if name == "quantile":
        return c.Quantile(count_noise_multiplier=sigma_c)        # target 0.5, learning rate 0.2
    if name == "multiobjective":
        return c.MultiObjective(count_noise_multiplier=sigma_c)  # utility_weight 1, privacy 0, lr 0.5
    if name == "autoclip":
        return c.PrivateAutoClip(count_noise_multiplier=sigma_c)  # 10th percentile
    if name == "zclip":
        return c.PrivateZClip(count_noise_multiplier=sigma_c)    # z 2.5, alpha 0.97
    raise ValueError(f"unknown controller {name!r}; choose from {', '.join(CONTROLLERS)}")


_DATA: dict[str, Any] = {}


def run_one(dataset: str, epsilon: float, controller: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """One DP-FedAvg run; returns the JSON-ready record."""
    if os.nice(0) < 19:
        os.nice(19 - os.nice(0))
    import torch

    torch.set_num_threads(1)
    from accountants import get_noise_multiplier

    from dpclip.federated.datasets import build_model, load
    from dpclip.federated.fedavg import FedAvgConfig, simulate
    from dpclip.federated.partitions import partition

    start = time.perf_counter()
    s = settings
    g = torch.Generator().manual_seed(seed)
    if dataset not in _DATA:
        _DATA[dataset] = load(dataset, torch.Generator().manual_seed(0))  # deterministic: no subset
    data = _DATA[dataset]
    model = build_model(s["model"], data, g, hidden=s["hidden"])
    parts = partition(data.train_y, s["clients"], s["partition"], g)
    q = s["clients_per_round"] / s["clients"]
    sigma = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=s["delta"], sample_rate=q,
                                       steps=s["rounds"], accountant=s["accountant"]))
    sigma_c = s["count_ratio"] * sigma
    name, _, start_clip = controller.partition("@")  # "fixed@0.3": another starting (fixed) threshold
    clip0 = float(start_clip) if start_clip else float(s["clip"])
    config = FedAvgConfig(
        rounds=s["rounds"], clients_per_round=s["clients_per_round"], local_epochs=s["local_epochs"],
        local_batch_size=s["local_batch_size"], local_lr=s["local_lr"], noise_multiplier=sigma, clip=clip0,
        clipping=s["clipping"], controller=make_controller(name, sigma_c),
        server_optimizer=s["server_optimizer"], server_lr=s["server_lr"], server_momentum=s["server_momentum"],
        accountant=s["accountant"], delta=s["delta"], eval_every=s["eval_every"],
    )
    result = simulate(model, (data.train_x, data.train_y), parts, config, g, test=(data.test_x, data.test_y))
    return {
        "dataset": dataset,
        "target_epsilon": epsilon,
        "controller": controller,
        "seed": seed,
        "epsilon": result.epsilon,
        "delta": result.delta,
        "noise_multiplier": result.noise_multiplier,
        "gradient_noise_multiplier": result.gradient_noise_multiplier,
        "count_noise_multiplier": None if name == "fixed" else sigma_c,
        "start_clip": clip0,
        "test_accuracy": result.test_accuracy,
        "test_loss": result.test_loss,
        "accuracy_history": [list(a) for a in result.accuracy_history],
        "clip_history": [c[0] for c in result.clip_history],
        "final_clip": result.clip_history[-1][0] if result.clip_history else None,
        "participants": list(result.participants),
        "accountant_history": [list(h) for h in result.accountant_history],
        "client_path": result.client_path,
        "rounds_per_second": result.rounds_per_second,
        "seconds": time.perf_counter() - start,
        "settings": s,
    }


def _list(kind: type, text: str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=lambda t: _list(str, t), default=["mnist", "fashion-mnist"])
    p.add_argument("--epsilons", type=lambda t: _list(float, t), default=[1.0, 3.0, 8.0])
    p.add_argument("--controllers", type=lambda t: _list(str, t), default=list(CONTROLLERS),
                   help="names from " + ", ".join(CONTROLLERS) + "; NAME@C starts (fixed: stays) at C instead of "
                        f"{SETTINGS['clip']}, e.g. fixed@0.3")
    p.add_argument("--seeds", type=lambda t: _list(int, t), default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON lines (default {DEFAULT_OUT.relative_to(HERE.parent.parent)})")
    p.add_argument("--order", choices=("seed", "cell"), default="seed",
                   help="seed: all cells for seed 0 first, then seed 1, ... (default), so a cut-short run has whole seeds")
    p.add_argument("--rounds", type=int, default=SETTINGS["rounds"],
                   help=f"default {SETTINGS['rounds']}; change it only with another --out (for a smoke test)")
    args = p.parse_args(argv)
    settings = dict(SETTINGS, rounds=args.rounds)
    for c in args.controllers:
        name, _, c0 = c.partition("@")
        if c0:
            try:
                float(c0)
            except ValueError:
                p.error(f"{c}: the starting clip norm after @ must be a number")
        if name not in CONTROLLERS:
            p.error(f"unknown controller {c!r}; choose from {', '.join(CONTROLLERS)}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            if line.strip():
                done.add(key_of(json.loads(line)))
    grid = [(d, e, c, s) for s in args.seeds for d in args.datasets for e in args.epsilons for c in args.controllers]
    if args.order == "cell":
        grid.sort(key=lambda k: (k[0], k[1], k[2], k[3]))
    todo = [k for k in grid if k not in done]
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already in {args.out}, {len(todo)} to run "
          f"with {args.jobs} processes", flush=True)
    t0 = time.perf_counter()
    failed = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, d, e, c, s, settings): (d, e, c, s) for d, e, c, s in todo}
        for n, fut in enumerate(as_completed(futures), 1):
            d, e, c, s = futures[fut]
            try:
                row = fut.result()
            except Exception as exc:  # report and go on; the run stays missing, so a rerun retries it
                failed += 1
                print(f"[{n}/{len(todo)}] {d} eps={e:g} {c} seed={s}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{n}/{len(todo)}] {d:13s} eps={e:<3g} {c:14s} seed={s}  acc={100 * row['test_accuracy']:5.1f}%  "
                  f"eps_spent={row['epsilon']:.3f} sigma={row['noise_multiplier']:.3f} "
                  f"final C={row['final_clip']:.3g}  {row['seconds']:.0f}s  (elapsed {time.perf_counter() - t0:.0f}s)",
                  flush=True)
    print(f"done in {time.perf_counter() - t0:.0f}s; {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

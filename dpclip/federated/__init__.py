"""Differentially private federated learning: DP-FedAvg simulation, client partitions, Flower strategy.

::

    from dpclip.federated import FedAvgConfig, simulate, partition
    parts = partition(train_y, num_clients=100, spec="dirichlet:0.5", generator=g)
    result = simulate(model, (train_x, train_y), parts, FedAvgConfig(rounds=50, clients_per_round=10,
                      noise_multiplier=1.0, clip=0.5, controller=Quantile()), g, test=(test_x, test_y))
    result.epsilon, result.test_accuracy, result.clip_history

Names are loaded on first use (PEP 562), so ``dpclip.federated.cli`` builds its parser
without importing torch. The Flower strategy lives in :mod:`dpclip.federated.flower` (needs
the ``flower`` extra) and is not exported here.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FedAvgConfig": "fedavg",
    "FederatedResult": "fedavg",
    "LocalDP": "fedavg",
    "simulate": "fedavg",
    "evaluate": "fedavg",
    "layer_groups": "fedavg",
    "RoundRelease": "aggregate",
    "dp_aggregate": "aggregate",
    "PartitionSpec": "spec",
    "parse_partition": "spec",
    "partition": "partitions",
    "iid_partition": "partitions",
    "dirichlet_partition": "partitions",
    "shard_partition": "partitions",
    "label_counts": "partitions",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

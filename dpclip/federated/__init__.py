"""Differentially private federated learning: DP-FedAvg simulation, client partitions, Flower strategy.

::

    from dpclip.federated import FedAvgConfig, simulate, partition
    parts = partition(train_y, num_clients=100, spec="dirichlet:0.5", generator=g)
    result = simulate(model, (train_x, train_y), parts, FedAvgConfig(rounds=50, clients_per_round=10,
                      noise_multiplier=1.0, clip=0.5, controller=Quantile()), g, test=(test_x, test_y))
    result.epsilon, result.test_accuracy, result.clip_history

The Flower strategy lives in :mod:`dpclip.federated.flower` (needs the ``flower`` extra) and
is not imported here.
"""

from .aggregate import RoundRelease, dp_aggregate
from .fedavg import FedAvgConfig, FederatedResult, LocalDP, evaluate, layer_groups, simulate
from .partition import (
    PartitionSpec,
    dirichlet_partition,
    iid_partition,
    label_counts,
    parse_partition,
    partition,
    shard_partition,
)

__all__ = [
    "FedAvgConfig",
    "FederatedResult",
    "LocalDP",
    "PartitionSpec",
    "RoundRelease",
    "dirichlet_partition",
    "dp_aggregate",
    "evaluate",
    "iid_partition",
    "label_counts",
    "layer_groups",
    "parse_partition",
    "partition",
    "shard_partition",
    "simulate",
]

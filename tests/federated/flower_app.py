"""A Flower simulation driven by dpclip's DPFedAvg strategy; run by test_federated_flower.py in a subprocess.

    python tests/federated/flower_app.py OUT.json

Three clients (Ray actors) hold an IID split of the synthetic task and run full-batch GD; the
ServerApp runs two strategies one after the other on the same nodes:

* ``exact``: sigma = 0, no clipping, every client every round -> must equal the in-process
  simulation's model;
* ``dp``: sigma = 0.8, Poisson sampling of 2 of 3 expected clients, a Quantile controller ->
  its epsilon and accountant history must equal the in-process simulation's.

The results go to OUT.json (model state as lists, epsilon, histories).
"""

from __future__ import annotations

import json
import os
import sys

for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from dpclip.controllers import Quantile  # noqa: E402
from dpclip.federated.datasets import build_model, synthetic  # noqa: E402
from dpclip.federated.flower import DPFedAvg  # noqa: E402
from dpclip.federated.partitions import iid_partition  # noqa: E402

CLIENTS, ROUNDS, EPOCHS, LR = 3, 2, 2, 0.3
DP = dict(clients_per_round=2.0, noise_multiplier=0.8, clip_norm=0.5, delta=1e-5)
DP_COUNT_NOISE = 3.0


def task():
    """The data, the initial model and the partition: the same in every process."""
    data = synthetic(300, 100, torch.Generator().manual_seed(0), features=16, classes=4)
    model = build_model("mlp", data, torch.Generator().manual_seed(1), hidden=16)
    parts = iid_partition(len(data.train_y), CLIENTS, torch.Generator().manual_seed(2))
    return data, model, parts


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    data, model, parts = task()
    idx = parts[int(context.node_config["partition-id"])]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    clip = float(msg.content["config"]["clip-norm"])  # sent by DPFedAvg.configure_train
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(EPOCHS):
        opt.zero_grad()
        F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
    metrics = MetricRecord({"num-examples": len(idx), "clip-norm-seen": clip})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


server_app = ServerApp()
RESULT: dict = {}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    _, model, _ = task()
    initial = ArrayRecord(model.state_dict())
    exact = DPFedAvg(num_clients=CLIENTS, clients_per_round=CLIENTS, noise_multiplier=0.0, clip_norm=float("inf"),
                     seed=0)
    res = exact.start(grid=grid, initial_arrays=initial, num_rounds=ROUNDS)
    RESULT["exact"] = {k: v.tolist() for k, v in res.arrays.to_torch_state_dict().items()}
    RESULT["exact_participants"] = exact.participants
    dp = DPFedAvg(num_clients=CLIENTS, controller=Quantile(count_noise_multiplier=DP_COUNT_NOISE), seed=0, **DP)
    dp.start(grid=grid, initial_arrays=initial, num_rounds=ROUNDS)
    RESULT["dp"] = {"epsilon": dp.epsilon(), "history": [list(h) for h in dp.accountant.history],
                    "clip_history": [list(c) for c in dp.clip_history], "participants": dp.participants}


if __name__ == "__main__":
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0},  # one actor: less start-up
                                   "init_args": {"include_dashboard": False, "num_cpus": 2,
                                                 "_temp_dir": sys.argv[2] if len(sys.argv) > 2 else None}})
    if "dp" not in RESULT:
        sys.exit("the ServerApp did not finish (see the log above)")
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(RESULT, f)

"""A real Flower simulation (Ray, 3 clients, 2 rounds, CPU) driven by DPFedAvg, against the in-process simulation.

Skipped when flwr (with its Ray simulation backend) is not installed: ``pip install 'dpclip[flower]'``.
The simulation runs in a subprocess under ``timeout -k`` so that a stuck Ray cannot hang the suite.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'dpclip[flower]')")
pytest.importorskip("ray", reason="Flower's simulation backend (ray) is not installed")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from dpclip.controllers import Quantile  # noqa: E402
from dpclip.federated.fedavg import FedAvgConfig, simulate  # noqa: E402
from dpclip.federated.flower import DPFedAvg  # noqa: E402

APP = Path(__file__).with_name("flower_app.py")
sys.path.insert(0, str(APP.parent))
import flower_app  # noqa: E402


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    if shutil.which("timeout") is None:
        pytest.skip("coreutils timeout is needed to bound the Ray simulation")
    out = tmp_path_factory.mktemp("flower") / "result.json"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(["timeout", "-k", "10", "150", sys.executable, str(APP), str(out), ray_tmp],
                              capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"flower simulation failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _in_process(**overrides):
    data, model, parts = flower_app.task()
    base = dict(rounds=flower_app.ROUNDS, clients_per_round=flower_app.CLIENTS, local_epochs=flower_app.EPOCHS,
                local_batch_size=len(data.train_y), local_lr=flower_app.LR, server_momentum=0.0)
    config = FedAvgConfig(**(base | overrides))
    return simulate(model, (data.train_x, data.train_y), parts, config, torch.Generator().manual_seed(0))


def test_flower_exact_run_equals_in_process_fedavg(flower_run):
    assert flower_run["exact_participants"] == [flower_app.CLIENTS] * flower_app.ROUNDS
    ref = _in_process(noise_multiplier=0.0, clip=math.inf)
    for k, v in ref.state_dict.items():
        assert torch.allclose(torch.tensor(flower_run["exact"][k]), v, atol=1e-5), k


def test_flower_dp_run_has_the_in_process_epsilon(flower_run):
    dp = flower_run["dp"]
    ref = _in_process(clients_per_round=flower_app.DP["clients_per_round"],
                      noise_multiplier=flower_app.DP["noise_multiplier"], clip=flower_app.DP["clip_norm"],
                      delta=flower_app.DP["delta"], controller=Quantile(count_noise_multiplier=flower_app.DP_COUNT_NOISE))
    assert [tuple(h) for h in dp["history"]] == list(ref.accountant_history) == [(0.8, 2 / 3, 2)]
    assert dp["epsilon"] == pytest.approx(ref.epsilon, rel=1e-12)
    assert dp["clip_history"][0] == [flower_app.DP["clip_norm"]]
    assert len(dp["clip_history"]) == flower_app.ROUNDS and dp["clip_history"][1] != dp["clip_history"][0]


# -- the strategy without Ray: hand-built messages (as Flower's own tests do) ------------------------------
@pytest.fixture
def run_id(monkeypatch):
    """Outside a run, flwr 1.42's Message() needs run, node and task ids (Flower sets them when a ServerApp starts)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _reply(to: Message, state: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in state.items()}),
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=to)


def test_strategy_clips_on_the_server_and_divides_by_the_expected_count(run_id):
    strategy = DPFedAvg(num_clients=4, clients_per_round=4, noise_multiplier=0.0, clip_norm=1.0, seed=0)
    glob = {"w": torch.zeros(2)}
    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(glob["w"].numpy())}), ConfigRecord(),
                                             _Grid([11, 12, 13, 14])))
    assert len(messages) == 4 and all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    assert messages[0].content["config"]["clip-norm"] == 1.0
    replies = [_reply(messages[0], {"w": torch.tensor([3.0, 4.0])}),  # norm 5 -> scaled to norm 1
               _reply(messages[1], {"w": torch.tensor([0.0, 0.5])})]  # two nodes did not answer
    arrays, metrics = strategy.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()["w"]
    assert torch.allclose(new, torch.tensor([0.6, 0.8 + 0.5]) / 4)
    assert "epsilon" not in metrics and strategy.participants == [2]


def test_strategy_refuses_a_population_it_does_not_account_for(run_id):
    strategy = DPFedAvg(num_clients=5, clients_per_round=2, noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match="num_clients=3"):
        list(strategy.configure_train(1, ArrayRecord({"w": Array(torch.zeros(2).numpy())}), ConfigRecord(),
                                      _Grid([1, 2, 3])))

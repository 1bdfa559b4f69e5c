"""experiments/reproduce/opacus_mnist.py: the shared training loop runs and its records have the right shape.

A couple of steps on small synthetic tensors (no MNIST needed), so this takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from tests.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "reproduce" / "opacus_mnist.py"


@pytest.fixture(scope="module")
def om():
    return load_script(SCRIPT, "opacus_mnist_script")


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def _check(result: dict, library: str, epochs: int, max_steps: int) -> None:
    assert result["library"] == library and result["epochs"] == epochs
    assert [r["epoch"] for r in result["records"]] == list(range(1, epochs + 1))
    for r in result["records"]:
        assert set(r) == set(result["records"][0])  # same keys every epoch
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["epsilon_prv"] > 0 and r["epsilon_rdp"] > 0
        assert r["train_wall_s"] >= 0 and r["train_cpu_s"] >= 0
    assert result["records"][-1]["steps"] == epochs * max_steps
    # epsilon grows with the steps
    assert result["records"][1]["epsilon_prv"] > result["records"][0]["epsilon_prv"]
    assert sum(h[2] for h in result["history"]) == epochs * max_steps
    assert result["setting"]["sample_rate"] == pytest.approx(16 / 64)
    assert result["final"] == result["records"][-1]


def test_model_shape(om):
    model = om.SampleConvNet()
    assert sum(p.numel() for p in model.parameters()) == 26010
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_dpclip_run_and_files(om, tmp_path):
    result = om.run("dpclip", _data(64, 0), _data(32, 1), seed=3, epochs=2, batch_size=16, max_steps=2,
                    progress=False)
    _check(result, "dpclip", 2, 2)
    assert set(result["records"][0]) == set(om.CSV_FIELDS)
    again = om.run("dpclip", _data(64, 0), _data(32, 1), seed=3, epochs=2, batch_size=16, max_steps=2,
                   progress=False)
    assert [r["test_accuracy"] for r in again["records"]] == [r["test_accuracy"] for r in result["records"]]
    assert [r["train_loss"] for r in again["records"]] == [r["train_loss"] for r in result["records"]]

    path = om.write_run(result, tmp_path, {"load_average": (0.5, 0.5, 0.5)})
    assert path.name == "dpclip-e2-s3.json"
    assert json.loads(path.read_text())["records"][1]["steps"] == 4
    assert path.with_suffix(".csv").read_text().splitlines()[0] == ",".join(om.CSV_FIELDS)
    assert len(om.load_runs(tmp_path)) == 1
    # the report only summarises full-data runs, so a smoke run gives an empty table
    assert om.summarise(om.load_runs(tmp_path)) == {}


def test_opacus_run(om):
    pytest.importorskip("opacus")
    result = om.run("opacus", _data(64, 0), _data(32, 1), seed=3, epochs=2, batch_size=16, max_steps=2,
                    progress=False)
    _check(result, "opacus", 2, 2)


def test_unknown_library(om):
    with pytest.raises(ValueError, match="library"):
        om.privacy_engine_class("tensorflow")

"""``dpclip federated``: JSON fields on a quick synthetic run, epsilon, target epsilon, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from accountants import PRVAccountant
from dpclip.federated.cli import main

QUICK = ["--dataset", "synthetic", "--train-subset", "1200", "--clients", "12", "--clients-per-round", "4",
         "--rounds", "4", "--local-batch-size", "50", "--no-progress"]


def _run(capsys, *args):
    code = main([*QUICK, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_result_fields_and_epsilon(capsys):
    code, out, err = _run(capsys, "--noise-multiplier", "0.9", "--clip-controller", "quantile",
                          "--count-noise-multiplier", "2", "--partition", "dirichlet:0.5", "--json", "--seed", "3")
    assert code == 0, err
    result = json.loads(out)
    for key in ("epsilon", "delta", "rounds", "test_accuracy", "clip_history", "noise_multiplier",
                "rounds_per_second", "accountant_history", "client_path", "participants"):
        assert key in result, key
    assert result["rounds"] == 4 and len(result["clip_history"]) == 4 and len(result["participants"]) == 4
    assert all(isinstance(c, float) for c in result["clip_history"])
    assert result["clip_history"][0] == 1.0 and result["clip_history"][1] != 1.0  # quantile moved it
    assert result["accountant_history"] == [[0.9, 4 / 12, 4]]
    assert result["epsilon"] == PRVAccountant().step(0.9, 4 / 12, 4).get_epsilon(1e-5)
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["sample_epsilon"] is None and result["client_path"] == "vmap"


def test_target_epsilon_is_met(capsys):
    code, out, err = _run(capsys, "--target-epsilon", "4", "--clipping", "per_layer", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert 4 * 0.99 <= result["epsilon"] <= 4.0
    assert all(isinstance(c, list) and len(c) == 2 for c in result["clip_history"])  # two layers


def test_no_noise_gives_null_epsilon_and_human_output(capsys):
    code, out, _ = _run(capsys, "--noise-multiplier", "0", "--json")
    assert code == 0 and json.loads(out)["epsilon"] is None
    code, out, _ = _run(capsys, "--noise-multiplier", "1")
    assert code == 0
    assert "test accuracy" in out and "epsilon" in out and "rounds/s" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--noise-multiplier", "1", "--clients-per-round", "20"], "exceeds --clients 12"),
        (["--noise-multiplier", "1", "--delta", "0.5"], "--delta 0.5 must be in (0, 1 / clients"),
        (["--noise-multiplier", "1", "--partition", "shards:x"], "use iid, dirichlet:ALPHA"),
        (["--noise-multiplier", "-1"], "must be a finite number >= 0"),
        (["--noise-multiplier", "1", "--clip-controller", "quantile", "--count-noise-multiplier", "0.5"],
         "--count-noise-multiplier"),
        (["--noise-multiplier", "1", "--model", "cnn"], "--model cnn needs 28x28"),
        (["--noise-multiplier", "1", "--target-epsilon", "3"], "not allowed with argument"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(capsys, args, message):
    code, out, err = _run(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_parser_imports_neither_torch_nor_flwr():
    code = ("import sys, argparse; from dpclip.federated.cli import add_parser; "
            "p = argparse.ArgumentParser(); add_parser(p.add_subparsers()); "
            "p.parse_args(['federated', '--noise-multiplier', '1', '--partition', 'dirichlet:0.3']); "
            "print('torch' in sys.modules, 'flwr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("name", ["multiobjective", "autoclip", "zclip"])
def test_histogram_controllers_run_federated(capsys, name):
    import dpclip.controllers as controllers
    from dpclip.federated.cli import CONTROLLERS

    if not hasattr(controllers, CONTROLLERS[name]):
        pytest.skip(f"dpclip.controllers has no {CONTROLLERS[name]} yet")
    # without noise the statistics are exact (4 clients a round would drown in the count noise)
    code, out, err = _run(capsys, "--noise-multiplier", "0", "--clip-controller", name, "--json", "--rounds", "3")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["clip_history"]) == 3 and all(c > 0 for c in result["clip_history"])
    assert result["clip_history"][1] != result["clip_history"][0]  # the controller moved the threshold
    assert result["accountant_history"] == [[0.0, 4 / 12, 3]]
    # with noise it runs within the budget split (the default count noise is 3 sigma here)
    code, out, err = _run(capsys, "--noise-multiplier", "0.7", "--clip-controller", name, "--json", "--rounds", "2")
    assert code == 0, err
    assert json.loads(out)["accountant_history"] == [[0.7, 4 / 12, 2]]

"""dpclip.train and ``dpclip train``: a short private run on a small MNIST subset (real if it can be had).

The data goes through the real path: a 1,000-image subset of real MNIST (or, without it, a
learnable synthetic set) is written as IDX files and read with ``--data-dir``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from accountants import make_accountant
from dpclip import PrivacyEngine, cli, train as train_module
from dpclip.data import Arrays
from dpclip.models import build_model
from dpclip.train import TrainConfig, check_config, evaluate, random_subset, train
from tests.data_files import real_mnist, synthetic_arrays, write_idx_folder

N_TRAIN, N_TEST = 1000, 500


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """``(folder, is_real)``: IDX files of a 1,000/500 MNIST subset, or of a learnable synthetic set."""
    folder = tmp_path_factory.mktemp("mnist")
    try:
        full = real_mnist()
    except pytest.skip.Exception:
        arrays, real = synthetic_arrays(N_TRAIN, N_TEST, learnable=True), False
    else:
        arrays = Arrays(full.train_x[:N_TRAIN], full.train_y[:N_TRAIN], full.test_x[:N_TEST], full.test_y[:N_TEST])
        real = True
    write_idx_folder(folder / "MNIST" / "raw", arrays)
    return folder, real


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


QUICK = ("--epochs", "2", "--batch-size", "100", "--lr", "1.0", "--max-grad-norm", "1.0", "--seed", "3")


def test_train_cli_json_epsilon_and_files(capsys, mnist_dir, tmp_path):
    folder, real = mnist_dir
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-dir", str(folder), "--target-epsilon",
                             "8", *QUICK, "--out", str(out_dir), "--json")
    assert code == 0, err
    result = json.loads(out)
    for key in ("test_accuracy", "epsilon", "delta", "epochs", "seconds", "noise_multiplier", "sample_rate"):
        assert key in result, key
    assert result["train_size"] == N_TRAIN and result["test_size"] == N_TEST
    assert result["sample_rate"] == pytest.approx(100 / N_TRAIN)
    steps_per_epoch = math.ceil(N_TRAIN / 100)
    assert result["steps"] == 2 * steps_per_epoch and result["epochs"] == 2
    # epsilon: finite, within the target, and what an independent accountant says for the run
    acc = make_accountant("prv")
    acc.step(result["noise_multiplier"], result["sample_rate"], result["steps"])
    assert math.isfinite(result["epsilon"]) and result["epsilon"] <= 8.0
    assert result["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert result["epsilon"] >= 8.0 * 0.98  # calibrated to spend (almost) the whole budget
    assert result["history"] == [[result["noise_multiplier"], result["sample_rate"], result["steps"]]]
    # the model learned something: 20 noisy steps on 1,000 images
    assert result["test_accuracy"] > (0.5 if real else 0.3)
    # files
    rows = list(csv.DictReader(open(out_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(result["test_accuracy"])
    assert float(rows[0]["epsilon"]) < float(rows[1]["epsilon"]) == pytest.approx(result["epsilon"])
    assert (out_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=False)
    assert set(checkpoint) >= {"model", "optimizer", "privacy", "config"}
    privacy = checkpoint["privacy"]
    history = privacy["engine"]["accountant"]["history"] if "engine" in privacy else privacy["accountant"]["history"]
    assert [list(h) for h in history] == result["history"]
    model = build_model("cnn", 1)
    model.load_state_dict(checkpoint["model"])  # the saved weights are a whole model
    saved = json.loads((out_dir / "result.json").read_text())
    assert saved["test_accuracy"] == result["test_accuracy"]
    assert "epoch 2/2" in err and "\u03b5" in err


def test_train_with_noise_multiplier_and_max_steps_is_reproducible(mnist_dir):
    folder, _ = mnist_dir
    cfg = TrainConfig(dataset="mnist", data_dir=str(folder), noise_multiplier=1.1, epochs=3, batch_size=50,
                      lr=0.5, max_grad_norm=1.0, max_steps=4, train_subset=500, seed=1, progress=True)
    log = io.StringIO()
    a = train(cfg, log=log)
    b = train(TrainConfig(**{**cfg.__dict__, "progress": False}), log=io.StringIO())
    assert a["steps"] == 4 and a["epochs"] == pytest.approx(0.4)  # 4 of 10 steps in the first epoch
    assert a["noise_multiplier"] == 1.1 and a["sample_rate"] == pytest.approx(0.1) and a["train_size"] == 500
    assert a["test_loss"] == b["test_loss"] and a["epsilon"] == b["epsilon"]  # same seed, same run
    acc = make_accountant("prv")
    acc.step(1.1, 0.1, 4)
    assert a["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    c = train(TrainConfig(**{**cfg.__dict__, "seed": 2, "max_steps": 1, "progress": False}), log=io.StringIO())
    assert c["steps"] == 1 and c["test_loss"] != a["test_loss"]
    text = log.getvalue()
    assert "noise multiplier 1.1" in text
    assert "loss=" in text and "acc=" in text and "eps=" in text  # the progress bar's postfix


def test_evaluation_does_not_touch_the_private_step():
    """Evaluating between steps records nothing in the engine and the next step still works."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 28, 28, generator=g), torch.arange(64) % 10)
    model = build_model("cnn", 1, generator=g)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                            data_loader=DataLoader(data, batch_size=16), noise_multiplier=0.0,
                                            max_grad_norm=1e6, generator=g)
    for i, (x, y) in enumerate(loader):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        loss, accuracy = evaluate(model, data, batch_size=20)  # 4 eval batches of other sizes
        assert model.training and 0 <= accuracy <= 1 and math.isfinite(loss)
        if i == 2:
            break
    assert engine.accountant.history[-1][2] == 3  # evaluation added no steps
    # with no noise and no clipping, the private step is plain SGD: eval left no stale state behind
    x, y = data.tensors[0][:8], data.tensors[1][:8]
    reference = build_model("cnn", 1)
    reference.load_state_dict(model.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    evaluate(model, data)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    for name, p in reference.named_parameters():
        expected = before[name] - 0.1 * p.grad * 8 / 16  # the private step divides by the expected batch (16)
        assert torch.allclose(dict(model.named_parameters())[name], expected, atol=1e-5), name


def test_evaluate_restores_eval_mode_and_counts_correctly():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3]

    x = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]]).view(4, 1, 1, 3)
    data = TensorDataset(x, torch.tensor([0, 1, 0, 0]))
    model = Fixed().eval()
    loss, accuracy = evaluate(model, data, batch_size=3)
    assert accuracy == 0.75 and not model.training
    logits = x.flatten(1)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, data.tensors[1])))


def test_helpers():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.arange(10.0), torch.arange(10))
    sub = random_subset(data, 4, g)
    assert len(sub) == 4 and torch.equal(sub.tensors[0].long(), sub.tensors[1])
    assert len(set(sub.tensors[1].tolist())) == 4
    with pytest.raises(ValueError, match="train_subset=11 is larger than the training set \\(10"):
        random_subset(data, 11, g)


def test_cosine_schedule_goes_from_lr_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    schedule = train_module.lr_schedule(opt, "cosine", total_steps=4)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen == pytest.approx([2.0, 2.0 * (1 + math.cos(math.pi / 4)) / 2, 1.0,
                                  2.0 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0], abs=1e-12)
    constant = train_module.lr_schedule(torch.optim.SGD([param], lr=0.3), "constant", 4)
    assert constant.get_last_lr() == [0.3]
    with pytest.raises(ValueError, match="'linear' is not one of constant, cosine"):
        train_module.lr_schedule(opt, "linear", 4)


def test_default_threads_leave_busy_cores_alone():
    assert train_module.default_threads(cpus=2, load=0.1) == 2
    assert train_module.default_threads(cpus=2, load=0.6) == 1
    assert train_module.default_threads(cpus=2, load=7.0) == 1
    assert train_module.default_threads(cpus=16, load=3.2) == 13
    assert 1 <= train_module.default_threads() <= os.cpu_count()


def test_train_restores_the_thread_count(mnist_dir):
    folder, _ = mnist_dir
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    result = train(TrainConfig(data_dir=str(folder), noise_multiplier=1.0, train_subset=100, batch_size=50,
                               max_steps=1, threads=other, progress=False), log=io.StringIO())
    assert result["threads"] == other and torch.get_num_threads() == before


def test_check_config_lists_every_problem():
    with pytest.raises(ValueError) as info:
        check_config(TrainConfig(dataset="svhn", target_epsilon=3, noise_multiplier=1, lr=-1, momentum=1.0,
                                 batch_size=0, clipping="none"))
    message = str(info.value)
    for part in ("svhn", "exactly one of target_epsilon", "lr must be", "momentum must be", "batch_size must be",
                 "clipping 'none'"):
        assert part in message, part


@pytest.mark.parametrize("argv, message", [
    (("--epochs", "0"), "--epochs: must be a whole number >= 1; got 0"),
    (("--lr", "-1"), "--lr: must be a finite number > 0; got -1"),
    (("--target-epsilon", "3", "--noise-multiplier", "1"), "not allowed with argument"),
    (("--dataset", "svhn"), "invalid choice: 'svhn'"),
    (("--momentum", "1"), "--momentum: must be in [0, 1)"),
])
def test_train_cli_bad_input_one_line_exit_2(capsys, argv, message):
    base = ["train", "--max-steps", "1"]
    if "--target-epsilon" not in argv:
        base += ["--noise-multiplier", "1"]
    code, out, err = run_cli(capsys, *base, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_train_cli_missing_data_exit_2(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--dataset", "cifar10", "--noise-multiplier", "1", "--data-dir",
                             str(tmp_path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "data_batch_1" in err and "cifar-10-batches-py" in err


def test_train_cli_subset_larger_than_data_exit_2(capsys, mnist_dir):
    folder, _ = mnist_dir
    code, _, err = run_cli(capsys, "train", "--data-dir", str(folder), "--noise-multiplier", "1", "--train-subset",
                           str(N_TRAIN + 1))
    assert code == 2 and f"train_subset={N_TRAIN + 1}" in err


def test_batchnorm_model_is_refused_with_the_fix(capsys, mnist_dir):
    folder, _ = mnist_dir
    code, _, err = run_cli(capsys, "train", "--data-dir", str(folder), "--model", "resnet18-bn", "--noise-multiplier",
                           "1", "--train-subset", "100", "--max-steps", "1")
    assert code == 2 and "BatchNorm" in err and "GroupNorm" in err


def test_cli_choices_match_the_train_module():
    assert cli.TRAIN_DATASETS == train_module.DATASETS
    assert set(cli.TRAIN_MODELS) == set(train_module.MODELS)
    assert cli.TRAIN_CLIPPINGS == train_module.CLIPPINGS


def test_human_output(capsys, mnist_dir):
    folder, _ = mnist_dir
    code, out, err = run_cli(capsys, "train", "--data-dir", str(folder), "--noise-multiplier", "1.0",
                             "--train-subset", "400", "--batch-size", "100", "--max-steps", "2", "--epochs", "1")
    assert code == 0, err
    lines = dict(line.split(None, 1) if not line.startswith(("test ", "noise ", "sample ")) else
                 (" ".join(line.split()[:2]), " ".join(line.split()[2:])) for line in out.splitlines())
    assert lines["test accuracy"].endswith("%") and "delta 1e-05, prv" in lines["epsilon"]
    assert lines["noise multiplier"] == "1" and lines["steps"].startswith("2 (0.5 epochs)")
    code, out, err = run_cli(capsys, "train", "--data-dir", str(folder), "--noise-multiplier", "1.0", "--train-subset",
                             "400", "--batch-size", "100", "--max-steps", "1", "--pixels", "standard", "--lr-schedule",
                             "cosine", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["pixels"] == "standard" and result["lr_schedule"] == "cosine" and result["steps"] == 1
    assert np.isfinite(float(lines["epsilon"].split()[0]))


def test_batch_clipping_counts_logical_steps_not_micro_batches(mnist_dir):
    """With micro-batch units the loader yields several items per private step; steps are the engine's."""
    folder, _ = mnist_dir
    cfg = TrainConfig(data_dir=str(folder), model="resnet18-bn", width=4, noise_multiplier=1.0, train_subset=200,
                      batch_size=100, epochs=1, clipping="batch", batch_clip_size=25, max_grad_norm=1.0, lr=0.1,
                      threads=1, progress=False)
    result = train(cfg, log=io.StringIO())
    assert result["steps"] == 2 and result["epochs"] == 1  # 200 / 100 = 2 steps per epoch, 4 units each
    assert result["history"] == [[1.0, 0.5, 2]]
    assert result["width"] == 4 and result["parameters"] < 50_000  # width 32 (default): 2.8M
    short = train(TrainConfig(**{**cfg.__dict__, "epochs": 2, "max_steps": 3}), log=io.StringIO())
    assert short["steps"] == 3 and short["epochs"] == 1.5 and short["history"][-1][2] == 3


def test_batch_clipping_layerwise_with_quantile_controller(mnist_dir):
    """BC + ALC: one threshold per layer (C / sqrt(L)), moved by the privatised Quantile controller."""
    folder, _ = mnist_dir
    model = build_model("resnet18-bn", 1, 10)
    bounds = train_module.layer_bounds(model, 2.0)
    assert len(bounds) == sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    assert math.isclose(math.sqrt(sum(b * b for b in bounds.values())), 2.0)
    # 20 units per step: the counts' default noise multiplier 20 / 20 = 1 must exceed sigma
    result = train(TrainConfig(data_dir=str(folder), model="resnet18-bn", width=4, noise_multiplier=0.5,
                               train_subset=200, batch_size=100, epochs=1, clipping="batch", batch_clip_size=5,
                               layerwise=True, clip_controller="quantile", max_grad_norm=1.0, lr=0.1, threads=1,
                               progress=False), log=io.StringIO())
    thresholds = result["clip_thresholds"]
    assert result["layerwise"] and len(thresholds) == len(bounds) and len(set(thresholds)) > 1
    assert result["steps"] == 2 and math.isfinite(result["epsilon"])


def test_layerwise_and_width_are_checked():
    with pytest.raises(ValueError) as info:
        check_config(TrainConfig(noise_multiplier=1.0, layerwise=True, width=8))
    assert "layerwise is for clipping 'batch'" in str(info.value) and "width is for the resnet18" in str(info.value)


def test_train_cli_layerwise_and_width(capsys, mnist_dir):
    folder, _ = mnist_dir
    code, out, err = run_cli(capsys, "train", "--data-dir", str(folder), "--model", "resnet18-bn", "--width", "4",
                             "--clipping", "batch", "--batch-clip-size", "20", "--layerwise", "--clip-controller",
                             "quantile", "--noise-multiplier", "0.2", "--train-subset", "200", "--batch-size", "100",
                             "--max-steps", "1", "--threads", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["layerwise"] is True and result["width"] == 4 and result["steps"] == 1
    assert result["batch_clip_size"] == 20 and len(result["clip_thresholds"]) > 1


def test_fixed_total_quantile_keeps_the_root_sum_of_squares(mnist_dir):
    from dpclip.controllers import ClipStatistics

    from dpclip.controllers import Quantile

    controller = Quantile(keep_total=2.0)
    assert controller.statistics_noise_multiplier(100) == 5.0  # Quantile's default: units / 20
    stats = ClipStatistics((0.0, 1.0, 0.5), 100.0, clip=(1.0, 1.0, 1.0))
    new = controller.update((1.0, 1.0, 1.0), stats)
    assert math.isclose(math.sqrt(sum(c * c for c in new)), 2.0) and new[0] > new[2] > new[1]
    folder, _ = mnist_dir
    result = train(TrainConfig(data_dir=str(folder), model="resnet18", width=4, noise_multiplier=0.5,
                               train_subset=200, batch_size=100, epochs=1, clipping="adaptive_layerwise",
                               clip_controller="quantile-fixed-total", max_grad_norm=1.5, lr=0.1, threads=1,
                               progress=False), log=io.StringIO())
    thresholds = result["clip_thresholds"]
    assert len(set(thresholds)) > 1 and math.isclose(math.sqrt(sum(c * c for c in thresholds)), 1.5)

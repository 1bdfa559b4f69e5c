"""experiments/reproduce/lipschitz_clip.py: the per-sample Lipschitz constant of a softmax layer and one sweep point."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.scripts import load_script

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "reproduce" / "lipschitz_clip.py"


@pytest.fixture(scope="module")
def lc():
    return load_script(SCRIPT, "lipschitz_clip")


def _autograd_norms(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient norms by one backward pass per sample (the float64 oracle)."""
    norms = []
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(layer(x[i:i + 1]), y[i:i + 1]), list(layer.parameters()))
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(norms)


@pytest.mark.parametrize("bias", [True, False])
def test_lipschitz_bounds_autograd_norms_float64(lc, bias):
    g = torch.Generator().manual_seed(0)
    n, d, k = 64, 12, 10
    x = torch.relu(torch.randn(n, d, generator=g, dtype=torch.float64)) * torch.rand(n, 1, generator=g,
                                                                                      dtype=torch.float64) * 5
    y = torch.randint(0, k, (n,), generator=g)
    layer = nn.Linear(d, k, bias=bias).double()
    with torch.no_grad():
        layer.weight.copy_(3 * torch.randn(k, d, generator=g, dtype=torch.float64))
        if bias:
            layer.bias.copy_(torch.randn(k, generator=g, dtype=torch.float64))
    exact = _autograd_norms(layer, x, y)
    torch.testing.assert_close(lc.softmax_grad_norms(layer, x, y), exact, rtol=1e-12, atol=1e-12)
    L = lc.lipschitz_constants(x, bias=bias)
    assert L.dtype == torch.float64
    assert bool((exact <= L * (1 + 1e-12)).all())
    expected = torch.sqrt(2 * (x.pow(2).sum(1) + (1.0 if bias else 0.0)))
    torch.testing.assert_close(L, expected, rtol=0, atol=0)


def test_lipschitz_bound_is_approached(lc):
    """All probability on one wrong class: the gradient norm tends to L_i (the bound is the supremum)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 5, generator=g, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    layer = nn.Linear(5, 10).double()
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.bias[3] = 60.0  # p concentrates on class 3 != y
    ratio = _autograd_norms(layer, x, y) / lc.lipschitz_constants(x)
    assert bool((ratio > 1 - 1e-9).all()) and bool((ratio <= 1 + 1e-12).all())
    with torch.no_grad():  # at zero weights p is uniform: ||p - e_y|| = sqrt(0.9)
        layer.bias.zero_()
    torch.testing.assert_close(_autograd_norms(layer, x, y) / lc.lipschitz_constants(x),
                               torch.full((8,), math.sqrt(0.9 / 2), dtype=torch.float64))


def test_sweep_point_runs_and_reports(lc, tmp_path):
    g = torch.Generator().manual_seed(2)
    n, d = 400, 16
    centers = 3 * torch.randn(10, d, generator=g)

    def make(m):
        y = torch.randint(0, 10, (m,), generator=g)
        return torch.relu(centers[y] + torch.randn(m, d, generator=g)), y

    (tx, ty), (vx, vy), (sx, sy) = make(n), make(100), make(100)
    data = {"train_x": tx, "train_y": ty, "val_x": vx, "val_y": vy, "test_x": sx, "test_y": sy}
    min_l = float(lc.lipschitz_constants(tx).min())
    grid = lc.clip_grid(min_l, 0.1, 10.0, 3)
    assert grid[1] == pytest.approx(min_l)
    r = lc.private_run(data, clip=grid[1], lr=1.0 / grid[1], noise_multiplier=1.0, epochs=2, batch_size=50, seed=0)
    assert 0 < r["epsilon"] < math.inf and r["steps"] == 16 and not r["diverged"]
    assert 0.0 <= r["test_accuracy"] <= 1.0
    at_init = math.sqrt(0.45) * lc.lipschitz_constants(tx)  # zero weights: ||p - e_y||^2 = 0.9
    assert r["clipped_fraction_init"] == pytest.approx(float((at_init > grid[1]).float().mean()))
    again = lc.private_run(data, clip=grid[1], lr=1.0 / grid[1], noise_multiplier=1.0, epochs=2, batch_size=50,
                           seed=0)
    assert again["test_accuracy"] == r["test_accuracy"]  # seeded sampling and noise
    free = lc.private_run(data, clip=grid[2], lr=0.1, noise_multiplier=0.0, epochs=1, batch_size=50, seed=0)
    assert free["epsilon"] is None and free["clipped_fraction_init"] == 0.0  # sigma = 0: not private

    stats = lc.quantile_stats(lc.lipschitz_constants(tx))
    meta = {"config": {"delta": 1e-5, "epochs": 2, "batch_size": 50, "sample_rate": 0.125, "steps": 16,
                       "c_low": 0.1, "c_high": 10.0, "c_points": 3},
            "features": {"feature_dim": d, "cnn_epochs": 0, "public_test_accuracy": 0.0},
            "n_train": n, "n_val": 100, "n_test": 100, "lipschitz_private_train": stats,
            "lipschitz_public_mnist": lc.quantile_stats(lc.lipschitz_constants(vx)),
            "feature_norm_private_train": stats, "grad_norm_at_zero_init": stats}
    rows = [{"target_epsilon": 1.0, "clip": c, "c_over_min_l": c / min_l, "eta": eta, "lr": eta / c, "seed": s,
             "noise_multiplier": 1.0, "val_accuracy": 0.5 + 0.01 * s + 0.1 * (eta == 1.0), "test_accuracy": 0.5,
             "epsilon": r["epsilon"], "clipped_fraction_init": 1.0, "clipped_fraction_final": 0.5}
            for c in grid for eta in (0.3, 1.0) for s in (0, 1)]
    rows += [dict(row, target_epsilon=None, noise_multiplier=0.0, epsilon=None) for row in rows]
    summary = lc.summarize(rows, meta)
    assert len(summary["points"]) == 6 and all(p["eta"] == 1.0 and p["seeds"] == 2 for p in summary["points"])
    assert summary["findings"]["1.0"]["best_inside_by_val"]["c_over_min_l"] <= 1 + 1e-9
    assert summary["noise_multipliers"] == {1.0: 1.0, math.inf: 0.0}
    lc.plot(summary, tmp_path / "p.png")
    text = lc.page(summary)
    assert "| yes |" in text and "σ = 0" in text
    assert (tmp_path / "p.png").stat().st_size > 0

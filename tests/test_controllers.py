"""Clip-norm controllers: the update rules, the budget split, and what the engine releases to them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpclip import PrivacyEngine
from dpclip.controllers import ClipStatistics, Fixed, Quantile, gradient_noise_multiplier


def test_the_budget_split_keeps_the_whole_release_at_sigma():
    sigma, sigma_c = 1.2, 30.0
    sigma_grad = gradient_noise_multiplier(sigma, sigma_c)
    # whitened sensitivities add in squares: 1/sigma_grad^2 + 1/sigma_c^2 = 1/sigma^2
    assert sigma_grad**-2 + sigma_c**-2 == pytest.approx(sigma**-2, rel=1e-12)
    assert sigma_grad > sigma
    assert gradient_noise_multiplier(sigma, None) == sigma
    assert gradient_noise_multiplier(0.0, 5.0) == 0.0
    with pytest.raises(ValueError, match="must exceed noise_multiplier=2"):
        gradient_noise_multiplier(2.0, 1.5)


def test_quantile_moves_geometrically_toward_the_target():
    q = Quantile(target_unclipped_quantile=0.5, learning_rate=0.2)
    stats = ClipStatistics(unclipped_fraction=(0.9, 0.1, 0.5), expected_units=64.0)
    new = q.update((1.0, 1.0, 2.0), stats)
    assert new == pytest.approx((math.exp(-0.08), math.exp(0.08), 2.0))
    assert q.update((1.0,), None) == (1.0,)
    assert q.statistics_noise_multiplier(64.0) == pytest.approx(3.2)  # Andrew et al.: B / 20
    assert Quantile(count_noise_multiplier=7.0).statistics_noise_multiplier(64.0) == 7.0
    assert Quantile(min_clip=0.5).update((0.5,), ClipStatistics((1.0,), 10.0)) == (0.5,)
    with pytest.raises(ValueError, match="2 statistics for 1 thresholds"):
        q.update((1.0,), ClipStatistics((0.1, 0.2), 4.0))


def test_fixed_reads_nothing():
    assert Fixed().statistics_noise_multiplier(100.0) is None
    assert Fixed().update((0.3, 0.4), None) == (0.3, 0.4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_unclipped_quantile": 1.0}, "target_unclipped_quantile must be in"),
        ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
        ({"count_noise_multiplier": -1.0}, "count_noise_multiplier must be"),
        ({"min_clip": 2.0, "max_clip": 1.0}, "min_clip"),
    ],
)
def test_quantile_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Quantile(**kwargs)


@dataclass(frozen=True)
class Recorder:
    """A controller that keeps the thresholds and records every statistic it is shown."""

    seen: list = field(default_factory=list)
    sigma_c: float = 8.0

    def statistics_noise_multiplier(self, expected_units: float) -> float:
        return self.sigma_c

    def update(self, clip, stats):
        self.seen.append(stats)
        return tuple(clip)


@pytest.mark.parametrize("clipping, units, max_grad_norm", [("flat", 10.0, 1.0), ("per_layer", 10.0, [1.0, 1.0]),
                                                             ("batch", 5.0, 1.0)])
def test_the_controller_sees_noisy_counts_with_the_declared_noise(clipping, units, max_grad_norm):
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    data = TensorDataset(torch.randn(100, 4, dtype=torch.float64), torch.randint(0, 2, (100,)))
    recorder = Recorder()
    engine = PrivacyEngine()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    extra = {"batch_clip_size": 2} if clipping == "batch" else {}
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=10), noise_multiplier=1.0,
        max_grad_norm=max_grad_norm, clipping=clipping, clip_controller=recorder,
        generator=torch.Generator().manual_seed(1), **extra,
    )
    true_counts, open_count = [], 0
    for _ in range(30):
        for x, y in loader:
            (0.0 * F.cross_entropy(model(x), y)).backward()  # zero gradients: every unit is unclipped
            open_count += (len(x) if clipping != "batch" else 1) if len(x) else 0
            steps = engine.steps
            opt.step()
            opt.zero_grad()
            if engine.steps > steps:  # a logical step was released
                true_counts.append(open_count)
                open_count = 0
    fractions = torch.tensor([s.unclipped_fraction for s in recorder.seen], dtype=torch.float64)
    assert len(recorder.seen) == len(true_counts) == 300 and all(s.expected_units == units for s in recorder.seen)
    noise = fractions * units - torch.tensor(true_counts, dtype=torch.float64)[:, None]
    groups = fractions.shape[1]
    # one unit moves each count by at most 1 (L2 sensitivity sqrt(G)); the noise std is sigma_c * sqrt(G)
    assert float(noise.std()) == pytest.approx(8.0 * math.sqrt(groups), rel=0.1)
    assert abs(float(noise.mean())) < 4 * 8.0 * math.sqrt(groups) / math.sqrt(noise.numel())
    assert engine.accountant.history == [(1.0, 0.1, 300)]


def test_count_noise_that_would_use_the_whole_budget_is_refused_up_front():
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(100, 4), torch.randint(0, 2, (100,)))
    with pytest.raises(ValueError, match="statistics noise multiplier 0.2 must exceed noise_multiplier=1"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
            clipping="adaptive_layerwise",  # default Quantile: sigma_c = 4 / 20
        )

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
    for _ in range(15):
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
    assert len(recorder.seen) == len(true_counts) == 150 and all(s.expected_units == units for s in recorder.seen)
    noise = fractions * units - torch.tensor(true_counts, dtype=torch.float64)[:, None]
    groups = fractions.shape[1]
    # one unit moves each count by at most 1 (L2 sensitivity sqrt(G)); the noise std is sigma_c * sqrt(G)
    assert float(noise.std()) == pytest.approx(8.0 * math.sqrt(groups), rel=0.15)
    assert abs(float(noise.mean())) < 4 * 8.0 * math.sqrt(groups) / math.sqrt(noise.numel())
    assert engine.accountant.history == [(1.0, 0.1, 150)]


def test_count_noise_that_would_use_the_whole_budget_is_refused_up_front():
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(100, 4), torch.randint(0, 2, (100,)))
    with pytest.raises(ValueError, match="statistics noise multiplier 0.2 must exceed noise_multiplier=1"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
            clipping="adaptive_layerwise",  # default Quantile: sigma_c = 4 / 20
        )


# ---------------------------------------------------------------- histogram controllers
from dpclip.controllers import (  # noqa: E402
    MultiObjective,
    PrivateAutoClip,
    PrivateZClip,
    histogram_estimate,
    release_statistics,
)


def _exact(sigma_c, values, sensitivity):
    return dict(values)  # noise-free release, for convergence checks (sigma = 0)


def _lognormal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64))  # median 1


def test_statistics_hold_plain_numbers_only():
    with pytest.raises(TypeError, match="tuple of floats"):
        ClipStatistics(torch.tensor([0.5]), 10.0)
    with pytest.raises(TypeError, match="floats, not tensors"):
        ClipStatistics((torch.tensor(0.5),), 10.0)
    stats = release_statistics(Quantile(), _lognormal(50, 0), (1.0,), 50.0, 1.0, _exact)
    assert all(type(v) is float for v in stats.unclipped_fraction)


def test_quantile_converges_to_the_target_quantile_without_statistics_noise():
    target = 0.7
    q = Quantile(target_unclipped_quantile=target, learning_rate=0.2)
    clip = (0.1,)
    for step in range(400):
        norms = _lognormal(2000, step)
        clip = q.update(clip, release_statistics(q, norms, clip, 2000.0, 0.0, _exact))
    true = math.exp(0.5 * 0.5244)  # the 0.7 quantile of exp(0.5 N(0, 1))
    assert clip[0] == pytest.approx(true, rel=0.05)


def test_private_autoclip_finds_the_percentile_within_the_grid():
    ac = PrivateAutoClip(percentile=30.0)
    clip = (1.0,)
    for step in range(50):
        clip = ac.update(clip, release_statistics(ac, _lognormal(2000, step), clip, 2000.0, 0.0, _exact))
    true = math.exp(0.5 * -0.5244)  # the 30th percentile
    assert clip[0] == pytest.approx(true, rel=0.2)  # half-octave bins, history on quarter-octaves
    restored = PrivateAutoClip(percentile=30.0)
    restored.load_state_dict(ac.state_dict())
    assert restored.state_dict() == ac.state_dict()


def test_private_zclip_tracks_mean_plus_z_std():
    zc = PrivateZClip(z=1.0, alpha=0.5)
    clip = (1.0,)
    for step in range(40):
        clip = zc.update(clip, release_statistics(zc, _lognormal(4000, step), clip, 4000.0, 0.0, _exact))
    mean, std = math.exp(0.125), math.sqrt((math.exp(0.25) - 1) * math.exp(0.25))
    assert clip[0] == pytest.approx(mean + std, rel=0.1)  # half-octave bins bias the moments a little


def test_histogram_release_has_the_declared_sensitivity_and_noise():
    zc = PrivateZClip(count_noise_multiplier=3.0)
    norms = _lognormal(100, 1).repeat(1, 2)  # two groups
    calls = []

    def spy(sigma_c, values, sensitivity):
        calls.append((sigma_c, sensitivity))
        return dict(values)

    stats = release_statistics(zc, norms, (1.0, 2.0), 100.0, 1.0, spy, histogram_sensitivity=math.sqrt(2.0))
    assert calls == [(3.0, pytest.approx(2.0))]  # sqrt(2) per unit (batch clipping) times sqrt(G = 2)
    assert stats.count_noise_std == pytest.approx(6.0)
    values, weights = histogram_estimate(stats, 1, threshold=0.0)
    assert float(weights.sum()) == pytest.approx(1.0)  # exact counts / expected units
    _, kept = histogram_estimate(stats, 1)  # bins below 2 noise stds (12 counts) are taken as empty
    assert float(kept.sum()) < 1.0 and bool(((kept == 0) | (kept * 100 > 12)).all())
    assert values[9] == pytest.approx(2.0 * 2**0.25)  # the bin [1, sqrt 2) x C_1 = 2


def test_multi_objective_picks_the_minimiser_of_its_objective():
    norms = _lognormal(1000, 3)
    mo = MultiObjective(learning_rate=1.0)
    stats = release_statistics(mo, norms, (1.0,), 1000.0, 1.0, _exact, dimension=200_000)
    new = mo.update((1.0,), stats)[0]

    def exact_objective(c: float) -> float:  # with the exact norms instead of the histogram
        bias = float((norms - c).clamp_min(0).mean())
        signal = float(norms.clamp_max(c).mean())
        return (bias**2 + stats.noise_multiplier**2 * c**2 * 200_000 / 1000**2) / signal**2

    grid = [2 ** (k / 16) for k in range(-48, 33)]
    best = min(grid, key=exact_objective)
    assert new == pytest.approx(best, rel=0.35)
    assert exact_objective(new) <= 1.3 * exact_objective(best)
    # more noise per unit of C (larger model) pushes the threshold down
    big = release_statistics(mo, norms, (1.0,), 1000.0, 1.0, _exact, dimension=20_000_000)
    assert mo.update((1.0,), big)[0] < new


def test_noise_std_regime_accounts_the_multiplier_of_every_step():
    from accountants import PRVAccountant

    torch.manual_seed(0)
    model = nn.Linear(20, 2).double()
    data = TensorDataset(torch.randn(400, 20, dtype=torch.float64), torch.randint(0, 2, (400,)))
    controller = MultiObjective(privacy_weight=1e-3, utility_weight=1.0, regime="noise_std", count_noise_multiplier=5.0)
    engine = PrivacyEngine()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=100), noise_multiplier=1.0,
        max_grad_norm=1.0, clip_controller=controller, generator=torch.Generator().manual_seed(0),
    )
    for _ in range(5):
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    clips = [c[0] for c in engine.clip_history]
    assert len(set(clips)) > 1  # the threshold moved
    by_hand = PRVAccountant()
    for c in clips:
        by_hand.step(noise_multiplier=1.0 / c, sample_rate=0.25)  # fixed std 1.0 * 1.0; sigma_t = std / C_t
    assert engine.accountant.history == by_hand.history
    assert engine.get_epsilon(1e-5) == by_hand.get_epsilon(1e-5)


def test_multi_objective_keeps_learning_when_the_noise_dominates():
    # the regime that drove an absolute-error objective to C -> 0: the noise term
    # sigma^2 C^2 d / B^2 (here 1.7 C^2) dwarfs the squared clipping bias at every C
    norms = _lognormal(200, 4)
    mo = MultiObjective(learning_rate=1.0)
    clip = (1.0,)
    for _ in range(30):
        stats = release_statistics(mo, norms, clip, 200.0, 1.15, _exact, dimension=50_890)
        clip = mo.update(clip, stats)
    assert 0.3 < clip[0] < 3.0  # it settles at the scale of the norms (median 1)


def test_quantile_keep_total_fixes_the_root_sum_of_squares():
    """keep_total: the same geometric moves, then one common rescaling (post-processing)."""
    from dpclip.controllers import ClipStatistics, Quantile

    stats = ClipStatistics((0.0, 1.0, 0.5), 100.0, clip=(1.0, 2.0, 0.5))
    free = Quantile().update((1.0, 2.0, 0.5), stats)
    kept = Quantile(keep_total=3.0).update((1.0, 2.0, 0.5), stats)
    assert math.isclose(math.sqrt(sum(c * c for c in kept)), 3.0)
    ratio = [k / f for k, f in zip(kept, free)]
    assert max(ratio) - min(ratio) < 1e-12  # the split across layers is the free rule's
    with pytest.raises(ValueError, match="keep_total"):
        Quantile(keep_total=0.0)

"""PRV accountant against exact closed forms and dp-accounting's PLD accountant."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from accountants.events import ComposedEvent, GaussianEvent, SelfComposedEvent, dpsgd_event
from accountants.prv import EpsilonBounds, prv_delta, prv_epsilon, prv_epsilon_bounds
from tests._reference import gaussian_delta, gaussian_epsilon, pld_epsilon


def _event(segments):
    return ComposedEvent(tuple(dpsgd_event(sigma, q, steps) for sigma, q, steps in segments))


# --- exact references: N Gaussian mechanisms compose to one Gaussian (sample rate 1) ---


@pytest.mark.parametrize(
    "sigma, steps, delta",
    [(2.0, 10, 1e-6), (1.0, 1, 1e-5), (0.7, 50, 1e-12), (20.0, 100_000, 1e-12), (5.0, 1000, 1e-3), (50.0, 3, 1e-9)],
)
def test_gaussian_bounds_contain_the_exact_epsilon(sigma, steps, delta):
    exact = gaussian_epsilon(delta, sigma, steps)
    bounds = prv_epsilon_bounds(dpsgd_event(sigma, 1.0, steps), delta)
    assert bounds.lower <= exact <= bounds.upper
    assert bounds.upper - exact <= max(0.008 * exact, 5e-4) + 1e-12
    assert abs(bounds.estimate - exact) <= 1e-3 * max(exact, 0.1)


def test_gaussian_event_without_sampling_equals_sample_rate_one():
    plain = prv_epsilon_bounds(SelfComposedEvent(GaussianEvent(3.0), 20), 1e-6)
    sampled = prv_epsilon_bounds(dpsgd_event(3.0, 1.0, 20), 1e-6)
    assert plain == sampled


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 8.0])
def test_delta_is_an_upper_bound_close_to_exact(epsilon):
    sigma, steps = 2.0, 10
    exact = gaussian_delta(epsilon, sigma, steps)
    bound = prv_delta(dpsgd_event(sigma, 1.0, steps), epsilon)
    assert exact <= bound
    # the bound is the exact delta at epsilon - t with t below the default accuracy
    # the error terms in delta add at most ~1e-3 relative
    assert bound <= gaussian_delta(epsilon - max(0.008 * epsilon, 5e-4), sigma, steps) * (1 + 3e-3)


# --- randomised grid against dp-accounting's PLD, refined until it converges ---


def _random_cases(count: int, seed: int = 20261129):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        parts = 3 if len(cases) % 4 == 3 else 1
        segments = tuple(
            (float(rng.uniform(0.5, 10.0)), float(10 ** rng.uniform(-4, 0)), int(10 ** rng.uniform(0, 5)))
            for _ in range(parts)
        )
        delta = float(10 ** rng.uniform(-12, -3))
        cases.append((segments, delta))
    return cases


@pytest.mark.parametrize("segments, delta", _random_cases(36))
def test_random_grid_matches_converged_pld(segments, delta):
    pytest.importorskip("dp_accounting")
    bounds = prv_epsilon_bounds(_event(segments), delta)
    if bounds.lower > 50:
        pytest.skip(f"epsilon {bounds.lower:.0f} > 50 is outside the accuracy contract")
    reference, converged = pld_epsilon(segments, delta)
    tolerance = 1e-3 if reference < 0.1 else 0.01 * reference
    if converged:
        assert bounds.upper - reference <= tolerance, (bounds, reference)
        assert reference - bounds.upper <= (5e-4 if reference < 0.1 else 0.005 * reference), (bounds, reference)
    else:
        # PLD scatters at tiny delta; it must still fall near our rigorous interval
        assert bounds.lower - 2 * tolerance <= reference <= bounds.upper + 2 * tolerance, (bounds, reference)


def test_heterogeneous_history_is_order_free_and_merges():
    a, b = dpsgd_event(1.0, 0.01, 300), dpsgd_event(2.0, 0.05, 200)
    one = prv_epsilon_bounds(ComposedEvent((a, b)), 1e-6)
    two = prv_epsilon_bounds(ComposedEvent((b, a)), 1e-6)
    assert one.upper == pytest.approx(two.upper, rel=1e-9)
    split = ComposedEvent((dpsgd_event(1.0, 0.01, 100), b, dpsgd_event(1.0, 0.01, 200)))
    assert prv_epsilon_bounds(split, 1e-6) == one


def test_small_delta_and_large_epsilon_are_finite_and_consistent():
    coarse = prv_epsilon_bounds(dpsgd_event(1.0, 0.01, 10_000), 1e-12)
    fine = prv_epsilon_bounds(dpsgd_event(1.0, 0.01, 10_000), 1e-12, relative_error=0.001)
    assert math.isfinite(coarse.upper)
    assert coarse.lower <= fine.upper and fine.lower <= coarse.upper
    big = prv_epsilon_bounds(dpsgd_event(0.6, 0.1, 1000), 1e-5)
    assert 40 < big.estimate < 100 and big.upper - big.lower <= 0.008 * big.lower + 1e-9


def test_monotone_in_steps_and_noise():
    base = prv_epsilon_bounds(dpsgd_event(1.0, 0.01, 1000), 1e-5)
    more_steps = prv_epsilon_bounds(dpsgd_event(1.0, 0.01, 2000), 1e-5)
    more_noise = prv_epsilon_bounds(dpsgd_event(1.5, 0.01, 1000), 1e-5)
    assert more_steps.lower > base.upper
    assert more_noise.upper < base.lower


def test_tighter_than_rdp():
    rdp = pytest.importorskip("dp_accounting.rdp")
    import dp_accounting

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1)), 14062)
    assert prv_epsilon(dpsgd_event(1.1, 256 / 60000, 14062), 1e-5) < accountant.get_epsilon(1e-5)


def test_trivial_events():
    assert prv_epsilon_bounds(ComposedEvent(()), 1e-5) == EpsilonBounds(0.0, 0.0, 0.0)
    assert prv_epsilon(dpsgd_event(0.0, 0.01, 10), 1e-5) == math.inf
    assert prv_delta(dpsgd_event(0.0, 0.01, 10), 1.0) == 1.0
    assert prv_delta(ComposedEvent(()), 0.0) == 0.0


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, float("nan")])
def test_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        prv_epsilon(dpsgd_event(1.0, 0.01, 10), delta)


def test_bad_accuracy_and_epsilon():
    with pytest.raises(ValueError, match="relative_error"):
        prv_epsilon(dpsgd_event(1.0, 0.01, 10), 1e-5, relative_error=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        prv_delta(dpsgd_event(1.0, 0.01, 10), -1.0)


def test_grid_cap_returns_a_valid_but_looser_bound():
    exact = gaussian_epsilon(1e-6, 2.0, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bounds = prv_epsilon_bounds(dpsgd_event(2.0, 1.0, 10), 1e-6, relative_error=1e-6, max_grid=1 << 15)
    assert any("max_grid" in str(w.message) for w in caught)
    assert bounds.lower <= exact <= bounds.upper


def test_heavy_tailed_step_among_many_light_ones_at_tiny_delta():
    # one step with small sigma limits the FFT's tilt; the window is widened instead
    segments = ((2.508285254404614, 0.0003558697747137715, 82937), (0.5260979022253094, 0.0029065253607306134, 1),
                (6.580100304017928, 0.00015350863441340973, 2))
    bounds = prv_epsilon_bounds(_event(segments), 5.2418253944430554e-12)
    assert bounds.upper - bounds.lower <= 0.008 * bounds.lower
    reference, _ = pld_epsilon(segments, 5.2418253944430554e-12)
    assert abs(bounds.upper / reference - 1) <= 0.01


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2])
def test_very_small_noise_multipliers_give_a_finite_epsilon_below_rdp(sigma):
    # the tail quadrature once overflowed a float here (a noise-std controller can reach such sigmas)
    from accountants import RDPAccountant
    from accountants.events import dpsgd_event

    eps = prv_epsilon(dpsgd_event(sigma, 0.25, 20), 1e-5)
    assert math.isfinite(eps) and 0 < eps < RDPAccountant().step(sigma, 0.25, 20).get_epsilon(1e-5)

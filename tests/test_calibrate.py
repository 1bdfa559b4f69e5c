"""Noise calibration: never above the target, within the tolerance, few accountant calls."""

from __future__ import annotations

import math

import pytest

from accountants import get_noise_multiplier, make_accountant
from accountants import accountant as accountant_module
from accountants import calibrate as calibrate_module
from accountants.calibrate import calibrate

DELTA = 1e-5


def epsilon_of(kind, delta, *segments):
    acc = make_accountant(kind)
    for segment in segments:
        acc.step(*segment)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "target, delta, q, steps, kind",
    [
        (3.0, 1e-5, 0.004, 7500, "prv"),  # the typical case
        (3.0, 1e-5, 0.004, 7500, "rdp"),
        (1.0, 1e-5, 0.01, 1000, "prv"),
        (8.0, 1e-5, 4096 / 50000, 300, "prv"),
        (0.5, 1e-6, 0.002, 2000, "rdp"),
        (2.0, 1e-5, 1.0, 1, "prv"),  # the plain Gaussian mechanism
        (20.0, 1e-5, 0.01, 500, "rdp"),
    ],
)
def test_calibrated_sigma_meets_the_target_within_tolerance(target, delta, q, steps, kind):
    sigma = get_noise_multiplier(target, delta, q, steps, accountant=kind)
    eps = epsilon_of(kind, delta, (sigma, q, steps))
    assert target * (1 - 0.01) <= eps <= target


def test_a_tighter_tolerance_is_honoured():
    sigma = get_noise_multiplier(3.0, DELTA, 0.01, 1000, accountant="rdp", epsilon_tolerance=1e-4)
    assert 3.0 * (1 - 1e-4) <= epsilon_of("rdp", DELTA, (sigma, 0.01, 1000)) <= 3.0


def test_prv_needs_less_noise_than_rdp_and_more_budget_needs_less_noise():
    prv = get_noise_multiplier(3.0, DELTA, 0.01, 1000, accountant="prv")
    rdp = get_noise_multiplier(3.0, DELTA, 0.01, 1000, accountant="rdp")
    assert prv < rdp
    assert get_noise_multiplier(6.0, DELTA, 0.01, 1000, accountant="rdp") < rdp


def test_typical_prv_case_uses_few_fine_evaluations(monkeypatch):
    calls = []
    original = accountant_module.prv_epsilon_bounds

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(accountant_module, "prv_epsilon_bounds", counting)
    get_noise_multiplier(3.0, DELTA, 0.004, 7500, accountant="prv")
    assert 1 <= len(calls) <= 3


def test_epochs_mean_steps_of_round_epochs_over_q():
    by_epochs = get_noise_multiplier(2.0, DELTA, 0.01, accountant="rdp", epochs=10)
    by_steps = get_noise_multiplier(2.0, DELTA, 0.01, 1000, accountant="rdp")
    assert by_epochs == by_steps


def test_history_counts_against_the_budget():
    history = [(1.5, 0.01, 500)]
    fresh = get_noise_multiplier(3.0, DELTA, 0.01, 500, accountant="rdp")
    sigma = get_noise_multiplier(3.0, DELTA, 0.01, 500, accountant="rdp", history=history)
    assert sigma > fresh
    eps = epsilon_of("rdp", DELTA, *history, (sigma, 0.01, 500))
    assert 3.0 * 0.99 <= eps <= 3.0


def test_history_with_prv_and_an_accountant_instance():
    acc = make_accountant("prv")
    acc.step(1.5, 0.01, 300)
    sigma = get_noise_multiplier(2.0, DELTA, 0.01, 300, accountant=acc, history=acc.history)
    assert acc.history == [(1.5, 0.01, 300)]  # the instance is not changed
    assert 2.0 * 0.99 <= epsilon_of("prv", DELTA, (1.5, 0.01, 300), (sigma, 0.01, 300)) <= 2.0


def test_zero_steps_need_no_noise():
    assert get_noise_multiplier(1.0, DELTA, 0.01, 0) == 0.0
    assert get_noise_multiplier(1.0, DELTA, 0.01, 0, history=[(5.0, 0.01, 10)], accountant="rdp") == 0.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target_epsilon": 0.0}, ValueError, "target_epsilon must be a finite number > 0"),
        ({"target_epsilon": -1.0}, ValueError, "target_epsilon"),
        ({"target_epsilon": math.inf}, ValueError, "target_epsilon"),
        ({"target_epsilon": math.nan}, ValueError, "target_epsilon"),
        ({"target_epsilon": "3"}, TypeError, "target_epsilon"),
        ({"target_delta": 0.0}, ValueError, r"delta must be in \(0, 1\)"),
        ({"target_delta": 1.0}, ValueError, "delta"),
        ({"sample_rate": 0.0}, ValueError, r"sample_rate must be in \(0, 1\]"),
        ({"sample_rate": 1.5}, ValueError, "sample_rate"),
        ({"steps": -1}, ValueError, "steps must be >= 0"),
        ({"steps": 2.5}, TypeError, "steps"),
        ({"steps": None}, ValueError, "exactly one of steps= or epochs="),
        ({"epochs": 3}, ValueError, "exactly one of steps= or epochs="),
        ({"steps": None, "epochs": -2}, ValueError, "epochs"),
        ({"epsilon_tolerance": 0.0}, ValueError, "epsilon_tolerance"),
        ({"epsilon_tolerance": 1.0}, ValueError, "epsilon_tolerance"),
        ({"accountant": "gdp"}, ValueError, "unknown accountant 'gdp'"),
        ({"accountant": 3}, TypeError, "accountant"),
        ({"history": [(1.0, 0.01)]}, TypeError, r"history\[0\]"),
        ({"history": [(-1.0, 0.01, 5)]}, ValueError, r"history\[0\].*noise_multiplier"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    args = {"target_epsilon": 3.0, "target_delta": DELTA, "sample_rate": 0.01, "steps": 100, "accountant": "rdp"}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        get_noise_multiplier(**args)


def test_a_history_that_already_spends_the_budget_is_unreachable():
    with pytest.raises(ValueError, match="already spends epsilon .* raise target_epsilon"):
        get_noise_multiplier(1.0, DELTA, 0.01, 100, accountant="rdp", history=[(0.5, 0.1, 1000)])
    with pytest.raises(ValueError, match="already spends epsilon inf"):
        get_noise_multiplier(1.0, DELTA, 0.01, 100, accountant="rdp", history=[(0.0, 0.1, 1)])


# -- the general search ----------------------------------------------------------------------
@pytest.mark.parametrize("start", [1e-3, 0.5, 5.0, 1e4])
def test_calibrate_finds_the_smallest_feasible_parameter(start):
    calls = []

    def eps(x):
        calls.append(x)
        return 10.0 / x**1.5

    x = calibrate(eps, 2.0, start, epsilon_tolerance=0.01)
    exact = 5.0 ** (1 / 1.5)
    assert exact <= x <= exact * (1 / 0.99) ** (1 / 1.5)
    assert 2.0 * 0.99 <= eps(x) <= 2.0
    assert len(calls) < 30


def test_calibrate_handles_infinite_epsilon_and_a_floor():
    x = calibrate(lambda s: math.inf if s < 1.0 else 1.0 / s, 0.5, 0.01)
    assert 0.5 * 0.99 <= 1.0 / x <= 0.5
    assert calibrate(lambda s: 0.1, 0.5, 1.0, lower=0.2) == 0.2  # met everywhere: the lower end


def test_calibrate_reports_an_unreachable_target():
    with pytest.raises(ValueError, match="not reached even at 1000"):
        calibrate(lambda s: 1.0 + 1.0 / s, 0.5, 1.0, upper=1e3)
    with pytest.raises(ValueError, match="target epsilon must be a finite number > 0"):
        calibrate(lambda s: 1.0 / s, 0.0, 1.0)


def test_calibrate_never_returns_a_point_above_the_target_for_a_noisy_function():
    # a slightly non-monotone function, as a numerical accountant may be
    def eps(x):
        return 3.0 / x * (1 + 0.002 * math.sin(50 * x))

    x = calibrate(eps, 1.0, 1.0)
    assert eps(x) <= 1.0


# -- references ------------------------------------------------------------------------------
@pytest.mark.reference
@pytest.mark.parametrize("target, q, steps", [(3.0, 0.004, 7500), (8.0, 4096 / 50000, 2500)])
def test_rdp_calibration_matches_opacus(target, q, steps):
    utils = pytest.importorskip("opacus.accountants.utils")
    theirs = utils.get_noise_multiplier(
        target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp",
        epsilon_tolerance=0.001,
    )
    ours = get_noise_multiplier(target, DELTA, q, steps, accountant="rdp", epsilon_tolerance=0.001)
    assert ours == pytest.approx(theirs, rel=0.01)


@pytest.mark.reference
def test_prv_calibration_matches_dp_accounting_pld():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import mechanism_calibration
    from dp_accounting.pld import pld_privacy_accountant

    q, steps, target = 0.01, 1000, 1.0
    theirs = mechanism_calibration.calibrate_dp_mechanism(
        lambda: pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3),
        lambda s: dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), steps
        ),
        target, DELTA, mechanism_calibration.LowerEndpointAndGuess(0.5, 1.5), tol=1e-4,
    )
    ours = get_noise_multiplier(target, DELTA, q, steps, accountant="prv", epsilon_tolerance=0.001)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_module_exports():
    assert calibrate_module.__all__ == ["calibrate", "get_noise_multiplier"]

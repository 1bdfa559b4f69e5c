"""The accountant API contract (DESIGN.md section 2), run against both accountants."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import accountants
from accountants import (
    ACCOUNTANTS,
    ComposedEvent,
    EpsilonBounds,
    PRVAccountant,
    RDPAccountant,
    dpsgd_event,
    make_accountant,
    to_segments,
)
from accountants import accountant as accountant_module
from accountants.prv import prv_epsilon_bounds
from accountants.rdp import DEFAULT_ORDERS, compute_rdp, rdp_to_epsilon

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5


@pytest.fixture(params=["prv", "rdp"])
def kind(request) -> str:
    return request.param


def fresh(kind: str, *segments):
    acc = make_accountant(kind)
    for segment in segments:
        acc.step(*segment)
    return acc


# -- recording -------------------------------------------------------------------------------
def test_empty_accountant_spends_nothing(kind):
    acc = make_accountant(kind)
    assert len(acc) == 0
    assert acc.history == []
    assert acc.get_epsilon(DELTA) == 0.0
    assert acc.get_delta(1.0) == 0.0
    assert to_segments(acc.event) == ()


def test_step_defaults_to_one_step_and_merges_equal_consecutive_settings(kind):
    acc = make_accountant(kind)
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.step(1.0, 0.01, steps=9)
    assert acc.history == [(1.0, 0.01, 10)]
    acc.step(1.5, 0.01, 5)
    acc.step(1.0, 0.01, 2)  # not consecutive with the first entry: a new entry
    assert acc.history == [(1.0, 0.01, 10), (1.5, 0.01, 5), (1.0, 0.01, 2)]
    assert len(acc) == 17
    acc.step(1.0, 0.01, 0)  # zero steps record nothing
    assert acc.history == [(1.0, 0.01, 10), (1.5, 0.01, 5), (1.0, 0.01, 2)]


def test_step_returns_self_and_history_is_a_copy(kind):
    acc = make_accountant(kind)
    assert acc.step(1.0, 0.01, 3) is acc
    history = acc.history
    history.append((9.0, 0.5, 1))
    history[0] = (0.1, 0.1, 1)
    assert acc.history == [(1.0, 0.01, 3)]
    assert all(isinstance(v, t) for v, t in zip(acc.history[0], (float, float, int)))


def test_event_is_the_history(kind):
    acc = fresh(kind, (1.0, 0.01, 10), (1.5, 0.02, 5))
    event = acc.event
    assert isinstance(event, ComposedEvent)
    assert event == ComposedEvent((dpsgd_event(1.0, 0.01, 10), dpsgd_event(1.5, 0.02, 5)))
    assert [(s.noise_multiplier, s.sample_rate, s.steps) for s in to_segments(event)] == acc.history


def test_rdp_accountant_is_the_rdp_functions():
    acc = fresh("rdp", (1.1, 0.01, 500), (2.0, 0.02, 100))
    expected = rdp_to_epsilon(DEFAULT_ORDERS, compute_rdp(acc.event, DEFAULT_ORDERS), DELTA)[0]
    assert acc.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-12)
    custom = RDPAccountant(orders=[2.0, 4.0, 8.0, 16.0, 32.0])
    custom.step(1.1, 0.01, 500)
    assert custom.orders == (2.0, 4.0, 8.0, 16.0, 32.0)
    assert custom.get_epsilon(DELTA) >= fresh("rdp", (1.1, 0.01, 500)).get_epsilon(DELTA)


def test_prv_accountant_reports_the_upper_bound():
    acc = fresh("prv", (1.1, 0.01, 500), (2.0, 0.02, 100))
    bounds = acc.get_epsilon_bounds(DELTA)
    assert isinstance(bounds, EpsilonBounds)
    assert 0 < bounds.lower <= bounds.estimate <= bounds.upper
    assert acc.get_epsilon(DELTA) == bounds.upper
    direct = prv_epsilon_bounds(acc.event, DELTA)
    assert bounds.upper == pytest.approx(direct.upper, rel=1e-12)
    assert bounds.upper - bounds.lower <= max(acc.relative_error * bounds.lower, acc.absolute_error) * 1.0001


def test_epsilon_grows_with_steps_and_delta_falls_with_epsilon(kind):
    acc = fresh(kind, (1.0, 0.01, 200))
    e1 = acc.get_epsilon(DELTA)
    acc.step(1.0, 0.01, 200)
    e2 = acc.get_epsilon(DELTA)
    assert 0 < e1 < e2 < math.inf
    assert acc.get_epsilon(1e-3) < e2
    d_small, d_large = acc.get_delta(0.5 * e2), acc.get_delta(2 * e2)
    assert 0 <= d_large < d_small <= 1


def test_get_delta_is_consistent_with_get_epsilon(kind):
    acc = fresh(kind, (1.0, 0.01, 300))
    eps = acc.get_epsilon(DELTA)
    # delta at a slightly larger epsilon is below the target delta; at a smaller one, above
    assert acc.get_delta(eps * 1.05) <= DELTA
    assert acc.get_delta(eps * 0.8) > DELTA


@pytest.mark.parametrize(
    "sigma, q, steps",
    [(1.1, 256 / 60000, 2000), (3.0, 4096 / 50000, 300), (0.7, 0.004, 1500), (2.0, 1.0, 5)],
)
def test_prv_upper_bound_is_below_rdp(sigma, q, steps):
    prv = fresh("prv", (sigma, q, steps)).get_epsilon(DELTA)
    rdp = fresh("rdp", (sigma, q, steps)).get_epsilon(DELTA)
    assert prv <= rdp


# -- zero noise ------------------------------------------------------------------------------
def test_zero_noise_multiplier_is_not_private(kind):
    acc = fresh(kind, (1.0, 0.01, 100), (0.0, 0.01, 3))
    assert acc.get_epsilon(DELTA) == math.inf
    leak = 1 - (1 - 0.01) ** 3
    private = fresh(kind, (1.0, 0.01, 100)).get_delta(1.0)
    assert acc.get_delta(1.0) == pytest.approx(min(1.0, leak + private), rel=1e-9)
    assert fresh(kind, (0.0, 1.0, 1)).get_delta(5.0) == 1.0
    if kind == "prv":
        assert acc.get_epsilon_bounds(DELTA) == EpsilonBounds(math.inf, math.inf, math.inf)


# -- cache -----------------------------------------------------------------------------------
def test_repeated_queries_are_cached_and_a_step_invalidates(monkeypatch, kind):
    name = "prv_epsilon_bounds" if kind == "prv" else "compute_rdp"
    calls = []
    original = getattr(accountant_module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(accountant_module, name, counting)
    acc = fresh(kind, (1.0, 0.01, 100))
    e1 = acc.get_epsilon(DELTA)
    assert acc.get_epsilon(DELTA) == e1
    assert len(calls) == 1
    acc.step(1.0, 0.01, 100)
    e2 = acc.get_epsilon(DELTA)
    assert len(calls) == 2 and e2 > e1
    acc.step(1.0, 0.01, 0)  # nothing recorded: still cached
    assert acc.get_epsilon(DELTA) == e2 and len(calls) == 2


# -- state -----------------------------------------------------------------------------------
def test_state_dict_is_json_and_round_trips(kind):
    acc = fresh(kind, (1.0, 0.01, 100), (1.5, 0.02, 50))
    state = json.loads(json.dumps(acc.state_dict()))
    assert state["mechanism"] == kind and state["version"] == 1
    assert state["history"] == [[1.0, 0.01, 100], [1.5, 0.02, 50]]
    restored = make_accountant(kind)
    restored.load_state_dict(state)
    assert restored.history == acc.history
    assert restored.get_epsilon(DELTA) == acc.get_epsilon(DELTA)


def test_resume_continues_epsilon_and_never_resets(kind):
    uninterrupted = fresh(kind, (1.0, 0.01, 200), (1.0, 0.01, 100))
    first = fresh(kind, (1.0, 0.01, 200))
    spent = first.get_epsilon(DELTA)
    resumed = make_accountant(kind)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.get_epsilon(DELTA) == spent
    resumed.step(1.0, 0.01, 100)
    assert resumed.history == uninterrupted.history == [(1.0, 0.01, 300)]
    assert resumed.get_epsilon(DELTA) == pytest.approx(uninterrupted.get_epsilon(DELTA), rel=1e-12)
    assert resumed.get_epsilon(DELTA) > spent


def test_load_invalidates_the_cache(kind):
    acc = fresh(kind, (1.0, 0.01, 50))
    small = acc.get_epsilon(DELTA)
    acc.load_state_dict(fresh(kind, (1.0, 0.01, 500)).state_dict())
    assert acc.get_epsilon(DELTA) > small


def test_settings_are_restored_from_a_state_of_the_same_kind():
    rdp = RDPAccountant(orders=[2.0, 8.0, 32.0])
    rdp.step(1.0, 0.01, 100)
    other = RDPAccountant()
    other.load_state_dict(rdp.state_dict())
    assert other.orders == (2.0, 8.0, 32.0)
    assert other.get_epsilon(DELTA) == rdp.get_epsilon(DELTA)
    prv = PRVAccountant(relative_error=0.01, absolute_error=1e-3)
    prv.step(1.0, 0.01, 100)
    other_prv = PRVAccountant()
    other_prv.load_state_dict(prv.state_dict())
    assert (other_prv.relative_error, other_prv.absolute_error) == (0.01, 1e-3)


def test_a_state_of_the_other_kind_is_refused_unless_converting():
    rdp = fresh("rdp", (1.0, 0.01, 100))
    prv = PRVAccountant()
    with pytest.raises(ValueError, match=r"'rdp'.*RDPAccountant\(\).*convert=True"):
        prv.load_state_dict(rdp.state_dict())
    assert prv.history == []
    prv.load_state_dict(rdp.state_dict(), convert=True)
    assert prv.history == rdp.history
    assert (prv.relative_error, prv.absolute_error) == (PRVAccountant().relative_error, PRVAccountant().absolute_error)
    assert prv.get_epsilon(DELTA) <= rdp.get_epsilon(DELTA)


def test_an_opacus_style_state_loads():
    acc = RDPAccountant()
    acc.load_state_dict({"history": [(1.0, 0.01, 10), (1.0, 0.01, 5)], "mechanism": "rdp"})
    assert acc.history == [(1.0, 0.01, 15)]


@pytest.mark.parametrize(
    "state, error, match",
    [
        ([1, 2], TypeError, "mapping"),
        ({"history": []}, ValueError, "missing 'mechanism'"),
        ({"mechanism": "prv"}, ValueError, "missing 'history'"),
        ({"mechanism": "gdp", "history": []}, ValueError, "mechanism 'gdp'"),
        ({"mechanism": "prv", "version": 99, "history": []}, ValueError, "version 99"),
        ({"mechanism": "prv", "history": "abc"}, TypeError, "history"),
        ({"mechanism": "prv", "history": [[1.0, 0.01]]}, ValueError, r"history\[0\]"),
        ({"mechanism": "prv", "history": [[-1.0, 0.01, 5]]}, ValueError, r"history\[0\].*noise_multiplier"),
        ({"mechanism": "prv", "history": [[1.0, 0.01, 5], [1.0, 2.0, 5]]}, ValueError, r"history\[1\].*sample_rate"),
        ({"mechanism": "prv", "history": [[1.0, 0.01, 2.5]]}, TypeError, r"history\[0\].*steps"),
        ({"mechanism": "prv", "history": [], "settings": {"relative_error": -1}}, ValueError, "relative_error"),
    ],
)
def test_invalid_states_are_refused_and_change_nothing(state, error, match):
    acc = fresh("prv", (1.0, 0.01, 7))
    with pytest.raises(error, match=match):
        acc.load_state_dict(state)
    assert acc.history == [(1.0, 0.01, 7)]


# -- input errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, error, match",
    [
        ((-0.5, 0.01, 1), ValueError, "noise_multiplier must be >= 0"),
        ((1.0, 0.0, 1), ValueError, r"sample_rate must be in \(0, 1\]"),
        ((1.0, 1.5, 1), ValueError, "sample_rate"),
        ((1.0, 0.01, -3), ValueError, "steps must be >= 0"),
        ((1.0, 0.01, 2.5), TypeError, "steps must be an integer"),
        ((float("nan"), 0.01, 1), ValueError, "noise_multiplier"),
        (("1.0", 0.01, 1), TypeError, "noise_multiplier"),
    ],
)
def test_invalid_steps_are_refused_and_change_nothing(kind, args, error, match):
    acc = fresh(kind, (1.0, 0.01, 7))
    with pytest.raises(error, match=match):
        acc.step(*args)
    assert acc.history == [(1.0, 0.01, 7)]


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, float("nan")])
def test_invalid_delta(kind, delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        fresh(kind, (1.0, 0.01, 7)).get_epsilon(delta)


@pytest.mark.parametrize("epsilon", [-1.0, float("inf"), float("nan")])
def test_invalid_epsilon(kind, epsilon):
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        fresh(kind, (1.0, 0.01, 7)).get_delta(epsilon)


def test_delta_type_error(kind):
    with pytest.raises(TypeError, match="delta must be a real number"):
        make_accountant(kind).get_epsilon("1e-5")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RDPAccountant(orders=[]), "orders"),
        (lambda: RDPAccountant(orders=[0.5, 2.0]), "order"),
        (lambda: PRVAccountant(relative_error=0.0), "relative_error"),
        (lambda: PRVAccountant(absolute_error=-1.0), "absolute_error"),
    ],
)
def test_invalid_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- registry --------------------------------------------------------------------------------
def test_make_accountant_and_registry():
    assert type(make_accountant("prv")) is PRVAccountant
    assert type(make_accountant("rdp", orders=[2.0, 3.0])) is RDPAccountant
    assert type(make_accountant()) is PRVAccountant
    assert dict(ACCOUNTANTS) == {"prv": PRVAccountant, "rdp": RDPAccountant}
    assert PRVAccountant.mechanism() == "prv" and RDPAccountant().mechanism() == "rdp"
    with pytest.raises(ValueError, match="unknown accountant 'gdp'; choose one of prv, rdp"):
        make_accountant("gdp")
    with pytest.raises(TypeError):
        ACCOUNTANTS["gdp"] = RDPAccountant  # read-only
    assert "steps=3" in repr(fresh("prv", (1.0, 0.1, 3)))


def test_public_names():
    for name in accountants.__all__:
        assert hasattr(accountants, name), name
    for name in ("RDPAccountant", "PRVAccountant", "get_noise_multiplier", "EpsilonBounds", "GaussianEvent",
                 "PoissonSampledEvent", "SelfComposedEvent", "ComposedEvent", "dpsgd_event"):
        assert name in accountants.__all__


def test_accountants_never_import_torch():
    code = (
        "import sys, accountants, accountants.accountant, accountants.calibrate; "
        "acc = accountants.PRVAccountant(); acc.step(1.0, 0.01, 100); acc.get_epsilon(1e-5); "
        "assert 'torch' not in sys.modules and 'dpclip' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_numpy_scalars_are_accepted(kind):
    acc = make_accountant(kind)
    acc.step(np.float64(1.0), np.float32(0.01), np.int64(100))
    assert acc.history == [(1.0, float(np.float32(0.01)), 100)]
    assert acc.get_epsilon(np.float64(DELTA)) > 0


def test_rdp_exact_fractional_orders_are_tighter_and_round_trip():
    loose = RDPAccountant().step(10.0, 0.1, 50)
    exact = RDPAccountant(fractional="exact").step(10.0, 0.1, 50)
    assert exact.get_epsilon(DELTA) <= loose.get_epsilon(DELTA)
    again = RDPAccountant()
    again.load_state_dict(exact.state_dict())
    assert again.fractional == "exact" and again.get_epsilon(DELTA) == exact.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="fractional"):
        RDPAccountant(fractional="fast")


def test_get_privacy_spent_is_opacus_compatible():
    """Opacus's examples print accountant.get_privacy_spent(delta=...): same call, same numbers."""
    from accountants import PRVAccountant, RDPAccountant

    rdp = RDPAccountant()
    assert rdp.get_privacy_spent(delta=1e-5) == (0.0, None)
    rdp.step(noise_multiplier=1.1, sample_rate=0.004, steps=2500)
    eps, order = rdp.get_privacy_spent(delta=1e-5)
    assert eps == rdp.get_epsilon(1e-5) and order in rdp.orders
    # Opacus's own RDP accountant on the same history (test-only dependency)
    opacus_rdp = pytest.importorskip("opacus.accountants").RDPAccountant()
    opacus_rdp.history = [(1.1, 0.004, 2500)]
    o_eps, o_alpha = opacus_rdp.get_privacy_spent(delta=1e-5)
    assert eps == pytest.approx(o_eps, rel=1e-9)
    # a custom order grid, as Opacus's alphas=
    eps_grid, best = rdp.get_privacy_spent(delta=1e-5, alphas=[2, 4, 8, 16, 32])
    assert best in (2, 4, 8, 16, 32) and eps_grid >= eps
    o_eps_grid, o_best = opacus_rdp.get_privacy_spent(delta=1e-5, alphas=[2, 4, 8, 16, 32])
    assert eps_grid == pytest.approx(o_eps_grid, rel=1e-9) and best == o_best
    prv = PRVAccountant()
    prv.step(noise_multiplier=1.1, sample_rate=0.004, steps=2500)
    assert prv.get_privacy_spent(delta=1e-5) == (prv.get_epsilon(1e-5), None)
